"""Hypothesis: whatever bytes reach an EDHOC decoder, the only exceptions are SealmqError
subclasses, and a failure leaves a dead object that hands out no keys.

Beyond arbitrary bytes and mutations of the RFC 9529 trace 1 messages (which mostly die at the
keystream or the AEAD), the trace's known keys let us *encrypt* arbitrary plaintexts, so that
garbage reaches the PLAINTEXT_2/3/4 parsers, EAD handling and the authenticator too.
"""

from __future__ import annotations

import contextlib
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from hypothesis import given
from hypothesis import strategies as st

from sealmq import cbor, kdf
from sealmq.edhoc import Initiator, Responder, State, decode_error_message
from sealmq.errors import LocalProtocolError, SealmqError
from tests.edhoc_helpers import h, trace1_pair

cbor_items = st.recursive(
    st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=10)
    | st.booleans()
    | st.none(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.integers(-40, 40) | st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
cbor_seqs = st.lists(cbor_items, max_size=6).map(lambda items: cbor.dumps_seq(*items))


@st.composite
def mutated(draw: st.DrawFn, good: bytes) -> bytes:
    data = bytearray(good)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data.insert(i, draw(st.integers(0, 255)))
        elif op == "delete" and data:
            del data[i]
        elif op == "truncate":
            del data[i:]
    return bytes(data)


def in_state(which: str) -> tuple[Initiator, Responder]:
    ini, res = trace1_pair(debug=False)
    if which == "message_1":
        return ini, res
    res.process_message_1(ini.create_message_1())
    if which == "message_2":
        return ini, res
    ini.process_message_2(res.create_message_2())
    if which == "message_3":
        return ini, res
    res.process_message_3(ini.create_message_3())
    return ini, res


def feed(which: str, data: bytes) -> None:
    ini, res = in_state(which)
    party = res if which in ("message_1", "message_3") else ini
    try:
        getattr(party, f"process_{which}")(data)
    except SealmqError:
        assert party.state is State.FAILED
        try:
            party.result()
        except LocalProtocolError:
            return
        raise AssertionError("a failed handshake handed out keys") from None


@given(st.binary(max_size=300))
def test_arbitrary_bytes_message_1(data: bytes) -> None:
    feed("message_1", data)


@given(st.binary(max_size=300) | cbor_seqs)
def test_arbitrary_bytes_message_2(data: bytes) -> None:
    feed("message_2", data)


@given(st.binary(max_size=200) | cbor_seqs)
def test_arbitrary_bytes_message_3(data: bytes) -> None:
    feed("message_3", data)


@given(st.binary(max_size=60) | cbor_seqs)
def test_arbitrary_bytes_message_4(data: bytes) -> None:
    feed("message_4", data)


@given(
    st.sampled_from(["message_1", "message_2", "message_3", "message_4"]).flatmap(
        lambda w: st.tuples(st.just(w), mutated(h(w)))
    )
)
def test_mutated_trace_messages(case: tuple[str, bytes]) -> None:
    feed(*case)


@given(st.binary(max_size=60) | cbor_seqs | mutated(bytes.fromhex("02820602")))
def test_error_decoding(data: bytes) -> None:
    with contextlib.suppress(SealmqError):
        decode_error_message(data)
    ini, _ = in_state("message_2")
    try:
        ini.process_error(data)
    except SealmqError:
        assert ini.state is State.FAILED
    else:
        raise AssertionError("only ERR_CODE 2 with a new common suite continues, and suite 0 is our only one")


# --- garbage inside valid encryption ---------------------------------------------------------


def message_2_for(plaintext_2: bytes) -> bytes:
    keystream = kdf.edhoc_kdf(h("PRK_2e"), 0, h("TH_2"), len(plaintext_2))
    return cbor.dumps(h("G_Y") + bytes(a ^ b for a, b in zip(plaintext_2, keystream, strict=True)))


def message_3_for(plaintext_3: bytes) -> bytes:
    aad = cbor.dumps(["Encrypt0", b"", h("TH_3")])
    return cbor.dumps(AESCCM(h("K_3"), tag_length=8).encrypt(h("IV_3"), plaintext_3, aad))


def message_4_for(plaintext_4: bytes) -> bytes:
    aad = cbor.dumps(["Encrypt0", b"", h("TH_4")])
    return cbor.dumps(AESCCM(h("K_4"), tag_length=8).encrypt(h("IV_4"), plaintext_4, aad))


def test_crafting_helpers_reproduce_the_trace() -> None:
    assert message_2_for(h("PLAINTEXT_2")) == h("message_2")
    assert message_3_for(h("PLAINTEXT_3")) == h("message_3")
    assert message_4_for(b"") == h("message_4")


@given(st.binary(min_size=1, max_size=200) | cbor_seqs.filter(bool) | mutated(h("PLAINTEXT_2")))
def test_garbage_plaintext_2(pt: bytes) -> None:
    feed("message_2", message_2_for(pt))


@given(st.binary(max_size=200) | cbor_seqs | mutated(h("PLAINTEXT_3")))
def test_garbage_plaintext_3(pt: bytes) -> None:
    feed("message_3", message_3_for(pt))


@given(st.binary(max_size=60) | cbor_seqs)
def test_garbage_plaintext_4(pt: bytes) -> None:
    feed("message_4", message_4_for(pt))


@given(st.lists(cbor_items, min_size=0, max_size=4))
def test_valid_plaintext_with_garbage_ead(items: list[Any]) -> None:
    """The real PLAINTEXT_2 followed by arbitrary items where EAD_2 would be."""
    feed("message_2", message_2_for(h("PLAINTEXT_2") + cbor.dumps_seq(*items)))
