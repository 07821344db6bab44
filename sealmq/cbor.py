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


_FAST_SCALARS = frozenset({bytes, str, bool, type(None), float})
_INT_MIN = -(2**64)
_INT_MAX = 2**64 - 1


def _key_class(key: Any) -> int:
    """The major type of a map key cbor2 sorts the way RFC 8949 does (0, 1, 2, 3), else -1."""
    t = type(key)
    if t is str:
        return 3
    if t is bytes:
        return 2
    if t is int and _INT_MIN <= key <= _INT_MAX:
        return 0 if key >= 0 else 1
    return -1


def _fast_ok(obj: Any, depth: int = 0) -> bool:
    """True if cbor2's canonical encoder writes ``obj`` exactly as :func:`dumps_slow` does.

    Scalars and arrays: cbor2 writes shortest-form heads and definite lengths, as we do. Maps:
    cbor2's ``canonical`` sorts keys length-first (RFC 7049), RFC 8949 bytewise. The two orders
    agree when every key of a map has the same major type (within one major type a longer
    encoding has a larger head byte, and equal lengths compare bytewise in both), so such maps
    (the protocol's bodies: text or integer keys) take the fast path; mixed keys do not.
    """
    t = type(obj)
    if t is int:
        return bool(_INT_MIN <= obj <= _INT_MAX)
    if t in _FAST_SCALARS:
        return True
    if depth >= MAX_DEPTH:
        return False
    if t is list or t is tuple:
        for item in obj:
            if type(item) in _FAST_SCALARS:
                continue
            if not _fast_ok(item, depth + 1):
                return False
        return True
    if t is dict:
        major = -2
        for key, value in obj.items():
            k = _key_class(key)
            if k < 0 or major not in (k, -2):
                return False
            major = k
            if type(value) not in _FAST_SCALARS and not _fast_ok(value, depth + 1):
                return False
        return True
    return False


def dumps(obj: Any) -> bytes:
    """Encode deterministically (RFC 8949 section 4.2.1: bytewise-sorted map keys).

    Deterministic encoding is shortest-form heads, definite lengths and bytewise-sorted map keys.
    cbor2's C encoder with ``canonical`` writes exactly that for every value :func:`_fast_ok`
    accepts (no map, or maps whose keys share one major type): that fast path serves the records,
    AADs and bodies of every message. Other maps go through our own encoder, because cbor2 sorts
    keys of mixed types length-first (RFC 7049), not bytewise (RFC 8949). ``tests/test_cbor.py``
    checks both paths agree.
    """
    if _fast_ok(obj):
        return cbor2.dumps(obj, canonical=True)
    out: list[bytes] = []
    _encode(obj, out)
    return b"".join(out)


def dumps_strict(obj: Any) -> bytes:
    """:func:`dumps`, refusing (``ValueError``/``TypeError``, or :class:`DecodeError`) what
    :func:`loads` would refuse: the bytes a peer's strict decoder accepts as they are.

    What :func:`_fast_ok` accepts is plain data, nested at most :data:`MAX_DEPTH` deep, and cbor2
    writes it deterministically: :func:`loads` accepts it by construction, so it is not decoded
    again (``tests/test_cbor.py`` checks both agree). Anything else is encoded, then decoded.
    """
    if _fast_ok(obj):
        return cbor2.dumps(obj, canonical=True)
    data = dumps(obj)
    loads(data)
    return data


def uint_head(value: int) -> bytes:
    """Shortest CBOR head of an unsigned integer (major type 0) below 2**64."""
    if value < 24:
        return bytes((value,))
    if value < 0x100:
        return bytes((0x18, value))
    if value < 0x10000:
        return b"\x19" + value.to_bytes(2, "big")
    if value < 0x100000000:
        return b"\x1a" + value.to_bytes(4, "big")
    return b"\x1b" + value.to_bytes(8, "big")


def read_head(data: bytes, i: int, major: int, max_value: int) -> tuple[int, int] | None:
    """(argument, next index) of a shortest-form head of major type ``major`` at ``data[i]``: an
    unsigned integer's value (major 0) or a string's length (2, 3), at most ``max_value``. None for
    anything else (another major type, a longer head than needed, too large, truncated). May raise
    IndexError when ``data[i]`` is missing. For the hand-written fast decoders
    (:func:`sealmq.record.decode_fast`, :func:`sealmq.media.decode_chunk`), which fall back to
    :func:`loads` on None."""
    b = data[i]
    if b >> 5 != major:
        return None
    info = b & 0x1F
    if info < 24:
        value, i = info, i + 1
    elif info <= 27:  # a 1-, 2-, 4- or 8-byte argument, which must not fit the next shorter form
        width = 1 << (info - 24)
        value, i = int.from_bytes(data[i + 1:i + 1 + width], "big"), i + 1 + width
        if value < (24 if width == 1 else 1 << (4 * width)):
            return None
    else:
        return None
    return (value, i) if value <= max_value and i <= len(data) else None


def bstr_head(length: int) -> bytes:
    """Shortest CBOR head of a byte string of ``length`` bytes (major type 2), up to 2**32 - 1."""
    if length < 24:
        return bytes((0x40 | length,))
    if length < 0x100:
        return bytes((0x58, length))
    if length < 0x10000:
        return b"\x59" + length.to_bytes(2, "big")
    return b"\x5a" + length.to_bytes(4, "big")


def array_head(count: int) -> bytes:
    """The deterministic head of an array of ``count`` elements (what precedes their encodings)."""
    return _head(4, count)


def dumps_slow(obj: Any) -> bytes:
    """The pure encoder, without the fast path (for tests that compare the two)."""
    out: list[bytes] = []
    _encode(obj, out)
    return b"".join(out)


def dumps_seq(*items: Any) -> bytes:
    """Encode a CBOR sequence (RFC 8742): the concatenation of each item's encoding."""
    return b"".join(dumps(i) for i in items)


def _check_plain(obj: Any, depth: int) -> bool:
    """Refuse anything outside the plain data model or nested too deep; returns :func:`_fast_ok`
    of ``obj`` (one walk instead of two for every decoded item)."""
    if depth > MAX_DEPTH:
        raise DecodeError(Reason.MALFORMED, "nesting too deep")
    t = type(obj)
    if t in _FAST_SCALARS:
        return True
    if t is int:
        return bool(_INT_MIN <= obj <= _INT_MAX)
    if obj and depth >= MAX_DEPTH and (t is list or t is dict):
        raise DecodeError(Reason.MALFORMED, "nesting too deep")  # its items would be too deep
    if t is list:
        fast = depth < MAX_DEPTH
        for item in obj:
            if type(item) not in _FAST_SCALARS and not _check_plain(item, depth + 1):
                fast = False
        return fast
    if t is dict:
        fast = depth < MAX_DEPTH
        major = -2
        for key, value in obj.items():
            if type(key) not in _FAST_SCALARS:
                _check_plain(key, depth + 1)
            k = _key_class(key)
            if k < 0 or major not in (k, -2):
                fast = False
            major = k
            if type(value) not in _FAST_SCALARS and not _check_plain(value, depth + 1):
                fast = False
        return fast
    if isinstance(obj, _PLAIN_SCALARS):  # a subclass cbor2 may hand back: plain, but not fast
        return False
    raise DecodeError(Reason.UNSUPPORTED, f"CBOR item of type {type(obj).__name__} not allowed")


def _decode_one(stream: io.BytesIO) -> Any:
    try:
        return cbor2.CBORDecoder(stream).decode()
    except DecodeError:
        raise
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError,
            MemoryError, IndexError, KeyError, UnicodeError, EOFError) as exc:
        raise DecodeError(Reason.MALFORMED, f"not well-formed CBOR ({type(exc).__name__})") from None


def _check_item(item: Any, raw: bytes, depth: int = 0) -> None:
    fast = _check_plain(item, depth)
    try:
        again = cbor2.dumps(item, canonical=True) if fast else dumps_slow(item)
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


def loads_array(data: bytes, *, max_items: int) -> list[tuple[Any, bytes]]:
    """Decode exactly one deterministic CBOR array of at most ``max_items`` elements; returns
    each element with the bytes that encode it in ``data`` (a receiver that stores the elements
    one by one keeps the very bytes the sender sealed). Accepts exactly what :func:`loads` accepts
    when that is such an array; raises :class:`~sealmq.errors.DecodeError` otherwise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(Reason.WRONG_TYPE, "expected bytes")
    data = bytes(data)
    if not data:
        raise DecodeError(Reason.MALFORMED, "empty input")
    if data[0] >> 5 != 4:
        raise DecodeError(Reason.WRONG_TYPE, "expected an array")
    info = data[0] & 0x1F
    if info < 24:
        count, start = info, 1
    elif info <= 27:
        start = 1 + (1 << (info - 24))
        if len(data) < start:
            raise DecodeError(Reason.MALFORMED, "not well-formed CBOR (truncated array head)")
        count = int.from_bytes(data[1:start], "big")
        if count < (24 if info == 24 else 1 << (8 << (info - 25))):
            raise DecodeError(Reason.NOT_DETERMINISTIC, "CBOR item is not deterministically encoded")
    elif info == 31:
        raise DecodeError(Reason.NOT_DETERMINISTIC, "CBOR item is not deterministically encoded")
    else:
        raise DecodeError(Reason.MALFORMED, "not well-formed CBOR (reserved additional information)")
    if count > max_items:
        raise DecodeError(Reason.TOO_LARGE, f"array of more than {max_items} items")
    stream = io.BytesIO(data)
    stream.seek(start)
    out: list[tuple[Any, bytes]] = []
    for _ in range(count):
        begin = stream.tell()
        item = _decode_one(stream)
        raw = data[begin:stream.tell()]
        _check_item(item, raw, 1)
        out.append((item, raw))
    end = stream.tell()
    if end != len(data):
        raise DecodeError(Reason.TRAILING_DATA, f"{len(data) - end} bytes after the CBOR item")
    return out


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
