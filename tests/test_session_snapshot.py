"""Session snapshots (``Session.to_bytes`` / ``Session.from_bytes``, docs/protocol.md section 12).

The property: a session restored from its snapshot *is* the session. Hypothesis drives a device and a
backend session through random sequences of seals, deliveries (reordered, lost, duplicated, forged),
key updates started by either side and polls at various times, and at random points snapshots one
side and restores it; from then on the original and every restored copy get the same inputs and
must give the same outputs (the same record bytes, events and rejections) and keep the same state
(``_state(include_failed=True)``) and the same snapshot bytes. Randomness and time are injected, so
a run is reproducible.

The decoder is checked against every single-byte change and every truncation of real snapshots:
each either is a valid snapshot (and encodes back to the very same bytes) or raises a sealmq error.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealmq import cbor, record
from sealmq.errors import DecodeError, Reason, SealmqError
from sealmq.events import Publish
from sealmq.session import Session, SessionConfig
from sealmq.topics import RecordKind
from tests.test_session import C_I, C_R, DEVICE_ID, DOWN_KINDS, PRK_OUT, UP_KINDS

# Small windows and short timers, so that short runs reach every state: two held epochs, a pending
# update, buffered records, a retransmitted request, old epochs dropped, too-old sequence numbers.
CONFIGS = [
    SessionConfig(replay_window=16, key_update_after_records=10, key_update_after_seconds=60.0,
                  grace_seconds=5.0, old_epoch_max_seconds=40.0, key_update_retry_seconds=3.0,
                  max_buffered=3, max_failed_decryptions=6),
    SessionConfig(replay_window=40, grace_seconds=2.5, grace_records=3, old_epoch_max_seconds=20.0,
                  key_update_retry_seconds=4.0, max_buffered=2, max_failed_decryptions=3,
                  key_update_nonce_length=12, auto_key_update=False),
]


def rng(label: str) -> Callable[[int], bytes]:
    """Deterministic 'random' bytes, the same for every copy of a session given the same label."""
    counter = [0]

    def random_bytes(n: int) -> bytes:
        counter[0] += 1
        return hashlib.sha256(f"{label}/{counter[0]}".encode()).digest()[:n]

    return random_bytes


def fresh_pair(config: SessionConfig, now: float = 0.0) -> tuple[Session, Session]:
    common: dict[str, Any] = {"prk_out": PRK_OUT, "c_i": C_I, "c_r": C_R, "device_id": DEVICE_ID, "now": now,
                              "config": config}
    return Session.from_edhoc(is_initiator=True, **common), Session.from_edhoc(is_initiator=False, **common)


def restore(session: Session) -> Session:
    blob = session.to_bytes()
    copy = Session.from_bytes(blob, config=session.config)
    assert copy._state(include_failed=True) == session._state(include_failed=True)
    assert copy.to_bytes() == blob
    return copy


def outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    """What a call did, comparable across copies: its result, or the error type and reason."""
    try:
        return ("ok", fn())
    except SealmqError as exc:
        return ("error", type(exc).__name__, exc.reason)


class World:
    """A device and a backend, each as a list of copies that must behave identically, and the
    broker between them: per-topic queues from which the test delivers in any order."""

    def __init__(self, config: SessionConfig) -> None:
        device, backend = fresh_pair(config)
        self.copies = {"dev": [device], "back": [backend]}
        self.queues: dict[str, list[bytes]] = {}
        self.log: list[tuple[str, bytes]] = []
        self.now = 0.0
        self.step = 0
        self.snapshots: list[bytes] = []

    def publish(self, topic: str, data: bytes) -> None:
        self.queues.setdefault(topic, []).append(data)
        self.log.append((topic, data))

    def on_all(self, side: str, call: Callable[[Session], Any]) -> tuple[Any, ...]:
        results = [outcome(lambda s=s: call(s)) for s in self.copies[side]]
        assert all(r == results[0] for r in results), results
        states = [s._state(include_failed=True) for s in self.copies[side]]
        assert all(st_ == states[0] for st_ in states)
        if results[0][0] == "ok":
            value = results[0][1]
            events = value if isinstance(value, list) else []
            for e in events:
                if isinstance(e, Publish):
                    self.publish(e.topic, e.payload)
        return results[0]

    def receive(self, topic: str, data: bytes) -> None:
        side = "back" if topic.endswith("/up") else "dev"
        label = f"{side}/{self.step}"
        now = self.now
        self.on_all(side, lambda s: s.open(topic, data, now, rng(label)))


def apply(world: World, data: st.DataObject) -> None:
    world.step += 1
    ready = sorted(t for t, q in world.queues.items() if q)
    ops = ["seal-dev", "seal-back", "burst", "ku-dev", "ku-back", "poll", "snapshot", "replay", "forge"]
    ops += ["deliver"] * 4 * bool(ready) + ["lose"] * bool(ready)
    op = data.draw(st.sampled_from(ops), label="op")
    now = world.now
    if op.startswith("seal"):
        side = op[5:]
        kind = data.draw(st.sampled_from(UP_KINDS if side == "dev" else DOWN_KINDS), label="kind")
        payload = f"{side}-{world.step}".encode()
        res = world.on_all(side, lambda s: s.seal(kind, payload, now))
        if res[0] == "ok":
            world.publish(*res[1])
    elif op == "burst":  # several records at once: sequence numbers far apart, windows with many bits
        for i in range(data.draw(st.integers(2, 12), label="burst")):
            res = world.on_all("dev", lambda s, i=i: s.seal(RecordKind.MEDIA_CHUNK, bytes([i]) * 3, now))
            if res[0] == "ok":
                world.publish(*res[1])
    elif op.startswith("ku"):
        side = op[3:]
        nonce = hashlib.sha256(f"nonce/{world.step}".encode()).digest()[:data.draw(st.sampled_from([8, 16, 32]))]
        res = world.on_all(side, lambda s: s.start_key_update(nonce, now))
        if res[0] == "ok":
            world.publish(*res[1])
    elif op == "poll":
        world.now = now = now + data.draw(st.sampled_from([0.0, 0.5, 1.0, 2.75, 4.0, 6.0, 25.0, 45.0, 70.0]),
                                          label="dt")
        for side in data.draw(st.sampled_from([["dev"], ["back"], ["dev", "back"]]), label="who"):
            label = f"{side}/{world.step}"
            world.on_all(side, lambda s, label=label: s.poll(now, rng(label)))
    elif op == "snapshot":
        side = data.draw(st.sampled_from(["dev", "back"]), label="side")
        copies = world.copies[side]
        copy = restore(copies[data.draw(st.integers(0, len(copies) - 1), label="which")])
        world.snapshots.append(copy.to_bytes())
        copies.append(copy)
        if len(copies) > 3:
            del copies[0]  # the original too, eventually: a chain of restores
    elif op == "deliver":
        topic = data.draw(st.sampled_from(ready), label="topic")
        queue = world.queues[topic]
        # mostly in order (MQTT per topic), sometimes not
        index = data.draw(st.sampled_from([0, 0, 0, len(queue) - 1]), label="index")
        world.receive(topic, queue.pop(index))
    elif op == "lose":
        topic = data.draw(st.sampled_from(ready), label="topic")
        world.queues[topic].pop(0)
    elif op == "replay" and world.log:
        world.receive(*world.log[data.draw(st.integers(0, len(world.log) - 1), label="replayed")])
    elif op == "forge" and world.log:
        topic, rec = world.log[data.draw(st.integers(0, len(world.log) - 1), label="forged")]
        # anywhere, or in the tag (which reaches the decryption and counts as a failed one)
        pos = data.draw(st.integers(0, len(rec) - 1) | st.integers(len(rec) - 8, len(rec) - 1), label="pos")
        world.receive(topic, rec[:pos] + bytes([rec[pos] ^ 0x01]) + rec[pos + 1:])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), config=st.sampled_from(CONFIGS), length=st.integers(5, 80))
def test_a_restored_session_behaves_exactly_like_the_original(data: st.DataObject, config: SessionConfig,
                                                              length: int) -> None:
    world = World(config)
    for _ in range(length):
        apply(world, data)
    # and a last snapshot of every copy: the same bytes, the same state
    for side in ("dev", "back"):
        blobs = {s.to_bytes() for s in world.copies[side]}
        assert len(blobs) == 1
        assert restore(world.copies[side][-1]).to_bytes() in blobs


def test_the_property_run_reaches_every_part_of_the_snapshot() -> None:
    """A directed run through what the random one should also reach: the snapshot of each state
    is decoded and compared with the live session."""
    config = CONFIGS[0]
    device, backend = fresh_pair(config)
    t, r = device.seal(RecordKind.TELEMETRY, b"a", 1.0)
    backend.open(t, r, 1.0)
    # a forged record: a failed decryption is counted (and kept by the snapshot)
    t, r = device.seal(RecordKind.TELEMETRY, b"b", 1.0)
    forged = r[:-1] + bytes([r[-1] ^ 1])
    with pytest.raises(SealmqError):
        backend.open(t, forged, 1.0)
    assert restore(backend)._epochs[0].failed == 1
    # device asks; the backend answers and sends under the new epoch before the device knows
    t_req, req = device.start_key_update(b"R" * 8, 2.0)
    pending = restore(device)
    assert pending.key_update_pending
    out = backend.open(t_req, req, 2.0, rng("b"))
    answer = next(e for e in out if isinstance(e, Publish))
    assert restore(backend)._ku.answered is not None and restore(backend).epochs == (0, 1)
    t_cmd, cmd = backend.seal(RecordKind.COMMAND, b"new-epoch", 2.0)
    assert device.open(t_cmd, cmd, 2.0) == []  # buffered
    buffered = restore(device)
    assert len(buffered._buffer) == 1
    # the restored copy and the original open the answer identically (and drain the buffer)
    assert buffered.open(answer.topic, answer.payload, 3.0) == device.open(answer.topic, answer.payload, 3.0)
    assert restore(device)._ku.last_switch is not None
    assert buffered.to_bytes() == device.to_bytes()


# --- refusals -------------------------------------------------------------------------------------

@functools.cache
def rich_snapshots() -> list[bytes]:
    """Real snapshots of sessions in every kind of state (used by the mutation tests)."""
    config = CONFIGS[0]
    device, backend = fresh_pair(config)
    for i in range(3):
        backend.open(*device.seal(RecordKind.TELEMETRY, bytes([i]), 1.0), 1.0)
    t, r = device.seal(RecordKind.TELEMETRY, b"x", 1.0)
    with pytest.raises(SealmqError):
        backend.open(t, r[:-1] + bytes([r[-1] ^ 1]), 1.0)
    out = [backend.to_bytes()]
    t_req, req = device.start_key_update(b"Q" * 8, 2.0)
    answer = next(e for e in backend.open(t_req, req, 2.0, rng("x")) if isinstance(e, Publish))
    t_cmd, cmd = backend.seal(RecordKind.COMMAND, b"c", 2.0)
    device.open(t_cmd, cmd, 2.0)
    out += [device.to_bytes(), backend.to_bytes()]  # pending + buffer; two epochs + answered
    device.open(answer.topic, answer.payload, 3.0)
    backend.open(*device.seal(RecordKind.REPLY, b"r", 3.5), 3.5)
    out += [device.to_bytes(), backend.to_bytes()]  # switched, last_switch; peer switched
    device.poll(100.0)
    out.append(device.to_bytes())  # old epoch dropped
    return out


def test_only_version_1_and_complete_snapshots() -> None:
    blob = rich_snapshots()[0]
    items = cbor.loads(blob)
    for version in (0, 2, 1.0, True, "1"):
        with pytest.raises(DecodeError) as exc:
            Session.from_bytes(cbor.dumps([version, *items[1:]]), config=CONFIGS[0])
        assert exc.value.reason is Reason.UNSUPPORTED
    for bad in (items[:-1], [*items, False], {}, [], None):
        with pytest.raises(DecodeError):
            Session.from_bytes(cbor.dumps(bad), config=CONFIGS[0])


def _replace(blob: bytes, path: tuple[int, ...], value: Any) -> bytes:
    items = cbor.loads(blob)
    node = items
    for i in path[:-1]:
        node = node[i]
    node[path[-1]] = value
    return cbor.dumps(items)


@pytest.mark.parametrize(("path", "value", "reason"), [
    ((7,), bytes(32), Reason.MALFORMED),  # PRK_out that is not the current epoch's
    ((7,), bytes(31), Reason.WRONG_TYPE),
    ((5,), "sha512", Reason.UNSUPPORTED_ALGORITHM),
    ((6,), 11, Reason.UNSUPPORTED_ALGORITHM),
    ((3,), bytes(8), Reason.UNSUPPORTED),  # C_I too long for an OSCORE id
    ((4,), C_I, Reason.CONNECTION_ID_IN_USE),  # C_R = C_I
    ((1,), "Dev-1", Reason.WRONG_TYPE),
    ((8,), 5, Reason.MALFORMED),  # current epoch not held
    ((9, 0, 4), 1, Reason.WRONG_TYPE),  # a time as an integer
    ((9, 0, 4), float("inf"), Reason.WRONG_TYPE),
    ((9, 0, 7), 9.0, Reason.MALFORMED),  # the current epoch retired
    ((9, 0, 10), [-1, b"\x01"], Reason.MALFORMED),  # nothing seen but bits set
    ((9, 0, 10), [2, b"\x02"], Reason.MALFORMED),  # highest not marked
    ((9, 0, 10), [2, b"\x00\x07"], Reason.NOT_DETERMINISTIC),
    ((9, 0, 10), [2, b"\x0f"], Reason.MALFORMED),  # a bit below sequence number 0
    ((9, 0, 10), [100, b"\x01" + bytes(2)], Reason.TOO_LARGE),  # wider than the 16-bit window
    ((9, 0, 6), 7, Reason.WRONG_TYPE),  # more failed decryptions than the limit
    ((10, 0), [2, b"N" * 8, 0.5], Reason.MALFORMED),  # pending for an epoch after the next
    ((10, 1), [1, b"N" * 8, b"M" * 8], Reason.MALFORMED),  # answered with one epoch held
    ((10, 2), [3, b"N" * 8], Reason.MALFORMED),  # a completed update in the future
    ((10, 2), [1, b"N" * 7], Reason.WRONG_TYPE),
    ((11,), [["sealmq/v1/dev-1/data/down", b"\x00"]], Reason.WRONG_TOPIC),  # the backend's own send topic
])
def test_inconsistent_snapshots_are_refused(path: tuple[int, ...], value: Any, reason: Reason) -> None:
    blob = rich_snapshots()[0]  # the backend at epoch 0, one failed decryption
    Session.from_bytes(blob, config=CONFIGS[0])
    with pytest.raises(DecodeError) as exc:
        Session.from_bytes(_replace(blob, path, value), config=CONFIGS[0])
    assert exc.value.reason is reason


def test_buffered_records_must_be_ones_the_session_would_buffer() -> None:
    blob = rich_snapshots()[1]  # the device with a pending update and a buffered command
    restored = Session.from_bytes(blob, config=CONFIGS[0])
    (topic, _, data), = restored._buffer
    rec = record.decode(data)
    for bad in (record.Record(rec.kind, rec.kid, 0, rec.piv, rec.ciphertext),  # not the pending epoch
                record.Record(rec.kind, b"\x99", rec.epoch, rec.piv, rec.ciphertext),  # another kid
                record.Record(RecordKind.MEDIA_ACK, rec.kid, rec.epoch, rec.piv, rec.ciphertext)):  # wrong channel
        with pytest.raises(DecodeError):
            Session.from_bytes(_replace(blob, (11, 0, 1), bad.encode()), config=CONFIGS[0])
    with pytest.raises(DecodeError) as exc:  # more than max_buffered
        Session.from_bytes(_replace(blob, (11,), [[topic, data]] * 4), config=CONFIGS[0])
    assert exc.value.reason is Reason.TOO_LARGE


def test_the_snapshot_holds_no_configuration() -> None:
    """The importer's SessionConfig applies: the same snapshot under another config (when valid)."""
    blob = rich_snapshots()[0]
    wide = Session.from_bytes(blob, config=SessionConfig(replay_window=64))
    assert wide.config.replay_window == 64 and wide._ku.nonce_length == 8
    assert Session.from_bytes(blob, config=SessionConfig(key_update_nonce_length=20))._ku.nonce_length == 20
    with pytest.raises(DecodeError):  # sequence numbers 0..2 seen do not fit a window of 1
        Session.from_bytes(blob, config=SessionConfig(replay_window=1))


# --- mutations: nothing but sealmq errors, and what is accepted encodes back to itself ------------

def _check_mutant(data: bytes) -> bool:
    try:
        restored = Session.from_bytes(data, config=CONFIGS[0])
    except SealmqError:
        return False
    assert restored.to_bytes() == data
    return True


@pytest.mark.parametrize("index", range(6))
def test_every_single_byte_change_and_truncation(index: int) -> None:
    blob = rich_snapshots()[index]
    accepted = 0
    for pos in range(len(blob)):
        for flip in (0x01, 0x02, 0x10, 0x20, 0x80, 0xFF):
            accepted += _check_mutant(blob[:pos] + bytes([blob[pos] ^ flip]) + blob[pos + 1:])
        for value in (0x00, 0x17, 0x18, 0x40, 0xF4, 0xF6, 0xFB):
            if value != blob[pos]:
                accepted += _check_mutant(blob[:pos] + bytes([value]) + blob[pos + 1:])
        assert not _check_mutant(blob[:pos])  # a truncated snapshot is never one
        _check_mutant(blob[:pos] + blob[pos + 1:])  # a byte left out
    assert accepted > 0  # e.g. a changed ciphertext byte of a buffered record, a time, a nonce


def test_every_value_of_every_byte_of_one_snapshot() -> None:
    blob = rich_snapshots()[1]
    for pos in range(len(blob)):
        for value in range(256):
            if value != blob[pos]:
                _check_mutant(blob[:pos] + bytes([value]) + blob[pos + 1:])


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_edits_only_raise_sealmq_errors(data: st.DataObject) -> None:
    blob = bytearray(data.draw(st.sampled_from(rich_snapshots())))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        if action == "set":
            blob[pos] = data.draw(st.integers(0, 255))
        elif action == "insert":
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=9))
        elif len(blob) > 1:
            del blob[pos]
    _check_mutant(bytes(blob))


@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_sealmq_errors(data: bytes) -> None:
    _check_mutant(data)
