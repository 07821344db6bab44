"""Zero loss end to end (issue 12) with real brokers, the real service and agents, real files:
a device restarting with unacknowledged messages, the backend killed with SIGKILL in the middle of
a batch, deduplication across backend restarts, an amqtt restart that drops its queues, and
commands that survive a lost session."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.ingest import Ingest
from backend.storage import Storage, db_path
from bench.chaos import _spawn
from device.outbox import OutboxLimits
from runtime.audit import AuditLog
from sealmq import cbor
from sealmq.bodies import Ack, Telemetry
from sealmq.endpoint import Received
from sealmq.topics import RecordKind
from tests.brokers import needs_mosquitto
from tests.e2e import System, wait_for

pytestmark = pytest.mark.slow

BROKERS = ["amqtt", pytest.param("mosquitto", marks=[pytest.mark.mosquitto, needs_mosquitto])]


@pytest.fixture(params=BROKERS)
def system(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[System]:
    sys_ = System(tmp_path, ["cam-1", "cam-2"], broker=request.param)
    try:
        yield sys_
    finally:
        sys_.close()


def stored(storage: Storage, device_id: str) -> list[tuple[int | None, int]]:
    """(message id, "n") of every stored row, in storage order."""
    return [(m.msg_id, cbor.loads(m.payload)["v"]["n"]) for m in storage.messages(device_id, limit=10**6)]


def test_device_restart_with_unacknowledged_messages(system: System) -> None:
    agent = system.agent("cam-1", wait=False)  # no backend yet: nothing can be acknowledged
    ids = [agent.send_telemetry({"n": n}) for n in range(20)]
    assert agent.unacknowledged() == 20
    agent.stop()  # the device goes down with 20 unacknowledged messages in its outbox
    backend = system.start_backend()
    again = system.agent("cam-1")  # same state directory: the outbox is on disk
    assert again.unacknowledged() == 20
    ids += [again.send_telemetry({"n": 20})]
    assert again.wait_acknowledged(20)
    assert stored(backend.storage, "cam-1") == list(zip(ids, range(21), strict=True))


def test_backend_restart_telemetry_across_it_is_stored_once(system: System) -> None:
    backend = system.start_backend()
    a = system.agent("cam-1")
    for n in range(3):
        a.send_telemetry({"n": n})
    assert a.wait_acknowledged(10)
    system.stop_backend()
    backend = system.start_backend()
    a.send_telemetry({"n": 3})  # sealed for the session the backend lost
    a.send_telemetry({"n": 4})
    assert a.wait_acknowledged(20)
    assert [n for _, n in stored(backend.storage, "cam-1")] == [0, 1, 2, 3, 4]
    assert a.counters["handshakes"] == 2


@pytest.mark.mosquitto
@needs_mosquitto
def test_backend_sigkill_mid_batch_loses_nothing(tmp_path: Path) -> None:
    """A backend process that received a batch but never committed it (its batch waits an hour)
    is killed with SIGKILL; a new one gets everything from the broker and the device's outbox."""
    system = System(tmp_path, ["cam-1"], broker="mosquitto")
    root, status = system.dep.root, system.dep.root / "backend-status.json"
    common = ["--role", "backend", "--root", str(root), "--port", str(system.port)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        never = ["--max-batch", "100000", "--max-delay", "3600", "--idle", "3600"]  # a batch that never commits
        procs.append(_spawn([*common, *never], tmp_path / "b1.log"))
        agent = system.agent("cam-1")
        ids = [agent.send_telemetry({"n": n}) for n in range(40)]

        def backend_status() -> dict[str, int]:
            try:
                return dict(json.loads(status.read_text()))
            except (OSError, ValueError):
                return {}
        # records reached the backend (as many as mosquitto lets be unacknowledged: its
        # max_inflight_messages is 20), none is committed, the device holds them all
        assert wait_for(lambda: backend_status().get("received", 0) >= 20, 20), backend_status()
        assert backend_status()["stored"] == 0 and agent.unacknowledged() == 40
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        with Storage(db_path(system.dep.backend_data)) as storage:
            assert storage.count_messages() == 0  # the batch died with the process
        status.unlink()
        procs.append(_spawn(common, tmp_path / "b2.log"))
        ids += [agent.send_telemetry({"n": 40})]
        assert agent.wait_acknowledged(30), agent.unacknowledged()
        procs[1].send_signal(signal.SIGTERM)
        procs[1].wait(20)
        with Storage(db_path(system.dep.backend_data)) as storage:
            assert stored(storage, "cam-1") == list(zip(ids, range(41), strict=True))  # each once, in order
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        system.close()


def test_dedup_survives_backend_restarts(tmp_path: Path) -> None:
    """The same message ids, delivered again to a restarted backend (its ledger is on disk), are
    acknowledged again and never stored twice."""
    path = db_path(tmp_path)
    sent_acks: list[tuple[str, Ack]] = []

    def ingest_once(msg_ids: list[int]) -> tuple[Storage, Ingest]:
        storage = Storage(path)
        audit = AuditLog(tmp_path / "audit.jsonl", component="backend")
        import threading

        ingest = Ingest(storage, audit, threading.RLock(), lambda d, ack, now: sent_acks.append((d, ack)))
        for seq, msg_id in enumerate(msg_ids):
            body = Telemetry(1.0, {"n": msg_id}, msg_id).encode()
            ingest.add(Received("cam-1", RecordKind.TELEMETRY, body, 0, seq), 1.0, None)
        ingest.flush()
        return storage, ingest

    storage, ingest = ingest_once([1, 2, 3, 5])
    assert ingest.counters.stored == 4 and sent_acks[-1] == ("cam-1", Ack(3, ((5, 5),)))
    storage.close()
    storage, ingest = ingest_once([2, 3, 4, 5, 6])  # restart; 2, 3, 5 again
    assert ingest.counters.stored == 2 and ingest.counters.duplicates == 3
    assert sent_acks[-1] == ("cam-1", Ack(6))
    storage.close()
    storage, ingest = ingest_once([1, 6, 7])
    assert ingest.counters.stored == 1 and ingest.counters.duplicates == 2
    assert sorted(m.msg_id or 0 for m in storage.messages("cam-1")) == [1, 2, 3, 4, 5, 6, 7]
    storage.close()


def test_lost_acks_and_a_backend_restart_store_nothing_twice(system: System) -> None:
    """The backend commits, its ACKs never reach the device, and it restarts: the restarted backend
    (its ledger read from disk) acknowledges all of it and stores none of it again."""
    backend = system.start_backend()
    agent = system.agent("cam-1")
    apply_ack = agent.messages.ack
    agent.messages.ack = lambda ack: 0  # type: ignore[method-assign]  # every ACK is lost
    ids = [agent.send_telemetry({"n": n}) for n in range(10)]
    assert wait_for(lambda: backend.ingest.counters.stored == 10, 15)
    assert agent.unacknowledged() == 10
    system.stop_backend()
    agent.messages.ack = apply_ack  # type: ignore[method-assign]
    backend = system.start_backend()
    agent.send_telemetry({"n": 10})  # the device learns of the new backend and re-sends all 11
    assert agent.wait_acknowledged(20), agent.unacknowledged()
    # the new session's first ACK (the ledger on disk) or the ledger's refusal of the repeats:
    # either way only the one new message is stored by the restarted backend
    assert backend.ingest.counters.stored == 1
    rows = stored(backend.storage, "cam-1")
    assert [n for _, n in rows] == list(range(11)) and [i for i, _ in rows][:10] == ids


def test_amqtt_restart_drops_its_queue_the_outbox_resends(tmp_path: Path) -> None:
    system = System(tmp_path, ["cam-1"], broker="amqtt")
    try:
        backend = system.start_backend()
        agent = system.agent("cam-1")
        agent.messages.limits = OutboxLimits(resend_after=1.0)
        agent.send_telemetry({"n": 0})
        assert agent.wait_acknowledged(10)
        backend.link.stop()  # the broker queues the backend's messages in its persistent session ...
        ids = [agent.send_telemetry({"n": n}) for n in range(1, 11)]
        time.sleep(0.5)
        system.restart_broker(downtime=0.5)  # ... and amqtt forgets them when it restarts
        backend.link.start()
        assert agent.wait_acknowledged(30), agent.unacknowledged()
        rows = stored(backend.storage, "cam-1")
        assert [n for _, n in rows] == list(range(11)) and [i for i, _ in rows][1:] == ids
        assert agent.counters["handshakes"] == 1  # same session: the outbox re-sent under it
    finally:
        system.close()


def test_commands_survive_a_lost_session_and_run_once(system: System) -> None:
    backend = system.start_backend()
    agent = system.agent("cam-1")
    runs: list[object] = []

    def count(args: object) -> int:
        runs.append(args)
        if args == 2:
            system.stop_backend()  # the backend dies before the reply reaches it
        return len(runs)
    agent.commands["count"] = count
    system.stop_backend()
    backend = system.start_backend()
    first = backend.send_command("cam-1", "count", 1)  # the device's session is dead: queued
    assert [c.id for c in backend.storage.commands(device_id="cam-1", state="queued")] == [first]
    agent.send_telemetry({"n": 0})  # the device learns the backend lost its session
    assert wait_for(lambda: (c := backend.storage.command(first)) is not None and c.status == "replied", 20)
    assert runs == [1]
    assert backend.storage.commands(state="replied")[0].replied_at is not None
    # sent, run, and the backend dies before the reply reaches it: on the next session the command
    # goes out again, the device does not run it twice, and its reply comes from the outbox
    second = backend.send_command("cam-1", "count", 2)
    assert wait_for(lambda: system.backend is None and agent.unacknowledged() == 1, 20)
    backend = system.start_backend()
    # still pending: "sent", or already "queued" again if the device re-handshook with the new
    # backend before this line (a new session puts sent commands back in the queue)
    assert backend.storage.command(second).status in {"sent", "queued"}  # type: ignore[union-attr]
    agent.send_telemetry({"n": 1})
    assert wait_for(lambda: (c := backend.storage.command(second)) is not None and c.status == "replied", 30)
    assert runs == [1, 2]  # executed once
    assert agent.wait_acknowledged(10)
    with pytest.raises(ValueError, match="state"):
        backend.storage.commands(state="pending")


def test_commands_expire(tmp_path: Path) -> None:
    storage = Storage(db_path(tmp_path))
    old = storage.queue_command("cam-1", "ping", cbor.dumps(None), 100.0)
    new = storage.queue_command("cam-1", "ping", cbor.dumps(None), 200.0)
    assert [c.id for c in storage.expire_commands(150.0)] == [old]
    assert [c.id for c in storage.commands(state="expired")] == [old]
    assert [c.id for c in storage.commands(device_id="cam-1", state="queued")] == [new]
    storage.close()


@pytest.mark.parametrize("batch", [64, 1])
def test_readings_due_together_travel_in_batches_and_are_stored_one_by_one(system: System, batch: int) -> None:
    from sealmq.bodies import decode_telemetry
    from tests.e2e import Recorder

    backend = system.start_backend()
    agent = system.agent("cam-1")
    agent.config.telemetry_batch = batch
    wire = Recorder(system, "sealmq/v1/cam-1/data/up")
    time.sleep(0.3)  # the recorder's subscription is in place
    ids = agent.send_telemetry_many([{"n": n} for n in range(200)])
    assert agent.wait_acknowledged(30)
    assert stored(backend.storage, "cam-1") == list(zip(ids, range(200), strict=True))
    for m in backend.storage.messages("cam-1", limit=1000):
        assert decode_telemetry(m.payload).msg_id == m.msg_id  # each row is one reading, as sent
    assert wait_for(lambda: len(wire.snapshot()) >= (200 if batch == 1 else 4))
    records = len(wire.snapshot())
    wire.stop()
    if batch == 1:
        assert records >= 200
    else:
        assert records <= 20  # 200 readings due at once: 4 records of up to 64, plus any re-send


def test_a_failed_commit_keeps_its_handshake_rows_for_the_next_batch(tmp_path: Path) -> None:
    """A batch whose commit fails acknowledges nothing (the records come again); the handshake rows
    it carried are not sent again by anyone, so they go with the next batch (SQLite refusing the write
    here: a temporary trigger makes the devices insert fail until it is dropped)."""
    import sqlite3
    import threading

    from runtime.audit import read_audit

    storage = Storage(db_path(tmp_path))
    storage._db.execute("CREATE TEMP TRIGGER refuse BEFORE INSERT ON devices"
                        " BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    audit = AuditLog(tmp_path / "audit.jsonl", component="backend")
    ingest = Ingest(storage, audit, threading.RLock(), lambda d, ack, now: None)
    ingest.add_handshake("cam-1", 5.0, "ab" * 32)
    with pytest.raises(sqlite3.IntegrityError):
        ingest.flush()
    assert storage.devices() == []
    storage._db.execute("DROP TRIGGER refuse")  # the store works again
    ingest.flush()  # the next batch: nothing but the kept handshake
    assert storage.devices() == [("cam-1", 5.0, 5.0, 1)]
    audit.close()
    failed = [e for e in read_audit(tmp_path / "audit.jsonl") if e["event"] == "ingest_failed"]
    assert [(e["records"], e["handshakes"]) for e in failed] == [(0, 1)]
    storage.close()
