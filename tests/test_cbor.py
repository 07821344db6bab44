"""Strict deterministic CBOR: golden encodings, rejection of every non-deterministic form,
and the property that arbitrary bytes only ever raise DecodeError."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealmq import cbor, kdf
from sealmq.errors import DecodeError, Reason

plain = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.binary(max_size=40) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.integers(-30, 300) | st.text(max_size=4), children, max_size=5),
    max_leaves=20,
)


@pytest.mark.parametrize(
    ("value", "hex_"),
    [
        (0, "00"), (23, "17"), (24, "1818"), (256, "190100"), (-1, "20"), (-25, "3818"),
        (b"", "40"), ("a", "6161"), ([1, [2]], "82018102"), (None, "f6"), (True, "f5"),
        # RFC 8949 4.2.1: keys sorted bytewise on their encodings (not length-first)
        ({100: 1, -1: 2}, "a218640120" + "02"),
        ({"a": 1, 10: 2}, "a20a02616101"),
    ],
)
def test_golden_encodings(value: object, hex_: str) -> None:
    assert cbor.dumps(value).hex() == hex_
    assert cbor.loads(bytes.fromhex(hex_)) == value


@pytest.mark.parametrize(
    ("hex_", "reason"),
    [
        ("1800", Reason.NOT_DETERMINISTIC),  # 0 in two bytes
        ("190017", Reason.NOT_DETERMINISTIC),
        ("5f41ffff", Reason.NOT_DETERMINISTIC),  # indefinite byte string
        ("9f01ff", Reason.NOT_DETERMINISTIC),  # indefinite array
        ("a2616101" + "0a02", Reason.NOT_DETERMINISTIC),  # keys out of order
        ("0102", Reason.TRAILING_DATA),
        ("c11a00000000", Reason.UNSUPPORTED),  # tag
        ("f7", Reason.UNSUPPORTED),  # undefined
        ("", Reason.MALFORMED),
        ("ff", Reason.MALFORMED),
        ("5a ffffffff".replace(" ", ""), Reason.MALFORMED),  # claims 4 GiB, has none
    ],
)
def test_rejects(hex_: str, reason: Reason) -> None:
    with pytest.raises(DecodeError) as info:
        cbor.loads(bytes.fromhex(hex_))
    assert info.value.reason == reason


def test_too_deep_is_rejected() -> None:
    data = bytes([0x81] * 40) + b"\x00"
    with pytest.raises(DecodeError):
        cbor.loads(data)


@pytest.mark.parametrize("leaf", ["00", "6161", "4161", "f6", "a0", "80", "f93e00"])
def test_depth_limit_is_exact(leaf: str) -> None:
    # a leaf inside MAX_DEPTH arrays sits at depth MAX_DEPTH: accepted; one array more: refused
    # (whatever the leaf's type: the decoder's walk skips no scalar when it counts depth)
    ok = bytes([0x81] * cbor.MAX_DEPTH) + bytes.fromhex(leaf)
    assert cbor.dumps(cbor.loads(ok)) == ok
    with pytest.raises(DecodeError) as info:
        cbor.loads(b"\x81" + ok)
    assert info.value.reason == Reason.MALFORMED
    in_map = bytes([0x81] * (cbor.MAX_DEPTH - 1)) + b"\xa1\x61\x6b" + bytes.fromhex(leaf)
    assert cbor.dumps(cbor.loads(in_map)) == in_map
    with pytest.raises(DecodeError):
        cbor.loads(b"\x81" + in_map)


@given(plain)
def test_round_trip(value: object) -> None:
    encoded = cbor.dumps(value)
    assert cbor.loads(encoded) == value
    # cbor2 agrees on the meaning of what we write
    assert cbor2.loads(encoded) == value


@given(st.binary(max_size=64))
def test_arbitrary_bytes_only_raise_decode_error(data: bytes) -> None:
    try:
        value = cbor.loads(data)
    except DecodeError:
        return
    assert cbor.dumps(value) == data  # whatever is accepted is the one deterministic encoding


@given(st.lists(plain, min_size=1, max_size=4))
def test_sequence_round_trip(items: list[object]) -> None:
    assert cbor.loads_seq(cbor.dumps_seq(*items)) == items


@given(plain)
def test_fast_path_equals_the_pure_encoder(value: object) -> None:
    # dumps() hands map-free values to cbor2's C encoder: it must write the very same bytes
    assert cbor.dumps(value) == cbor.dumps_slow(value)


@given(st.lists(st.integers(min_value=-(2**64), max_value=2**64 - 1) | st.binary(max_size=300)
                | st.text(max_size=30) | st.booleans() | st.none(), max_size=8))
def test_fast_path_on_record_shaped_values(value: list[object]) -> None:
    assert cbor.dumps(value) == cbor.dumps_slow(value)
    assert cbor.dumps(tuple(value)) == cbor.dumps_slow(value)


# Maps whose keys share one major type take cbor2's encoder too (sealmq.cbor._fast_ok): every
# key class, with lengths across the head-size boundaries (23/24, 255/256, 65,535/65,536 ...).
_uint_keys = st.integers(min_value=0, max_value=2**64 - 1) | st.sampled_from([23, 24, 255, 256, 65535, 65536])
_nint_keys = st.integers(min_value=-(2**64), max_value=-1) | st.sampled_from([-24, -25, -256, -257])
_text_keys = st.text(max_size=30)
_bytes_keys = st.binary(max_size=300)
one_key_type_maps = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.binary(max_size=40) | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=4)
    | st.one_of(*(st.dictionaries(keys, children, max_size=6)
                  for keys in (_uint_keys, _nint_keys, _text_keys, _bytes_keys))),
    max_leaves=30,
)


@given(one_key_type_maps)
def test_fast_path_on_maps_with_one_key_type(value: object) -> None:
    assert cbor.dumps(value) == cbor.dumps_slow(value)


@pytest.mark.parametrize(("value", "hex_"), [
    ({1000: 1, "a": 2}, "a21903e8016161" "02"),  # bytewise: the integer key first, though longer
    ({"a": 1, -1000: 2}, "a23903e7026161" "01"),
    ({b"\x00\x00": 1, "": 2}, "a2420000016002"),
])
def test_mixed_key_types_sort_bytewise(value: object, hex_: str) -> None:
    assert cbor.dumps(value).hex() == hex_
    assert cbor.loads(bytes.fromhex(hex_)) == value


def _loads_or_none(data: bytes) -> Any:
    try:
        return cbor.loads(data)
    except DecodeError:
        return None


def _check_loads_array(data: bytes, max_items: int) -> None:
    whole = _loads_or_none(data)
    try:
        items = cbor.loads_array(data, max_items=max_items)
    except DecodeError:
        # refused: loads refuses it too, or it is not an array of at most max_items
        assert whole is None or not isinstance(whole, list) or len(whole) > max_items
        return
    # accepted: exactly what loads gives, and each raw slice is that element's one encoding
    assert isinstance(whole, list)
    assert [item for item, _ in items] == whole
    assert [raw for _, raw in items] == [cbor.dumps(item) for item in whole]
    assert data.endswith(b"".join(raw for _, raw in items))


@given(st.lists(plain, max_size=30), st.integers(0, 40))
def test_loads_array_of_valid_arrays(items: list[object], max_items: int) -> None:
    _check_loads_array(cbor.dumps(items), max_items)


@given(st.binary(max_size=80), st.integers(0, 40))
def test_loads_array_of_arbitrary_bytes(data: bytes, max_items: int) -> None:
    _check_loads_array(data, max_items)


@given(st.lists(plain, min_size=1, max_size=30), st.data())
def test_loads_array_of_mutated_arrays(items: list[object], data: st.DataObject) -> None:
    raw = bytearray(cbor.dumps(items))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    _check_loads_array(bytes(raw), 64)


@pytest.mark.parametrize("hex_", ["9801" "01", "9900010102", "9f01ff", "80ff", "9c", "8201", "a0", "9818"])
def test_loads_array_refuses(hex_: str) -> None:
    # a long head for a short count, indefinite length, trailing bytes, a reserved head, truncation, a map
    with pytest.raises(DecodeError):
        cbor.loads_array(bytes.fromhex(hex_), max_items=64)


deep_or_odd = st.recursive(
    plain | st.floats() | st.builds(bytearray, st.binary(max_size=4))
    | st.sampled_from(["\ud800", 2**64, -(2**64) - 1]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3) | st.integers(-5, 5),
                                                                      children, max_size=3),
    max_leaves=40,
)


def _nested(value: object, levels: int) -> object:
    for _ in range(levels):
        value = [value]
    return value


@given(deep_or_odd, st.integers(0, cbor.MAX_DEPTH + 2))
def test_dumps_strict_refuses_exactly_what_loads_would(value: object, levels: int) -> None:
    value = _nested(value, levels)
    try:
        expected: bytes | None = cbor.dumps(value)
        cbor.loads(expected)
    except (ValueError, TypeError, DecodeError):
        expected = None
    try:
        got: bytes | None = cbor.dumps_strict(value)
    except (ValueError, TypeError, DecodeError):
        got = None
    assert got == expected


@given(st.integers(min_value=-(2**64), max_value=2**64 - 1), st.binary(max_size=300),
       st.integers(min_value=-(2**64), max_value=2**64 - 1))
@settings(max_examples=500)
def test_edhoc_info_is_the_cbor_sequence_of_its_three_items(label: int, context: bytes, length: int) -> None:
    """kdf.edhoc_info writes the heads itself for the key schedule's labels and lengths; every
    input must give the generic encoder's bytes (the RFC 9529 traces check the usual ones)."""
    assert kdf.edhoc_info(label, context, length) == cbor.dumps_seq(label, context, length)
    small = (label % 24, context, length % 0x10000)
    assert kdf.edhoc_info(*small) == cbor.dumps_seq(*small)


# --- read_head: the fast decoders' head reader agrees with the strict decoder ----------------------

@given(st.sampled_from([0, 2]), st.one_of(st.integers(0, 2**64 - 1), st.sampled_from(
    [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1])), st.integers(0, 2**64 - 1))
def test_read_head_takes_only_the_shortest_form(major: int, value: int, max_value: int) -> None:
    """Every head form of ``value`` (shortest or longer, whole or cut short): read_head gives
    (value, head length) for the shortest whole one within max_value, None for every other."""
    uint = cbor.uint_head(value)  # the shortest head; a string's differs only in the major type
    shortest = bytes([uint[0] | major << 5]) + uint[1:]
    forms = [bytes([major << 5 | value])] if value < 24 else []
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * width):
            forms.append(bytes([major << 5 | info]) + value.to_bytes(width, "big"))
    for head in forms:
        expected = (value, len(head)) if value <= max_value and head == shortest else None
        assert cbor.read_head(head + b"\x00", 0, major, max_value) == expected
        assert cbor.read_head(head, 0, 2 - major, 2**64 - 1) is None  # the other major type
        if len(head) > 1:  # cut short
            try:
                assert cbor.read_head(head[:-1], 0, major, max_value) is None
            except IndexError:
                pytest.fail("a head cut after its first byte returns None")
