"""The invalid-message classes of RFC 9529 section 4, applied to trace 2 (method 3, CCS by kid,
suite 2) and rejected with a typed error and a stable reason by both roles.

RFC 9529 section 4 gives one example per class and says the same kinds of error apply to every
field of every message; tests/vectors holds only the valid traces, so each invalid message here
is built from a trace-2 message by one such change. Messages with a bad field *inside* the
encryption are re-encrypted with the trace's own keys (KEYSTREAM_2 for message_2, K_3/IV_3 for
message_3), so they reach the check under test instead of failing at the AEAD:

* encoding errors: wrong CBOR type, SUITES_I as a one-element array, a connection identifier or
  kid not in its compact integer form, ID_CRED as a map around a lone kid, truncation, trailing data;
* cryptography errors: a point not on the curve, a wrong MAC_2/MAC_3 (inside a valid encryption),
  a wrong AEAD tag, a MAC of the wrong length;
* non-deterministic CBOR: integers and lengths not in preferred encoding, indefinite lengths;
* parameters/state: unsupported method or suite, an unknown critical EAD item, an unknown kid,
  C_R equal to C_I, a message in the wrong state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from sealmq import cbor, kdf
from sealmq.edhoc import CcsRegistry, Initiator, Responder
from sealmq.errors import EdhocError, LocalProtocolError, Reason, RemoteProtocolError
from tests.test_method3_ccs import h, trace_pair, trace_registry


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def message_2_with(plaintext_2: bytes) -> bytes:
    """message_2 carrying ``plaintext_2``, encrypted exactly as the trace's responder would."""
    keystream = kdf.edhoc_kdf(h("PRK_2e"), 0, h("TH_2"), len(plaintext_2))
    return cbor.dumps(h("G_Y") + xor(plaintext_2, keystream))


def message_3_with(plaintext_3: bytes) -> bytes:
    """message_3 carrying ``plaintext_3`` under the trace's K_3/IV_3 (a valid AEAD)."""
    aad = cbor.dumps(["Encrypt0", b"", h("TH_3")])
    return cbor.dumps(AESCCM(h("K_3"), tag_length=8).encrypt(h("IV_3"), plaintext_3, aad))


def long_bstr_header(message: bytes) -> bytes:
    """The same byte string with its length in a non-preferred 2-byte argument (59 00 nn)."""
    content = cbor.loads(message)
    return b"\x59" + len(content).to_bytes(2, "big") + content


def flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


NOT_ON_CURVE = bytes(31) + b"\x01"  # x = 1: x^3 - 3x + b is not a square mod p on P-256
MAC_2, MAC_3 = h("MAC_2"), h("MAC_3")
M1 = h("message_1")
M1_ITEMS = cbor.loads_seq(M1)  # [3, [6, 2], G_X, -24]


@dataclass(frozen=True)
class Case:
    cls: str
    name: str
    message: int  # which message is invalid: 1, 3 (to the responder), 2, 4 (to the initiator)
    build: Callable[[], bytes]
    reason: Reason


CASES = [
    # --- encoding errors ---------------------------------------------------------------------------
    Case("encoding", "METHOD as a byte string", 1, lambda: cbor.dumps_seq(b"\x03", *M1_ITEMS[1:]), Reason.WRONG_TYPE),
    Case("encoding", "SUITES_I as a one-element array", 1,
         lambda: cbor.dumps_seq(3, [2], *M1_ITEMS[2:]), Reason.WRONG_TYPE),
    Case("encoding", "G_X as an integer", 1, lambda: cbor.dumps_seq(3, [6, 2], 7, -24), Reason.WRONG_TYPE),
    Case("encoding", "C_I as a byte string that is a one-byte int", 1,
         lambda: cbor.dumps_seq(3, [6, 2], M1_ITEMS[2], b"\x37"), Reason.NOT_DETERMINISTIC),
    Case("encoding", "message_1 truncated", 1, lambda: M1[:-1], Reason.MALFORMED),
    Case("encoding", "message_1 without C_I", 1, lambda: cbor.dumps_seq(*M1_ITEMS[:3]), Reason.MALFORMED),
    Case("encoding", "message_3 not a byte string", 3, lambda: cbor.dumps([h("CIPHERTEXT_3")]), Reason.WRONG_TYPE),
    # (sealmq.edhoc.wire reports items after the one byte string as TOO_LARGE: "too many items")
    Case("encoding", "message_3 with trailing data", 3, lambda: h("message_3") + b"\x00", Reason.TOO_LARGE),
    Case("encoding", "ID_CRED_I as the map {4: kid} instead of the compact kid", 3,
         lambda: message_3_with(cbor.dumps_seq({4: b"\x2b"}, MAC_3)), Reason.NOT_DETERMINISTIC),
    Case("encoding", "kid as a byte string that is a one-byte int", 3,
         lambda: message_3_with(cbor.dumps_seq(b"\x2b", MAC_3)), Reason.NOT_DETERMINISTIC),
    Case("encoding", "Signature_or_MAC_3 as an integer", 3,
         lambda: message_3_with(cbor.dumps_seq(-12, 5)), Reason.WRONG_TYPE),
    Case("encoding", "message_2 not a byte string", 2, lambda: cbor.dumps([h("G_Y")]), Reason.WRONG_TYPE),
    Case("encoding", "message_2 only G_Y", 2, lambda: cbor.dumps(h("G_Y")), Reason.MALFORMED),
    Case("encoding", "C_R as a byte string that is a one-byte int", 2,
         lambda: message_2_with(cbor.dumps_seq(b"\x27", -19, MAC_2)), Reason.NOT_DETERMINISTIC),
    Case("encoding", "ID_CRED_R as the map {4: kid} instead of the compact kid", 2,
         lambda: message_2_with(cbor.dumps_seq(-8, {4: b"\x32"}, MAC_2)), Reason.NOT_DETERMINISTIC),
    Case("encoding", "PLAINTEXT_2 without Signature_or_MAC_2", 2,
         lambda: message_2_with(cbor.dumps_seq(-8, -19)), Reason.MALFORMED),
    Case("encoding", "message_4 not a byte string", 4, lambda: cbor.dumps(7), Reason.WRONG_TYPE),
    # --- cryptography errors -----------------------------------------------------------------------
    Case("crypto", "G_X not on the curve", 1,
         lambda: cbor.dumps_seq(3, [6, 2], NOT_ON_CURVE, -24), Reason.INVALID_POINT),
    Case("crypto", "G_X of the wrong length", 1,
         lambda: cbor.dumps_seq(3, [6, 2], M1_ITEMS[2][:31], -24), Reason.INVALID_POINT),
    Case("crypto", "CIPHERTEXT_3 with a wrong tag", 3, lambda: flip_last(h("message_3")), Reason.MAC_FAILED),
    Case("crypto", "wrong MAC_3 inside a valid encryption", 3,
         lambda: message_3_with(cbor.dumps_seq(-12, flip_last(MAC_3))), Reason.MAC_FAILED),
    Case("crypto", "MAC_3 one byte too long", 3,
         lambda: message_3_with(cbor.dumps_seq(-12, MAC_3 + b"\x00")), Reason.MAC_FAILED),
    Case("crypto", "G_Y not on the curve", 2,
         lambda: cbor.dumps(NOT_ON_CURVE + h("CIPHERTEXT_2")), Reason.INVALID_POINT),
    Case("crypto", "wrong MAC_2 (a flipped ciphertext bit)", 2, lambda: flip_last(h("message_2")), Reason.MAC_FAILED),
    Case("crypto", "MAC_2 truncated", 2,
         lambda: message_2_with(cbor.dumps_seq(-8, -19, MAC_2[:7])), Reason.MAC_FAILED),
    Case("crypto", "CIPHERTEXT_4 with a wrong tag", 4, lambda: flip_last(h("message_4")), Reason.MAC_FAILED),
    # --- non-deterministic CBOR --------------------------------------------------------------------
    Case("nondeterministic", "METHOD 3 as 18 03", 1, lambda: b"\x18\x03" + M1[1:], Reason.NOT_DETERMINISTIC),
    Case("nondeterministic", "SUITES_I as an indefinite-length array", 1,
         lambda: b"\x03\x9f\x06\x02\xff" + M1[4:], Reason.NOT_DETERMINISTIC),
    Case("nondeterministic", "G_X length as 59 00 20", 1,
         lambda: M1[:4] + b"\x59\x00\x20" + M1[6:], Reason.NOT_DETERMINISTIC),
    Case("nondeterministic", "message_3 length in 3 bytes (59 00 nn)", 3,
         lambda: long_bstr_header(h("message_3")), Reason.NOT_DETERMINISTIC),
    Case("nondeterministic", "message_2 length in 3 bytes (59 00 nn)", 2,
         lambda: long_bstr_header(h("message_2")), Reason.NOT_DETERMINISTIC),
    Case("nondeterministic", "C_R -8 as 38 07 inside PLAINTEXT_2", 2,
         lambda: message_2_with(b"\x38\x07" + cbor.dumps_seq(-19, MAC_2)), Reason.NOT_DETERMINISTIC),
    Case("nondeterministic", "message_4 as an indefinite-length byte string", 4,
         lambda: b"\x5f" + h("message_4") + b"\xff", Reason.NOT_DETERMINISTIC),
    # --- parameters and state ----------------------------------------------------------------------
    Case("parameters", "METHOD 4 does not exist", 1,
         lambda: cbor.dumps_seq(4, *M1_ITEMS[1:]), Reason.UNSUPPORTED_METHOD),
    Case("parameters", "METHOD 0 not accepted by this responder", 1,
         lambda: cbor.dumps_seq(0, *M1_ITEMS[1:]), Reason.UNSUPPORTED_METHOD),
    Case("parameters", "selected suite 6 not supported", 1,
         lambda: h("first_time.message_1"), Reason.UNSUPPORTED_SUITE),
    Case("parameters", "unknown critical EAD_1 item", 1, lambda: M1 + cbor.dumps_seq(-5, b"x"), Reason.UNSUPPORTED),
    Case("parameters", "unknown kid in message_3", 3,
         lambda: message_3_with(cbor.dumps_seq(-13, MAC_3)), Reason.UNKNOWN_CREDENTIAL),
    Case("parameters", "unknown kid in message_2", 2,
         lambda: message_2_with(cbor.dumps_seq(-8, -15, MAC_2)), Reason.UNKNOWN_CREDENTIAL),
    Case("parameters", "C_R equal to C_I", 2,
         lambda: message_2_with(cbor.dumps_seq(-24, -19, MAC_2)), Reason.CONNECTION_ID_IN_USE),
    Case("parameters", "unknown critical EAD_2 item", 2,
         lambda: message_2_with(cbor.dumps_seq(-8, -19, MAC_2, -7)), Reason.UNSUPPORTED),
]


def run_until(message: int) -> tuple[Initiator, Responder]:
    """A trace-2 pair advanced to just before ``message`` is processed."""
    ini, res = trace_pair()
    assert ini.create_message_1() == M1
    if message == 1:
        return ini, res
    res.process_message_1(M1)
    assert res.create_message_2() == h("message_2")
    if message == 2:
        return ini, res
    ini.process_message_2(h("message_2"))
    assert ini.create_message_3() == h("message_3")
    if message == 3:
        return ini, res
    res.process_message_3(h("message_3"))
    assert res.create_message_4() == h("message_4")
    return ini, res


def test_every_class_is_tested_on_both_roles() -> None:
    for cls in {c.cls for c in CASES}:
        roles = {"responder" if c.message in (1, 3) else "initiator" for c in CASES if c.cls == cls}
        assert roles == {"responder", "initiator"}, cls


def test_the_builders_change_only_what_they_say() -> None:
    """The re-encryption helpers reproduce the valid trace messages from the valid plaintexts."""
    assert message_2_with(h("PLAINTEXT_2")) == h("message_2")
    assert message_3_with(h("PLAINTEXT_3")) == h("message_3")
    assert cbor.dumps_seq(-8, -19, MAC_2) == h("PLAINTEXT_2")
    assert cbor.dumps_seq(-12, MAC_3) == h("PLAINTEXT_3")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.cls}-m{c.message}-{c.name}")
def test_invalid_message_is_rejected_with_its_reason(case: Case) -> None:
    ini, res = run_until(case.message)
    data = case.build()
    receiver: Initiator | Responder = res if case.message in (1, 3) else ini
    step = {1: res.process_message_1, 2: ini.process_message_2,
            3: res.process_message_3, 4: ini.process_message_4}[case.message]
    with pytest.raises(RemoteProtocolError) as info:
        step(data)
    assert info.value.reason is case.reason, info.value
    # the receiving side is dead, its secrets dropped, and no further call succeeds
    assert receiver.transcript == {}
    with pytest.raises(LocalProtocolError):
        receiver.result()


def test_suite_refusal_carries_err_code_2_and_suites_r() -> None:
    _, res = run_until(1)
    with pytest.raises(EdhocError) as info:
        res.process_message_1(h("first_time.message_1"))
    assert (info.value.err_code, info.value.suites_r) == (2, [2])


@pytest.mark.parametrize("message", [1, 2, 3, 4])
def test_message_in_the_wrong_state_is_rejected_by_both_roles(message: int) -> None:
    """Unexpected message type: the valid trace message, delivered when another is due."""
    ini, res = trace_pair()
    wrong = {1: lambda: res.process_message_3(h("message_3")),
             2: lambda: ini.process_message_4(h("message_4")),
             3: res.create_message_4,
             4: lambda: ini.process_message_2(h("message_2"))}[message]
    with pytest.raises(LocalProtocolError) as info:
        wrong()
    assert info.value.reason is Reason.UNEXPECTED_MESSAGE


def test_revoked_registry_entry_is_an_unknown_like_refusal_on_both_sides() -> None:
    """Not a wire error, but the same path: a revoked kid stops either role at authentication."""
    entries = trace_registry().entries
    revoked = [type(e)(e.ccs, e.role, e.name, True) for e in entries]
    ini, res = trace_pair(registry=CcsRegistry(revoked))
    res.process_message_1(ini.create_message_1())
    with pytest.raises(EdhocError) as info:
        ini.process_message_2(res.create_message_2())
    assert info.value.reason is Reason.REVOKED
