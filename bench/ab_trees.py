"""Per-record CPU of two checkouts of the project, interleaved (issue #11): did a change help?

On this host the CPU speed drifts by 30 % or more within minutes, so two runs of
``python3 -m bench.records`` one after the other cannot resolve a 10 % change. This runs one
worker process per tree (``PYTHONPATH`` pointing at it), each with its own device and backend
endpoints after a real in-memory EDHOC handshake, and has them take turns: a batch in one, then
a batch in the other, the order alternating, for ``--rounds`` rounds. Both see the same drift; the
figure that counts is the median over rounds of new / old, round by round.

Measured per batch (CPU microseconds per record, ``time.thread_time``):

* ``DeviceEndpoint.seal`` and ``BackendEndpoint.handle`` (what the device agent and the backend
  service call per message);
* ``Session.seal`` and ``Session.open`` alone.

Run: ``python3 -m bench.ab_trees OLD_TREE NEW_TREE [--size 256] [--rounds 40]``, for example
with ``git worktree add --detach /tmp/old <commit>`` as the old tree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LABELS = ("DeviceEndpoint.seal", "BackendEndpoint.handle", "Session.seal", "Session.open")
BATCH = 2000


def worker(size: int) -> None:
    """One tree's side: wait for a line on stdin, run a batch, print the four figures."""
    from bench.records import endpoint_pair
    from sealmq.endpoint import Publish
    from sealmq.topics import RecordKind

    with tempfile.TemporaryDirectory(prefix="sealmq-ab-") as tmp:
        device, backend = endpoint_pair(Path(tmp) / "pki")
        plaintext = os.urandom(size)
        dev_session = device.session
        be_session = backend.sessions[device.device_id].session
        if dev_session is None:
            raise RuntimeError("no session after the handshake")
        print("ready", flush=True)
        for _ in sys.stdin:
            now = time.time()
            t0 = time.thread_time()
            pubs = [o for _ in range(BATCH) for o in device.seal(RecordKind.TELEMETRY, plaintext, now)
                    if isinstance(o, Publish)]
            t1 = time.thread_time()
            for p in pubs:
                backend.handle(p.topic, p.payload, now, os.urandom)
            t2 = time.thread_time()
            records = [dev_session.seal(RecordKind.TELEMETRY, plaintext, now) for _ in range(BATCH)]
            t3 = time.thread_time()
            for topic, data in records:
                be_session.open(topic, data, now)
            t4 = time.thread_time()
            print(" ".join(f"{(b - a) / BATCH * 1e6:.4f}" for a, b in ((t0, t1), (t1, t2), (t2, t3), (t3, t4))),
                  flush=True)


def run(old: Path, new: Path, size: int = 256, rounds: int = 40) -> str:
    trees = {"old": old.resolve(), "new": new.resolve()}
    procs = {}
    for name, path in trees.items():
        env = {**os.environ, "PYTHONPATH": str(path)}
        # this file runs as the worker in both (an old tree may not have it); everything it
        # imports (sealmq, bench.records) comes from the tree on PYTHONPATH
        procs[name] = subprocess.Popen([sys.executable, __file__, "--worker", "--size", str(size)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                       cwd=tempfile.gettempdir())
    results: dict[str, list[list[float]]] = {name: [] for name in trees}
    try:
        for name, p in procs.items():
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the {name} tree's worker did not start")
        for r in range(rounds):
            for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                p = procs[name]
                assert p.stdin is not None
                assert p.stdout is not None
                p.stdin.write("go\n")
                p.stdin.flush()
                results[name].append([float(x) for x in p.stdout.readline().split()])
    finally:
        for p in procs.values():
            if p.stdin is not None:
                p.stdin.close()
            p.wait(30)
    lines = [f"### Per record, {size} B, old `{trees['old']}` vs new `{trees['new']}`: {rounds} rounds "
             f"of {BATCH} records, interleaved\n",
             "| operation | old (us, median) | new (us, median) | new / old (median over rounds) |",
             "|---|---:|---:|---:|"]
    for i, label in enumerate(LABELS):
        o = statistics.median(v[i] for v in results["old"])
        n = statistics.median(v[i] for v in results["new"])
        ratio = statistics.median(b[i] / a[i] for a, b in zip(results["old"], results["new"], strict=True))
        lines.append(f"| {label} | {o:.2f} | {n:.2f} | {ratio:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="per-record CPU of two project trees, interleaved")
    ap.add_argument("old", nargs="?", type=Path)
    ap.add_argument("new", nargs="?", type=Path)
    ap.add_argument("--size", type=int, default=256, help="plaintext bytes per record")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.size)
        return
    if args.old is None or args.new is None:
        ap.error("give the old and the new tree")
    print(run(args.old, args.new, args.size, args.rounds))


if __name__ == "__main__":
    main()
