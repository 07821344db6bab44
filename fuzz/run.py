"""``python3 -m fuzz``: run the fuzz targets and print what they did.

    python3 -m fuzz --target all --runs 1000000 --jobs 2      # the campaign (atheris/libFuzzer)
    python3 -m fuzz --target cbor --runs 20000                # one target
    python3 -m fuzz --target all --plain --max-time 2         # without atheris: corpus + plain mutations
    python3 -m fuzz --target all --merge                      # minimise new inputs into fuzz/corpus/
    python3 -m fuzz --list

Each target runs in its own process (:mod:`fuzz.worker`), ``--jobs`` of them at a time. libFuzzer's
working corpus is a temporary directory seeded with this process's real messages; ``fuzz/corpus/<target>``
is read as a second corpus and only changes with ``--merge`` (libFuzzer ``-merge=1``: only inputs that
add coverage, then capped in count and size). A crash (a non-project exception, or a harness invariant
such as "the legitimate session still opens a fresh record") is saved under ``--artifacts`` and the
target is restarted for its remaining runs, up to ``--max-crashes`` times. Exit status 1 if any target
crashed.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "fuzz" / "corpus"
MAX_LEN = 4096
CORPUS_MAX_FILES = 64  # per target, after a merge
CORPUS_MAX_BYTES = 256 * 1024  # per target


@dataclass
class Result:
    name: str
    inputs: int = 0
    seconds: float = 0.0
    coverage: int = 0
    features: int = 0
    corpus: int = 0
    fuzz_rate: int = 0  # libFuzzer's own average exec/s (without start-up)
    crashes: list[str] = field(default_factory=list)  # artifact paths or descriptions

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


def corpus_files(name: str) -> list[Path]:
    d = CORPUS / name
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


# --- without atheris: the corpus, then plain mutations ------------------------------------------------
def plain(name: str, *, seconds: float, mutations: int, seed: int = 0) -> Result:
    """Run one harness in this process over its corpus and ``mutations`` mutated inputs (or until
    ``seconds``). Crashes are collected (input and traceback), not raised."""
    from fuzz import targets
    from fuzz.mutate import mutate
    from fuzz.oracle import run_one

    target = targets.TARGETS[name]
    harness = target.make()
    inputs = [p.read_bytes() for p in corpus_files(name)] + target.seeds()
    result = Result(name, corpus=len(inputs))
    rng = random.Random(seed)
    start = time.perf_counter()

    def feed(data: bytes) -> None:
        try:
            run_one(harness, data)
        except Exception as exc:
            result.crashes.append(f"{type(exc).__name__}: {exc} (input {data[:64].hex()})\n"
                                  + "".join(traceback.format_exception(exc)[-3:]))
        result.inputs += 1

    for data in inputs:
        feed(data)
    pool = inputs or [b""]
    for _ in range(mutations):
        if time.perf_counter() - start > seconds:
            break
        feed(mutate(rng.choice(pool), rng, pool, MAX_LEN))
    result.seconds = time.perf_counter() - start
    return result


# --- with atheris: one libFuzzer process per target ----------------------------------------------------
def launcher(tmp: Path) -> Path:
    """An executable that starts the worker: libFuzzer re-executes its own argv[0] for ``-merge``.

    Written once per work folder (``main`` does so before its threads start): a thread rewriting
    it while another starts it made exec fail with ETXTBSY ("Text file busy"). Written to a
    temporary name and renamed, so a started worker never sees a file still open for writing.
    """
    path = tmp / "sealmq-fuzz-worker"
    text = (f"#!{sys.executable}\nimport os, sys\nsys.path.insert(0, {str(REPO)!r})\n"
            "from fuzz.worker import main\n"
            "raise SystemExit(main([os.environ['SEALMQ_FUZZ_TARGET'], *sys.argv[1:]]))\n")
    if path.is_file() and path.read_text() == text and os.access(path, os.X_OK):
        return path
    part = tmp / f".sealmq-fuzz-worker.{os.getpid()}.{threading.get_ident()}"
    part.write_text(text)
    part.chmod(part.stat().st_mode | stat.S_IXUSR)
    os.replace(part, path)
    return path


_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)
_PROGRESS = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)")
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")


def parse_log(text: str, result: Result) -> None:
    stats = dict(_STAT.findall(text))
    progress = _PROGRESS.findall(text)
    if progress:
        cov, ft, corp = progress[-1]
        result.coverage, result.features, result.corpus = int(cov), int(ft), int(corp)
    if "average_exec_per_sec" in stats:
        result.fuzz_rate = int(stats["average_exec_per_sec"])
    if "number_of_executed_units" in stats:
        result.inputs += int(stats["number_of_executed_units"])
    else:
        done = _DONE.findall(text)
        if done:
            result.inputs += int(done[-1][0])


def atheris_run(name: str, *, runs: int, max_time: float, artifacts: Path, tmp: Path, max_crashes: int,
                log_dir: Path | None) -> Result:
    result = Result(name)
    work = tmp / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    art = artifacts / name
    art.mkdir(parents=True, exist_ok=True)
    exe = launcher(tmp)
    env = {**os.environ, "SEALMQ_FUZZ_TARGET": name, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    attempt = 0
    while result.inputs < runs:
        left_time = max_time - (time.perf_counter() - start) if max_time else 0
        if max_time and left_time < 1:
            break
        cmd = [str(exe), f"-runs={runs - result.inputs}", f"-max_len={MAX_LEN}", "-timeout=20",
               "-rss_limit_mb=3072", "-print_final_stats=1", f"-artifact_prefix={art}/", str(work)]
        if max_time:
            cmd.insert(1, f"-max_total_time={int(left_time)}")
        if (CORPUS / name).is_dir():
            cmd.append(str(CORPUS / name))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace", check=False)
        log = proc.stdout + proc.stderr
        if log_dir is not None:
            (log_dir / f"{name}.{attempt}.log").write_text(log)
        before = result.inputs
        parse_log(log, result)
        if proc.returncode == 0:
            break
        crash_files = sorted(p for p in art.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
        exc = re.findall(r"^(\w+(?:Error|Exception|Violated)\b.*)$", log, re.M)
        result.crashes.append(f"{exc[-1] if exc else 'exit ' + str(proc.returncode)}"
                              f" -> {crash_files[-1] if crash_files else '(no artifact)'}")
        attempt += 1
        if attempt >= max_crashes or (result.inputs == before and attempt > 1):
            break
        result.inputs += 1  # the crashing input itself
    result.seconds = time.perf_counter() - start
    return result


def merge(name: str, *, tmp: Path) -> tuple[int, int]:
    """Fold libFuzzer's working corpus into ``fuzz/corpus/<name>``: ``-merge=1`` keeps only inputs that add
    coverage; then the corpus is capped (smallest files first). Returns (files, bytes)."""
    dest = CORPUS / name
    dest.mkdir(parents=True, exist_ok=True)
    work = tmp / "work" / name
    if work.is_dir() and any(work.iterdir()):
        merged = tmp / "merged" / name
        merged.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "SEALMQ_FUZZ_TARGET": name, "PYTHONPATH": str(REPO)}
        subprocess.run([str(launcher(tmp)), "-merge=1", f"-max_len={MAX_LEN}", str(merged), str(dest), str(work)],
                       env=env, capture_output=True, check=False)
        for p in merged.iterdir():
            if not (dest / p.name).exists():
                shutil.copy(p, dest / p.name)
    files = sorted(dest.iterdir(), key=lambda p: (p.stat().st_size, p.name))
    keep: list[Path] = []
    total = 0
    for p in files:
        size = p.stat().st_size
        if p.name.startswith(("seed-", "regression-")) or (len(keep) < CORPUS_MAX_FILES
                                                          and total + size <= CORPUS_MAX_BYTES):
            keep.append(p)
            total += size
        else:
            p.unlink()
    return len(keep), total


def table(results: list[Result]) -> str:
    head = (f"{'target':<18} {'inputs':>10} {'seconds':>8} {'exec/s':>8} {'lf exec/s':>9} {'cov':>6} {'ft':>6} "
            f"{'corpus':>6} crashes")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.name:<18} {r.inputs:>10,} {r.seconds:>8.1f} {r.rate:>8,.0f} {r.fuzz_rate:>9,} "
                     f"{r.coverage:>6} {r.features:>6} {r.corpus:>6} {len(r.crashes)}")
    total_in = sum(r.inputs for r in results)
    lines.append(f"{'total':<18} {total_in:>10,} {sum(r.seconds for r in results):>8.1f}")
    for r in results:
        lines.extend(f"  CRASH {r.name}: {c}" for c in r.crashes)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fuzz.targets import TARGETS

    parser = argparse.ArgumentParser(prog="python3 -m fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="all", help="a target name, a comma-separated list, or all")
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per target (default 1,000,000)")
    parser.add_argument("--jobs", type=int, default=1, help="targets run in parallel (default 1)")
    parser.add_argument("--max-time", type=float, default=0, help="seconds per target (0: no limit)")
    parser.add_argument("--max-crashes", type=int, default=3, help="restarts of a target after a crash")
    parser.add_argument("--plain", action="store_true", help="no atheris: corpus + plain mutations in-process")
    parser.add_argument("--merge", action="store_true", help="after running, minimise new inputs into fuzz/corpus")
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"), help="where crashes are saved")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep libFuzzer's working corpora here (default: a temporary directory)")
    parser.add_argument("--logs", type=Path, default=None, help="keep libFuzzer's output per target here")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    args = parser.parse_args(argv)
    if args.list:
        for t in TARGETS.values():
            print(f"{t.name:<18} {t.about}")
        return 0
    names = list(TARGETS) if args.target == "all" else args.target.split(",")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; see --list")
    if not args.plain:
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris is not installed (pip install -e '.[fuzz]'); use --plain", file=sys.stderr)
            return 2
    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)
    tmp = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="sealmq-fuzz-"))
    tmp.mkdir(parents=True, exist_ok=True)
    if not args.plain:
        launcher(tmp)  # before the threads: see launcher()
    try:
        def one(name: str) -> Result:
            if args.plain:
                return plain(name, seconds=args.max_time or float("inf"), mutations=args.runs)
            r = atheris_run(name, runs=args.runs, max_time=args.max_time, artifacts=args.artifacts.resolve(),
                            tmp=tmp, max_crashes=args.max_crashes, log_dir=args.logs)
            print(f"done {name}: {r.inputs:,} inputs in {r.seconds:.0f} s, {len(r.crashes)} crash(es)", flush=True)
            return r

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(one, names))
        print(table(results))
        if args.merge and not args.plain:
            for name in names:
                files, size = merge(name, tmp=tmp)
                print(f"corpus {name}: {files} files, {size:,} bytes")
    finally:
        if args.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any(r.crashes for r in results) else 0
