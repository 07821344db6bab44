"""The EDHOC responder's snapshot between message_2 and message_3 (``Responder.to_bytes`` /
``Responder.from_bytes``, docs/protocol.md section 12): a responder restored from it, with its own
credentials and authenticator, finishes the handshake exactly as the original would.

RFC 9529 trace 1 (method 0) and trace 2 (method 3) are finished by a restored responder and give the
RFC's message_4 and PRK_out; methods 1 and 2 (where only one side uses static DH) are checked with
test doubles. Every single-byte change and truncation of the snapshots is refused with a sealmq
error or decodes to a responder whose snapshot is the very same bytes.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from sealmq import cbor
from sealmq.edhoc import (
    AuthenticatedPeer,
    AuthKind,
    IdCred,
    Initiator,
    LocalCredential,
    Responder,
    Suite,
    encode_error,
    initiator_signs,
)
from sealmq.edhoc.suites import CURVE_X25519, exchange
from sealmq.errors import DecodeError, EdhocError, LocalProtocolError, Reason, SealmqError
from tests import test_edhoc_trace2 as trace2
from tests.edhoc_helpers import Trace1Authenticator, trace1_credential, trace1_pair
from tests.edhoc_helpers import h as h1


def _same_result(a: Responder, b: Responder) -> None:
    ra, rb = a.result(), b.result()
    assert (ra.prk_out, ra.suite, ra.c_i, ra.c_r, ra.method, ra.peer.cred, ra.ead) == \
        (rb.prk_out, rb.suite, rb.c_i, rb.c_r, rb.method, rb.peer.cred, rb.ead)


# --- the RFC 9529 traces, finished by a restored responder -------------------------------------------

def test_trace_1_finished_by_a_restored_responder() -> None:
    ini, res = trace1_pair(debug=False)
    res.process_message_1(ini.create_message_1())
    ini.process_message_2(res.create_message_2())
    message_3 = ini.create_message_3()
    blob = res.to_bytes()
    assert cbor.loads(blob)[7] == b""  # method 0: the initiator signs, Y is not kept
    restored = Responder.from_bytes(blob, trace1_credential("R"), Trace1Authenticator(), suites=[0])
    assert restored.to_bytes() == blob
    restored.process_message_3(message_3)
    assert restored.result().prk_out == h1("PRK_out")
    assert restored.create_message_4() == h1("message_4")
    res.process_message_3(message_3)
    _same_result(res, restored)


def _trace_2_until_message_3() -> tuple[Initiator, Responder, bytes]:
    h = trace2.h
    ini = Initiator(trace2.CcsStaticDh("I"), trace2.KidAuthenticator(), c_i=h("first_time.C_I"), suites=[6, 2],
                    method=3, ephemeral_key=h("first_time.X"))
    first = Responder(trace2.CcsStaticDh("R"), trace2.KidAuthenticator(), c_r=h("C_R"), suites=[2], methods=[3])
    with pytest.raises(EdhocError) as info:
        first.process_message_1(ini.create_message_1())
    message_1 = ini.process_error(encode_error(info.value), ephemeral_key=h("X"), c_i=h("C_I"))
    res = Responder(trace2.CcsStaticDh("R"), trace2.KidAuthenticator(), c_r=h("C_R"), suites=[2], methods=[3],
                    ephemeral_key=h("Y"))
    res.process_message_1(message_1)
    ini.process_message_2(res.create_message_2())
    return ini, res, ini.create_message_3()


def test_trace_2_finished_by_a_restored_responder() -> None:
    h = trace2.h
    _, res, message_3 = _trace_2_until_message_3()
    blob = res.to_bytes()
    assert cbor.loads(blob)[7] == h("Y")  # method 3: Y meets the initiator's static key in message_3
    restored = Responder.from_bytes(blob, [trace2.CcsStaticDh("R")], trace2.KidAuthenticator(), suites=[2],
                                    methods=[3])
    restored.process_message_3(message_3)
    assert restored.result().prk_out == h("PRK_out")
    assert restored.create_message_4() == h("message_4")
    res.process_message_3(message_3)
    _same_result(res, restored)


# --- every method, with doubles for the X25519 static-DH credentials -------------------------------

class X25519Credential:
    """A static-DH credential for suite 0 (X25519), named by kid: the CCS-like counterpart of the
    trace's Ed25519 certificates, so that methods 1 and 2 can be run."""

    kind = AuthKind.STATIC_DH

    def __init__(self, name: str) -> None:
        self.key = x25519.X25519PrivateKey.from_private_bytes(hashlib.sha256(name.encode()).digest())
        self.id_cred = IdCred.kid(name.encode()[:1])
        self.cred = cbor.dumps({"sub": name, "x": self.key.public_key().public_bytes_raw()})

    def supports(self, suite: Suite) -> bool:
        return suite.curve == CURVE_X25519

    def sign(self, suite: Suite, message: bytes) -> bytes:
        raise AssertionError("a static-DH credential never signs")

    def static_dh(self, suite: Suite, peer_public: bytes) -> bytes:
        return exchange(self.key, suite.load_public(peer_public))


class BothAuthenticator:
    """x5t -> the trace's certificates; kid -> the X25519 doubles."""

    def __init__(self) -> None:
        self.x509 = Trace1Authenticator()
        self.dh = {c.id_cred.encoded: c for c in (X25519Credential("I"), X25519Credential("R"))}

    def authenticate(self, id_cred: IdCred) -> AuthenticatedPeer:
        cred = self.dh.get(id_cred.encoded)
        if cred is None:
            return self.x509.authenticate(id_cred)
        return AuthenticatedPeer(cred.cred, cred.key.public_key(), f"dh {cred.id_cred.encoded.hex()}")


def _responder_credentials() -> list[LocalCredential]:
    return [trace1_credential("R"), X25519Credential("R")]


def _until_message_3(method: int, ead_1: Any = ()) -> tuple[Initiator, Responder, bytes]:
    cred: LocalCredential = trace1_credential("I") if initiator_signs(method) else X25519Credential("I")
    ini = Initiator(cred, BothAuthenticator(), c_i=b"\x0e", suites=[0], method=method,
                    ephemeral_key=hashlib.sha256(b"X").digest())
    res = Responder(_responder_credentials(), BothAuthenticator(), c_r=b"\x18\x2a", suites=[0], methods=[method],
                    ephemeral_key=hashlib.sha256(b"Y").digest(), known_ead_labels=frozenset({5}))
    res.process_message_1(ini.create_message_1(ead_1))
    ini.process_message_2(res.create_message_2())
    return ini, res, ini.create_message_3()


@pytest.mark.parametrize("method", [0, 1, 2, 3])
def test_every_method_is_finished_by_a_restored_responder(method: int) -> None:
    ini, res, message_3 = _until_message_3(method, ead_1=[(-5, b"critical"), (7, None), (9, b"")])
    blob = res.to_bytes()
    assert (cbor.loads(blob)[7] == b"") is initiator_signs(method)
    restored = Responder.from_bytes(blob, _responder_credentials(), BothAuthenticator(), suites=[0],
                                    methods=[method], known_ead_labels=frozenset({5}))
    assert restored.to_bytes() == blob
    restored.process_message_3(message_3)
    message_4 = restored.create_message_4()
    res.process_message_3(message_3)
    assert res.create_message_4() == message_4
    _same_result(res, restored)
    assert restored.result().ead[1] == res.result().ead[1] and len(res.result().ead[1]) == 3
    ini.process_message_4(message_4)
    assert ini.result().prk_out == restored.result().prk_out
    with pytest.raises(LocalProtocolError):  # no snapshot once completed
        restored.to_bytes()


def test_a_snapshot_only_between_message_2_and_message_3() -> None:
    ini = Initiator(trace1_credential("I"), Trace1Authenticator(), c_i=b"\x0e", suites=[0],
                    ephemeral_key=hashlib.sha256(b"X").digest())
    res = Responder(trace1_credential("R"), Trace1Authenticator(), c_r=b"\x18\x2a", suites=[0],
                    ephemeral_key=hashlib.sha256(b"Y").digest())
    with pytest.raises(LocalProtocolError):
        res.to_bytes()
    res.process_message_1(ini.create_message_1())
    with pytest.raises(LocalProtocolError):
        res.to_bytes()
    res.create_message_2()
    assert res.to_bytes()


def test_the_importer_must_serve_the_method_suite_and_credential() -> None:
    _, res, _ = _until_message_3(0)
    blob = res.to_bytes()
    auth = BothAuthenticator()
    cases: list[tuple[Any, dict[str, Any], Reason]] = [
        (_responder_credentials(), {"suites": [0], "methods": [3]}, Reason.UNSUPPORTED_METHOD),
        (_responder_credentials(), {"suites": [2], "methods": [0]}, Reason.UNSUPPORTED_SUITE),
        ([X25519Credential("R")], {"suites": [0], "methods": [0]}, Reason.UNSUPPORTED_SUITE),  # no signing key
        # an Ed25519 signing key, but not the certificate message_2 was signed with
        ([trace1_credential("I")], {"suites": [0], "methods": [0]}, Reason.UNKNOWN_CREDENTIAL),
    ]
    for creds, kw, reason in cases:
        with pytest.raises(DecodeError) as exc:
            Responder.from_bytes(blob, creds, auth, **kw)
        assert exc.value.reason is reason, (kw, exc.value)
    # an unknown critical EAD item in EAD_1 (the importer does not know label 5)
    _, res, _ = _until_message_3(0, ead_1=[(-5, b"x")])
    with pytest.raises(DecodeError) as exc:
        Responder.from_bytes(res.to_bytes(), _responder_credentials(), auth, suites=[0], methods=[0])
    assert exc.value.reason is Reason.UNSUPPORTED


@pytest.mark.parametrize(("index", "value", "reason"), [
    (0, 2, Reason.UNSUPPORTED),
    (1, 7, Reason.UNSUPPORTED_METHOD),
    (2, 99, Reason.UNSUPPORTED),
    (3, b"\x18\x2a", Reason.CONNECTION_ID_IN_USE),  # C_I = C_R
    (4, b"", Reason.WRONG_TYPE),  # no C_R
    (5, bytes(31), Reason.WRONG_TYPE),  # TH_3 not a hash long
    (6, bytes(33), Reason.TOO_LARGE),
    (7, bytes(32), Reason.MALFORMED),  # Y kept for method 0
    (8, {34: [-15, bytes(8)]}, Reason.UNKNOWN_CREDENTIAL),
    (8, {4: b"\x01"}, Reason.NOT_DETERMINISTIC),  # a lone kid not in compact form
    (9, [b"x"], Reason.WRONG_TYPE),
    (9, [1, 2.5], Reason.WRONG_TYPE),
])
def test_invalid_responder_snapshots_are_refused(index: int, value: Any, reason: Reason) -> None:
    _, res, _ = _until_message_3(0)
    items = cbor.loads(res.to_bytes())
    items[index] = value
    with pytest.raises(DecodeError) as exc:
        Responder.from_bytes(cbor.dumps(items), _responder_credentials(), BothAuthenticator(), suites=[0])
    assert exc.value.reason is reason


def test_an_invalid_ephemeral_key_is_refused() -> None:
    _, res, _ = _trace_2_until_message_3()
    items = cbor.loads(res.to_bytes())
    for bad in (bytes(32), b"\xff" * 32, b"\x01" * 31):  # 0 and >= the P-256 order are no scalars
        items[7] = bad
        with pytest.raises(DecodeError):
            Responder.from_bytes(cbor.dumps(items), [trace2.CcsStaticDh("R")], trace2.KidAuthenticator(),
                                 suites=[2], methods=[3])


# --- mutations ------------------------------------------------------------------------------------

@functools.cache
def _snapshots() -> list[tuple[bytes, tuple[Any, ...]]]:
    out = []
    for method in (0, 3):
        _, res, _ = _until_message_3(method, ead_1=[(7, b"ead")])
        out.append((res.to_bytes(), (_responder_credentials(), BothAuthenticator(), [0], [method])))
    _, res, _ = _trace_2_until_message_3()
    out.append((res.to_bytes(), ([trace2.CcsStaticDh("R")], trace2.KidAuthenticator(), [2], [3])))
    return out


def _check(data: bytes, args: tuple[Any, ...]) -> bool:
    creds, auth, suites, methods = args
    try:
        restored = Responder.from_bytes(data, creds, auth, suites=suites, methods=methods)
    except SealmqError:
        return False
    assert restored.to_bytes() == data
    return True


@pytest.mark.parametrize("index", range(3))
def test_every_single_byte_change_and_truncation(index: int) -> None:
    blob, args = _snapshots()[index]
    accepted = 0
    for pos in range(len(blob)):
        for flip in (0x01, 0x02, 0x20, 0x80, 0xFF):
            accepted += _check(blob[:pos] + bytes([blob[pos] ^ flip]) + blob[pos + 1:], args)
        assert not _check(blob[:pos], args)
        _check(blob[:pos] + blob[pos + 1:], args)
    assert accepted > 0  # a changed TH_3 or PRK_3e2m byte cannot be told apart (message_3 will fail)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_edits_only_raise_sealmq_errors(data: st.DataObject) -> None:
    blob, args = data.draw(st.sampled_from(_snapshots()))
    edited = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(edited) - 1))
        if data.draw(st.booleans()):
            edited[pos] = data.draw(st.integers(0, 255))
        else:
            edited[pos:pos] = data.draw(st.binary(min_size=1, max_size=6))
    _check(bytes(edited), args)
