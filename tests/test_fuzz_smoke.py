"""Smoke run of the fuzz harnesses (``fuzz/``, docs/fuzzing.md): every target over its committed corpus
plus a few thousand mutated inputs, in this process with the plain mutator (so CI without atheris
still exercises every harness), then one short atheris run through ``python3 -m fuzz`` when atheris
is installed. And the oracle itself: a planted non-project exception, and a session that stopped
working, must both be reported as crashes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from fuzz import run, targets, world
from fuzz.oracle import INJECT_MARKER, InvariantViolated, inject_crash, is_crash, run_one
from sealmq import record
from sealmq.errors import DecodeError, DecryptError
from sealmq.topics import Channel

REPO = Path(__file__).resolve().parent.parent
HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None


@pytest.fixture(scope="module", autouse=True)
def _world_cleanup() -> object:
    yield None
    world.cleanup()


def test_every_target_has_a_small_corpus() -> None:
    total = 0
    for name in targets.TARGETS:
        files = run.corpus_files(name)
        assert files, f"fuzz/corpus/{name} is empty"
        total += sum(p.stat().st_size for p in files)
    assert total < 4 * 1024 * 1024


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_target_survives_corpus_and_mutations(name: str) -> None:
    result = run.plain(name, seconds=1.5, mutations=3000, seed=1)
    assert not result.crashes, "\n".join(result.crashes)
    assert result.inputs >= len(run.corpus_files(name))


def test_oracle_reports_a_planted_exception_as_a_crash() -> None:
    harness = targets.TARGETS["record"].make()
    assert isinstance(run_one(harness, b"\x85"), DecodeError)  # a rejection is not a crash
    undo = inject_crash("sealmq.record:decode")
    try:
        with pytest.raises(KeyError):
            run_one(harness, b"\x85" + INJECT_MARKER)
        assert is_crash(KeyError("x")) and not is_crash(DecodeError())
        # through the whole backend endpoint (the session decodes the record): still a crash
        backend = targets.TARGETS["backend_endpoint"].make()
        with pytest.raises(KeyError):
            run_one(backend, bytes([list(Channel).index(Channel.DATA)]) + b"\x85" + INJECT_MARKER)
    finally:
        undo()


def test_liveness_oracle_notices_a_session_that_stopped_opening(monkeypatch: pytest.MonkeyPatch) -> None:
    harness = targets.EndpointHarness("backend")
    harness._live()  # healthy

    def broken(*args: object, **kwargs: object) -> bytes:
        raise DecryptError()

    monkeypatch.setattr("sealmq.record.open_", broken)
    monkeypatch.setattr("sealmq.record.EpochCodec.open", broken)  # the sessions' fast path
    monkeypatch.setattr("sealmq.session.Session._open_hot", broken)  # and their receive hot path
    real = record.speedups
    if real is not None:  # and its compiled form: every record fails its tag there

        class BrokenFraming:
            seal = staticmethod(real.seal)

            @staticmethod
            def open_hot(*args: object) -> None:
                raise InvalidTag

            @staticmethod
            def open_known(*args: object) -> None:  # the backend endpoint's compiled path
                raise InvalidTag

        monkeypatch.setattr(record, "speedups", BrokenFraming())
    with pytest.raises(InvariantViolated):
        harness._live()


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris not installed (pip install -e '.[fuzz]')")
def test_atheris_run_and_crash_report(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "fuzz", "--target", "record,hs_framing", "--runs", "2000",
                         "--jobs", "2", "--artifacts", str(tmp_path / "a")], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "record" in ok.stdout and "hs_framing" in ok.stdout
    # a planted bug reached by a corpus input: libFuzzer saves it, the runner reports it, exit 1
    work = tmp_path / "w"
    (work / "work" / "record").mkdir(parents=True)
    (work / "work" / "record" / "planted").write_bytes(b"\x85" + INJECT_MARKER)
    bad = subprocess.run([sys.executable, "-m", "fuzz", "--target", "record", "--runs", "500", "--max-crashes", "1",
                          "--workdir", str(work), "--artifacts", str(tmp_path / "b")], cwd=REPO,
                         env={**env, "SEALMQ_FUZZ_INJECT": "sealmq.record:decode"},
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "KeyError" in bad.stdout
    assert list((tmp_path / "b" / "record").glob("crash-*"))
