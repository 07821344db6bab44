"""Every way an EDHOC handshake must fail, each with its reason, and what is left afterwards:
a dead object that refuses every call and hands out no keys."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509

from pki import issue
from sealmq import cbor
from sealmq.edhoc import (
    Initiator,
    Responder,
    State,
    X509Credential,
    decode_error_message,
    encode_error,
    is_error_message,
)
from sealmq.edhoc.handshake import _INITIATOR_TABLE, _RESPONDER_TABLE, Input
from sealmq.errors import DecodeError, EdhocError, LocalProtocolError, Reason, SealmqError
from sealmq.identity import Role
from tests.edhoc_helpers import PkiFixture, counter_random, h, make_pki, p256_key, run_handshake, trace1_pair


@pytest.fixture(scope="module")
def pki() -> PkiFixture:
    return make_pki()


def pair(
    pki: PkiFixture,
    *,
    dev_chain: list[bytes] | None = None,
    dev_key: Any = None,
    be_chain: list[bytes] | None = None,
    be_key: Any = None,
    now: Any = None,
    crls: list[x509.CertificateRevocationList] | None = None,
) -> tuple[Initiator, Responder]:
    dev_key = dev_key or p256_key(31)
    be_key = be_key or p256_key(32)
    dev_chain = dev_chain or pki.leaf(Role.DEVICE, "dev-1", dev_key)
    be_chain = be_chain or pki.leaf(Role.BACKEND, "backend", be_key)
    rnd = counter_random(77)
    ini = Initiator(
        X509Credential(dev_key, dev_chain),
        pki.authenticator(Role.BACKEND, now=now),
        c_i=b"\x01\x02",
        random_bytes=rnd,
    )
    res = Responder(
        X509Credential(be_key, be_chain),
        pki.authenticator(Role.DEVICE, now=now, crls=crls),
        c_r=b"\x03\x04",
        random_bytes=rnd,
    )
    return ini, res


def assert_dead(party: Initiator | Responder) -> None:
    assert party.state is State.FAILED
    with pytest.raises(LocalProtocolError):
        party.result()
    for call in ("create_message_1", "create_message_2", "create_message_3", "create_message_4"):
        if hasattr(party, call):
            with pytest.raises(LocalProtocolError):
                getattr(party, call)()
    assert party.transcript == {}


def fail_at_message_3(ini: Initiator, res: Responder) -> EdhocError:
    res.process_message_1(ini.create_message_1())
    ini.process_message_2(res.create_message_2())
    m3 = ini.create_message_3()
    with pytest.raises(EdhocError) as info:
        res.process_message_3(m3)
    assert_dead(res)
    # The responder tells the initiator, which then gives up too.
    with pytest.raises(EdhocError) as peer:
        ini.process_error(encode_error(info.value))
    assert peer.value.reason is Reason.PEER_ERROR
    assert_dead(ini)
    return info.value


def test_unknown_ca(pki: PkiFixture) -> None:
    foreign = make_pki(seed=99)
    key = p256_key(40)
    err = fail_at_message_3(*pair(pki, dev_key=key, dev_chain=foreign.leaf(Role.DEVICE, "dev-1", key)))
    assert err.reason is Reason.UNKNOWN_CA
    assert err.__cause__ is not None  # the CertificateError is kept for the audit trail


def test_expired_device_certificate(pki: PkiFixture) -> None:
    key = p256_key(41)
    old = pki.leaf(Role.DEVICE, "dev-1", key, now=pki.now - timedelta(days=20), days=10)
    assert fail_at_message_3(*pair(pki, dev_key=key, dev_chain=old)).reason is Reason.EXPIRED


def test_revoked_device_certificate(pki: PkiFixture) -> None:
    key = p256_key(42)
    chain = pki.leaf(Role.DEVICE, "dev-1", key)
    serial = x509.load_der_x509_certificate(chain[0]).serial_number
    crls = [
        issue.make_crl(pki.issuing, pki.issuing_key, [issue.Revocation(serial, pki.now)], pki.now, number=1),
        issue.make_crl(pki.root, _root_key(), [], pki.now, number=1),
    ]
    err = fail_at_message_3(*pair(pki, dev_key=key, dev_chain=chain, crls=crls))
    assert err.reason is Reason.REVOKED


def _root_key() -> Any:
    # make_pki derives its root key from counter_random(1); the same draw gives it back.
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.derive_private_key(int.from_bytes(counter_random(1)(32), "big"), ec.SECP256R1())


def test_wrong_role_device_with_backend_certificate(pki: PkiFixture) -> None:
    key = p256_key(43)
    chain = pki.leaf(Role.BACKEND, "dev-1", key)  # a valid certificate, but not a device's
    assert fail_at_message_3(*pair(pki, dev_key=key, dev_chain=chain)).reason is Reason.WRONG_ROLE


def test_wrong_role_backend_with_device_certificate(pki: PkiFixture) -> None:
    key = p256_key(44)
    ini, res = pair(pki, be_key=key, be_chain=pki.leaf(Role.DEVICE, "backend", key))
    res.process_message_1(ini.create_message_1())
    with pytest.raises(EdhocError) as info:
        ini.process_message_2(res.create_message_2())
    assert info.value.reason is Reason.WRONG_ROLE
    assert_dead(ini)


def test_x5t_nobody_knows(pki: PkiFixture) -> None:
    key = p256_key(45)
    ini = Initiator(
        X509Credential(key, pki.leaf(Role.DEVICE, "dev-1", key), by_reference=True),
        pki.authenticator(Role.BACKEND),
        c_i=1,
        random_bytes=counter_random(1),
    )
    _, res = pair(pki)
    res.process_message_1(ini.create_message_1())
    ini.process_message_2(res.create_message_2())
    with pytest.raises(EdhocError) as info:
        res.process_message_3(ini.create_message_3())
    assert info.value.reason is Reason.UNKNOWN_CREDENTIAL


def test_tampered_message_2_signature(pki: PkiFixture) -> None:
    ini, res = pair(pki)
    res.process_message_1(ini.create_message_1())
    m2 = bytearray(res.create_message_2())
    m2[-1] ^= 0x01  # the last plaintext byte is in Signature_or_MAC_2 (no EAD_2)
    with pytest.raises(EdhocError) as info:
        ini.process_message_2(bytes(m2))
    assert info.value.reason is Reason.SIGNATURE_FAILED
    assert_dead(ini)


def test_tampered_message_2_ephemeral_key(pki: PkiFixture) -> None:
    ini, res = pair(pki)
    res.process_message_1(ini.create_message_1())
    m2 = bytearray(res.create_message_2())
    m2[5] ^= 0x01  # inside G_Y: another point (or none), so another keystream: garbage plaintext
    with pytest.raises(SealmqError):
        ini.process_message_2(bytes(m2))
    assert_dead(ini)


def test_tampered_message_3(pki: PkiFixture) -> None:
    ini, res = pair(pki)
    res.process_message_1(ini.create_message_1())
    ini.process_message_2(res.create_message_2())
    m3 = bytearray(ini.create_message_3())
    m3[-3] ^= 0x80
    with pytest.raises(EdhocError) as info:
        res.process_message_3(bytes(m3))
    assert info.value.reason is Reason.MAC_FAILED
    assert_dead(res)


class BadSigner:
    """A credential whose signatures are wrong by one bit (an impostor without the key)."""

    def __init__(self, inner: X509Credential) -> None:
        self.inner = inner
        self.id_cred, self.cred, self.kind = inner.id_cred, inner.cred, inner.kind

    def supports(self, suite: Any) -> bool:
        return self.inner.supports(suite)

    def sign(self, suite: Any, message: bytes) -> bytes:
        sig = bytearray(self.inner.sign(suite, message))
        sig[0] ^= 1
        return bytes(sig)

    def static_dh(self, suite: Any, peer_public: bytes) -> bytes:
        raise AssertionError


def test_bad_signature_in_message_3(pki: PkiFixture) -> None:
    ini, res = pair(pki)
    ini.credential = BadSigner(ini.credential)  # type: ignore[arg-type, assignment]
    assert fail_at_message_3(ini, res).reason is Reason.SIGNATURE_FAILED


def test_tampered_message_4(pki: PkiFixture) -> None:
    ini, res = pair(pki)
    res.process_message_1(ini.create_message_1())
    ini.process_message_2(res.create_message_2())
    res.process_message_3(ini.create_message_3())
    m4 = bytearray(res.create_message_4())
    m4[-1] ^= 1
    with pytest.raises(EdhocError) as info:
        ini.process_message_4(bytes(m4))
    assert info.value.reason is Reason.MAC_FAILED
    assert_dead(ini)


@pytest.mark.parametrize("which", ["message_1", "message_2", "message_3", "message_4"])
def test_every_truncation_rejected(which: str) -> None:
    ini, res = trace1_pair(debug=False)
    good = h(which)
    for cut in range(len(good)):
        ini, res = trace1_pair(debug=False)
        with pytest.raises(SealmqError):
            _feed(ini, res, which, good[:cut])
        party = res if which in ("message_1", "message_3") else ini
        assert party.state is State.FAILED


def _feed(ini: Initiator, res: Responder, which: str, data: bytes) -> Any:
    """Bring the receiver of ``which`` to the state where it expects it, then feed ``data``."""
    if which == "message_1":
        return res.process_message_1(data)
    res.process_message_1(ini.create_message_1())
    if which == "message_2":
        return ini.process_message_2(data)
    ini.process_message_2(res.create_message_2())
    if which == "message_3":
        return res.process_message_3(data)
    res.process_message_3(ini.create_message_3())
    return ini.process_message_4(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (bytes.fromhex("1800") + h("message_1")[1:], Reason.NOT_DETERMINISTIC),  # METHOD as 0x1800
        (h("message_1")[:-1] + bytes.fromhex("412d"), Reason.NOT_DETERMINISTIC),  # C_I as bstr h'2d'
        (h("message_1")[:2] + bytes.fromhex("590020") + h("message_1")[4:], Reason.NOT_DETERMINISTIC),
        (h("message_1") + b"\xff", Reason.MALFORMED),
        (h("message_1")[:-1] + bytes.fromhex("3818"), Reason.WRONG_TYPE),  # C_I = -25
        (bytes.fromhex("04") + h("message_1")[1:], Reason.UNSUPPORTED_METHOD),
        (bytes.fromhex("01") + h("message_1")[1:], Reason.UNSUPPORTED_METHOD),  # valid, but not accepted
        (h("message_1") + bytes.fromhex("2c"), Reason.UNSUPPORTED),  # unknown critical EAD label -13
    ],
)
def test_message_1_rejections(data: bytes, reason: Reason) -> None:
    _, res = trace1_pair(debug=False)
    with pytest.raises(SealmqError) as info:
        res.process_message_1(data)
    assert info.value.reason is reason
    assert_dead(res)


def test_unsupported_suite_is_err_code_2() -> None:
    _, res = trace1_pair(debug=False)
    with pytest.raises(EdhocError) as info:
        res.process_message_1(bytes.fromhex("0002") + h("message_1")[2:])
    assert (info.value.err_code, info.value.suites_r) == (2, [0])
    assert encode_error(info.value) == bytes.fromhex("0200")


def test_invalid_p256_point() -> None:
    from tests.test_edhoc_roundtrip import make_pair

    ini, res = make_pair(make_pki(), "p256", [2], by_reference=True)
    m1 = cbor.loads_seq(ini.create_message_1())
    for bad_x in ((1).to_bytes(32, "big"), b"\xff" * 32, b"\x05" * 31):  # no such x / >= p / short
        _, res = make_pair(make_pki(), "p256", [2], by_reference=True)
        with pytest.raises(EdhocError) as info:
            res.process_message_1(cbor.dumps_seq(m1[0], m1[1], bad_x, m1[3]))
        assert info.value.reason is Reason.INVALID_POINT


def test_x25519_small_order_point() -> None:
    _, res = trace1_pair(debug=False)
    m1 = cbor.loads_seq(h("message_1"))
    res.process_message_1(cbor.dumps_seq(m1[0], m1[1], b"\x00" * 32, m1[3]))
    with pytest.raises(EdhocError) as info:
        res.create_message_2()
    assert info.value.reason is Reason.INVALID_POINT
    assert_dead(res)


INITIATOR_STEPS = ["create_message_1", "process_message_2", "create_message_3", "process_message_4"]
RESPONDER_STEPS = ["process_message_1", "create_message_2", "process_message_3", "create_message_4"]
CALLS: dict[str, tuple[str, Input]] = {
    "create_message_1": ("", Input.SEND_M1),
    "process_message_2": ("message_2", Input.RECV_M2),
    "create_message_3": ("", Input.SEND_M3),
    "process_message_4": ("message_4", Input.RECV_M4),
    "process_message_1": ("message_1", Input.RECV_M1),
    "create_message_2": ("", Input.SEND_M2),
    "process_message_3": ("message_3", Input.RECV_M3),
    "create_message_4": ("", Input.SEND_M4),
    "process_error": ("error", Input.RECV_ERROR),
}


def _call(party: Initiator | Responder, name: str) -> Any:
    arg = CALLS[name][0]
    if not arg:
        return getattr(party, name)()
    return getattr(party, name)(bytes.fromhex("0160") if arg == "error" else h(arg))


@pytest.mark.parametrize("role", ["initiator", "responder"])
@pytest.mark.parametrize("depth", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_transition_table_is_exhaustive(role: str, depth: int, call: str) -> None:
    """h2-style: every (state, input) pair that is not in the table is a LocalProtocolError
    and kills the object; the pairs in the table are accepted (with the trace's bytes)."""
    ini, res = trace1_pair(debug=False)
    party: Initiator | Responder = ini if role == "initiator" else res
    steps = INITIATOR_STEPS if role == "initiator" else RESPONDER_STEPS
    if not hasattr(party, call):
        return
    for step in steps[:depth]:
        _call(party, step)
    table = _INITIATOR_TABLE if role == "initiator" else _RESPONDER_TABLE
    if (party.state, CALLS[call][1]) in table:
        try:
            _call(party, call)
        except EdhocError as err:  # allowed, but the trace's bytes are not what this state wants
            assert call == "process_error"
            assert err.reason is Reason.PEER_ERROR
        return
    with pytest.raises(LocalProtocolError):
        _call(party, call)
    assert_dead(party)


def test_result_only_after_completion() -> None:
    ini, _ = trace1_pair(debug=False)
    ini.create_message_1()
    with pytest.raises(LocalProtocolError):
        ini.result()


def test_c_r_equal_to_c_i_rejected() -> None:
    ini, res = trace1_pair(debug=False)
    res.process_message_1(ini.create_message_1())
    with pytest.raises(LocalProtocolError) as info:
        res.create_message_2(c_r=h("C_I"))
    assert info.value.reason is Reason.CONNECTION_ID_IN_USE


def test_error_messages_round_trip() -> None:
    for data, code in (
        (bytes.fromhex("0202"), 2),
        (bytes.fromhex("01646f6f7073"), 1),
        (bytes.fromhex("03f5"), 3),
    ):
        assert is_error_message(data)
        msg = decode_error_message(data)
        assert msg.err_code == code
    assert decode_error_message(bytes.fromhex("01646f6f7073")).err_info == "oops"
    assert decode_error_message(bytes.fromhex("02820602")).suites_r == (6, 2)
    assert not is_error_message(h("message_2"))
    assert not is_error_message(b"\xff")
    assert encode_error(EdhocError(Reason.MAC_FAILED, "secret detail")) == cbor.dumps_seq(1, "mac_failed")
    for bad in ("0203ff", "02", "0161", "0341", "0940", "01f5"):
        with pytest.raises(DecodeError):
            decode_error_message(bytes.fromhex(bad))


def test_initiator_error_code_3_and_1() -> None:
    for data, reason in (
        (bytes.fromhex("03f5"), Reason.UNKNOWN_CREDENTIAL),
        (bytes.fromhex("0160"), Reason.PEER_ERROR),
    ):
        ini, _ = trace1_pair(debug=False)
        ini.create_message_1()
        with pytest.raises(EdhocError) as info:
            ini.process_error(data)
        assert info.value.reason is reason
        assert_dead(ini)


def test_responder_receives_error_instead_of_message_3() -> None:
    ini, res = trace1_pair(debug=False)
    res.process_message_1(ini.create_message_1())
    res.create_message_2()
    with pytest.raises(EdhocError) as info:
        res.process_error(bytes.fromhex("0160"))
    assert info.value.reason is Reason.PEER_ERROR
    assert_dead(res)


def test_completed_handshake_is_unaffected_by_later_misuse() -> None:
    ini, res = trace1_pair(debug=False)
    run_handshake(ini, res)
    with pytest.raises(LocalProtocolError):
        ini.process_message_4(h("message_4"))  # a replayed message_4
    assert ini.state is State.FAILED  # misuse kills the object: the caller must have taken result() before
