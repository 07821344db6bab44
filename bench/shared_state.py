"""The cost of sharing state between backend workers (issue 14): per record, on loopback.

Measures, one operation at a time from one client (the latency a worker adds to each record):

- the replay gate: :meth:`SessionState.accept` in process (one worker) and in Redis (one Lua script,
  one round trip): the issue's target is <= 100 us p50 on loopback for the shared state per record;
- a sender-number reservation (``INCRBY``) and a sealed session snapshot write + read (AES-GCM);
- storing one record: SQLite (the embedded default, ``synchronous=NORMAL``) and PostgreSQL.

Redis and PostgreSQL are real servers started here on 127.0.0.1 (the test helpers' child processes;
PostgreSQL with fsync off like in the tests, so its row is the protocol and SQL cost, not the disk).
"""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from backend.session_state import MemorySessionState
from backend.state_seal import KEY_SIZE, StateSealer
from backend.storage import Storage
from bench.stats import percentile, table


def _lat(op: Callable[[int], object], n: int, warmup: int = 50) -> tuple[float, float, float]:
    for i in range(warmup):
        op(-1 - i)
    samples = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        op(i)
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return percentile(samples, 50), percentile(samples, 90), percentile(samples, 99)


def run(quick: bool = False) -> str:
    from backend.session_state_redis import RedisSessionState
    from tests.postgres import BINDIR, HAVE_PSYCOPG, postgres_server
    from tests.redis_server import HAVE_REDIS_PY, REDIS_SERVER, redis_server

    n = 200 if quick else 20_000
    rows: list[list[object]] = []

    def row(what: str, lat: tuple[float, float, float]) -> None:
        rows.append([what, f"{lat[0]:.1f}", f"{lat[1]:.1f}", f"{lat[2]:.1f}"])

    mem = MemorySessionState()
    row("replay gate, in process (1 worker)", _lat(lambda i: mem.accept("dev", "s:0", i + 100), n))
    snapshot = secrets.token_bytes(400)  # about a session's keys, epochs and windows
    if REDIS_SERVER and HAVE_REDIS_PY:
        with redis_server() as server:
            st = RedisSessionState(server.url, StateSealer(secrets.token_bytes(KEY_SIZE)))
            row("replay gate, Redis Lua script", _lat(lambda i: st.accept("dev", "s:0", i + 100), n))
            row("sender number, Redis INCRBY", _lat(lambda i: st.reserve_seq("dev", "o:0"), n))

            def put_get(_: int) -> bytes | None:
                st.put("session", "dev", snapshot)
                return st.get("session", "dev")

            row("session snapshot put+get, Redis, AES-GCM", _lat(put_get, n // 4))
            st.close()
    else:
        rows.append(["Redis: not installed", "-", "-", "-"])
    with tempfile.TemporaryDirectory() as tmp:
        lite = Storage(Path(tmp) / "b.sqlite3")
        payload = secrets.token_bytes(64)
        row("store one record, SQLite", _lat(lambda i: lite.store_message("dev", 1.0, "telemetry", 0, i, payload),
                                              n // 4))
        lite.close()
    if BINDIR is not None and HAVE_PSYCOPG:
        from backend.storage_pg import PostgresStorage

        with postgres_server() as pg:
            store = PostgresStorage(pg.new_database())
            row("store one record, PostgreSQL", _lat(lambda i: store.store_message("dev", 1.0, "telemetry", 0, i,
                                                                                    payload), n // 4))
            store.close()
    else:
        rows.append(["PostgreSQL: not installed", "-", "-", "-"])
    return ("## Shared state per record (issue 14)\n\n"
            + table(["operation (one client, loopback)", "p50 us", "p90 us", "p99 us"], rows) + "\n")


if __name__ == "__main__":
    print(run())
