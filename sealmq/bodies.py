"""The application bodies of the data channel: telemetry, command, reply and acknowledgement
(docs/protocol.md section 7), as typed values with one encoder and one strict decoder each.

These are the plaintexts of sealed records of kinds TELEMETRY (device -> backend), COMMAND
(backend -> device), REPLY (device -> backend) and ACK (backend -> device). Telemetry and replies
carry the device's message id (``msg_id``, 1..2^63-1, increasing, never reused by a device): the
backend stores each id once and acknowledges it in an :class:`Ack` after it committed it.
Encoding is the project's deterministic CBOR (:mod:`sealmq.cbor`), byte for byte what
``device/agent.py`` and ``backend/service.py`` produce (``tests/test_bodies.py`` pins it).
Decoding accepts exactly the CDDL of the docs,
with the bounds stated there; anything else raises :class:`~sealmq.errors.BodyError` (reason
``bad_body``, or the CBOR reason when the bytes are not one strict CBOR item). Building a body with
values the peer would refuse raises :class:`~sealmq.errors.LocalProtocolError` (``bad_body``).

Typical use::

    plaintext = Telemetry.at(now, {"temp": 21.5}, msg_id).encode()   # device
    command = decode_command(received.plaintext)                 # device
    reply = Reply.success(command.id, result, msg_id).encode()   # device
    reply = decode_reply(received.plaintext)                     # backend: reply.id, reply.ok
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from sealmq import cbor
from sealmq.errors import BodyError, DecodeError, LocalProtocolError, Reason

# Command ids are the backend's SQLite row ids: a signed 64-bit integer, so never 2^63 or more.
MAX_COMMAND_ID = 2**63 - 1
MAX_COMMAND_NAME = 64  # bytes of UTF-8
MAX_REPLY_ERROR = 256  # bytes of UTF-8: an error type name or "unknown command <name>"

# Readings in one TELEMETRY record: a device with several readings queued seals them together
# (one record, one MQTT message, one broker acknowledgement for all of them).
MAX_TELEMETRY_BATCH = 64

TELEMETRY_TIME = "t"
TELEMETRY_VALUES = "v"
TELEMETRY_MSG_ID = "m"

# Message ids are stored as SQLite integers on both sides: 1..2^63-1 (0 means "none yet").
MAX_MSG_ID = 2**63 - 1
# A device never has more than this many messages in flight: it sends id X only while every id
# up to X - MESSAGE_WINDOW is acknowledged. The backend relies on it to bound its dedup memory.
MESSAGE_WINDOW = 256
MAX_ACK_RANGES = MESSAGE_WINDOW


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _id_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COMMAND_ID:
        return f"command id must be an integer 0..{MAX_COMMAND_ID}"
    return None


def _msg_id_problem(value: Any, low: int = 1) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_MSG_ID:
        return f"message id must be an integer {low}..{MAX_MSG_ID}"
    return None


def _text_problem(value: Any, what: str, max_bytes: int) -> str | None:
    if not isinstance(value, str):
        return f"{what} must be a text string"
    if _utf8_len(value) > max_bytes:
        return f"{what} longer than {max_bytes} bytes"
    return None


def _time_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "telemetry time must be a number"
    if isinstance(value, float) and not math.isfinite(value):
        return "telemetry time must be finite"
    return None


def _values_problem(value: Any) -> str | None:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return "telemetry values must be a map with text keys"
    return None


def _refuse_local(problem: str | None) -> None:
    if problem is not None:
        raise LocalProtocolError(Reason.BAD_BODY, problem)


def _refuse_remote(problem: str | None) -> None:
    if problem is not None:
        raise BodyError(Reason.BAD_BODY, problem)


def _encode(item: Any, what: str) -> bytes:
    """Encode, and refuse what the peer's strict decoder would refuse (e.g. nesting too deep)."""
    try:
        data = cbor.dumps_strict(item)
    except (TypeError, ValueError, DecodeError) as exc:
        raise LocalProtocolError(Reason.BAD_BODY, f"{what} cannot be sent as strict CBOR") from exc
    return data


def _load(data: bytes, what: str) -> Any:
    try:
        return cbor.loads(data)
    except DecodeError as exc:
        raise BodyError(exc.reason, f"{what}: {exc.detail}") from None


# --- telemetry --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Telemetry:
    """``{"m": msg_id, "t": time, "v": values}``: readings by name at the device's clock ``time``
    (seconds since 1970, UTC). ``values`` is any map with text keys; its values are any plain CBOR
    data. ``msg_id`` is the device's message id (the backend stores each id once)."""

    time: int | float
    values: dict[str, Any]
    msg_id: int

    def __post_init__(self) -> None:
        _refuse_local(_time_problem(self.time) or _values_problem(self.values) or _msg_id_problem(self.msg_id))

    @classmethod
    def at(cls, now: float, values: dict[str, Any], msg_id: int) -> Telemetry:
        """Telemetry stamped ``now`` at millisecond resolution (what the agent sends)."""
        return cls(round(now, 3), values, msg_id)

    def encode(self) -> bytes:
        return _encode({TELEMETRY_MSG_ID: self.msg_id, TELEMETRY_TIME: self.time, TELEMETRY_VALUES: self.values},
                       "telemetry")

    def __repr__(self) -> str:  # reading values never go to logs
        return f"Telemetry(msg_id={self.msg_id}, time={self.time}, names={sorted(self.values)})"


def _telemetry_of(item: Any) -> Telemetry:
    if not isinstance(item, dict) or set(item) != {TELEMETRY_MSG_ID, TELEMETRY_TIME, TELEMETRY_VALUES}:
        raise BodyError(Reason.BAD_BODY, 'telemetry must be a map of exactly "m", "t" and "v"')
    _refuse_remote(_time_problem(item[TELEMETRY_TIME]) or _values_problem(item[TELEMETRY_VALUES])
                   or _msg_id_problem(item[TELEMETRY_MSG_ID]))
    # checked just above: built without running __post_init__'s same checks again
    reading = object.__new__(Telemetry)
    object.__setattr__(reading, "time", item[TELEMETRY_TIME])
    object.__setattr__(reading, "values", item[TELEMETRY_VALUES])
    object.__setattr__(reading, "msg_id", item[TELEMETRY_MSG_ID])
    return reading


def decode_telemetry(data: bytes) -> Telemetry:
    """Strictly decode one reading (a ``telemetry`` map); raises :class:`BodyError`."""
    return _telemetry_of(_load(data, "telemetry"))


@dataclass(frozen=True, slots=True)
class TelemetryBatch:
    """``[2*64 telemetry]``: several readings in one TELEMETRY record, message ids strictly
    increasing. ``bodies`` holds each reading's own encoding (what the device's outbox committed
    and what the backend stores, reading by reading)."""

    readings: tuple[Telemetry, ...]
    bodies: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _refuse_local(_batch_problem(self.readings) or (
            None if len(self.bodies) == len(self.readings) else "one body per reading"))

    @classmethod
    def of(cls, readings: list[Telemetry]) -> TelemetryBatch:
        return cls(tuple(readings), tuple(r.encode() for r in readings))

    def encode(self) -> bytes:
        return encode_telemetry_batch(self.bodies)

    def __repr__(self) -> str:  # reading values never go to logs
        return f"TelemetryBatch(msg_ids={[r.msg_id for r in self.readings]})"


def _batch_problem(readings: tuple[Telemetry, ...]) -> str | None:
    if not 2 <= len(readings) <= MAX_TELEMETRY_BATCH:
        return f"a telemetry batch holds 2..{MAX_TELEMETRY_BATCH} readings"
    if any(a.msg_id >= b.msg_id for a, b in itertools.pairwise(readings)):
        return "the message ids of a telemetry batch must be strictly increasing"
    return None


def encode_telemetry_batch(bodies: list[bytes] | tuple[bytes, ...]) -> bytes:
    """The TELEMETRY body of several readings already encoded (``Telemetry.encode``, as the
    device's outbox holds them): the CBOR array head, then the readings' bytes as they are. The
    caller keeps the batch rules (2..64 readings, increasing ids); the backend refuses the rest."""
    if not 2 <= len(bodies) <= MAX_TELEMETRY_BATCH:
        raise LocalProtocolError(Reason.BAD_BODY, f"a telemetry batch holds 2..{MAX_TELEMETRY_BATCH} readings")
    return cbor.array_head(len(bodies)) + b"".join(bodies)


def decode_telemetry_body(data: bytes) -> Telemetry | TelemetryBatch:
    """Strictly decode a TELEMETRY record's body: one reading (a map) or a batch (an array of 2..64
    readings, message ids strictly increasing); raises :class:`BodyError`."""
    if data[:1] and data[0] >> 5 != 4:  # not an array: one reading
        return decode_telemetry(data)
    try:
        items = cbor.loads_array(data, max_items=MAX_TELEMETRY_BATCH)
    except DecodeError as exc:
        raise BodyError(exc.reason, f"telemetry: {exc.detail}") from None
    readings = tuple(_telemetry_of(item) for item, _ in items)
    _refuse_remote(_batch_problem(readings))
    return TelemetryBatch(readings, tuple(raw for _, raw in items))


def telemetry_readings(data: bytes) -> list[tuple[Telemetry, bytes]]:
    """Every reading of a TELEMETRY body with its own encoding (the backend stores them one by one)."""
    body = decode_telemetry_body(data)
    if isinstance(body, Telemetry):
        return [(body, data)]
    return list(zip(body.readings, body.bodies, strict=True))


# --- command ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Command:
    """``[id, name, args]``: run command ``name`` with ``args`` (any plain CBOR data, or null).
    ``id`` is the backend's command number; the reply carries it back."""

    id: int
    name: str
    args: Any = None

    def __post_init__(self) -> None:
        _refuse_local(_id_problem(self.id) or _text_problem(self.name, "command name", MAX_COMMAND_NAME))

    def encode(self) -> bytes:
        return _encode([self.id, self.name, self.args], "command")

    def __repr__(self) -> str:  # arguments never go to logs
        return f"Command(id={self.id}, name={self.name!r})"


def decode_command(data: bytes) -> Command:
    """Strictly decode a COMMAND body; raises :class:`BodyError`."""
    item = _load(data, "command")
    if not isinstance(item, list) or len(item) != 3:
        raise BodyError(Reason.BAD_BODY, "command must be an array [id, name, args]")
    _refuse_remote(_id_problem(item[0]) or _text_problem(item[1], "command name", MAX_COMMAND_NAME))
    return Command(item[0], item[1], item[2])


# --- reply ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Reply:
    """``[id, true, result, msg_id]`` or ``[id, false, error, msg_id]``: the outcome of command
    ``id``, sent as the device's message ``msg_id``.

    ``value`` is the result (any plain CBOR data) when ``ok``, else the error text. Build with
    :meth:`success`, :meth:`failure` or :meth:`unknown_command`.
    """

    id: int
    ok: bool
    value: Any
    msg_id: int

    def __post_init__(self) -> None:
        _refuse_local(_id_problem(self.id) or _reply_problem(self.ok, self.value) or _msg_id_problem(self.msg_id))

    @classmethod
    def success(cls, command_id: int, result: Any, msg_id: int) -> Reply:
        return cls(command_id, True, result, msg_id)

    @classmethod
    def failure(cls, command_id: int, error: str, msg_id: int) -> Reply:
        """A failed command; ``error`` is a short text such as the handler's exception type name."""
        return cls(command_id, False, error, msg_id)

    @classmethod
    def unknown_command(cls, command_id: int, name: str, msg_id: int) -> Reply:
        """The device has no handler for ``name`` (the text the agent has always sent)."""
        return cls(command_id, False, f"unknown command {name}", msg_id)

    @property
    def error(self) -> str | None:
        return None if self.ok else str(self.value)

    def encode(self) -> bytes:
        return _encode([self.id, self.ok, self.value, self.msg_id], "reply")

    def __repr__(self) -> str:  # results never go to logs
        return f"Reply(id={self.id}, ok={self.ok}, msg_id={self.msg_id})"


def _reply_problem(ok: Any, value: Any) -> str | None:
    if not isinstance(ok, bool):
        return "reply ok must be true or false"
    return None if ok else _text_problem(value, "reply error", MAX_REPLY_ERROR)


def decode_reply(data: bytes) -> Reply:
    """Strictly decode a REPLY body; raises :class:`BodyError`."""
    item = _load(data, "reply")
    if not isinstance(item, list) or len(item) != 4:
        raise BodyError(Reason.BAD_BODY, "reply must be an array [id, ok, result-or-error, msg_id]")
    _refuse_remote(_id_problem(item[0]) or _reply_problem(item[1], item[2]) or _msg_id_problem(item[3]))
    return Reply(item[0], item[1], item[2], item[3])


# --- acknowledgement --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ack:
    """``[cumulative, [[first, last], ...]]``: the backend has committed every message id up to
    ``cumulative`` (0: none) and each id in the ranges, which lie above ``cumulative + 1``, are
    sorted, and neither overlap nor touch. Sent only after the commit, batched per device."""

    cumulative: int
    ranges: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        _refuse_local(_ack_problem(self.cumulative, self.ranges))

    def covers(self, msg_id: int) -> bool:
        return msg_id <= self.cumulative or any(first <= msg_id <= last for first, last in self.ranges)

    def encode(self) -> bytes:
        return _encode([self.cumulative, [list(r) for r in self.ranges]], "ack")

    @classmethod
    def of(cls, cumulative: int, ids: Any) -> Ack:
        """The ack for ``cumulative`` and the ids above it (any iterable of ints > cumulative + 1)."""
        ranges: list[tuple[int, int]] = []
        for i in sorted(ids):
            if ranges and i == ranges[-1][1] + 1:
                ranges[-1] = (ranges[-1][0], i)
            else:
                ranges.append((i, i))
        return cls(cumulative, tuple(ranges))


def _ack_problem(cumulative: Any, ranges: Any) -> str | None:
    problem = _msg_id_problem(cumulative, low=0)
    if problem is not None:
        return "ack cumulative: " + problem
    if not isinstance(ranges, list | tuple) or len(ranges) > MAX_ACK_RANGES:
        return f"ack ranges must be an array of at most {MAX_ACK_RANGES}"
    floor = cumulative + 1  # each range starts above the previous one's end + 1
    for r in ranges:
        if not isinstance(r, list | tuple) or len(r) != 2 or _msg_id_problem(r[0]) or _msg_id_problem(r[1]):
            return "ack range must be [first, last] message ids"
        if not floor < r[0] <= r[1]:
            return "ack ranges must be sorted, above cumulative + 1, and neither overlap nor touch"
        floor = r[1] + 1
    return None


def decode_ack(data: bytes) -> Ack:
    """Strictly decode an ACK body; raises :class:`BodyError`."""
    item = _load(data, "ack")
    if not isinstance(item, list) or len(item) != 2:
        raise BodyError(Reason.BAD_BODY, "ack must be an array [cumulative, ranges]")
    _refuse_remote(_ack_problem(item[0], item[1]))
    return Ack(item[0], tuple((r[0], r[1]) for r in item[1]))
