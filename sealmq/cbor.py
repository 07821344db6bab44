"""Strict CBOR: the only way the protocol core decodes bytes from the wire.

Every message sealmq accepts must be *deterministically encoded* (RFC 8949 section 4.2.1:
shortest-form integers and lengths, definite lengths, sorted map keys), contain only the
plain data model (integers, byte and text strings, arrays, maps, floats, false, true, null;
no tags, no undefined, no other simple value) and nest at most :data:`MAX_DEPTH` deep.
Anything else raises :class:`~sealmq.errors.DecodeError`, never a cbor2 exception.

Rejecting non-deterministic encodings is what RFC 9529 section 4 asks of EDHOC, and it
also closes a malleability channel: the same message has exactly one valid encoding.
"""

from __future__ import annotations

import io
import math
from typing import Any

import cbor2

from sealmq.errors import DecodeError, Reason

MAX_DEPTH = 16

_PLAIN_SCALARS = (int, bytes, str, bool, float, type(None))


def _head(major: int, value: int) -> bytes:
    mt = major << 5
    if value < 24:
        return bytes([mt | value])
    if value < 0x100:
        return bytes([mt | 24, value])
    if value < 0x10000:
        return bytes([mt | 25]) + value.to_bytes(2, "big")
    if value < 0x100000000:
        return bytes([mt | 26]) + value.to_bytes(4, "big")
    if value < 0x10000000000000000:
        return bytes([mt | 27]) + value.to_bytes(8, "big")
    raise ValueError("integer out of CBOR range")


def _encode(obj: Any, out: list[bytes]) -> None:
    if obj is True:
        out.append(b"\xf5")
    elif obj is False:
        out.append(b"\xf4")
    elif obj is None:
        out.append(b"\xf6")
    elif isinstance(obj, int):
        out.append(_head(0, obj) if obj >= 0 else _head(1, -1 - obj))
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        raw = bytes(obj)
        out.append(_head(2, len(raw)))
        out.append(raw)
    elif isinstance(obj, str):
        raw = obj.encode("utf-8")
        out.append(_head(3, len(raw)))
        out.append(raw)
    elif isinstance(obj, (list, tuple)):
        out.append(_head(4, len(obj)))
        for item in obj:
            _encode(item, out)
    elif isinstance(obj, dict):
        pairs = sorted((dumps(k), v) for k, v in obj.items())
        out.append(_head(5, len(pairs)))
        for key, value in pairs:
            out.append(key)
            _encode(value, out)
    elif isinstance(obj, float):
        out.append(cbor2.dumps(obj, canonical=True))  # shortest exact float form
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} deterministically")


_MAP_FREE_SCALARS = frozenset({bytes, str, bool, type(None), float})
_INT_MIN = -(2**64)
_INT_MAX = 2**64 - 1


def _map_free(obj: Any, depth: int = 0) -> bool:
    """True if ``obj`` holds no map (nor anything cbor2 would encode differently from us)."""
    t = type(obj)
    if t is int:
        return bool(_INT_MIN <= obj <= _INT_MAX)
    if t in _MAP_FREE_SCALARS:
        return True
    if (t is list or t is tuple) and depth < MAX_DEPTH:
        for item in obj:
            ti = type(item)
            if ti in _MAP_FREE_SCALARS:
                continue
            if not _map_free(item, depth + 1):
                return False
        return True
    return False


def dumps(obj: Any) -> bytes:
    """Encode deterministically (RFC 8949 section 4.2.1: bytewise-sorted map keys).

    Without maps, deterministic encoding is just shortest-form heads and definite lengths, which is
    exactly what cbor2's C encoder writes: that fast path serves the records and AADs on every
    message. Maps go through our own encoder, because cbor2's ``canonical`` sorts keys length-first
    (RFC 7049), not bytewise (RFC 8949). ``tests/test_cbor.py`` checks both paths agree.
    """
    if _map_free(obj):
        return cbor2.dumps(obj, canonical=True)
    out: list[bytes] = []
    _encode(obj, out)
    return b"".join(out)


def dumps_slow(obj: Any) -> bytes:
    """The pure encoder, without the fast path (for tests that compare the two)."""
    out: list[bytes] = []
    _encode(obj, out)
    return b"".join(out)


def dumps_seq(*items: Any) -> bytes:
    """Encode a CBOR sequence (RFC 8742): the concatenation of each item's encoding."""
    return b"".join(dumps(i) for i in items)


def _check_plain(obj: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise DecodeError(Reason.MALFORMED, "nesting too deep")
    if isinstance(obj, _PLAIN_SCALARS):
        return
    if isinstance(obj, list):
        for item in obj:
            _check_plain(item, depth + 1)
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, depth + 1)
            _check_plain(value, depth + 1)
        return
    raise DecodeError(Reason.UNSUPPORTED, f"CBOR item of type {type(obj).__name__} not allowed")


def _decode_one(stream: io.BytesIO) -> Any:
    try:
        return cbor2.CBORDecoder(stream).decode()
    except DecodeError:
        raise
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError,
            MemoryError, IndexError, KeyError, UnicodeError, EOFError) as exc:
        raise DecodeError(Reason.MALFORMED, f"not well-formed CBOR ({type(exc).__name__})") from None


def _check_item(item: Any, raw: bytes) -> None:
    _check_plain(item, 0)
    try:
        again = dumps(item)
    except (ValueError, TypeError) as exc:
        raise DecodeError(Reason.MALFORMED, f"cannot re-encode ({type(exc).__name__})") from None
    if again != raw:
        raise DecodeError(Reason.NOT_DETERMINISTIC, "CBOR item is not deterministically encoded")


def loads(data: bytes) -> Any:
    """Decode exactly one deterministic CBOR data item; trailing bytes are an error."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(Reason.WRONG_TYPE, "expected bytes")
    data = bytes(data)
    if not data:
        raise DecodeError(Reason.MALFORMED, "empty input")
    stream = io.BytesIO(data)
    item = _decode_one(stream)
    end = stream.tell()
    if end != len(data):
        raise DecodeError(Reason.TRAILING_DATA, f"{len(data) - end} bytes after the CBOR item")
    _check_item(item, data)
    return item


def loads_seq(data: bytes, *, max_items: int = 64) -> list[Any]:
    """Decode a CBOR sequence of deterministic items (e.g. an EDHOC message)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(Reason.WRONG_TYPE, "expected bytes")
    data = bytes(data)
    if not data:
        raise DecodeError(Reason.MALFORMED, "empty input")
    stream = io.BytesIO(data)
    items: list[Any] = []
    start = 0
    while start < len(data):
        if len(items) >= max_items:
            raise DecodeError(Reason.TOO_LARGE, "too many items in CBOR sequence")
        item = _decode_one(stream)
        end = stream.tell()
        _check_item(item, data[start:end])
        items.append(item)
        start = end
    return items


# --- typed accessors: shape checks that raise DecodeError(WRONG_TYPE) ------------------------

def as_bytes(value: Any, what: str, *, max_len: int | None = None) -> bytes:
    if not isinstance(value, bytes):
        raise DecodeError(Reason.WRONG_TYPE, f"{what} must be a byte string")
    if max_len is not None and len(value) > max_len:
        raise DecodeError(Reason.TOO_LARGE, f"{what} longer than {max_len} bytes")
    return value


def as_uint(value: Any, what: str, *, max_value: int = 2**64 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > max_value:
        raise DecodeError(Reason.WRONG_TYPE, f"{what} must be an unsigned integer <= {max_value}")
    return value


def as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError(Reason.WRONG_TYPE, f"{what} must be an integer")
    return value


def as_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise DecodeError(Reason.WRONG_TYPE, f"{what} must be true or false")
    return value


def as_float(value: Any, what: str) -> float:
    """A finite float (a time, in state snapshots); an integer is refused, so each value has one encoding."""
    if type(value) is not float or not math.isfinite(value):
        raise DecodeError(Reason.WRONG_TYPE, f"{what} must be a finite float")
    return value


def as_text(value: Any, what: str, *, max_len: int | None = None) -> str:
    if not isinstance(value, str):
        raise DecodeError(Reason.WRONG_TYPE, f"{what} must be a text string")
    if max_len is not None and len(value) > max_len:
        raise DecodeError(Reason.TOO_LARGE, f"{what} longer than {max_len} characters")
    return value


def as_list(value: Any, what: str, *, length: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise DecodeError(Reason.WRONG_TYPE, f"{what} must be an array")
    if length is not None and len(value) != length:
        raise DecodeError(Reason.WRONG_TYPE, f"{what} must have {length} elements")
    return value


def as_map(value: Any, what: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise DecodeError(Reason.WRONG_TYPE, f"{what} must be a map")
    return value
