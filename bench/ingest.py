"""The backend's batched ingest without a broker: ``Ingest.add`` + ``Ingest.flush`` straight into a store.

What the storage layer costs per record, apart from the network and the crypto (``bench/broker.py``
measures the whole path):

- SQLite, one worker (the default; ``synchronous=FULL`` as the service opens it): batches of 256
  records of one device, and of 16 devices interleaved;
- PostgreSQL (a real server on 127.0.0.1, fsync off as in the tests): one worker, and two workers
  (two ``Ingest`` + two connections) committing overlapping batches of the same device at once, the
  way a shared subscription spreads one device's messages and repeats over workers (docs/scaling.md).

Each round is 256 new message ids (one device's window); with two workers each gets a random 60 %
of the round, so about a fifth of the records reach both. Columns: records/s = records added / wall
time (repeats included); CPU us per record = this process's CPU time (both workers' threads) per
record added, which a busy machine disturbs less than the wall time; "rows stored twice" = rows
beyond one per (device, message id), which must be 0. Run alone: ``python3 -m bench.ingest [--quick]``.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from pathlib import Path

from backend.ingest import Ingest
from backend.storage import Storage
from backend.store import BackendStore
from bench.stats import fmt, median, percentile, table
from runtime.audit import AuditLog
from sealmq.bodies import Telemetry
from sealmq.endpoint import Received
from sealmq.topics import RecordKind

WINDOW = 256
PAYLOAD = {"p": bytes(200)}


def _records(device: str, first: int, count: int) -> list[Received]:
    return [Received(device, RecordKind.TELEMETRY, Telemetry(1.7e9, PAYLOAD, msg_id).encode(), 0, msg_id)
            for msg_id in range(first, first + count)]


def _ingest(store: BackendStore, audit: AuditLog) -> Ingest:
    return Ingest(store, audit, threading.RLock(), lambda device, ack, now: None)


def _feed(ingest: Ingest, records: list[Received], flush_ms: list[float]) -> None:
    for rec in records:
        ingest.add(rec, 1.0, None)
    t0 = time.perf_counter()
    ingest.flush()
    flush_ms.append((time.perf_counter() - t0) * 1e3)


def one_worker(store: BackendStore, audit: AuditLog, rounds: int,
               devices: int) -> tuple[float, list[float], float]:
    """records/s, per-batch commit times and CPU us per record; one Ingest, ``devices`` devices interleaved."""
    ingest = _ingest(store, audit)
    per = WINDOW // devices
    batches = [[rec for d in range(devices) for rec in _records(f"dev-{d}", 1 + r * per, per)]
               for r in range(rounds)]
    flush_ms: list[float] = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    for batch in batches:
        _feed(ingest, batch, flush_ms)
    n = sum(map(len, batches))
    return n / (time.perf_counter() - t0), flush_ms, (time.process_time() - cpu0) / n * 1e6


def two_workers(stores: tuple[BackendStore, BackendStore], audit: AuditLog, rounds: int,
                seed: int = 7) -> tuple[float, list[float], float]:
    """Two Ingests, one device, overlapping batches at once: records/s, commit times, CPU us per record."""
    rng = random.Random(seed)
    ingests = [_ingest(s, audit) for s in stores]
    plan: list[tuple[list[Received], list[Received]]] = []
    for r in range(rounds):
        recs = _records("dev-0", 1 + r * WINDOW, WINDOW)
        to_a = [rng.random() < 0.6 for _ in recs]
        to_b = [not in_a or rng.random() < 0.6 for in_a in to_a]
        plan.append(([r for r, x in zip(recs, to_a, strict=True) if x],
                     [r for r, x in zip(recs, to_b, strict=True) if x]))
    barrier = threading.Barrier(2)
    flush_ms: list[float] = []

    def run(w: int) -> None:
        for pair in plan:
            barrier.wait()
            _feed(ingests[w], pair[w], flush_ms)

    threads = [threading.Thread(target=run, args=(w,)) for w in (0, 1)]
    t0, cpu0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    added = sum(len(a) + len(b) for a, b in plan)
    return added / (time.perf_counter() - t0), flush_ms, (time.process_time() - cpu0) / added * 1e6


def _twice(store: BackendStore) -> int:
    rows = store.messages(limit=10**7)
    return len(rows) - len({(m.device_id, m.msg_id) for m in rows})


def run(*, quick: bool = False, repeats: int = 5) -> str:
    from tests.postgres import BINDIR, HAVE_PSYCOPG, postgres_server

    rounds = 4 if quick else 80
    reps = 1 if quick else repeats
    results: dict[str, list[tuple[float, list[float], float, int]]] = {}

    def add(case: str, measured: tuple[float, list[float], float], twice: int) -> None:
        results.setdefault(case, []).append((*measured, twice))

    with tempfile.TemporaryDirectory(prefix="sealmq-bench-ingest-") as tmp:
        audit = AuditLog(Path(tmp) / "audit.jsonl", component="backend")
        for rep in range(reps):
            for devices in (1, 16):
                store = Storage(Path(tmp) / f"b-{rep}-{devices}.sqlite3", durable=True)
                add(f"SQLite, 1 worker, {devices} device(s)", one_worker(store, audit, rounds, devices),
                    _twice(store))
                store.close()
        if BINDIR is not None and HAVE_PSYCOPG:
            from backend.storage_pg import PostgresStorage

            with postgres_server() as pg:
                for _ in range(reps):
                    one = PostgresStorage(pg.new_database())
                    add("PostgreSQL, 1 worker, 1 device", one_worker(one, audit, rounds, 1), _twice(one))
                    one.close()
                    url = pg.new_database()
                    pair = (PostgresStorage(url), PostgresStorage(url))
                    add("PostgreSQL, 2 workers, 1 device, overlapping", two_workers(pair, audit, rounds),
                        _twice(pair[0]))
                    for s in pair:
                        s.close()
        audit.close()
    rows = []
    for case, runs in results.items():
        every_flush = [ms for _, flush_ms, _, _ in runs for ms in flush_ms]
        rows.append([case, fmt(median([r[0] for r in runs])), " / ".join(fmt(r[0]) for r in runs),
                     fmt(median([r[2] for r in runs])), fmt(percentile(every_flush, 50), 2),
                     fmt(percentile(every_flush, 90), 2), sum(r[3] for r in runs)])
    return (f"## Batched ingest into the store ({rounds} rounds of {WINDOW} records, median of {reps} runs)\n\n"
            + table(["case", "records/s (median)", "each run", "CPU us per record (median)", "commit p50 ms",
                     "commit p90 ms", "rows stored twice"], rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="sealmq ingest (store) benchmark")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    print(run(quick=args.quick, repeats=args.repeats))


if __name__ == "__main__":
    main()
