"""Child-process entry for bench.bench_media: run one ``sealmq`` CLI command, then record its peak RSS.

``python3 -m bench._media_proc OUT sealmq-args...`` runs ``app.cli.main(sealmq-args)`` and
writes this process's VmHWM (peak resident set, KiB, from /proc/self/status) to ``OUT`` as it
exits. The parent cannot use ``wait4``'s ``ru_maxrss`` for this: Linux carries the parent's own
high-water mark over into a forked child's ``ru_maxrss`` across exec, so a 300 MB parent makes a
13 MB child report 313 MB (measured). VmHWM belongs to the child's own address space.
"""

from __future__ import annotations

import sys
from pathlib import Path


def vmhwm_kib(pid: int | str = "self") -> int:
    """Peak resident set size of ``pid`` in KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc status")


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    from app.cli import main as sealmq_main

    try:
        code = sealmq_main(argv[1:])
    finally:
        out.write_text(f"{vmhwm_kib()}\n", encoding="ascii")
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
