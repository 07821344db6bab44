"""The application bodies of the data channel: telemetry, command and reply (docs/protocol.md
section 7), as typed values with one encoder and one strict decoder each.

These are the plaintexts of sealed records of kinds TELEMETRY (device -> backend), COMMAND
(backend -> device) and REPLY (device -> backend). Encoding is the project's deterministic CBOR
(:mod:`sealmq.cbor`), byte for byte what ``device/agent.py`` and ``backend/service.py`` have
always produced (``tests/test_bodies.py`` pins it). Decoding accepts exactly the CDDL of the docs,
with the bounds stated there; anything else raises :class:`~sealmq.errors.BodyError` (reason
``bad_body``, or the CBOR reason when the bytes are not one strict CBOR item). Building a body with
values the peer would refuse raises :class:`~sealmq.errors.LocalProtocolError` (``bad_body``).

Typical use::

    plaintext = Telemetry.at(now, {"temp": 21.5}).encode()      # device
    command = decode_command(received.plaintext)                 # device
    reply = Reply.success(command.id, result).encode()           # device
    reply = decode_reply(received.plaintext)                     # backend: reply.id, reply.ok
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sealmq import cbor
from sealmq.errors import BodyError, DecodeError, LocalProtocolError, Reason

# Command ids are the backend's SQLite row ids: a signed 64-bit integer, so never 2^63 or more.
MAX_COMMAND_ID = 2**63 - 1
MAX_COMMAND_NAME = 64  # bytes of UTF-8
MAX_REPLY_ERROR = 256  # bytes of UTF-8: an error type name or "unknown command <name>"

TELEMETRY_TIME = "t"
TELEMETRY_VALUES = "v"


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _id_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COMMAND_ID:
        return f"command id must be an integer 0..{MAX_COMMAND_ID}"
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
        data = cbor.dumps(item)
        cbor.loads(data)
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
    """``{"t": time, "v": values}``: readings by name at the device's clock ``time`` (seconds since
    1970, UTC). ``values`` is any map with text keys; its values are any plain CBOR data."""

    time: int | float
    values: dict[str, Any]

    def __post_init__(self) -> None:
        _refuse_local(_time_problem(self.time) or _values_problem(self.values))

    @classmethod
    def at(cls, now: float, values: dict[str, Any]) -> Telemetry:
        """Telemetry stamped ``now`` at millisecond resolution (what the agent sends)."""
        return cls(round(now, 3), values)

    def encode(self) -> bytes:
        return _encode({TELEMETRY_TIME: self.time, TELEMETRY_VALUES: self.values}, "telemetry")

    def __repr__(self) -> str:  # reading values never go to logs
        return f"Telemetry(time={self.time}, names={sorted(self.values)})"


def decode_telemetry(data: bytes) -> Telemetry:
    """Strictly decode a TELEMETRY body; raises :class:`BodyError`."""
    item = _load(data, "telemetry")
    if not isinstance(item, dict) or set(item) != {TELEMETRY_TIME, TELEMETRY_VALUES}:
        raise BodyError(Reason.BAD_BODY, 'telemetry must be a map of exactly "t" and "v"')
    _refuse_remote(_time_problem(item[TELEMETRY_TIME]) or _values_problem(item[TELEMETRY_VALUES]))
    return Telemetry(item[TELEMETRY_TIME], item[TELEMETRY_VALUES])


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
    """``[id, true, result]`` or ``[id, false, error]``: the outcome of command ``id``.

    ``value`` is the result (any plain CBOR data) when ``ok``, else the error text. Build with
    :meth:`success`, :meth:`failure` or :meth:`unknown_command`.
    """

    id: int
    ok: bool
    value: Any = None

    def __post_init__(self) -> None:
        _refuse_local(_id_problem(self.id) or _reply_problem(self.ok, self.value))

    @classmethod
    def success(cls, command_id: int, result: Any) -> Reply:
        return cls(command_id, True, result)

    @classmethod
    def failure(cls, command_id: int, error: str) -> Reply:
        """A failed command; ``error`` is a short text such as the handler's exception type name."""
        return cls(command_id, False, error)

    @classmethod
    def unknown_command(cls, command_id: int, name: str) -> Reply:
        """The device has no handler for ``name`` (the text the agent has always sent)."""
        return cls(command_id, False, f"unknown command {name}")

    @property
    def error(self) -> str | None:
        return None if self.ok else str(self.value)

    def encode(self) -> bytes:
        return _encode([self.id, self.ok, self.value], "reply")

    def __repr__(self) -> str:  # results never go to logs
        return f"Reply(id={self.id}, ok={self.ok})"


def _reply_problem(ok: Any, value: Any) -> str | None:
    if not isinstance(ok, bool):
        return "reply ok must be true or false"
    return None if ok else _text_problem(value, "reply error", MAX_REPLY_ERROR)


def decode_reply(data: bytes) -> Reply:
    """Strictly decode a REPLY body; raises :class:`BodyError`."""
    item = _load(data, "reply")
    if not isinstance(item, list) or len(item) != 3:
        raise BodyError(Reason.BAD_BODY, "reply must be an array [id, ok, result-or-error]")
    _refuse_remote(_id_problem(item[0]) or _reply_problem(item[1], item[2]))
    return Reply(item[0], item[1], item[2])
