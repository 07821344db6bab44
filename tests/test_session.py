"""Two in-memory Sessions (device and backend) driven by a test network: flow, replay, key update, limits."""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sealmq import cbor, kdf, oscore, record
from sealmq.errors import (
    ConfigError,
    DecryptError,
    LocalProtocolError,
    Reason,
    RecordError,
    ReplayError,
    SealmqError,
    SessionError,
)
from sealmq.events import EpochDropped, KeyUpdateDone, Publish, Received, Rejected, Stage
from sealmq.session import Session, SessionConfig
from sealmq.topics import RecordKind
from tests.conftest import load_vectors

TRACE1 = load_vectors("rfc9529_trace1.json")["values"]
PRK_OUT = bytes.fromhex(TRACE1["PRK_out"])
C_I, C_R = bytes.fromhex(TRACE1["C_I"]), bytes.fromhex(TRACE1["C_R"])
DEVICE_ID = "dev-1"

UP_KINDS = [RecordKind.TELEMETRY, RecordKind.REPLY, RecordKind.MEDIA_MANIFEST, RecordKind.MEDIA_CHUNK,
            RecordKind.MEDIA_CONTROL]
DOWN_KINDS = [RecordKind.COMMAND, RecordKind.MEDIA_ACK, RecordKind.MEDIA_CONTROL]


def rng(seed: bytes) -> Callable[[int], bytes]:
    counter = [0]

    def random_bytes(n: int) -> bytes:
        counter[0] += 1
        return hashlib.sha256(seed + counter[0].to_bytes(8, "big")).digest()[:n]

    return random_bytes


def pair(config: SessionConfig | None = None, now: float = 0.0) -> tuple[Session, Session]:
    device = Session.from_edhoc(prk_out=PRK_OUT, c_i=C_I, c_r=C_R, is_initiator=True, device_id=DEVICE_ID,
                                now=now, random_bytes=rng(b"device"), config=config)
    backend = Session.from_edhoc(prk_out=PRK_OUT, c_i=C_I, c_r=C_R, is_initiator=False,
                                 device_id=DEVICE_ID, now=now, random_bytes=rng(b"backend"), config=config)
    return device, backend


def delivered(events: list[Any]) -> list[bytes]:
    return [e.plaintext for e in events if isinstance(e, Received)]


def sends(events: list[Any]) -> list[Publish]:
    return [e for e in events if isinstance(e, Publish)]


# --- the basic flow -----------------------------------------------------------------------------

def test_full_flow_with_key_update() -> None:
    device, backend = pair()
    assert device.subscriptions() == ["sealmq/v1/dev-1/data/down", "sealmq/v1/dev-1/media/down"]
    assert backend.subscriptions() == ["sealmq/v1/dev-1/data/up", "sealmq/v1/dev-1/media/up"]

    topic, rec = device.seal(RecordKind.TELEMETRY, b'{"t":21}', now=1)
    assert topic == "sealmq/v1/dev-1/data/up"
    assert b"21" not in rec  # sealed
    [ev] = backend.open(topic, rec, now=1)
    assert ev == Received(DEVICE_ID, RecordKind.TELEMETRY, b'{"t":21}', 0, 0)
    assert "21" not in repr(ev)  # payloads stay out of logs

    topic, rec = backend.seal(RecordKind.COMMAND, b"reboot", now=2)
    assert topic == "sealmq/v1/dev-1/data/down"
    assert delivered(device.open(topic, rec, now=2)) == [b"reboot"]

    topic, rec = device.seal(RecordKind.MEDIA_CHUNK, b"\x00" * 1000, now=3)
    assert topic == "sealmq/v1/dev-1/media/up"
    assert delivered(backend.open(topic, rec, now=3)) == [b"\x00" * 1000]

    # Key update started by the device.
    topic, request = device.start_key_update(b"N" * 8, now=4)
    assert device.key_update_pending
    out = backend.open(topic, request, now=4)
    [answer] = sends(out)
    assert KeyUpdateDone(DEVICE_ID, 1) in out
    assert backend.epoch == 1
    assert answer.topic == "sealmq/v1/dev-1/data/down"
    assert record.decode(answer.payload).epoch == 0  # the answer travels under the old epoch
    out = device.open(answer.topic, answer.payload, now=4)
    assert out == [KeyUpdateDone(DEVICE_ID, 1)]
    assert device.epoch == backend.epoch == 1
    assert device.epochs == backend.epochs == (0, 1)

    topic, rec = device.seal(RecordKind.TELEMETRY, b"after", now=5)
    assert record.decode(rec).epoch == 1
    assert record.decode(rec).piv == 0  # each epoch has its own sequence space
    assert delivered(backend.open(topic, rec, now=5)) == [b"after"]
    topic, rec = backend.seal(RecordKind.COMMAND, b"ok", now=5)
    assert delivered(device.open(topic, rec, now=5)) == [b"ok"]

    # After the grace window the old keys go.
    assert device.poll(now=20) == []
    assert device.poll(now=34) == [EpochDropped(DEVICE_ID, 0)]
    assert backend.poll(now=36) == [EpochDropped(DEVICE_ID, 0)]
    assert device.epochs == backend.epochs == (1,)


def test_key_update_matches_rfc9529_trace1() -> None:
    """The session's epoch 1 is RFC 9528 Appendix H applied to nonce_A || nonce_B (trace 1's context)."""
    context = bytes.fromhex(TRACE1["context_for_KeyUpdate"])
    device = Session.from_edhoc(prk_out=PRK_OUT, c_i=C_I, c_r=C_R, is_initiator=True, device_id=DEVICE_ID,
                                now=0, random_bytes=rng(b"d"))
    backend = Session.from_edhoc(prk_out=PRK_OUT, c_i=C_I, c_r=C_R, is_initiator=False,
                                 device_id=DEVICE_ID, now=0, random_bytes=lambda n: context[8:8 + n])
    old_prk = device._prk_out  # the object holding epoch 0's PRK_out
    topic, request = device.start_key_update(context[:8], now=0)
    [answer] = sends(backend.open(topic, request, now=0))
    device.open(answer.topic, answer.payload, now=0)
    assert bytes(old_prk) == bytes(32)  # overwritten in place: forward secrecy
    assert bytes(device._prk_out) == bytes.fromhex(TRACE1["PRK_out_after_KeyUpdate"])
    secret = bytes.fromhex(TRACE1["OSCORE_Master_Secret_after_KeyUpdate"])
    salt = bytes.fromhex(TRACE1["OSCORE_Master_Salt_after_KeyUpdate"])
    # An independent receiver built from the trace's published epoch-1 values opens the record.
    trace_backend = oscore.SecurityContext.derive(master_secret=secret, master_salt=salt,
                                                  sender_id=C_I, recipient_id=C_R)
    topic, rec = device.seal(RecordKind.TELEMETRY, b"x", now=0)
    assert record.decode(rec).epoch == 1
    assert record.open_(trace_backend, record.decode(rec), topic) == b"x"
    topic, rec = backend.seal(RecordKind.COMMAND, b"y", now=0)
    assert delivered(device.open(topic, rec, now=0)) == [b"y"]


# --- topic, kind and session binding ------------------------------------------------------------------

@pytest.mark.parametrize(("topic", "reason"), [
    ("sealmq/v1/dev-2/data/up", Reason.WRONG_TOPIC),  # another device's namespace
    ("sealmq/v1/dev-1/data/down", Reason.WRONG_TOPIC),  # the backend's own direction
    ("sealmq/v1/dev-1/hs/up", Reason.WRONG_TOPIC),
    ("sealmq/v1/dev-1/media/up", Reason.WRONG_TOPIC),  # telemetry belongs on data
    ("sealmq/v2/dev-1/data/up", Reason.WRONG_TOPIC),
    ("", Reason.WRONG_TOPIC),
])
def test_wrong_topic_refused(topic: str, reason: Reason) -> None:
    device, backend = pair()
    _, rec = device.seal(RecordKind.TELEMETRY, b"x", now=0)
    before = backend._state(include_failed=True)
    with pytest.raises(RecordError) as info:
        backend.open(topic, rec, now=0)
    assert info.value.reason is reason
    assert backend._state(include_failed=True) == before


def test_kind_direction_enforced() -> None:
    device, backend = pair()
    with pytest.raises(LocalProtocolError):
        device.seal(RecordKind.COMMAND, b"x", now=0)
    with pytest.raises(LocalProtocolError):
        backend.seal(RecordKind.TELEMETRY, b"x", now=0)
    with pytest.raises(LocalProtocolError):
        device.seal(RecordKind.KEY_UPDATE, b"x", now=0)
    # A backend-style COMMAND forged onto the up topic is refused before any crypto.
    ctx = oscore.from_edhoc(PRK_OUT, C_I, C_R, True)
    topic = "sealmq/v1/dev-1/data/up"
    rec = record.seal(ctx, kind=RecordKind.COMMAND, epoch=0, piv=0, topic=topic, plaintext=b"x")
    with pytest.raises(RecordError) as info:
        backend.open(topic, rec, now=0)
    assert info.value.reason is Reason.WRONG_TOPIC


def test_other_session_kid_refused() -> None:
    _, backend = pair()
    stranger = Session.from_edhoc(prk_out=PRK_OUT, c_i=C_I, c_r=b"\x07", is_initiator=True,
                                  device_id=DEVICE_ID, now=0, random_bytes=rng(b"s"))
    topic, rec = stranger.seal(RecordKind.TELEMETRY, b"x", now=0)
    with pytest.raises(RecordError) as info:
        backend.open(topic, rec, now=0)
    assert info.value.reason is Reason.UNKNOWN_SESSION


def test_other_device_topic_and_key_refused() -> None:
    """A valid record of device A replayed into device B's session is refused (kid and topic)."""
    device_a, _ = pair()
    backend_b = Session.from_edhoc(prk_out=PRK_OUT[::-1], c_i=C_I, c_r=C_R, is_initiator=False,
                                   device_id="dev-2", now=0, random_bytes=rng(b"b"))
    _, rec = device_a.seal(RecordKind.TELEMETRY, b"x", now=0)
    with pytest.raises(RecordError):
        backend_b.open("sealmq/v1/dev-1/data/up", rec, now=0)
    with pytest.raises(DecryptError):
        backend_b.open("sealmq/v1/dev-2/data/up", rec, now=0)


@pytest.mark.parametrize("change", ["kind", "epoch"])
def test_moved_to_other_kind_or_epoch_fails(change: str) -> None:
    device, backend = pair()
    topic, rec = device.seal(RecordKind.TELEMETRY, b"x", now=0)
    r = record.decode(rec)
    moved = (record.Record(RecordKind.REPLY, r.kid, r.epoch, r.piv, r.ciphertext) if change == "kind"
             else record.Record(r.kind, r.kid, 1, r.piv, r.ciphertext))
    with pytest.raises(SealmqError):
        backend.open(topic, moved.encode(), now=0)
    assert delivered(backend.open(topic, rec, now=0)) == [b"x"]


# --- garbage, mutations and replay ---------------------------------------------------------------------

@given(st.binary(max_size=300), st.sampled_from(["sealmq/v1/dev-1/data/up", "sealmq/v1/dev-1/media/up"]))
def test_arbitrary_bytes_only_raise_sealmq_errors(data: bytes, topic: str) -> None:
    _, backend = pair()
    before = backend._state()
    with pytest.raises(SealmqError):
        backend.open(topic, data, now=0)
    assert backend._state() == before


def _valid_records() -> tuple[Session, Session, list[tuple[str, bytes]]]:
    device, backend = pair()
    out = [device.seal(kind, bytes([i]) * (i * 7), now=0) for i, kind in enumerate(UP_KINDS)]
    return device, backend, out


@given(st.data())
def test_flipped_bit_rejected_and_state_unchanged(data: st.DataObject) -> None:
    _, backend, recs = _valid_records()
    # Deliver some first so that the state is not trivial.
    split = data.draw(st.integers(0, len(recs) - 1))
    for topic, rec in recs[:split]:
        backend.open(topic, rec, now=0)
    topic, rec = recs[data.draw(st.integers(split, len(recs) - 1))]
    bit = data.draw(st.integers(0, len(rec) * 8 - 1))
    mutated = bytearray(rec)
    mutated[bit // 8] ^= 1 << (bit % 8)
    before = backend._state()
    with pytest.raises(SealmqError):
        backend.open(topic, bytes(mutated), now=0)
    assert backend._state() == before
    assert delivered(backend.open(topic, rec, now=0)) != []  # the genuine record still opens


@given(st.data())
def test_mutated_records_only_raise_sealmq_errors(data: st.DataObject) -> None:
    _, backend, recs = _valid_records()
    topic, rec = recs[data.draw(st.integers(0, len(recs) - 1))]
    buf = bytearray(rec)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        i = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "set" and buf:
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf.insert(i, data.draw(st.integers(0, 255)))
        elif buf:
            del buf[i]
    before = backend._state()
    if bytes(buf) == rec:
        return
    with pytest.raises(SealmqError):
        backend.open(topic, bytes(buf), now=0)
    assert backend._state() == before


@given(st.lists(st.integers(0, 39), min_size=1, max_size=120))
def test_any_delivery_order_with_duplicates_delivers_each_at_most_once(order: list[int]) -> None:
    device, backend = pair()
    recs = [device.seal(UP_KINDS[i % len(UP_KINDS)], f"m{i}".encode(), now=0) for i in range(40)]
    got: list[bytes] = []
    for i in order:
        try:
            got.extend(delivered(backend.open(*recs[i], now=0)))
        except ReplayError:
            assert f"m{i}".encode() in got
    assert sorted(got) == sorted({f"m{i}".encode() for i in order})  # 40 < 256: all in the window


def test_too_old_rejected_after_window_moves() -> None:
    device, backend = pair(SessionConfig(replay_window=32))
    recs = [device.seal(RecordKind.TELEMETRY, b"%d" % i, now=0) for i in range(40)]
    backend.open(*recs[39], now=0)
    with pytest.raises(ReplayError):
        backend.open(*recs[7], now=0)  # 39 - 7 >= 32
    assert delivered(backend.open(*recs[8], now=0)) == [b"8"]


def test_forged_record_never_moves_the_window() -> None:
    device, backend = pair()
    topic, rec = device.seal(RecordKind.TELEMETRY, b"x", now=0)
    r = record.decode(rec)
    forged = record.Record(r.kind, r.kid, 0, 5000, r.ciphertext).encode()
    with pytest.raises(DecryptError):
        backend.open(topic, forged, now=0)
    assert delivered(backend.open(topic, rec, now=0)) == [b"x"]


# --- key update interleaved with traffic ------------------------------------------------------------

class Net:
    """Per-topic FIFO queues (MQTT's only ordering guarantee), interleaved as the test decides."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[bytes]] = {}
        self.log: list[tuple[str, bytes]] = []

    def publish(self, topic: str, data: bytes) -> None:
        self.queues.setdefault(topic, deque()).append(data)
        self.log.append((topic, data))

    def ready(self) -> list[str]:
        return sorted(t for t, q in self.queues.items() if q)


def _run(data: st.DataObject, n_dev: int, n_back: int, ku: str, config: SessionConfig | None = None,
         duplicates: bool = True) -> tuple[Session, Session, Net, list[bytes], list[bytes]]:
    device, backend = pair(config)
    net = Net()
    sent: list[bytes] = []
    got: list[bytes] = []
    counters = {"dev": 0, "back": 0}
    ku_after = data.draw(st.integers(0, n_dev + n_back), label="ku_after")
    started = False

    def receiver(topic: str) -> Session:
        return backend if topic.endswith("/up") else device

    def deliver(topic: str, payload: bytes) -> None:
        try:
            events = receiver(topic).open(topic, payload, now=1)
        except SealmqError as exc:
            assert not isinstance(exc, SessionError)
            return
        for e in events:
            if isinstance(e, Publish):
                net.publish(e.topic, e.payload)
            assert not isinstance(e, Rejected) or e.reason is Reason.REPLAY
        got.extend(delivered(events))

    while True:
        actions: list[str] = []
        if counters["dev"] < n_dev:
            actions.append("dev")
        if counters["back"] < n_back:
            actions.append("back")
        if not started and counters["dev"] + counters["back"] >= ku_after and ku != "none":
            actions.append("ku")
        actions.extend(net.ready())
        if duplicates and net.log:
            actions.append("dup")
        if not actions or actions == ["dup"]:
            break
        act = data.draw(st.sampled_from(actions))
        if act == "dev":
            kind = data.draw(st.sampled_from(UP_KINDS))
            payload = f"dev-{counters['dev']}".encode()
            net.publish(*device.seal(kind, payload, now=1))
            sent.append(payload)
            counters["dev"] += 1
        elif act == "back":
            kind = data.draw(st.sampled_from(DOWN_KINDS))
            payload = f"back-{counters['back']}".encode()
            net.publish(*backend.seal(kind, payload, now=1))
            sent.append(payload)
            counters["back"] += 1
        elif act == "ku":
            started = True
            starters = {"device": [device], "backend": [backend], "both": [device, backend]}[ku]
            for s in starters:
                nonce = hashlib.sha256(repr(s).encode()).digest()[:8]
                net.publish(*s.start_key_update(nonce, now=1))
        elif act == "dup":
            deliver(*net.log[data.draw(st.integers(0, len(net.log) - 1))])  # a QoS 1 duplicate
        else:
            deliver(act, net.queues[act].popleft())
    return device, backend, net, sent, got


@given(st.data(), st.integers(0, 25), st.integers(0, 25),
       st.sampled_from(["device", "backend", "both", "none"]))
def test_key_update_interleaved_loses_nothing(data: st.DataObject, n_dev: int, n_back: int, ku: str) -> None:
    device, backend, net, sent, got = _run(data, n_dev, n_back, ku)
    assert sorted(got) == sorted(sent)  # every record exactly once, none lost
    expected_epoch = 0 if ku == "none" else 1
    assert device.epoch == backend.epoch == expected_epoch
    assert not device.key_update_pending
    assert not backend.key_update_pending
    # After the grace window, only the new epoch's keys are left, and old records are refused.
    # The requester drops after the grace window; the answerer may never have seen a new-epoch
    # record (no traffic after the update), then its cap (old_epoch_max_seconds) applies.
    device.poll(now=1 + 601)
    backend.poll(now=1 + 601)
    assert device.epochs == backend.epochs == (expected_epoch,)
    if expected_epoch == 1:
        for topic, payload in net.log:
            if record.decode(payload).epoch == 0:
                target = backend if topic.endswith("/up") else device
                with pytest.raises(RecordError) as info:
                    target.open(topic, payload, now=700)
                assert info.value.reason is Reason.UNKNOWN_EPOCH


def test_simultaneous_requests_device_wins() -> None:
    device, backend = pair()
    t1, req_dev = device.start_key_update(b"D" * 8, now=0)
    t2, req_back = backend.start_key_update(b"B" * 8, now=0)
    assert device.open(t2, req_back, now=0) == []  # ignored: the device's own request wins
    out = backend.open(t1, req_dev, now=0)
    [answer] = sends(out)
    assert KeyUpdateDone(DEVICE_ID, 1) in out
    assert not backend.key_update_pending
    assert device.open(answer.topic, answer.payload, now=0) == [KeyUpdateDone(DEVICE_ID, 1)]
    # Both derived from the device's nonce: records open across.
    topic, rec = backend.seal(RecordKind.COMMAND, b"c", now=0)
    assert delivered(device.open(topic, rec, now=0)) == [b"c"]
    body = cbor.loads(record.open_(oscore.from_edhoc(PRK_OUT, C_I, C_R, True), record.decode(answer.payload),
                                   answer.topic))
    assert body[:3] == [2, 1, b"D" * 8]


def test_new_epoch_records_before_answer_are_buffered_then_opened() -> None:
    device, backend = pair()
    topic, request = device.start_key_update(b"N" * 8, now=0)
    [answer] = sends(backend.open(topic, request, now=0))
    early = [backend.seal(RecordKind.MEDIA_ACK, b"ack%d" % i, now=0) for i in range(3)]
    for t, r in early:
        assert device.open(t, r, now=0) == []  # waiting for the answer
    assert device.open(*early[1], now=0) == []  # a duplicate waits too
    out = device.open(answer.topic, answer.payload, now=0)
    assert out[0] == KeyUpdateDone(DEVICE_ID, 1)
    assert delivered(out) == [b"ack0", b"ack1", b"ack2"]
    [dup] = [e for e in out if isinstance(e, Rejected)]  # the duplicate, refused once its keys exist
    assert (dup.device_id, dup.topic, dup.stage, dup.reason, dup.size) == (
        DEVICE_ID, early[1][0], Stage.RECORD, Reason.REPLAY, len(early[1][1]))


def test_buffer_is_bounded() -> None:
    device, backend = pair(SessionConfig(max_buffered=2))
    topic, request = device.start_key_update(b"N" * 8, now=0)
    backend.open(topic, request, now=0)
    early = [backend.seal(RecordKind.MEDIA_ACK, b"a", now=0) for _ in range(3)]
    device.open(*early[0], now=0)
    device.open(*early[1], now=0)
    before = device._state()
    with pytest.raises(RecordError) as info:
        device.open(*early[2], now=0)
    assert info.value.reason is Reason.TOO_LARGE
    assert device._state() == before


def test_unknown_epoch_refused_without_pending_update() -> None:
    device, backend = pair()
    topic, request = device.start_key_update(b"N" * 8, now=0)
    backend.open(topic, request, now=0)
    other_device, _ = pair()
    t, r = backend.seal(RecordKind.COMMAND, b"x", now=0)
    with pytest.raises(RecordError) as info:
        other_device.open(t, r, now=0)
    assert info.value.reason is Reason.UNKNOWN_EPOCH


def test_lost_answer_request_retransmitted_and_reanswered() -> None:
    device, backend = pair()
    topic, request = device.start_key_update(b"N" * 8, now=0)
    [first_answer] = sends(backend.open(topic, request, now=0))  # ... and lost
    assert device.poll(now=5) == []
    [retry] = sends(device.poll(now=10))
    [again] = sends(backend.open(retry.topic, retry.payload, now=10))
    assert backend.epoch == 1
    assert device.open(again.topic, again.payload, now=10) == [KeyUpdateDone(DEVICE_ID, 1)]
    assert device.open(first_answer.topic, first_answer.payload, now=10) == []  # late duplicate: ignored
    topic, rec = device.seal(RecordKind.TELEMETRY, b"t", now=11)
    assert delivered(backend.open(topic, rec, now=11)) == [b"t"]


def test_old_epoch_records_accepted_within_grace_then_rejected() -> None:
    device, backend = pair()
    late = [backend.seal(RecordKind.MEDIA_ACK, b"late%d" % i, now=0) for i in range(2)]
    topic, request = device.start_key_update(b"N" * 8, now=0)
    [answer] = sends(backend.open(topic, request, now=0))
    device.open(answer.topic, answer.payload, now=100)
    assert delivered(device.open(*late[0], now=129)) == [b"late0"]
    with pytest.raises(RecordError) as info:
        device.open(*late[1], now=130)  # grace over, even before poll() ran
    assert info.value.reason is Reason.UNKNOWN_EPOCH
    assert device.poll(now=130) == [EpochDropped(DEVICE_ID, 0)]


def test_grace_by_record_count() -> None:
    device, backend = pair(SessionConfig(grace_records=2))
    topic, request = device.start_key_update(b"N" * 8, now=0)
    [answer] = sends(backend.open(topic, request, now=0))
    device.open(answer.topic, answer.payload, now=0)
    assert backend.epochs == (0, 1)
    backend.open(*device.seal(RecordKind.TELEMETRY, b"1", now=0), now=0)
    out = backend.open(*device.seal(RecordKind.TELEMETRY, b"2", now=0), now=0)
    assert EpochDropped(DEVICE_ID, 0) in out
    assert backend.epochs == (1,)


def test_backend_grace_starts_when_device_switches() -> None:
    device, backend = pair()
    topic, request = device.start_key_update(b"N" * 8, now=0)
    old = device.seal(RecordKind.TELEMETRY, b"old", now=0)
    [answer] = sends(backend.open(topic, request, now=0))
    # The device is slow to get the answer: its epoch-0 records keep opening at the backend.
    assert delivered(backend.open(*old, now=200)) == [b"old"]
    assert backend.poll(now=200) == []
    device.open(answer.topic, answer.payload, now=300)
    backend.open(*device.seal(RecordKind.TELEMETRY, b"new", now=300), now=300)
    assert backend.poll(now=329) == []
    assert backend.poll(now=330) == [EpochDropped(DEVICE_ID, 0)]


# --- limits -----------------------------------------------------------------------------------------

def test_key_update_due_by_records_and_time_and_auto_start() -> None:
    config = SessionConfig(key_update_after_records=3, key_update_after_seconds=100)
    device, backend = pair(config)
    for _ in range(2):
        device.seal(RecordKind.TELEMETRY, b"x", now=0)
    assert not device.key_update_due(now=0)
    device.seal(RecordKind.TELEMETRY, b"x", now=0)
    assert device.key_update_due(now=0)
    assert not backend.key_update_due(now=99)
    assert backend.key_update_due(now=100)
    assert backend.next_timer() == 100
    [req] = sends(device.poll(now=1))
    assert device.key_update_pending
    assert not device.key_update_due(now=1)
    [answer] = sends(backend.open(req.topic, req.payload, now=1))
    device.open(answer.topic, answer.payload, now=1)
    assert device.epoch == 1
    assert not device.key_update_due(now=1)  # new epoch, fresh counters (and old one still held)


def test_manual_config_without_auto_update() -> None:
    device, _ = pair(SessionConfig(key_update_after_records=1, auto_key_update=False))
    device.seal(RecordKind.TELEMETRY, b"x", now=0)
    assert device.key_update_due(now=0)
    assert device.poll(now=0) == []


def test_failed_decryptions_close_the_session() -> None:
    device, backend = pair(SessionConfig(max_failed_decryptions=3))
    topic, rec = device.seal(RecordKind.TELEMETRY, b"x", now=0)
    r = record.decode(rec)
    bad = record.Record(r.kind, r.kid, r.epoch, r.piv, bytes(len(r.ciphertext))).encode()
    for _ in range(2):
        with pytest.raises(DecryptError):
            backend.open(topic, bad, now=0)
    with pytest.raises(SessionError) as info:
        backend.open(topic, bad, now=0)
    assert info.value.reason is Reason.KEY_LIMIT_REACHED
    assert backend.closed
    for call in (lambda: backend.open(topic, rec, now=0),
                 lambda: backend.seal(RecordKind.COMMAND, b"x", now=0)):
        with pytest.raises(SessionError) as info:
            call()
        assert info.value.reason is Reason.KEY_LIMIT_REACHED


def test_sender_key_limit() -> None:
    device, _ = pair(SessionConfig(max_records_per_key=2, key_update_after_records=1))
    device.seal(RecordKind.TELEMETRY, b"x", now=0)
    device.seal(RecordKind.TELEMETRY, b"x", now=0)
    with pytest.raises(SessionError) as info:
        device.seal(RecordKind.TELEMETRY, b"x", now=0)
    assert info.value.reason is Reason.KEY_LIMIT_REACHED


def test_sequence_numbers_never_wrap() -> None:
    device, backend = pair(SessionConfig(max_records_per_key=2**40))
    device._epochs[0].next_seq = 2**40 - 1
    topic, rec = device.seal(RecordKind.TELEMETRY, b"last", now=0)
    assert record.decode(rec).piv == 2**40 - 1
    assert delivered(backend.open(topic, rec, now=0)) == [b"last"]
    for _ in range(2):
        with pytest.raises(SessionError) as info:
            device.seal(RecordKind.TELEMETRY, b"x", now=0)
        assert info.value.reason is Reason.SEQUENCE_EXHAUSTED
    assert device._epochs[0].next_seq == 2**40


def test_api_misuse() -> None:
    device, _ = pair()
    with pytest.raises(LocalProtocolError):
        device.start_key_update(b"short", now=0)
    device.start_key_update(b"N" * 8, now=0)
    with pytest.raises(LocalProtocolError):
        device.start_key_update(b"M" * 8, now=0)
    with pytest.raises(LocalProtocolError):
        device.seal(RecordKind.MEDIA_CHUNK, b"x" * 65536, now=0)
    with pytest.raises(ConfigError):
        SessionConfig(replay_window=0)
    with pytest.raises(ConfigError):
        SessionConfig(key_update_after_records=2**21)


def test_request_without_random_source_is_refused_unchanged() -> None:
    device, _ = pair()
    backend = Session.from_edhoc(prk_out=PRK_OUT, c_i=C_I, c_r=C_R, is_initiator=False,
                                 device_id=DEVICE_ID, now=0)
    topic, request = device.start_key_update(b"N" * 8, now=0)
    before = backend._state()
    with pytest.raises(LocalProtocolError):
        backend.open(topic, request, now=0)
    assert backend._state() == before
    [answer] = sends(backend.open(topic, request, now=0, random_bytes=rng(b"late")))
    assert device.open(answer.topic, answer.payload, now=0) == [KeyUpdateDone(DEVICE_ID, 1)]


def test_malformed_control_payload_refused_unchanged() -> None:
    _, backend = pair()
    ctx = oscore.from_edhoc(PRK_OUT, C_I, C_R, True)
    topic = "sealmq/v1/dev-1/data/up"
    for piv, body in enumerate([b"\xff", cbor.dumps([9, 1, b"N" * 8]), cbor.dumps([1, 1, b"n"]),
                                cbor.dumps([1, 5, b"N" * 8]), cbor.dumps([2, 1, b"N" * 8, b"M" * 8])]):
        rec = record.seal(ctx, kind=RecordKind.KEY_UPDATE, epoch=0, piv=piv, topic=topic, plaintext=body)
        before = backend._state()
        with pytest.raises(SealmqError):
            backend.open(topic, rec, now=0)
        assert backend._state() == before


def test_key_update_derivation_uses_both_nonces() -> None:
    a = kdf.key_update(PRK_OUT, b"A" * 8 + b"B" * 8)
    b = kdf.key_update(PRK_OUT, b"A" * 8 + b"C" * 8)
    assert a != b
