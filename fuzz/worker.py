"""One target under atheris/libFuzzer, in its own process: ``python3 -m fuzz.worker NAME [libFuzzer args]``.

:mod:`fuzz.run` starts it. The project's packages are imported under ``atheris.instrument_imports``
so that libFuzzer sees their branch coverage; nothing of them may be imported before that. The
harness is built once, this process's real messages are written into the first corpus directory
(libFuzzer's working corpus), then libFuzzer runs. A non-project exception propagates out of the
harness: atheris prints it, saves the input as ``<artifact_prefix>crash-<sha1>`` and exits non-zero.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

INSTRUMENTED = ["sealmq", "pki", "broker", "backend", "device", "runtime", "fuzz"]


def main(argv: list[str]) -> int:
    import atheris

    name, libfuzzer_args = argv[0], argv[1:]
    with atheris.instrument_imports(include=INSTRUMENTED):
        from fuzz import targets, world
        from fuzz.oracle import inject_crash, run_one

    if os.environ.get("SEALMQ_FUZZ_INJECT"):  # the oracle's self-test (tests/test_fuzz_smoke.py)
        inject_crash(os.environ["SEALMQ_FUZZ_INJECT"])

    target = targets.TARGETS[name]
    harness = target.make()
    dirs = [a for a in libfuzzer_args if not a.startswith("-")]
    if dirs:
        work = Path(dirs[0])
        work.mkdir(parents=True, exist_ok=True)
        for seed in target.seeds():
            (work / ("seed-" + hashlib.sha1(seed).hexdigest())).write_bytes(seed)

    def test_one_input(data: bytes) -> None:
        run_one(harness, data)

    import atexit

    atexit.register(world.cleanup)
    atheris.Setup([sys.argv[0], *libfuzzer_args], test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
