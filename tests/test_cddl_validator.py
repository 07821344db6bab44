"""Unit tests of tests/cddl.py, the CDDL validator the protocol docs are checked with.

The validator is itself test code, so it gets its own tests: every supported construct accepts
what RFC 8610 says it should and refuses the rest, the shapes pycddl 0.6 gets wrong are handled,
and on shapes pycddl gets right both validators agree on arbitrary values (a differential test).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sealmq import cbor
from tests.cddl import CddlError, CddlSyntaxError, Schema, cddl_from_markdown

# The EDHOC message_1 CDDL of RFC 9528 (section 5.2.1 and 3.8), verbatim apart from the frame rule.
EDHOC = """
message_1 = (
  METHOD : int,
  SUITES_I : suites,
  G_X : bstr,
  C_I : bstr / -24..23,
  ? EAD_1,
)
suites = [ 2* int ] / int
EAD_1 = 1* ead
ead = (
  ead_label : int,
  ? ead_value : bstr,
)
frame = [ true, message_1 ] / [ c_x, message_3 ]
c_x = bstr / -24..23
message_3 = ( CIPHERTEXT_3 : bstr )
"""


def rejects(schema: Schema, value: Any, rule: str) -> CddlError:
    with pytest.raises(CddlError) as exc:
        schema.validate(value, rule)
    return exc.value


# --- what pycddl 0.6 gets wrong ---------------------------------------------------------------

def test_edhoc_message_1_shapes() -> None:
    s = Schema(EDHOC)
    good = [
        [True, 3, 2, b"gx", 5],                          # one suite as an int, C_I an int
        [True, 3, [6, 2], b"gx", b"\x01\x02"],           # suites as an array, C_I a bstr
        [True, 0, [6, 2, -24], b"gx", -24, 1, b"v"],      # one EAD with a value
        [True, 0, 2, b"gx", 23, 1, -5, b"v", 7],          # three EADs, mixed with and without value
        [b"\x07", b"ciphertext"],                        # the other frame alternative
        [-3, b"ciphertext"],
    ]
    for value in good:
        s.validate(value, "frame")
    assert s.matches([3, 2, b"gx", 5], "[ message_1 ]")
    bad = {
        "one-element suite array": [True, 3, [2], b"gx", 5],
        "C_I out of range": [True, 3, 2, b"gx", 24],
        "C_I below range": [True, 3, 2, b"gx", -25],
        "EAD value without label": [True, 3, 2, b"gx", 5, b"v"],
        "G_X missing": [True, 3, 2],
        "false marker": [False, 3, 2, b"gx", 5],
        "bool as METHOD": [True, True, 2, b"gx", 5],
        "message_3 with a second item": [b"\x07", b"ct", b"extra"],
        "empty": [],
    }
    for why, value in bad.items():
        assert not s.matches(value, "frame"), why


def test_backtracking_like_a_regex() -> None:
    s = Schema("""
    a = [ * int, int, tstr ]              ; the star must give back one int
    b = [ * (int, ? bstr), bstr ]         ; which bstr belongs to the group is only known at the end
    c = [ 2*3 uint, 2*3 (tstr) ]
    d = [ + (tstr, int) // + bool ]
    """)
    assert s.matches([1, 2, 3, "x"], "a")
    assert s.matches([1, "x"], "a")
    assert not s.matches(["x"], "a")
    assert s.matches([1, b"x", 2, b"y"], "b")  # last bstr is the final entry, not group 2's value
    assert s.matches([b"y"], "b")
    assert not s.matches([1, b"x", 2], "b")
    assert s.matches([1, 2, "a", "b"], "c")
    assert s.matches([1, 2, 3, "a", "b", "c"], "c")
    assert not s.matches([1, "a", "b"], "c")
    assert not s.matches([1, 2, 3, 4, "a", "b"], "c")
    assert not s.matches([1, 2, "a", "b", "c", "d"], "c")
    assert s.matches(["a", 1, "b", 2], "d")
    assert s.matches([True, False], "d")
    assert not s.matches(["a", 1, True], "d")


def test_negative_and_exclusive_ranges() -> None:
    s = Schema("""
    r = -24..23
    x = 0...10
    f = -1.5..2.5
    """)
    for v in (-24, -1, 0, 23):
        assert s.matches(v, "r")
    for v in (-25, 24, 1.0, True, "1"):
        assert not s.matches(v, "r")
    assert s.matches(9, "x")
    assert not s.matches(10, "x")
    assert s.matches(-1.5, "f")
    assert s.matches(2.5, "f")
    assert not s.matches(2, "f")  # an int is not a float
    assert not s.matches(2.6, "f")


# --- literals, prelude, choices ----------------------------------------------------------------

def test_literals_and_strict_types() -> None:
    s = Schema("""
    i = 0x10 / 0b101 / -7
    t = "a\\"b" / "x"
    b = h'01 02 ff' / b64'AQI' / 'hi'
    f = 1.5
    """)
    assert [s.matches(v, "i") for v in (16, 5, -7, 7, True)] == [True, True, True, False, False]
    assert s.matches('a"b', "t")
    assert not s.matches("ab", "t")
    assert [s.matches(v, "b") for v in (b"\x01\x02\xff", b"\x01\x02", b"hi", "hi")] == [True] * 3 + [False]
    assert s.matches(1.5, "f")
    assert not s.matches(1, "f")


@pytest.mark.parametrize(("prim", "accepted"), [
    ("int", {"i", "n"}), ("uint", {"i"}), ("nint", {"n"}), ("bstr", {"b"}), ("bytes", {"b"}),
    ("tstr", {"t"}), ("text", {"t"}), ("bool", {"T", "F"}), ("true", {"T"}), ("false", {"F"}),
    ("nil", {"0"}), ("null", {"0"}), ("float", {"f"}), ("number", {"i", "n", "f"}),
    ("any", {"i", "n", "b", "t", "T", "F", "0", "f", "a", "m"}),
])
def test_prelude_types(prim: str, accepted: set[str]) -> None:
    samples = {"i": 3, "n": -3, "b": b"x", "t": "x", "T": True, "F": False, "0": None, "f": 0.5,
               "a": [1], "m": {1: 2}}
    s = Schema(f"r = {prim}")
    assert {k for k, v in samples.items() if s.matches(v, "r")} == accepted


def test_type_and_group_choices_sockets_unwrap_enum() -> None:
    s = Schema("""
    t = int / [tstr] / { 1 => bool }
    g = [ int, int // tstr ]
    $ext /= int
    $ext /= tstr
    hdr = [ a: uint, b: bstr ]
    more = [ ~hdr, c: tstr ]
    colors = &( red: 1, green: 2 )
    """)
    assert all(s.matches(v, "t") for v in (1, ["a"], {1: True}))
    assert not any(s.matches(v, "t") for v in ("a", [1], {1: 1}, {2: True}))
    assert s.matches([1, 2], "g")
    assert s.matches(["a"], "g")
    assert not s.matches([1, "a"], "g")
    assert s.matches(1, "$ext")
    assert s.matches("1", "$ext")
    assert not s.matches(b"1", "$ext")
    assert s.matches([1, b"x", "c"], "more")
    assert not s.matches([1, b"x"], "more")
    assert s.matches(2, "colors")
    assert not s.matches(3, "colors")


# --- maps --------------------------------------------------------------------------------------

def test_maps() -> None:
    s = Schema("""
    m = { 1 => int, ? 2 => tstr, * tstr => bstr }
    k = { name: tstr, ? "n" : uint }
    c = { ? 1 ^ => uint, * int => any }   ; cut: key 1 with a wrong value is not caught by the star
    nc = { ? 1 => uint, * int => any }    ; no cut: it is
    g = { hdr, 3 => bool }
    hdr = ( 1 => int, 2 => int )
    e = {}
    """)
    assert s.matches({1: 5}, "m")
    assert s.matches({1: 5, 2: "x", "a": b"", "b": b"1"}, "m")
    assert rejects(s, {2: "x"}, "m").message.startswith("missing key 1")
    assert rejects(s, {1: 5, 3: 1}, "m").path == "${3}"
    assert rejects(s, {1: 5, "a": 1}, "m").path == "${'a'}"
    assert not s.matches({1: True}, "m")  # True is not an int (and True == 1 in Python)
    assert not s.matches({True: 5}, "m")
    assert s.matches({"name": "x"}, "k")
    assert s.matches({"name": "x", "n": 3}, "k")
    assert not s.matches({"name": 1}, "k")
    assert not s.matches({"name": "x", "n": -1}, "k")
    assert s.matches({1: 0, 5: "x"}, "c")
    assert not s.matches({1: "x"}, "c")
    assert s.matches({1: "x"}, "nc")
    assert s.matches({1: 1, 2: 2, 3: False}, "g")
    assert not s.matches({1: 1, 3: False}, "g")
    assert s.matches({}, "e")
    assert not s.matches({1: 1}, "e")
    assert not s.matches([], "e")


# --- controls ----------------------------------------------------------------------------------

def test_size_control() -> None:
    s = Schema("""
    b = bstr .size 4
    r = bstr .size (1..3)
    t = tstr .size (0..2)   ; bytes of UTF-8, not characters
    u = uint .size 1
    """)
    assert s.matches(b"abcd", "b")
    assert not s.matches(b"abc", "b")
    assert not s.matches("abcd", "b")
    assert [s.matches(bytes(n), "r") for n in range(5)] == [False, True, True, True, False]
    assert s.matches("ab", "t")
    assert not s.matches("é1", "t")  # 3 bytes of UTF-8
    assert s.matches(255, "u")
    assert not s.matches(256, "u")


def test_cbor_and_regexp_and_comparisons() -> None:
    s = Schema("""
    wrapped = bstr .cbor inner
    inner = { 1 => -7 / -8 }
    seq = bstr .cborseq [ int, tstr ]
    id = tstr .regexp "[a-z0-9][a-z0-9._-]{0,3}"
    small = uint .le 10
    big = int .gt -2
    same = tstr .eq "x"
    """)
    assert s.matches(cbor.dumps({1: -8}), "wrapped")
    assert not s.matches(cbor.dumps({1: -9}), "wrapped")
    assert not s.matches(b"\xa1\x01", "wrapped")  # truncated CBOR
    assert not s.matches(b"\xa1\x18\x01\x26", "wrapped")  # not deterministic (1 in two bytes)
    assert not s.matches({1: -8}, "wrapped")
    err = rejects(s, cbor.dumps({1: 5}), "wrapped")
    assert err.path == "$<cbor>{1}"
    assert s.matches(cbor.dumps_seq(1, "a"), "seq")
    assert not s.matches(cbor.dumps_seq(1), "seq")
    assert s.matches("a.b-", "id")
    assert not s.matches("a.b-c", "id")   # too long: the match must be full, not a prefix
    assert s.matches("x", "id")
    assert not s.matches("-ab", "id")     # first char restricted: not a search
    assert [s.matches(v, "small") for v in (0, 10, 11, -1)] == [True, True, False, False]
    assert [s.matches(v, "big") for v in (-1, -2, True)] == [True, False, False]
    assert s.matches("x", "same")
    assert not s.matches("y", "same")


# --- errors ------------------------------------------------------------------------------------

def test_error_paths_point_at_the_culprit() -> None:
    s = Schema(EDHOC + "\nouter = { 1 => [ * frame ] }")
    err = rejects(s, [True, 3, 2, b"gx", 24], "frame")
    assert err.path == "$[4]"
    assert "-24..23" in err.message
    err = rejects(s, {1: [[True, 3, 2, b"gx", 1], [True, 3, [2], b"gx", 1]]}, "outer")
    assert err.path.startswith("${1}[1][2]")
    err = rejects(s, [True, 3, 2], "frame")
    assert err.path == "$[3]"
    assert "missing" in err.message


@pytest.mark.parametrize("text", [
    "a = ",                            # no type
    "a = [int",                        # unbalanced
    "a = {1 => int",
    "a = undefined-name",              # typo in a rule name
    "a = [ * b ]",
    "a = int .frobnicate 3",           # unknown control
    "a = #6.24(bstr)",                 # tags are not supported
    "a<t> = [t]",                      # generics are not supported
    "a = int\na = tstr",               # defined twice
    "int = tstr",                      # redefining the prelude
    "a = h'0g'",                       # bad hex
    "a = 1 ! 2",                       # not CDDL
])
def test_syntax_errors(text: str) -> None:
    with pytest.raises(CddlSyntaxError):
        Schema(text)


def test_unsupported_uses_fail_loudly() -> None:
    s = Schema("g = (1 => int, 2 => int)\nm = { int }\nt = [ g ]")
    with pytest.raises(CddlSyntaxError):
        s.validate(3, "g")  # a two-entry group is not a type
    with pytest.raises(CddlSyntaxError):
        s.validate({1: 1}, "m")  # a map entry without a key
    with pytest.raises(CddlSyntaxError):
        s.validate(1, "[ nosuchrule ]")


def test_validate_cbor_and_seq() -> None:
    s = Schema(EDHOC)
    s.validate_seq(cbor.dumps_seq(True, 3, 2, b"gx", 5), "frame")
    with pytest.raises(CddlError):
        s.validate_seq(cbor.dumps_seq(True, 3, 2, b"gx", 24), "frame")
    with pytest.raises(CddlError):
        s.validate_seq(b"\x18", "frame")  # truncated
    assert s.validate_cbor(cbor.dumps(-3), "c_x") == -3
    with pytest.raises(CddlError):
        s.validate_cbor(cbor.dumps(-3) + b"\x00", "c_x")  # trailing data


def test_replacing_rules() -> None:
    s = Schema("a = [ b ]\nb = int", replace="b = uint")
    assert s.matches([1], "a")
    assert not s.matches([-1], "a")
    with pytest.raises(CddlSyntaxError):
        Schema("a = int", replace="c = int")  # a typo must not silently add a rule


def test_markdown_extraction() -> None:
    md = "# T\n```cddl\na = int ; one\n```\ntext\n```python\nb = 1\n```\n```cddl\nc = [a]\n```\n"
    text = cddl_from_markdown(md)
    assert "b = 1" not in text
    s = Schema(text)
    assert set(s.rules) == {"a", "c"}
    assert s.matches([1], "c")


# --- robustness ---------------------------------------------------------------------------------

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-30, 1030) | st.binary(max_size=6) | st.text("ab1é", max_size=4)
    | st.floats(allow_nan=False, allow_infinity=False, width=32),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.integers(-2, 4) | st.sampled_from(["a", "b", "name"]), inner, max_size=4),
    max_leaves=12,
)


@given(value=cbor_values, rule=st.sampled_from(["frame", "c_x", "suites", "[ message_1 ]", "[ * ead ]"]))
def test_arbitrary_values_only_raise_cddl_error(value: Any, rule: str) -> None:
    try:
        Schema(EDHOC).validate(value, rule)
    except CddlError as exc:
        assert exc.path.startswith("$")


@given(data=st.binary(max_size=40))
def test_arbitrary_bytes_only_raise_cddl_error(data: bytes) -> None:
    s = Schema(EDHOC)
    for call in (s.validate_cbor, s.validate_seq):
        with contextlib.suppress(CddlError):
            call(data, "frame")


# --- differential test against pycddl on shapes it is known to get right -----------------------

SCALARS = (st.none() | st.booleans() | st.integers(-30, 1030) | st.binary(max_size=6) | st.text("ab1é", max_size=4)
           | st.floats(allow_nan=False, allow_infinity=False, width=32))


@st.composite
def mutated(draw: st.DrawFn, value: Any, depth: int = 0) -> Any:
    """``value`` unchanged, or with one change somewhere: a node replaced, an item or key dropped or added."""
    if draw(st.integers(0, 3)) == 0 or depth > 6:
        return value
    if isinstance(value, list) and value and draw(st.booleans()):
        i = draw(st.integers(0, len(value) - 1))
        how = draw(st.sampled_from(["child", "drop", "insert"]))
        if how == "child":
            return [*value[:i], draw(mutated(value[i], depth + 1)), *value[i + 1:]]
        if how == "drop":
            return value[:i] + value[i + 1:]
        return [*value[:i], draw(SCALARS), *value[i:]]
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value, key=repr)))
        how = draw(st.sampled_from(["child", "drop", "add"]))
        if how == "child":
            return {**value, key: draw(mutated(value[key], depth + 1))}
        if how == "drop":
            return {k: v for k, v in value.items() if k is not key}
        return {**value, draw(st.integers(-2, 5) | st.text("ab", max_size=2)): draw(SCALARS)}
    return draw(SCALARS | st.lists(SCALARS, max_size=3))


# (rule, a valid value): the mutations of the value are about 10 % valid, 90 % not.
PYCDDL_SAFE = [
    ("r = [int, tstr, bstr]", [1, "a", b"x"]),
    ("r = [* uint]", [1, 2, 3]),
    ("r = {1 => int, ? 2 => tstr, ? 3 => bstr}", {1: -1, 2: "a", 3: b""}),
    ("r = {* tstr => int}", {"a": 1, "b": -2}),
    ('r = {"a" => uint, ? "b" => [* tstr]}', {"a": 1, "b": ["x", "y"]}),
    ("r = [a: uint, b: [2* int] / int]", [1, [2, 3]]),
    ("r = [uint, bool, tstr]", [5, True, "x"]),
    ("r = [uint, tstr, [* int]]", [5, "x", [1, -2]]),
    ("r = {1 => [* bstr], 2 => bool}", {1: [b"a"], 2: False}),
    ("r = uint", 4),
]


@pytest.mark.parametrize(("rule", "seed"), PYCDDL_SAFE, ids=[r for r, _ in PYCDDL_SAFE])
@given(data=st.data())
def test_agrees_with_pycddl(rule: str, seed: Any, data: st.DataObject) -> None:
    pycddl = pytest.importorskip("pycddl")
    value = data.draw(st.just(seed) | mutated(seed))
    try:
        pycddl.Schema(rule).validate_cbor(cbor.dumps(value))
        theirs = True
    except pycddl.ValidationError:
        theirs = False
    assert Schema(rule).matches(value, "r") == theirs, (rule, value)


# Found by running the differential test on more shapes: pycddl 0.6.4 gives the opposite answer
# for each of these (checked by hand against RFC 8610), so these shapes are not in PYCDDL_SAFE.
PYCDDL_WRONG = [
    ("r = [bool, ? tstr]", [True, "a"], True),
    ("r = [1, 2, tstr / bstr]", [1, 2, "a"], True),
    ("r = {1 => 5..10, 2 => -5..-1}", {1: 6, 2: -3}, True),
    ("r = [int, ? bstr, * tstr]", [1, "a"], True),
    ("r = [* (int, tstr)]", [1, "a", 2, "b"], True),
    ("r = 0..1000", b"", False),
    ("r = nint", 0, False),
    ("r = bstr .size 2", 0, False),
    ("r = [uint, bstr .size 4, tstr]", [5, 0, "x"], False),
    ("r = [uint, bool / null, tstr]", [5, None, ["b"]], False),
    ("r = tstr .size (0..2)", b"", False),
    ("r = [* [uint, tstr]]", [[1, "a"], [2, None]], False),
    ("r = {1 => {* int => bstr}}", {1: {1: b"", "b": True}}, False),
    ("r = [int, tstr] / {1 => int}", [1, [True]], False),
    ("r = int / [* bool]", [None], False),
    ("r = {1 => int, ? 2 => tstr}", {1: {1: None}}, False),
    ('r = tstr .regexp "[a-z]+"', "ab1", False),  # pycddl searches, RFC 8610 asks for a full match
]


@pytest.mark.parametrize(("rule", "value", "valid"), PYCDDL_WRONG, ids=[r for r, _, _ in PYCDDL_WRONG])
def test_shapes_pycddl_gets_wrong(rule: str, value: Any, valid: bool) -> None:
    assert Schema(rule).matches(value, "r") is valid


@pytest.mark.parametrize(("rule", "seed"), PYCDDL_SAFE, ids=[r for r, _ in PYCDDL_SAFE])
def test_differential_seeds_are_valid_and_wrapped_seeds_are_not(rule: str, seed: Any) -> None:
    """The differential test compares both answers, so make sure both answers occur."""
    pycddl = pytest.importorskip("pycddl")
    pycddl.Schema(rule).validate_cbor(cbor.dumps(seed))
    assert Schema(rule).matches(seed, "r")
    with pytest.raises(pycddl.ValidationError):
        pycddl.Schema(rule).validate_cbor(cbor.dumps([seed]))
    assert not Schema(rule).matches([seed], "r")
