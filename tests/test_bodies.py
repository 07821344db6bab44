"""sealmq.bodies: the telemetry/command/reply/ack codec. Golden bytes (what device/agent.py and
backend/service.py put in records today), strictness and bounds, Hypothesis round trips, and
garbage / mutations that must give a typed BodyError and nothing else."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealmq import cbor
from sealmq.bodies import (
    MAX_ACK_RANGES,
    MAX_COMMAND_ID,
    MAX_MSG_ID,
    Ack,
    Command,
    Reply,
    Telemetry,
    TelemetryBatch,
    decode_ack,
    decode_command,
    decode_reply,
    decode_telemetry,
    decode_telemetry_body,
    telemetry_readings,
)
from sealmq.errors import BodyError, DecodeError, LocalProtocolError, Reason

# --- golden: the bytes the agent and the service produce (expressions copied from them) ---------

VALUES = {"temp": 21.5, "n": 1, "ok": True, "tags": ["a", "b"], "raw": b"\x00"}
GOLDEN = [
    # device/agent.py send_telemetry: {"m": msg_id, "t": round(time.time(), 3), "v": values}
    (Telemetry.at(1700000000.12345, VALUES, 7),
     "a3616d076174fb41d954fc4007df3b6176a5616e01626f6bf5637261774100647461677382616161626474656d70f94d60",
     cbor.dumps({"m": 7, "t": round(1700000000.12345, 3), "v": VALUES})),
    (Telemetry.at(0.5, {}, MAX_MSG_ID), "a3616d1b7fffffffffffffff6174f938006176a0",
     cbor.dumps({"m": MAX_MSG_ID, "t": 0.5, "v": {}})),
    # backend/service.py _send_pending_commands: cbor.dumps([cmd.id, cmd.name, cbor.loads(cmd.args)]),
    # args stored as cbor.dumps(None) when the command takes none
    (Command(1, "ping"), "83016470696e67f6", cbor.dumps([1, "ping", None])),
    (Command(7, "status", {"why": 1}), "830766737461747573a16377687901", cbor.dumps([7, "status", {"why": 1}])),
    # device/agent.py _run_command: [command_id, ok, result-or-error, msg_id]
    (Reply.success(1, "pong", 8), "8401f564706f6e6708", cbor.dumps([1, True, "pong", 8])),
    (Reply.unknown_command(3, "nope", 9), "8403f474756e6b6e6f776e20636f6d6d616e64206e6f706509",
     cbor.dumps([3, False, "unknown command nope", 9])),
    (Reply.failure(4, "KeyError", 10), "8404f4684b65794572726f720a", cbor.dumps([4, False, "KeyError", 10])),
    # backend/ingest.py: the ledger's acknowledgement [cumulative, [[first, last], ...]]
    (Ack(0), "820080", cbor.dumps([0, []])),
    (Ack.of(5, [7, 8, 10]), "820582820708820a0a", cbor.dumps([5, [[7, 8], [10, 10]]])),
]


@pytest.mark.parametrize(("body", "hex_bytes", "legacy"), GOLDEN, ids=lambda v: repr(v)[:30])
def test_encoding_is_what_the_apps_send_today(body: Any, hex_bytes: str, legacy: bytes) -> None:
    assert body.encode() == legacy
    assert body.encode().hex() == hex_bytes


@pytest.mark.parametrize(("body", "hex_bytes", "legacy"), GOLDEN, ids=lambda v: repr(v)[:30])
def test_golden_bodies_decode_back(body: Any, hex_bytes: str, legacy: bytes) -> None:
    assert _decoder_of(body)(legacy) == body


def test_reply_accessors() -> None:
    assert Reply.success(1, {"a": 1}, 1).error is None
    assert Reply.unknown_command(2, "x", 1).error == "unknown command x"
    assert decode_reply(cbor.dumps([5, False, "E", 1])).ok is False


def test_reprs_carry_no_payload() -> None:
    assert "21.5" not in repr(Telemetry(1, {"temp": 21.5}, 1))
    assert "secret" not in repr(Command(1, "set", "secret")) + repr(Reply.success(1, "secret", 1))


def test_ack_covers_cumulative_and_ranges() -> None:
    ack = Ack.of(5, [7, 8, 10])
    assert [i for i in range(13) if ack.covers(i)] == [0, 1, 2, 3, 4, 5, 7, 8, 10]
    assert decode_ack(Ack.of(0, range(2, 2 + 2 * MAX_ACK_RANGES, 2)).encode()).ranges[-1] == (2 * MAX_ACK_RANGES,) * 2


@pytest.mark.parametrize("bad_id", [MAX_MSG_ID + 1, 0, -1, True, 1.0, None])
def test_message_id_out_of_range_is_a_typed_error(bad_id: Any) -> None:
    for data in (cbor.dumps({"m": bad_id, "t": 1, "v": {}}), cbor.dumps([1, True, None, bad_id])):
        decode = decode_telemetry if data[:1] == b"\xa3" else decode_reply
        with pytest.raises(BodyError) as exc:
            decode(data)
        assert exc.value.reason is Reason.BAD_BODY
    with pytest.raises(LocalProtocolError):
        Telemetry(1, {}, bad_id)


# --- bounds and strictness ----------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", [MAX_COMMAND_ID + 1, 2**64 - 1, -1, True, 1.0, "1", None])
def test_command_id_out_of_range_is_a_typed_error(bad_id: Any) -> None:
    for body in ([bad_id, "ping", None], [bad_id, True, "pong", 1]):
        data = cbor.dumps(body)
        decode = decode_command if isinstance(body[1], str) else decode_reply
        with pytest.raises(BodyError) as exc:
            decode(data)
        assert exc.value.reason is Reason.BAD_BODY
    with pytest.raises(LocalProtocolError):
        Command(bad_id, "ping")


def test_largest_command_id_is_accepted() -> None:
    assert decode_command(Command(MAX_COMMAND_ID, "ping").encode()).id == MAX_COMMAND_ID
    assert decode_reply(Reply.success(MAX_COMMAND_ID, None, 1).encode()).id == MAX_COMMAND_ID


REFUSED = [
    ("telemetry", cbor.dumps({"m": 1, "t": 1})),
    ("telemetry", cbor.dumps({"t": 1, "v": {}})),  # no message id
    ("telemetry", cbor.dumps({"m": 1, "t": 1, "v": {}, "x": 0})),
    ("telemetry", cbor.dumps({"m": 1, "t": True, "v": {}})),
    ("telemetry", cbor.dumps({"m": 1, "t": "1", "v": {}})),
    ("telemetry", cbor.dumps({"m": 1, "t": math.nan, "v": {}})),
    ("telemetry", cbor.dumps({"m": 1, "t": math.inf, "v": {}})),
    ("telemetry", cbor.dumps({"m": 1, "t": 1, "v": {1: 2}})),
    ("telemetry", cbor.dumps({"m": 1, "t": 1, "v": [1]})),
    ("telemetry", cbor.dumps({"m": "1", "t": 1, "v": {}})),
    ("telemetry", cbor.dumps([1, {}])),
    ("command", cbor.dumps([1, "ping"])),
    ("command", cbor.dumps([1, "ping", None, None])),
    ("command", cbor.dumps([1, b"ping", None])),
    ("command", cbor.dumps([1, "x" * 65, None])),
    ("command", cbor.dumps([1, "é" * 33, None])),  # 66 bytes of UTF-8
    ("command", cbor.dumps({"id": 1})),
    ("reply", cbor.dumps([1, 1, "pong", 1])),
    ("reply", cbor.dumps([1, None, "pong", 1])),
    ("reply", cbor.dumps([1, False, 42, 1])),
    ("reply", cbor.dumps([1, False, "e" * 257, 1])),
    ("reply", cbor.dumps([1, True, "pong"])),  # no message id
    ("reply", cbor.dumps([1, True])),
    ("ack", cbor.dumps([0])),
    ("ack", cbor.dumps([-1, []])),
    ("ack", cbor.dumps([5, [[6, 7]]])),  # touches cumulative: would be cumulative 7
    ("ack", cbor.dumps([5, [[9, 8]]])),
    ("ack", cbor.dumps([5, [[9, 10], [11, 12]]])),  # ranges touch
    ("ack", cbor.dumps([5, [[12, 13], [9, 10]]])),  # not sorted
    ("ack", cbor.dumps([5, [[9]]])),
    ("ack", cbor.dumps([0, [[2 * i + 2, 2 * i + 2] for i in range(MAX_ACK_RANGES + 1)]])),
    ("ack", cbor.dumps([MAX_MSG_ID + 1, []])),
]
_T1, _T2 = Telemetry(1, {"a": 1}, 5).encode(), Telemetry(2, {}, 6).encode()
REFUSED += [
    ("telemetry-body", cbor.array_head(1) + _T1),  # one reading is sent as the map itself
    ("telemetry-body", cbor.array_head(2) + _T2 + _T1),  # ids decreasing
    ("telemetry-body", cbor.array_head(2) + _T1 + _T1),  # the same id twice
    ("telemetry-body", cbor.array_head(2) + _T1 + cbor.dumps(7)),
    ("telemetry-body", cbor.array_head(2) + _T1 + cbor.dumps({"m": 7, "t": 1, "v": {}, "x": 0})),
    ("telemetry-body", cbor.array_head(2) + _T1 + cbor.array_head(2) + _T1 + _T2),  # nested batch
    ("telemetry-body", cbor.array_head(0)),
    ("telemetry", cbor.array_head(2) + _T1 + _T2),  # a batch is not one reading
]
DECODERS = {"telemetry": decode_telemetry, "command": decode_command, "reply": decode_reply, "ack": decode_ack,
            "telemetry-body": decode_telemetry_body}


@pytest.mark.parametrize(("kind", "data"), REFUSED)
def test_wrong_shapes_are_bad_body(kind: str, data: bytes) -> None:
    with pytest.raises(BodyError) as exc:
        DECODERS[kind](data)
    assert exc.value.reason is Reason.BAD_BODY


@pytest.mark.parametrize("kind", sorted(DECODERS))
@pytest.mark.parametrize(("data", "reason"), [
    (b"", Reason.MALFORMED),
    (b"\x83\x01", Reason.MALFORMED),
    (b"\x18\x01", Reason.NOT_DETERMINISTIC),
    (b"\x01\x01", Reason.TRAILING_DATA),
    (b"\xc1\x01", Reason.UNSUPPORTED),  # a tag
])
def test_cbor_failures_keep_their_reason(kind: str, data: bytes, reason: Reason) -> None:
    with pytest.raises(BodyError) as exc:
        DECODERS[kind](data)
    assert exc.value.reason is reason


def test_bodies_the_peer_would_refuse_cannot_be_built() -> None:
    with pytest.raises(LocalProtocolError):
        Command(1, "x" * 65)
    with pytest.raises(LocalProtocolError):
        Reply(1, False, 3, 1)
    with pytest.raises(LocalProtocolError):
        Telemetry(math.nan, {}, 1)
    with pytest.raises(LocalProtocolError):
        Telemetry(1, {2: 3}, 1)  # type: ignore[dict-item]
    with pytest.raises(LocalProtocolError):
        Ack(5, ((6, 6),))
    with pytest.raises(LocalProtocolError):
        Command(1, "set", {1, 2}).encode()  # a set has no CBOR form
    deep: Any = 0
    for _ in range(20):
        deep = [deep]
    with pytest.raises(LocalProtocolError):
        Command(1, "set", deep).encode()  # the strict decoder would refuse the nesting


# --- properties -----------------------------------------------------------------------------------

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats(allow_nan=False)
    | st.binary(max_size=16) | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ids = st.integers(0, MAX_COMMAND_ID)
msg_ids = st.integers(1, MAX_MSG_ID)
names = st.text(max_size=64).filter(lambda s: len(s.encode("utf-8", "surrogatepass")) <= 64)
telemetry = st.builds(Telemetry, st.floats(allow_nan=False, allow_infinity=False) | st.integers(0, 2**40),
                      st.dictionaries(st.text(max_size=8), plain, max_size=5), msg_ids)
batches = st.lists(telemetry, min_size=2, max_size=6).flatmap(
    lambda readings: st.lists(msg_ids, min_size=len(readings), max_size=len(readings), unique=True).map(
        lambda ids_: TelemetryBatch.of([Telemetry(r.time, r.values, i)
                                        for r, i in zip(readings, sorted(ids_), strict=True)])))
bodies = st.one_of(
    telemetry,
    batches,
    st.builds(Command, ids, names, plain),
    st.builds(Reply.success, ids, plain, msg_ids),
    st.builds(Reply.failure, ids, st.text(max_size=40), msg_ids),
    st.builds(lambda c, extra: Ack.of(c, {c + 2 + i for i in extra}), st.integers(0, 2**40),
              st.sets(st.integers(0, 2**20), max_size=MAX_ACK_RANGES)),
)


def _decoder_of(body: Any) -> Any:
    return {Telemetry: decode_telemetry, Command: decode_command, Reply: decode_reply, Ack: decode_ack,
            TelemetryBatch: decode_telemetry_body}[type(body)]


def _same(a: Any, b: Any) -> bool:
    # -0.0 == 0.0 in Python, but they are different CBOR: compare encodings too
    return bool(a == b and a.encode() == b.encode())


@settings(max_examples=300)
@given(bodies)
def test_round_trip(body: Any) -> None:
    data = body.encode()
    assert _same(_decoder_of(body)(data), body)


@settings(max_examples=300)
@given(st.sampled_from(sorted(DECODERS)), st.binary(max_size=64))
def test_garbage_gives_a_typed_error_or_a_valid_body(kind: str, data: bytes) -> None:
    try:
        body = DECODERS[kind](data)
    except BodyError:
        return
    assert body.encode() == data  # accepted: then it is exactly its own encoding


@settings(max_examples=300)
@given(bodies, st.data())
def test_mutations_give_a_typed_error_or_a_valid_body(body: Any, data: st.DataObject) -> None:
    raw = bytearray(body.encode())
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del raw[pos:pos + data.draw(st.integers(1, 4))]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=3))
    for decode in DECODERS.values():
        try:
            decoded = decode(bytes(raw))
        except BodyError as exc:
            assert isinstance(exc, DecodeError)
            continue
        assert decoded.encode() == bytes(raw)


def test_a_batch_of_64_readings_keeps_each_reading_as_sent() -> None:
    readings = [Telemetry.at(1_700_000_000 + i, {"n": i, "raw": bytes(i)}, 1000 + 3 * i) for i in range(64)]
    data = TelemetryBatch.of(readings).encode()
    assert data[:2] == bytes([0x98, 64])
    got = telemetry_readings(data)
    assert [t for t, _ in got] == readings
    assert [raw for _, raw in got] == [r.encode() for r in readings]  # what the backend stores, one by one
    assert telemetry_readings(readings[0].encode()) == [(readings[0], readings[0].encode())]
    assert isinstance(decode_telemetry_body(readings[5].encode()), Telemetry)
    with pytest.raises(LocalProtocolError):
        TelemetryBatch.of([*readings, Telemetry(0, {}, 5000)])  # 65
    too_many = cbor.array_head(65) + b"".join(Telemetry(1, {}, i).encode() for i in range(1, 66))
    with pytest.raises(BodyError) as exc:
        decode_telemetry_body(too_many)
    assert exc.value.reason is Reason.TOO_LARGE
    with pytest.raises(LocalProtocolError):
        TelemetryBatch.of(readings[:1])
    with pytest.raises(LocalProtocolError):
        TelemetryBatch.of([readings[1], readings[0]])
