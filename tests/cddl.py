"""A small CDDL (RFC 8610) validator for the subset sealmq's docs use, with real backtracking.

Why not pycddl: version 0.6 does not backtrack inside arrays (``[2* int] / int`` after other
entries, ``* ead`` where ``ead = (int, ? bstr)``) and rejects negative ranges such as
``-24..23``; zcbor does not run with cbor2 6. This module implements the parts of RFC 8610 the
docs need and fails loudly (``CddlSyntaxError``) on anything it does not implement, so that an
unsupported construct is never silently accepted.

Supported: rules ``name = type``, group rules ``name = ( group )`` / ``name = 1* entry``,
``/=`` and ``//=``; type choices ``/``; group choices ``//``; arrays and maps; member keys
``bareword:``, ``value:``, ``type =>`` and ``type ^ =>`` (cut); occurrences ``?``, ``*``, ``+``,
``n*m``; literal ints (decimal, hex, binary, negative), floats, text, ``h''``/``b64''``/``''``
byte strings; ranges ``a..b`` / ``a...b``; the prelude types (``int``, ``uint``, ``nint``,
``bstr``, ``bytes``, ``tstr``, ``text``, ``bool``, ``true``, ``false``, ``nil``, ``null``,
``any``, ``float*``, ``number``, ``undefined``); unwrap ``~name``; choice from group ``&``;
controls ``.size``, ``.cbor``, ``.cborseq``, ``.regexp``, ``.lt/.le/.gt/.ge/.eq/.ne``,
``.and``, ``.within``, ``.default``; comments. Not supported: generics, tags (``#6.n``), sockets
are only as plain choices.

Matching semantics: arrays are matched like a regular expression with backtracking over
occurrences and choices; map entries are matched against the map's remaining key/value pairs
(literal keys with ``:`` imply a cut as RFC 8610 section 3.5.4 says, ``=>`` keys do not), and the
map must be used up. Values are matched with strict types: ``True`` is not an ``int``, ``1`` is
not a ``float``.

Entry points: :class:`Schema` (``validate``, ``validate_cbor``, ``validate_seq``, ``matches``)
and :func:`cddl_from_markdown` (the ```cddl fenced blocks of a document, concatenated).
"""

from __future__ import annotations

import base64
import binascii
import math
import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Union

from sealmq import cbor
from sealmq.errors import SealmqError


class CddlError(Exception):
    """A value does not match the schema. ``path`` says where (``$`` is the root value)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


class CddlSyntaxError(Exception):
    """The CDDL text itself is malformed, refers to undefined names, or uses an unsupported feature."""


# --- abstract syntax ----------------------------------------------------------------------------

INF = math.inf


@dataclass(frozen=True)
class Value:
    value: Any  # int, float, str or bytes


@dataclass(frozen=True)
class Name:
    name: str


@dataclass(frozen=True)
class Choice:
    options: tuple[Type, ...]


@dataclass(frozen=True)
class Range:
    low: Type
    high: Type
    inclusive: bool


@dataclass(frozen=True)
class Control:
    target: Type
    op: str
    controller: Type


@dataclass(frozen=True)
class Array:
    group: Group


@dataclass(frozen=True)
class Map:
    group: Group


@dataclass(frozen=True)
class Unwrap:
    name: str


@dataclass(frozen=True)
class Enum:
    group: Group


@dataclass(frozen=True)
class Prim:
    kind: str


Type = Union[Value, Name, Choice, Range, Control, Array, Map, Unwrap, Enum, Prim]  # noqa: UP007


@dataclass(frozen=True)
class Entry:
    low: float
    high: float
    key: Type | None  # None: no member key
    cut: bool
    value: Type | Group  # a Group for a parenthesised group entry


@dataclass(frozen=True)
class Group:
    choices: tuple[tuple[Entry, ...], ...]


_ORDER = {".lt": operator.lt, ".le": operator.le, ".gt": operator.gt, ".ge": operator.ge}
_PRIMS = {
    "any", "uint", "nint", "int", "bstr", "bytes", "tstr", "text", "bool", "true", "false", "nil", "null",
    "undefined", "float", "float16", "float32", "float64", "float16-32", "float32-64", "number",
}
_CONTROLS = {".size", ".cbor", ".cborseq", ".regexp", ".lt", ".le", ".gt", ".ge", ".eq", ".ne", ".and",
             ".within", ".default"}


# --- lexer --------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|;[^\n]*)
  | (?P<bytes>(?:h|b64)?'[^']*')
  | (?P<text>"(?:[^"\\]|\\.)*")
  | (?P<num>-?(?:0x[0-9a-fA-F]+|0b[01]+|[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?))
  | (?P<range>\.\.\.?)
  | (?P<ctl>\.[A-Za-z@_$](?:[-.]*[A-Za-z0-9@_$])*)
  | (?P<id>[A-Za-z@_$](?:[-.]*[A-Za-z0-9@_$])*)
  | (?P<punct>//=|/=|//|=>|[=/(){}\[\],:?*+~&^<>\#])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Tok:
    kind: str
    text: str
    line: int


def tokenize(text: str) -> list[Tok]:
    out: list[Tok] = []
    pos = 0
    line = 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise CddlSyntaxError(f"line {line}: cannot read {text[pos:pos + 20]!r}")
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append(Tok(kind, m.group(), line))
        line += m.group().count("\n")
        pos = m.end()
    return out


def _text_literal(raw: str) -> str:
    # CDDL text strings escape like JSON; unknown escapes are kept so regexps such as "\d" survive.
    body = raw[1:-1]
    return re.sub(r'\\(["\\/])', r"\1", body)


def _bytes_literal(raw: str, line: int) -> bytes:
    prefix, body = raw.split("'", 1)
    body = body[:-1]
    try:
        if prefix == "h":
            return bytes.fromhex("".join(body.split()))
        if prefix == "b64":
            compact = "".join(body.split())
            compact += "=" * (-len(compact) % 4)
            return base64.urlsafe_b64decode(compact.replace("+", "-").replace("/", "_"))
    except (ValueError, binascii.Error) as exc:
        raise CddlSyntaxError(f"line {line}: bad byte string {raw!r}") from exc
    return body.encode("utf-8")


def _number(raw: str) -> int | float:
    neg = raw.startswith("-")
    body = raw[1:] if neg else raw
    if body.startswith("0x"):
        num: int | float = int(body, 16)
    elif body.startswith("0b"):
        num = int(body, 2)
    elif "." in body or "e" in body or "E" in body:
        num = float(body)
    else:
        num = int(body)
    return -num if neg else num


# --- parser -------------------------------------------------------------------------------------

class _Parser:
    def __init__(self, toks: list[Tok]) -> None:
        self.toks = toks
        self.i = 0

    def peek(self, ahead: int = 0) -> Tok | None:
        j = self.i + ahead
        return self.toks[j] if j < len(self.toks) else None

    def at(self, text: str, ahead: int = 0) -> bool:
        tok = self.peek(ahead)
        return tok is not None and tok.kind in ("punct", "range") and tok.text == text

    def take(self) -> Tok:
        tok = self.peek()
        if tok is None:
            raise CddlSyntaxError("unexpected end of CDDL")
        self.i += 1
        return tok

    def expect(self, text: str) -> None:
        tok = self.take()
        if tok.text != text or tok.kind not in ("punct", "range"):
            raise CddlSyntaxError(f"line {tok.line}: expected {text!r}, got {tok.text!r}")

    def fail(self, what: str) -> CddlSyntaxError:
        tok = self.peek()
        where = f"line {tok.line}: {what}, got {tok.text!r}" if tok else f"{what} at end of CDDL"
        return CddlSyntaxError(where)

    # rules
    def rules(self) -> list[tuple[str, str, Type | Group]]:
        out: list[tuple[str, str, Type | Group]] = []
        while self.peek() is not None:
            name = self.take()
            if name.kind != "id":
                raise CddlSyntaxError(f"line {name.line}: expected a rule name, got {name.text!r}")
            if self.at("<"):
                raise CddlSyntaxError(f"line {name.line}: generics are not supported ({name.text})")
            op = self.take()
            if op.text not in ("=", "/=", "//="):
                raise CddlSyntaxError(f"line {op.line}: expected '=' after {name.text!r}, got {op.text!r}")
            out.append((name.text, op.text, self.rule_body(op.text)))
        return out

    def rule_body(self, op: str) -> Type | Group:
        if op == "/=":
            return self.type_()
        entry = self.grpent()
        if op == "=" and self.at("//"):
            # name = a // b: a group choice without parentheses
            choices = [(entry,)]
            while self.at("//"):
                self.take()
                choices.append((self.grpent(),))
            return Group(tuple(choices))
        if op == "=" and entry.key is None and (entry.low, entry.high) == (1, 1) and not isinstance(
                entry.value, Group):
            return entry.value
        if (entry.key is None and (entry.low, entry.high) == (1, 1) and isinstance(entry.value, Group)):
            return entry.value
        return Group(((entry,),))

    # groups
    def group(self, closer: str) -> Group:
        choices: list[tuple[Entry, ...]] = []
        entries: list[Entry] = []
        while True:
            if self.at(closer):
                choices.append(tuple(entries))
                return Group(tuple(choices))
            if self.at("//"):
                self.take()
                choices.append(tuple(entries))
                entries = []
                continue
            entries.append(self.grpent())
            if self.at(","):
                self.take()
            elif not (self.at(closer) or self.at("//")):
                # RFC 8610 makes commas optional; only accept that where the next entry clearly starts
                tok = self.peek()
                if tok is None:
                    raise self.fail(f"expected {closer!r}")

    def occurrence(self) -> tuple[float, float] | None:
        tok = self.peek()
        if tok is None:
            return None
        if self.at("?"):
            self.take()
            return (0, 1)
        if self.at("+"):
            self.take()
            return (1, INF)
        if self.at("*"):
            self.take()
            high: float = INF
            nxt = self.peek()
            if nxt is not None and nxt.kind == "num" and re.fullmatch(r"[0-9]+", nxt.text):
                self.take()
                high = int(nxt.text)
            return (0, high)
        if tok.kind == "num" and re.fullmatch(r"[0-9]+", tok.text) and self.at("*", 1):
            self.take()
            self.take()
            low = int(tok.text)
            high2: float = INF
            nxt = self.peek()
            if nxt is not None and nxt.kind == "num" and re.fullmatch(r"[0-9]+", nxt.text):
                self.take()
                high2 = int(nxt.text)
            if high2 < low:
                raise CddlSyntaxError(f"line {tok.line}: occurrence {low}*{high2} is empty")
            return (low, high2)
        return None

    def grpent(self) -> Entry:
        occ = self.occurrence() or (1, 1)
        tok = self.peek()
        if tok is None:
            raise self.fail("expected a group entry")
        # bareword or value followed by ':' is a member key with an implied cut
        if tok.kind in ("id", "num", "text", "bytes") and self.at(":", 1):
            self.take()
            self.take()
            key: Type = Value(tok.text) if tok.kind == "id" else self.literal(tok)
            return Entry(occ[0], occ[1], key, True, self.type_())
        if self.at("("):
            # a parenthesised group (also covers a parenthesised type: a group of one entry)
            start = self.i
            self.take()
            inner = self.group(")")
            self.expect(")")
            if not (self.at("/") or self.at("=>") or self.at("^") or self.peek_ctl_or_range()):
                return Entry(occ[0], occ[1], None, False, inner)
            self.i = start  # it was a type after all, e.g. (a / b) => c
        first = self.type1()
        if self.at("^"):
            self.take()
            self.expect("=>")
            return Entry(occ[0], occ[1], first, True, self.type_())
        if self.at("=>"):
            self.take()
            return Entry(occ[0], occ[1], first, False, self.type_())
        options = [first]
        while self.at("/"):
            self.take()
            options.append(self.type1())
        value: Type = options[0] if len(options) == 1 else Choice(tuple(options))
        return Entry(occ[0], occ[1], None, False, value)

    def peek_ctl_or_range(self) -> bool:
        tok = self.peek()
        return tok is not None and tok.kind in ("ctl", "range")

    # types
    def type_(self) -> Type:
        options = [self.type1()]
        while self.at("/"):
            self.take()
            options.append(self.type1())
        return options[0] if len(options) == 1 else Choice(tuple(options))

    def type1(self) -> Type:
        left = self.type2()
        tok = self.peek()
        if tok is not None and tok.kind == "range":
            self.take()
            return Range(left, self.type2(), tok.text == "..")
        if tok is not None and tok.kind == "ctl":
            self.take()
            if tok.text not in _CONTROLS:
                raise CddlSyntaxError(f"line {tok.line}: control operator {tok.text} is not supported")
            return Control(left, tok.text, self.type2())
        return left

    def literal(self, tok: Tok) -> Value:
        if tok.kind == "num":
            return Value(_number(tok.text))
        if tok.kind == "text":
            return Value(_text_literal(tok.text))
        if tok.kind == "bytes":
            return Value(_bytes_literal(tok.text, tok.line))
        raise CddlSyntaxError(f"line {tok.line}: expected a literal, got {tok.text!r}")

    def type2(self) -> Type:
        tok = self.take()
        if tok.kind in ("num", "text", "bytes"):
            return self.literal(tok)
        if tok.kind == "id":
            if self.at("<"):
                raise CddlSyntaxError(f"line {tok.line}: generics are not supported ({tok.text})")
            return Name(tok.text)
        if tok.kind == "punct":
            if tok.text == "(":
                inner = self.type_()
                self.expect(")")
                return inner
            if tok.text == "[":
                group = self.group("]")
                self.expect("]")
                return Array(group)
            if tok.text == "{":
                group = self.group("}")
                self.expect("}")
                return Map(group)
            if tok.text == "~":
                name = self.take()
                if name.kind != "id":
                    raise CddlSyntaxError(f"line {name.line}: expected a name after '~'")
                return Unwrap(name.text)
            if tok.text == "&":
                if self.at("("):
                    self.take()
                    group = self.group(")")
                    self.expect(")")
                    return Enum(group)
                name = self.take()
                if name.kind != "id":
                    raise CddlSyntaxError(f"line {name.line}: expected a group name after '&'")
                return Enum(Group(((Entry(1, 1, None, False, Name(name.text)),),)))
            if tok.text == "#":
                raise CddlSyntaxError(f"line {tok.line}: tags and major types ('#') are not supported")
        raise CddlSyntaxError(f"line {tok.line}: expected a type, got {tok.text!r}")


# --- matching -----------------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _same(a: Any, b: Any) -> bool:
    """Equality without Python's 1 == True == 1.0 conflation."""
    return type(a) is type(b) and a == b


def _show(path: tuple[str, ...]) -> str:
    return "$" + "".join(path)


@dataclass
class _Run:
    """State of one validation: the deepest failure seen, for the error message."""

    schema: Schema
    best: tuple[tuple[int, ...], str, str] | None = None
    quiet: int = 0

    def fail(self, path: tuple[str, ...], message: str, *, weak: bool = False) -> bool:
        # Report the failure that got furthest into the value (array positions compared in
        # order, deeper beats shallower); on a tie the later, more summarising message wins
        # unless it is a weak one that says less than what is already known.
        if not self.quiet:
            progress = tuple(int(p[1:-1]) if p.startswith("[") else 0 for p in path)
            if self.best is None or progress > self.best[0] or (progress == self.best[0] and not weak):
                self.best = (progress, _show(path), message)
        return False

    # types
    def match(self, t: Type, v: Any, path: tuple[str, ...]) -> bool:
        if isinstance(t, Value):
            if _same(t.value, v):
                return True
            return self.fail(path, f"expected {t.value!r}, got {_brief(v)}")
        if isinstance(t, Prim):
            return self.prim(t.kind, v, path)
        if isinstance(t, Name):
            return self.match_name(t.name, v, path)
        if isinstance(t, Choice):
            for option in t.options:
                if self.match(option, v, path):
                    return True
            return self.fail(path, f"{_brief(v)} matches no alternative of {_describe(t)}")
        if isinstance(t, Range):
            return self.range_(t, v, path)
        if isinstance(t, Control):
            return self.control(t, v, path)
        if isinstance(t, Array):
            if not isinstance(v, list):
                return self.fail(path, f"expected an array, got {_brief(v)}")
            return self.array(t.group, v, path)
        if isinstance(t, Map):
            if not isinstance(v, dict):
                return self.fail(path, f"expected a map, got {_brief(v)}")
            return self.map_(t.group, v, path)
        if isinstance(t, Unwrap):
            as_type = _group_as_type(self.schema.unwrap(t.name))
            if as_type is None:
                raise CddlSyntaxError(f"~{t.name} used where a type is expected")
            return self.match(as_type, v, path)
        if isinstance(t, Enum):
            for option in self.schema.enum_values(t.group):
                if self.match(option, v, path):
                    return True
            return self.fail(path, f"{_brief(v)} is not one of the enumerated values")
        raise CddlSyntaxError(f"unknown node {t!r}")

    def match_name(self, name: str, v: Any, path: tuple[str, ...]) -> bool:
        rule = self.schema.resolve(name)
        if isinstance(rule, Group):
            as_type = _group_as_type(rule)
            if as_type is None:
                raise CddlSyntaxError(f"group {name!r} used where a type is expected")
            return self.match(as_type, v, path)
        return self.match(rule, v, path)

    def prim(self, kind: str, v: Any, path: tuple[str, ...]) -> bool:
        ok = {
            "any": True,
            "uint": _is_int(v) and v >= 0,
            "nint": _is_int(v) and v < 0,
            "int": _is_int(v),
            "bstr": isinstance(v, bytes), "bytes": isinstance(v, bytes),
            "tstr": isinstance(v, str), "text": isinstance(v, str),
            "bool": isinstance(v, bool),
            "true": v is True, "false": v is False,
            "nil": v is None, "null": v is None,
            "undefined": False,  # the strict decoder never produces it
            "float": isinstance(v, float), "float16": isinstance(v, float), "float32": isinstance(v, float),
            "float64": isinstance(v, float), "float16-32": isinstance(v, float),
            "float32-64": isinstance(v, float),
            "number": _is_int(v) or isinstance(v, float),
        }[kind]
        return True if ok else self.fail(path, f"expected {kind}, got {_brief(v)}")

    def constant(self, t: Type) -> Any:
        while isinstance(t, Name):
            rule = self.schema.resolve(t.name)
            if isinstance(rule, Group):
                as_type = _group_as_type(rule)
                if as_type is None:
                    break
                rule = as_type
            t = rule
        if isinstance(t, Value):
            return t.value
        raise CddlSyntaxError(f"expected a literal value, got {t!r}")

    def range_(self, t: Range, v: Any, path: tuple[str, ...]) -> bool:
        low, high = self.constant(t.low), self.constant(t.high)
        if _is_int(low) and _is_int(high):
            kind_ok = _is_int(v)
        elif isinstance(low, float) and isinstance(high, float):
            kind_ok = isinstance(v, float)
        else:
            raise CddlSyntaxError(f"range {low!r}..{high!r} mixes types")
        if kind_ok and low <= v and (v <= high if t.inclusive else v < high):
            return True
        dots = ".." if t.inclusive else "..."
        return self.fail(path, f"expected {low}{dots}{high}, got {_brief(v)}")

    def control(self, t: Control, v: Any, path: tuple[str, ...]) -> bool:
        if not self.match(t.target, v, path):
            return False
        op = t.op
        if op == ".size":
            if isinstance(v, bytes):
                size = len(v)
            elif isinstance(v, str):
                size = len(v.encode("utf-8"))
            elif _is_int(v) and v >= 0:
                # uint .size n: fits in n bytes
                self.quiet += 1
                try:
                    return self.uint_size(v, t.controller) or self.fail(path, f"{v} does not fit the .size")
                finally:
                    self.quiet -= 1
            else:
                return self.fail(path, f".size applied to {_brief(v)}")
            self.quiet += 1
            try:
                ok = self.match(t.controller, size, path)
            finally:
                self.quiet -= 1
            return ok or self.fail(path, f"size {size} does not match {_describe(t.controller)}")
        if op in (".cbor", ".cborseq"):
            if not isinstance(v, bytes):
                return self.fail(path, f"{op} needs a byte string")
            try:
                inner: Any = cbor.loads(v) if op == ".cbor" else cbor.loads_seq(v)
            except SealmqError as exc:
                return self.fail(path, f"embedded CBOR does not decode: {exc}")
            return self.match(t.controller, inner, (*path, f"<{op[1:]}>"))
        if op == ".regexp":
            pattern = self.constant(t.controller)
            if not isinstance(v, str) or not isinstance(pattern, str):
                return self.fail(path, ".regexp needs text")
            if re.fullmatch(pattern, v) is not None:
                return True
            return self.fail(path, f"{v!r} does not match /{pattern}/")
        if op in (".lt", ".le", ".gt", ".ge", ".eq", ".ne"):
            other = self.constant(t.controller)
            if op in (".eq", ".ne"):
                ok = _same(v, other) == (op == ".eq")
            elif (_is_int(v) or isinstance(v, float)) and (_is_int(other) or isinstance(other, float)):
                ok = bool(_ORDER[op](v, other))
            else:
                ok = False
            return True if ok else self.fail(path, f"{_brief(v)} is not {op[1:]} {other!r}")
        if op in (".and", ".within"):
            return self.match(t.controller, v, path)
        if op == ".default":
            return True
        raise CddlSyntaxError(f"control {op} not supported")

    def uint_size(self, v: int, controller: Type) -> bool:
        # .size n on a uint means v < 256**n; accept a literal or a range of byte counts
        if isinstance(controller, Range):
            high = self.constant(controller.high)
            limit = high if controller.inclusive else high - 1
            return bool(v < 256 ** limit)
        n = self.constant(controller)
        return bool(_is_int(n) and v < 256 ** n)

    # arrays: backtracking over a sequence
    def array(self, group: Group, items: list[Any], path: tuple[str, ...]) -> bool:
        for end in self.seq_group(group, items, 0, path):
            if end == len(items):
                return True
            self.fail((*path, f"[{end}]"), f"unexpected extra item {_brief(items[end])}")
        if not items:
            return self.fail(path, "empty array does not match")
        return self.fail(path, "array does not match", weak=True)

    def seq_group(self, group: Group, items: list[Any], pos: int, path: tuple[str, ...]) -> Iterator[int]:
        for entries in group.choices:
            yield from self.seq_entries(entries, 0, items, pos, path)

    def seq_entries(self, entries: tuple[Entry, ...], i: int, items: list[Any], pos: int,
                    path: tuple[str, ...]) -> Iterator[int]:
        if i == len(entries):
            yield pos
            return
        for nxt in self.seq_entry(entries[i], items, pos, path):
            yield from self.seq_entries(entries, i + 1, items, nxt, path)

    def seq_entry(self, entry: Entry, items: list[Any], pos: int, path: tuple[str, ...]) -> Iterator[int]:
        inner = self.entry_group(entry)
        if inner is None:
            # one item per occurrence: count greedily, then give back (as a regex engine does)
            assert not isinstance(entry.value, Group)
            count = 0
            while count < entry.high and pos + count < len(items) and self.match(
                    entry.value, items[pos + count], (*path, f"[{pos + count}]")):
                count += 1
            if count < entry.low and pos + count >= len(items):
                self.fail((*path, f"[{pos + count}]"), f"missing item: expected {_describe(entry.value)}")
            for n in range(count, int(entry.low) - 1, -1):
                yield pos + n
            return
        yield from self.seq_repeat(entry, inner, items, pos, 0, path)

    def seq_repeat(self, entry: Entry, inner: Group, items: list[Any], pos: int, count: int,
                   path: tuple[str, ...]) -> Iterator[int]:
        if count < entry.high:
            for nxt in self.seq_group(inner, items, pos, path):
                if nxt == pos:
                    # an empty match satisfies any remaining minimum; repeating it would loop
                    yield pos
                    continue
                yield from self.seq_repeat(entry, inner, items, nxt, count + 1, path)
        if count >= entry.low:
            yield pos

    def entry_group(self, entry: Entry) -> Group | None:
        """The group an entry stands for, or None if it matches a single value."""
        if isinstance(entry.value, Group):
            return entry.value
        if isinstance(entry.value, Name) and entry.key is None:
            rule = self.schema.resolve(entry.value.name)
            if isinstance(rule, Group):
                return rule
        if isinstance(entry.value, Unwrap) and entry.key is None:
            return self.schema.unwrap(entry.value.name)
        return None

    # maps: entries consume key/value pairs
    def map_(self, group: Group, value: dict[Any, Any], path: tuple[str, ...]) -> bool:
        pairs = list(value.items())
        for rest in self.map_group(group, pairs, frozenset(range(len(pairs))), path):
            if not rest:
                return True
            key = pairs[min(rest)][0]
            self.fail((*path, f"{{{key!r}}}"), f"unexpected key {key!r}", weak=True)
        return self.fail(path, "map does not match", weak=True)

    def map_group(self, group: Group, pairs: list[tuple[Any, Any]], rest: frozenset[int],
                  path: tuple[str, ...]) -> Iterator[frozenset[int]]:
        for entries in group.choices:
            yield from self.map_entries(entries, 0, pairs, rest, path)

    def map_entries(self, entries: tuple[Entry, ...], i: int, pairs: list[tuple[Any, Any]],
                    rest: frozenset[int], path: tuple[str, ...]) -> Iterator[frozenset[int]]:
        if i == len(entries):
            yield rest
            return
        for nxt in self.map_entry(entries[i], pairs, rest, path):
            yield from self.map_entries(entries, i + 1, pairs, nxt, path)

    def map_entry(self, entry: Entry, pairs: list[tuple[Any, Any]], rest: frozenset[int],
                  path: tuple[str, ...]) -> Iterator[frozenset[int]]:
        inner = self.entry_group(entry)
        if inner is not None:
            yield from self.map_repeat(entry, inner, pairs, rest, 0, path)
            return
        if entry.key is None:
            raise CddlSyntaxError(f"map entry {_describe(entry.value)} has no member key")
        assert not isinstance(entry.value, Group)
        self.quiet += 1
        try:
            keyed = [i for i in sorted(rest) if self.match(entry.key, pairs[i][0], ())]
        finally:
            self.quiet -= 1
        good = [i for i in keyed if self.match(entry.value, pairs[i][1], (*path, f"{{{pairs[i][0]!r}}}"))]
        if entry.cut and len(good) < len(keyed):
            return  # a matching key with a wrong value: no other entry may take it
        take = good[: int(min(len(good), entry.high))]
        if len(take) < entry.low:
            if not keyed:
                self.fail(path, f"missing key {_describe(entry.key)}")
            return
        yield rest - frozenset(take)

    def map_repeat(self, entry: Entry, inner: Group, pairs: list[tuple[Any, Any]], rest: frozenset[int],
                   count: int, path: tuple[str, ...]) -> Iterator[frozenset[int]]:
        if count < entry.high:
            for nxt in self.map_group(inner, pairs, rest, path):
                if nxt == rest:
                    yield rest
                    continue
                yield from self.map_repeat(entry, inner, pairs, nxt, count + 1, path)
        if count >= entry.low:
            yield rest


def _group_as_type(group: Group) -> Type | None:
    """A group of exactly one keyless, once-occurring type entry stands for that type."""
    if len(group.choices) == 1 and len(group.choices[0]) == 1:
        (entry,) = group.choices[0]
        if entry.key is None and (entry.low, entry.high) == (1, 1) and not isinstance(entry.value, Group):
            return entry.value
    return None


def _brief(v: Any) -> str:
    if isinstance(v, bytes):
        return f"bstr of {len(v)} bytes"
    if isinstance(v, str):
        return f"tstr {v[:40]!r}"
    if isinstance(v, list):
        return f"array of {len(v)}"
    if isinstance(v, dict):
        return f"map of {len(v)}"
    if isinstance(v, bool) or v is None:
        return repr(v).lower() if v is not None else "null"
    return f"{type(v).__name__} {v!r}"


def _describe(t: Type | Group) -> str:
    if isinstance(t, Value):
        return repr(t.value)
    if isinstance(t, Name):
        return t.name
    if isinstance(t, Prim):
        return t.kind
    if isinstance(t, Range):
        return f"{_describe(t.low)}{'..' if t.inclusive else '...'}{_describe(t.high)}"
    if isinstance(t, Choice):
        return " / ".join(_describe(o) for o in t.options)
    if isinstance(t, Control):
        return f"{_describe(t.target)} {t.op} {_describe(t.controller)}"
    return type(t).__name__.lower()


# --- schema -------------------------------------------------------------------------------------

class Schema:
    """Parsed CDDL. ``validate(value, rule)`` raises :class:`CddlError` if ``value`` does not match.

    ``rule`` is a rule name or any CDDL type expression over the schema's rules (``"[ message_1 ]"``).
    """

    def __init__(self, text: str, *, replace: str = "") -> None:
        """``replace``: rules that replace same-named rules of ``text`` (to narrow a schema in tests)."""
        self.rules: dict[str, Type | Group] = {}
        replacements = {name: body for name, _op, body in _Parser(tokenize(replace)).rules()}
        replaced: set[str] = set()
        for name, op, body in _Parser(tokenize(text)).rules():
            if name in replacements:
                replaced.add(name)
                continue
            if name in _PRIMS:
                raise CddlSyntaxError(f"rule {name!r} redefines a prelude type")
            if op == "=":
                if name in self.rules:
                    raise CddlSyntaxError(f"rule {name!r} defined twice")
                self.rules[name] = body
            elif op == "/=":
                old = self.rules.get(name)
                if isinstance(old, Group) or isinstance(body, Group):
                    raise CddlSyntaxError(f"'/=' on group {name!r}")
                olds = old.options if isinstance(old, Choice) else ((old,) if old is not None else ())
                news = body.options if isinstance(body, Choice) else (body,)
                self.rules[name] = Choice((*olds, *news)) if len(olds) + len(news) > 1 else news[0]
            else:
                old_g = self.rules.get(name)
                if old_g is not None and not isinstance(old_g, Group):
                    raise CddlSyntaxError(f"'//=' on type {name!r}")
                new_g = body if isinstance(body, Group) else Group(((Entry(1, 1, None, False, body),),))
                self.rules[name] = Group((*(old_g.choices if old_g else ()), *new_g.choices))
        for name, body in replacements.items():
            if name not in replaced:
                raise CddlSyntaxError(f"replacement for rule {name!r}, which the schema does not define")
            self.rules[name] = body
        for name, body in self.rules.items():
            self._check_names(body, name)

    def _check_names(self, node: Type | Group | None, where: str) -> None:
        if node is None or isinstance(node, (Value, Prim)):
            return
        if isinstance(node, (Name, Unwrap)):
            if node.name not in self.rules and node.name not in _PRIMS:
                raise CddlSyntaxError(f"rule {where!r} refers to undefined name {node.name!r}")
        elif isinstance(node, Choice):
            for option in node.options:
                self._check_names(option, where)
        elif isinstance(node, Range):
            self._check_names(node.low, where)
            self._check_names(node.high, where)
        elif isinstance(node, Control):
            self._check_names(node.target, where)
            self._check_names(node.controller, where)
        elif isinstance(node, (Array, Map, Enum)):
            self._check_names(node.group, where)
        elif isinstance(node, Group):
            for entries in node.choices:
                for entry in entries:
                    self._check_names(entry.key, where)
                    self._check_names(entry.value, where)

    def resolve(self, name: str) -> Type | Group:
        if name in self.rules:
            return self.rules[name]
        if name in _PRIMS:
            return Prim(name)
        raise CddlSyntaxError(f"undefined name {name!r}")

    def resolve_type(self, name: str) -> Type:
        rule = self.resolve(name)
        if isinstance(rule, Group):
            as_type = _group_as_type(rule)
            if as_type is None:
                raise CddlSyntaxError(f"group {name!r} used where a type is expected")
            return as_type
        return rule

    def unwrap(self, name: str) -> Group:
        """``~name``: the group inside the array or map type ``name``."""
        target = self.resolve_type(name)
        while isinstance(target, Name):
            target = self.resolve_type(target.name)
        if isinstance(target, (Array, Map)):
            return target.group
        raise CddlSyntaxError(f"~{name}: can only unwrap an array or map type")

    def enum_values(self, group: Group) -> list[Type]:
        out: list[Type] = []
        for entries in group.choices:
            for entry in entries:
                if isinstance(entry.value, Group):
                    out += self.enum_values(entry.value)
                elif isinstance(entry.value, Name) and entry.key is None and isinstance(
                        self.resolve(entry.value.name), Group):
                    inner = self.resolve(entry.value.name)
                    assert isinstance(inner, Group)
                    out += self.enum_values(inner)
                else:
                    out.append(entry.value)
        return out

    def _target(self, rule: str) -> Type:
        if rule in self.rules or rule in _PRIMS:
            return Name(rule)
        parser = _Parser(tokenize(rule))
        t = parser.type_()
        if parser.peek() is not None:
            raise parser.fail("unexpected text after the type expression")
        self._check_names(t, rule)
        return t

    def validate(self, value: Any, rule: str) -> None:
        run = _Run(self)
        if not run.match(self._target(rule), value, ()):
            best = run.best or ((), "$", "does not match")
            raise CddlError(best[1], f"{best[2]} (validating against {rule})")

    def matches(self, value: Any, rule: str) -> bool:
        try:
            self.validate(value, rule)
        except CddlError:
            return False
        return True

    def validate_cbor(self, data: bytes, rule: str) -> Any:
        """Decode one strict CBOR item (sealmq.cbor) and validate it; returns the decoded value."""
        try:
            value = cbor.loads(data)
        except SealmqError as exc:
            raise CddlError("$", f"not strict CBOR: {exc}") from None
        self.validate(value, rule)
        return value

    def validate_seq(self, data: bytes, rule: str) -> list[Any]:
        """Decode a CBOR sequence, wrap its items in an array, validate that against ``rule``."""
        try:
            items = cbor.loads_seq(data)
        except SealmqError as exc:
            raise CddlError("$", f"not a strict CBOR sequence: {exc}") from None
        self.validate(items, rule)
        return items


_FENCE = re.compile(r"^```cddl[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def cddl_from_markdown(markdown: str) -> str:
    """The ```cddl fenced blocks of a Markdown document, concatenated in order."""
    return "\n".join(m.group(1) for m in _FENCE.finditer(markdown))
