"""device/outbox.py: the device's durable message outbox, on real files. Ids persist and never
repeat across restarts, the window holds, acknowledgements remove exactly what they cover, the
bounds drop the oldest and the agent audits it, commands are remembered as executed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.outbox import MessageOutbox, OutboxLimits
from runtime.audit import read_audit
from sealmq import cbor
from sealmq.bodies import Ack, Telemetry, decode_telemetry
from sealmq.topics import RecordKind
from tests.e2e import System

NOW = 1_700_000_000.0


def _add(box: MessageOutbox, n: int, now: float = NOW) -> list[int]:
    return [box.add(RecordKind.TELEMETRY, lambda mid, i=i: Telemetry(now, {"n": i}, mid).encode(), now)[0]  # type: ignore[misc]
            for i in range(n)]


def test_ids_increase_and_survive_a_restart(tmp_path: Path) -> None:
    box = MessageOutbox(tmp_path, now=NOW)
    ids = _add(box, 3)
    assert ids == list(range(ids[0], ids[0] + 3))
    assert ids[0] == int(NOW * 1000) << 16
    box.close()
    again = MessageOutbox(tmp_path, now=NOW + 100)  # a restart: the counter is on disk, not the clock
    assert again.ids() == ids
    assert _add(again, 1) == [ids[-1] + 1]
    bodies = [decode_telemetry(p.body) for p in again.due(session=1, now=NOW)]
    assert [b.msg_id for b in bodies] == [*ids, ids[-1] + 1]  # the id is inside the stored body


def test_window_and_resend(tmp_path: Path) -> None:
    box = MessageOutbox(tmp_path, OutboxLimits(window=4, resend_after=5.0), now=NOW)
    ids = _add(box, 10)
    assert [p.msg_id for p in box.due(1, NOW)] == ids[:4]
    assert box.due(1, NOW + 1) == []  # in flight, not yet due again
    assert [p.msg_id for p in box.due(2, NOW + 1)] == ids[:4]  # a new session: sealed again
    assert box.ack(Ack.of(0, [ids[1], ids[2]])) == 2
    assert box.due(2, NOW + 1) == []  # the lowest unacknowledged id still holds the window
    box.ack(Ack(ids[0]))
    assert [p.msg_id for p in box.due(2, NOW + 1)] == ids[4:7]  # window = ids[3] .. ids[6]
    assert [p.msg_id for p in box.due(2, NOW + 7)] == ids[3:7]  # not acknowledged for resend_after
    box.rewind()
    assert [p.msg_id for p in box.due(2, NOW + 7)] == ids[3:7]
    assert box.ack(Ack(ids[-1])) == 7 and len(box) == 0 and box.acked == 10


def test_an_ack_above_our_ids_moves_the_counter(tmp_path: Path) -> None:
    box = MessageOutbox(tmp_path, now=NOW)
    first = _add(box, 1)[0]
    box.ack(Ack(first + 1000))  # a backend that saw higher ids from this device (its state was wiped)
    assert box.next_id() == first + 1001


def test_bounds_drop_the_oldest(tmp_path: Path) -> None:
    box = MessageOutbox(tmp_path, OutboxLimits(max_messages=5, max_age=60.0), now=NOW)
    ids = _add(box, 5)
    _, dropped = box.add(RecordKind.TELEMETRY, lambda mid: Telemetry(NOW, {}, mid).encode(), NOW)
    assert [(d.reason, d.count, d.first_id) for d in dropped] == [("max_messages", 1, ids[0])]
    assert box.ids()[0] == ids[1] and len(box) == 5
    assert box.expire(NOW + 30) == []
    [old] = box.expire(NOW + 61)
    assert (old.reason, old.count) == ("max_age", 5) and len(box) == 0
    small = MessageOutbox(tmp_path / "b", OutboxLimits(max_bytes=100), now=NOW)
    big = [small.add(RecordKind.TELEMETRY, lambda mid: Telemetry(NOW, {"x": "y" * 30}, mid).encode(), NOW)
           for _ in range(4)]
    assert any(d.reason == "max_bytes" for _, ds in big for d in ds)
    assert small.size_bytes <= 100


def test_commands_are_remembered_with_their_reply(tmp_path: Path) -> None:
    box = MessageOutbox(tmp_path, now=NOW)
    assert not box.executed(7)
    box.add_reply(7, lambda mid: cbor.dumps([7, True, "pong", mid]), NOW)
    box.close()
    again = MessageOutbox(tmp_path, now=NOW)
    assert again.executed(7) and len(again) == 1


def test_window_is_bounded_by_the_protocol(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="window"):
        MessageOutbox(tmp_path, OutboxLimits(window=257), now=NOW)


def test_agent_audits_what_the_bounds_drop(tmp_path: Path) -> None:
    from dataclasses import replace

    from device.agent import DeviceAgent

    system = System(tmp_path, ["cam-1"], broker="amqtt")
    try:
        template = system.agent("cam-1", start=False)
        template.messages.close()
        agent = DeviceAgent(replace(template.config, outbox=OutboxLimits(max_messages=3)))
        ids = [agent.send_telemetry({"n": n}) for n in range(5)]  # no session: all wait in the outbox
        assert agent.messages.ids() == ids[2:]
        agent.audit.close()
        dropped = [e for e in read_audit(system.dep.device_state("cam-1") / "device_log.jsonl")
                   if e["event"] == "outbox_dropped"]
        assert [(e["reason"], e["count"], e["first_id"]) for e in dropped] == [("max_messages", 1, ids[0]),
                                                                               ("max_messages", 1, ids[1])]
        assert all("n" not in e for e in dropped)  # ids only, never payloads
        agent.messages.close()
    finally:
        system.close()


def test_bad_ack_or_body_is_audited_and_harms_nothing(tmp_path: Path) -> None:
    import threading

    from backend.ingest import Ingest
    from backend.storage import Storage, db_path
    from runtime.audit import AuditLog
    from sealmq.endpoint import Received

    system = System(tmp_path, ["cam-1"], broker="amqtt")
    try:
        agent = system.agent("cam-1", start=False)
        mid = agent.send_telemetry({"n": 1})
        for garbage in (b"\xff", cbor.dumps([5, [[6, 6]]]), cbor.dumps([1])):
            agent._on_record(Received("cam-1", RecordKind.ACK, garbage, 0, 0), NOW)
        assert agent.messages.ids() == [mid]  # nothing acknowledged by garbage
        agent.audit.close()
        rejected = [e for e in read_audit(system.dep.device_state("cam-1") / "device_log.jsonl")
                    if e["event"] == "message_rejected"]
        assert [e["stage"] for e in rejected] == ["ack"] * 3
        agent.messages.close()
    finally:
        system.close()
    storage = Storage(db_path(tmp_path / "be"))
    audit = AuditLog(tmp_path / "be.jsonl", component="backend")
    acks: list[object] = []
    broker_acks: list[int] = []
    ingest = Ingest(storage, audit, threading.RLock(), lambda *a: acks.append(a))
    for body in (b"\xff", cbor.dumps({"t": 1, "v": {}}), cbor.dumps({"m": 0, "t": 1, "v": {}})):
        ingest.add(Received("cam-1", RecordKind.TELEMETRY, body, 0, 0), NOW, lambda: broker_acks.append(1))
    ingest.add(Received("cam-1", RecordKind.REPLY, cbor.dumps([1, True, None]), 0, 0), NOW, None)
    ingest.flush()
    assert broker_acks == [1, 1, 1]  # refused at once: the broker must not deliver them again
    assert storage.count_messages() == 0 and acks == []
    audit.close()
    assert [e["stage"] for e in read_audit(tmp_path / "be.jsonl")] == ["telemetry"] * 3 + ["reply"]
    storage.close()


def test_an_empty_outbox_answers_the_timer_without_touching_the_database(tmp_path: Path) -> None:
    """``due`` runs at every timer tick of every device and ``expire`` every 10 s: with nothing in
    the outbox neither runs a statement (a fleet of idle simulated devices did thousands a second)."""
    box = MessageOutbox(tmp_path, now=NOW)
    statements: list[str] = []
    box._db.set_trace_callback(statements.append)
    assert box.due(1, NOW) == [] and box.expire(NOW + 1e9) == []
    assert statements == []
    ids = _add(box, 2)
    statements.clear()
    assert [p.msg_id for p in box.due(1, NOW)] == ids  # not empty: the query runs again
    assert any(s.startswith("SELECT msg_id, kind, body") for s in statements)
    box.ack(Ack(ids[-1]))
    statements.clear()
    assert box.due(2, NOW) == [] and statements == []


# due() reads only new ids between re-send times (the incremental path); the reference reads the
# whole window every time. Any sequence of adds, acks, due() calls at advancing times, session
# changes, rewinds and restarts must give both the very same messages.
_ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40)),
    st.tuples(st.just("due"), st.sampled_from([0.0, 0.0, 0.5, 2.0, 4.9, 5.0, 7.0])),  # seconds later
    st.tuples(st.just("ack"), st.integers(0, 60), st.integers(0, 60)),
    st.tuples(st.just("session"), st.integers(1, 3)),
    st.tuples(st.just("rewind"), st.just(0)),
), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_ops, st.sampled_from([3, 4, 16, 256]))
def test_incremental_due_equals_the_full_scan(tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[Any, ...]],
                                              window: int) -> None:
    limits = OutboxLimits(window=window, resend_after=5.0)
    boxes = [MessageOutbox(tmp_path_factory.mktemp("box"), limits, now=NOW) for _ in range(2)]
    boxes[1]._incremental = False
    now, session = NOW, 1
    for op in ops:
        if op[0] == "add":
            ids = [b.add_many(RecordKind.TELEMETRY, [lambda mid, t=now: Telemetry(t, {}, mid).encode()] * op[1], now)[0]
                   for b in boxes]
            assert ids[0] == ids[1]
        elif op[0] == "due":
            now += op[1]
            got = [[p.msg_id for p in b.due(session, now)] for b in boxes]
            assert got[0] == got[1]
        elif op[0] == "ack":
            held = boxes[0].ids()
            if not held:
                continue
            i = min(op[1], len(held) - 1)
            above = [held[j] for j in range(i + 2, min(len(held), i + 2 + op[2]))]  # a range above a gap
            ack = Ack.of(held[i], above)
            assert boxes[0].ack(ack) == boxes[1].ack(ack)
        elif op[0] == "session":
            session = op[1]
        else:
            for b in boxes:
                b.rewind()
    for b in boxes:
        b.close()
