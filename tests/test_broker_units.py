"""Unit and property tests of the broker's pure parts: user file, ACL, CONNECT parser, inspect lines."""

from __future__ import annotations

import contextlib
import os
import stat
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import acl
from broker.framing import ConnectParseError, parse_connect, with_credentials
from broker.inspect_format import describe
from broker.passwd import (
    AccountRole,
    add_user,
    hash_password,
    load_users,
    parse_users,
    remove_user,
    verify_password,
)
from broker.policy import client_id_allowed
from sealmq import cbor
from sealmq.errors import ConfigError

# Made by mosquitto_passwd 2.0.11 (`mosquitto_passwd -c -b pw golden 'correct horse'`): an
# independent implementation of the same format.
MOSQUITTO_HASH = (
    "$7$101$UvUh7xi6U1PAD8tC$ka25mYsBGkhMJoU9bf0YcYDBH3PaHS+lnPEQTMTu5E9A7A+iX2sthPXolWB/mNC+oG7F"
    "bWHI596FQWBHo0bXYQ=="
)
# Ours, with a fixed salt (golden vector of our own output).
OUR_HASH = (
    "$7$1000$AAECAwQFBgcICQoL$hc9UTFKiTSi9CHPMacLhbZUJ9kJTrF7ND3F3GC2tMIePa6GeHoJUhLaT6N8wIl0Zgp48"
    "kWcgb9fqfYUYiR/1vQ=="
)


# --- passwords / user file ---------------------------------------------------------------------

def test_verifies_mosquitto_passwd_hash() -> None:
    assert verify_password("correct horse", MOSQUITTO_HASH)
    assert not verify_password("correct horsE", MOSQUITTO_HASH)


def test_hash_golden_vector_both_ways() -> None:
    assert hash_password("correct horse", iterations=1000, salt=bytes(range(12))) == OUR_HASH
    assert verify_password("correct horse", OUR_HASH)
    assert not verify_password("", OUR_HASH)


def test_hash_is_salted() -> None:
    assert hash_password("pw", iterations=1000) != hash_password("pw", iterations=1000)


BAD_HASHES = ["", "$6$abc$def", "$7$x$AAAA$AAAA", "$7$1000$!!$AAAA", "$7$1000$AAECAwQFBgcICQoL$AAAA",
              # found with the fuzz harness "config": str.isdigit() accepts "²", int() then raised ValueError
              "$7$²$AAAA$" + "A" * 86 + "=="]


@pytest.mark.parametrize("bad", BAD_HASHES)
def test_malformed_hash_never_verifies(bad: str) -> None:
    assert not verify_password("pw", bad)


def test_user_file_add_replace_remove_and_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "users"
    add_user(path, "dev-1", "a", AccountRole.DEVICE, iterations=1000)
    add_user(path, "backend", "b", "backend", iterations=1000)
    add_user(path, "dev-1", "plaintext-secret", AccountRole.DEVICE, iterations=1000)  # replaces
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    users = load_users(path)
    assert {u.name: u.role for u in users.values()} == {"dev-1": AccountRole.DEVICE, "backend": AccountRole.BACKEND}
    assert verify_password("plaintext-secret", users["dev-1"].pw_hash)
    assert not verify_password("a", users["dev-1"].pw_hash)
    assert "plaintext-secret" not in path.read_text()
    remove_user(path, "dev-1")
    assert set(load_users(path)) == {"backend"}


@pytest.mark.parametrize(
    "line",
    ["nocolons", "dev:device:$7$²$AAAA$" + "A" * 86 + "==", "dev:device:$7$١٠٠٠$AAAA$" + "A" * 86 + "==",
     "dev:admin:" + OUR_HASH, "Bad/Name:device:" + OUR_HASH, "dev:device:$7$10$AAAA$" + "A" * 88,
     "dev:device:" + MOSQUITTO_HASH],  # 101 iterations: below our floor
)
def test_user_file_rejects_bad_lines(line: str) -> None:
    with pytest.raises(ConfigError):
        parse_users(line)


@given(st.text(max_size=300))
def test_user_file_parser_total(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_users(text)


@pytest.mark.parametrize("name", ["", "Dev", "a/b", "+", "#", "a b", "x" * 64])
def test_add_user_refuses_names_unsafe_in_topics(tmp_path, name: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError):
        add_user(tmp_path / "u", name, "pw", iterations=1000)


# --- ACL ----------------------------------------------------------------------------------------

A, B = "deva", "devb"


@pytest.mark.parametrize(
    ("flt", "ok"),
    [
        (f"sealmq/v1/{A}/+/down", True),
        (f"sealmq/v1/{A}/data/down", True),
        ("sealmq/#", False),
        ("#", False),
        ("sealmq/v1/+/data/down", False),
        (f"sealmq/v1/{B}/#", False),
        (f"sealmq/v1/{A}/#", False),  # would include .../up
        (f"sealmq/v1/{A}/+/+", False),
        (f"sealmq/v1/{A}/data/up", False),
        (f"sealmq/v1/{A}/data/down/#", False),
        ("sealmq/v1/+/+/down", False),
        (f"sealmq/v1/{A}/+/down#", False),  # invalid filter
    ],
)
def test_device_subscribe(flt: str, ok: bool) -> None:
    assert acl.may_subscribe(AccountRole.DEVICE, A, flt) is ok


@pytest.mark.parametrize(
    ("topic", "ok"),
    [
        (f"sealmq/v1/{A}/data/up", True),
        (f"sealmq/v1/{A}/hs/up", True),
        (f"sealmq/v1/{A}/media/up", True),
        (f"sealmq/v1/{A}/data/down", False),
        (f"sealmq/v1/{B}/data/up", False),
        (f"sealmq/v1/{A}/other/up", False),
        (f"sealmq/v1/{A}/data/up/x", False),
        ("sealmq/v1/+/data/up", False),
    ],
)
def test_device_publish(topic: str, ok: bool) -> None:
    assert acl.may_publish(AccountRole.DEVICE, A, topic) is ok


def test_backend_and_monitor() -> None:
    assert acl.may_subscribe(AccountRole.BACKEND, "backend", "sealmq/v1/+/+/up")
    assert acl.may_subscribe(AccountRole.BACKEND, "backend", "sealmq/v1/+/data/up")
    assert not acl.may_subscribe(AccountRole.BACKEND, "backend", "sealmq/#")
    assert not acl.may_subscribe(AccountRole.BACKEND, "backend", "sealmq/v1/+/data/down")
    assert acl.may_publish(AccountRole.BACKEND, "backend", f"sealmq/v1/{A}/data/down")
    assert not acl.may_publish(AccountRole.BACKEND, "backend", f"sealmq/v1/{A}/data/up")
    assert acl.may_subscribe(AccountRole.MONITOR, "mon", "sealmq/#")
    assert not acl.may_subscribe(AccountRole.MONITOR, "mon", "#")
    assert not acl.may_publish(AccountRole.MONITOR, "mon", f"sealmq/v1/{A}/data/down")


LEVEL = st.sampled_from(["sealmq", "v1", A, B, "data", "hs", "down", "up", "x", "+", "#"])
CONCRETE = st.sampled_from(["sealmq", "v1", A, B, "data", "hs", "down", "up", "x", "$SYS"])


@given(
    st.lists(LEVEL, min_size=1, max_size=6).map("/".join),
    st.lists(CONCRETE, min_size=1, max_size=6).map("/".join),
    st.sampled_from(list(AccountRole)),
    st.sampled_from([A, B, "backend"]),
)
def test_subscribe_never_grants_an_unreceivable_topic(flt: str, topic: str, role: AccountRole, name: str) -> None:
    """The soundness property amqtt's ACL lacks: an allowed filter matches only allowed topics."""
    if acl.may_subscribe(role, name, flt) and acl.topic_matches(topic, flt):
        assert acl.may_receive(role, name, topic), (flt, topic)


FILTERS = st.lists(LEVEL, min_size=1, max_size=6).map("/".join)
TOPICS = st.lists(CONCRETE, min_size=1, max_size=6).map("/".join)


@given(FILTERS, TOPICS)
def test_filter_covered_agrees_with_matching(requested: str, topic: str) -> None:
    for allowed in ("sealmq/#", f"sealmq/v1/{A}/+/down", "sealmq/v1/+/+/up"):
        covered = acl.valid_filter(requested) and acl.filter_covered(requested, allowed)
        if covered and acl.topic_matches(topic, requested):
            assert acl.topic_matches(topic, allowed)


def test_client_id_binding() -> None:
    assert client_id_allowed("deva", "")
    assert client_id_allowed("deva", "deva")
    assert client_id_allowed("deva", "deva:agent-1")
    assert not client_id_allowed("deva", "backend")
    assert not client_id_allowed("deva", "deva-2")  # could be another device's id
    assert not client_id_allowed("deva", "devab")


# --- CONNECT parser -----------------------------------------------------------------------------

def _field(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def _connect(flags: int, client_id: bytes, *rest: bytes) -> bytes:
    head = _field(b"MQTT") + bytes([4, flags]) + b"\x00\x1e"
    return head + _field(client_id) + b"".join(_field(r) for r in rest)


def test_parse_connect_golden() -> None:
    flags = 0x80 | 0x40 | 0x04 | 0x08 | 0x02  # user, password, will at QoS 1, clean session
    body = _connect(flags, b"deva", b"sealmq/v1/deva/data/up", b"bye", b"deva", b"pw")
    info = parse_connect(body)
    assert (info.client_id, info.username, info.password) == ("deva", "deva", "pw")
    assert (info.will_topic, info.will_qos, info.will_retain, info.clean_session) == (
        "sealmq/v1/deva/data/up", 1, False, True)
    assert (info.proto_name, info.proto_level, info.keep_alive) == ("MQTT", 4, 30)


@given(st.booleans(), st.booleans(), st.booleans(), st.text(max_size=40), st.binary(max_size=300),
       st.sampled_from(["dev-1", "backend", "x" * 63]))
def test_with_credentials_replaces_only_the_credentials(
        will: bool, user: bool, password: bool, client_id: str, will_msg: bytes, name: str) -> None:
    """A certificate login's CONNECT as amqtt sees it: same packet, the account's credentials."""
    client_id = client_id.replace("\x00", "")
    flags = 0x02 | (0x0C if will else 0) | (0x80 if user else 0) | (0x40 if user and password else 0)
    rest = ([b"sealmq/v1/dev-1/data/up", will_msg] if will else []) + ([b"someone"] if user else []) + (
        [b"pw"] if user and password else [])
    body = _connect(flags, client_id.encode(), *rest)
    info = parse_connect(body)
    packet = with_credentials(body, info, name, "token")
    assert packet[0] == 0x10
    length, mult, i = 0, 1, 1
    while True:  # the remaining length, as MQTT encodes it
        length += (packet[i] & 0x7F) * mult
        mult *= 128
        i += 1
        if not packet[i - 1] & 0x80:
            break
    assert length == len(packet) - i
    again = parse_connect(packet[i:])
    assert (again.username, again.password) == (name, "token")
    same = ("proto_name", "proto_level", "clean_session", "keep_alive", "client_id", "will_topic", "will_qos",
            "will_retain")
    assert all(getattr(again, f) == getattr(info, f) for f in same)
    assert packet[i:].find(will_msg) >= 0 if will else True


@pytest.mark.parametrize(
    "body",
    [b"", _connect(0x01, b"x"), _connect(0x80, b"x"), _connect(0x02, b"x") + b"\x00", _connect(0x20, b"x"),
     _connect(0x80, b"x", b"\xff\xfe")],
)
def test_parse_connect_rejects(body: bytes) -> None:
    with pytest.raises(ConnectParseError):
        parse_connect(body)


@given(st.binary(max_size=200))
def test_parse_connect_total_on_garbage(data: bytes) -> None:
    with contextlib.suppress(ConnectParseError):
        parse_connect(data)


@given(st.data())
def test_parse_connect_total_on_mutations(data: st.DataObject) -> None:
    body = bytearray(_connect(0xC6, b"deva", b"sealmq/v1/deva/hs/up", b"w", b"deva", b"pw"))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    with contextlib.suppress(ConnectParseError):
        parse_connect(bytes(body[:cut]))


# --- inspect lines ------------------------------------------------------------------------------

RECORD = cbor.dumps([1, b"\x01\x02", 0, 5, bytes(range(20))])


def test_describe_record_golden() -> None:
    assert describe("sealmq/v1/deva/data/up", RECORD) == (
        "sealmq/v1/deva/data/up device=deva channel=data dir=up len=28 record kind=TELEMETRY kid=0102 "
        "epoch=0 piv=5 ct_len=20 ct=000102030405060708090a0b0c0d0e0f..."
    )


def test_describe_handshake_guesses() -> None:
    m1 = describe("sealmq/v1/deva/hs/up", cbor.dumps_seq(True, 0, [6, 2], b"g" * 32, -24))
    assert m1.endswith("edhoc message_1 method=0 suites=[6, 2] g_x_len=32")
    m2 = describe("sealmq/v1/deva/hs/down", cbor.dumps(b"x" * 60))
    assert m2.endswith("edhoc message_2 or message_4 body_len=60")
    assert describe("sealmq/v1/deva/hs/up", cbor.dumps_seq(-8, b"x" * 60)).endswith(
        "edhoc message_3 conn_id=-8 body_len=60")
    assert describe("sealmq/v1/deva/hs/up", cbor.dumps_seq(2, [2, 6])).endswith("edhoc error err_code=2")


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xff", cbor.dumps([1, b"k", 0, 5]), cbor.dumps([1, "k", 0, 5, b""]),
     cbor.dumps([-1, b"k", 0, 5, b""]), b"\x18\x01"],  # the last is a non-deterministic encoding of 1
)
def test_describe_undecodable(payload: bytes) -> None:
    assert "undecodable" in describe("sealmq/v1/deva/data/up", payload)


def test_describe_unknown_kind_and_foreign_topic() -> None:
    assert "kind=unknown(99)" in describe("sealmq/v1/deva/data/up", cbor.dumps([99, b"", 0, 0, b""]))
    assert describe("x/y", b"\x00").startswith("x/y device=? channel=? dir=? len=1 ")


@given(st.text(max_size=80), st.binary(max_size=200))
def test_describe_never_raises(topic: str, payload: bytes) -> None:
    line = describe(topic, payload)
    assert isinstance(line, str)
    assert "\n" not in line


@given(st.data())
def test_describe_mutated_records(data: st.DataObject) -> None:
    raw = bytearray(RECORD)
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    assert describe("sealmq/v1/deva/data/up", bytes(raw)).startswith("sealmq/v1/deva/data/up device=deva")
