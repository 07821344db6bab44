"""Two backend workers' ingests on one database (issue 14, docs/scaling.md "What remains" item 3).

The broker's shared subscription spreads one device's records over workers, and a device re-sends
what no ACK covered, so the same message id can reach both. Two real :class:`backend.ingest.Ingest`
instances, each with its own store connection (SQLite: two connections to one file; PostgreSQL: a
real server), are fed overlapping records of the same devices from two threads and flush at the
same moment, round after round. Every message must be stored exactly once, every command replied
once, and every ACK a worker sends must cover what it was given, whichever worker committed it.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backend.ingest import Ingest
from backend.store import BackendStore, open_store
from runtime.audit import AuditLog
from sealmq import cbor
from sealmq.bodies import Ack, Reply, Telemetry
from sealmq.endpoint import Received
from sealmq.topics import RecordKind
from tests.postgres import PostgresProcess, needs_postgres, postgres

__all__ = ["postgres"]  # the session fixture, imported for pytest


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs_postgres)])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "backend.sqlite3")
    server: PostgresProcess = request.getfixturevalue("postgres")
    return server.new_database()


def _read_audit(path: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Worker:
    """One backend worker's ingest: its own store connection, lock, audit log and sent ACKs."""

    def __init__(self, location: str, tmp_path: Path, n: int) -> None:
        self.store: BackendStore = open_store(location, tmp_path)
        self.audit_path = tmp_path / f"audit-{n}.jsonl"
        self.audit = AuditLog(self.audit_path, component="backend")
        self.acks: list[tuple[str, Ack]] = []
        self.ingest = Ingest(self.store, self.audit, threading.RLock(),
                             lambda device, ack, now: self.acks.append((device, ack)))
        self.broker_acks = 0

    def broker_ack(self) -> Callable[[], None]:
        def ack() -> None:
            self.broker_acks += 1
        return ack

    def close(self) -> None:
        self.audit.close()
        self.store.close()


def _telemetry(device: str, msg_id: int) -> Received:
    return Received(device, RecordKind.TELEMETRY, Telemetry(1.7e9, {"n": msg_id}, msg_id).encode(), 0, msg_id)


def _reply(device: str, command_id: int, msg_id: int) -> Received:
    return Received(device, RecordKind.REPLY, Reply(command_id, True, None, msg_id).encode(), 0, msg_id)


def test_two_ingests_on_one_database_store_each_message_once(location: str, tmp_path: Path) -> None:
    rng = random.Random(11)
    workers = [Worker(location, tmp_path, 0), Worker(location, tmp_path, 1)]
    devices = ["cam-1", "cam-2"]
    rounds, per_round = 30, 50  # one round's ids lie within one window (MESSAGE_WINDOW = 256)
    sent = {d: set[int]() for d in devices}
    commands: list[int] = []
    plans: list[list[list[Received]]] = [[], []]
    for r in range(rounds):
        ids = range(r * per_round + 1, (r + 1) * per_round)
        cmd = workers[0].store.queue_command("cam-1", "c", cbor.dumps(None), float(r))
        commands.append(cmd)
        for w in (0, 1):
            # id i always reaches worker i % 2 and often the other one too; old ids come again
            records = [_telemetry(d, i) for d in devices for i in ids if w == i % 2 or rng.random() < 0.5]
            records += [_telemetry(d, i) for d in devices for i in rng.sample(sorted(sent[d]), min(len(sent[d]), 4))]
            records.append(_reply("cam-1", cmd, (r + 1) * per_round))  # one reply, delivered to both
            rng.shuffle(records)
            plans[w].append(records)
        for d in devices:
            sent[d] |= set(ids)
    given = [[0, 0], [0, 0]]  # per worker: telemetry, replies
    uncovered: list[tuple[int, str, int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2, timeout=60)

    def work(w: int) -> None:
        worker = workers[w]
        try:
            for records in plans[w]:
                for rec in records:
                    worker.ingest.add(rec, 1.0, worker.broker_ack())
                    given[w][rec.kind is RecordKind.REPLY] += 1
                barrier.wait()  # both commit their batch at the same moment
                first_ack = len(worker.acks)
                worker.ingest.flush()
                acks = dict(worker.acks[first_ack:])
                # every ACK sent after the commit covers every id the worker was given in it
                uncovered.extend((w, rec.device_id, rec.seq) for rec in records
                                 if not acks[rec.device_id].covers(rec.seq))
        except BaseException as e:  # asserted below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    try:
        assert errors == [] and not any(t.is_alive() for t in threads)
        assert uncovered == []
        counters = [w.ingest.counters for w in workers]
        unique = sum(len(ids) for ids in sent.values())
        assert counters[0].stored + counters[1].stored == unique
        assert counters[0].replies + counters[1].replies == rounds
        assert sum(c.duplicates for c in counters) == sum(map(sum, given)) - unique - rounds
        assert [w.broker_acks for w in workers] == [sum(g) for g in given]  # every PUBLISH acknowledged
        for d in devices:
            rows = workers[0].store.messages(d, limit=100_000)
            assert sorted(m.msg_id or 0 for m in rows) == sorted(sent[d])  # each once
        assert {c.state for c in workers[1].store.commands()} == {"replied"}
        for worker in workers:
            worker.audit.close()
        replied = [e["id"] for worker in workers for e in _read_audit(worker.audit_path)
                   if e["event"] == "command_replied"]
        assert sorted(replied) == commands  # audited once, by the worker that stored the reply
        # a new session on either worker is acknowledged with everything any worker committed
        for worker in workers:
            worker.acks.clear()
            worker.ingest.acknowledge("cam-2", 2.0)
            assert worker.acks[0][0] == "cam-2" and all(worker.acks[0][1].covers(i) for i in sent["cam-2"])
    finally:
        for worker in workers:
            worker.close()
