"""Interoperability with an independent EDHOC implementation: lakers (Rust, ``lakers-python``
0.6.2), method 3, suite 2, CCS credentials by kid and by value (kccs), in memory, both roles:
PRK_out, the OSCORE exporter outputs and EDHOC_KeyUpdate agree on both sides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from pki import ccs as pki_ccs
from sealmq import cbor, kdf, oscore
from sealmq.edhoc import (
    CcsAuthenticator,
    CcsCredential,
    CcsEntry,
    CcsRegistry,
    EdhocResult,
    Initiator,
    Responder,
    decode_ccs,
    encode_ccs,
)
from sealmq.errors import EdhocError, Reason
from tests.edhoc_helpers import p256_key

lakers = pytest.importorskip("lakers", reason="lakers-python (pip install lakers-python) is not installed")


def raw_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(32, "big")


DEV_KEY, BE_KEY = p256_key(31), p256_key(32)
# Short enough that context_2/3 with the CCS sent by value stays under 256 bytes (see the
# last test: lakers 0.6.2 mis-encodes longer KDF contexts). lakers parses only minimal CCSs
# ({sub, cnf}): see test_lakers_parses_only_minimal_ccs.
DEV_CCS = encode_ccs("urn:sealmq:device:dev-l", b"\x11\x22", DEV_KEY.public_key())
BE_CCS = encode_ccs("urn:sealmq:backend:be", b"\x0b", BE_KEY.public_key())  # a one-byte kid: compact int
REGISTRY = CcsRegistry([CcsEntry.from_bytes(DEV_CCS), CcsEntry.from_bytes(BE_CCS)])
KU_CONTEXT = bytes.fromhex("a01158fdb820890cd6be169602b8bcea")


def transfer(by_value: bool) -> Any:
    return lakers.CredentialTransfer.ByValue if by_value else lakers.CredentialTransfer.ByReference


def assert_same_keys(ours: EdhocResult, theirs: Any, their_prk_out: bytes) -> None:
    assert ours.prk_out == bytes(their_prk_out)
    # Labels 0..23 only: lakers 0.6.2 encodes larger exporter labels wrongly (see the test below).
    for label, length in ((kdf.EXPORTER_OSCORE_MASTER_SECRET, 16), (kdf.EXPORTER_OSCORE_MASTER_SALT, 8),
                          (23, 32)):
        assert ours.exporter(label, b"ctx", length) == bytes(theirs.edhoc_exporter(label, b"ctx", length))
    assert oscore.master_from_edhoc(ours.prk_out) == (
        bytes(theirs.edhoc_exporter(0, b"", 16)), bytes(theirs.edhoc_exporter(1, b"", 8)))
    updated = ours.key_update(KU_CONTEXT)
    assert updated.prk_out == bytes(theirs.edhoc_key_update(KU_CONTEXT))
    assert updated.oscore_master_secret() == bytes(theirs.edhoc_exporter(0, b"", 16))
    assert updated.oscore_master_salt() == bytes(theirs.edhoc_exporter(1, b"", 8))


@pytest.mark.parametrize("their_by_value", [False, True])
@pytest.mark.parametrize("our_by_value", [False, True])
def test_our_initiator_their_responder(our_by_value: bool, their_by_value: bool) -> None:
    ini = Initiator(CcsCredential(DEV_KEY, DEV_CCS, by_value=our_by_value), CcsAuthenticator(REGISTRY, "backend"),
                    c_i=-8, suites=[2], method=3, random_bytes=os.urandom)
    res = lakers.EdhocResponder(raw_key(BE_KEY), BE_CCS)
    c_i, ead_1 = res.process_message_1(ini.create_message_1())
    assert bytes(c_i) == ini.c_i and ead_1 == []
    info = ini.process_message_2(res.prepare_message_2(transfer(their_by_value), b"\x05", None))
    assert info.c_r == b"\x05" and info.peer.identity.name == "be"
    id_cred_i, _ = res.parse_message_3(ini.create_message_3())
    their_prk_out = res.verify_message_3(lakers.credential_check_or_fetch(id_cred_i, DEV_CCS))
    ini.process_message_4(res.prepare_message_4(None))
    assert_same_keys(ini.result(), res, their_prk_out)


@pytest.mark.parametrize("their_by_value", [False, True])
@pytest.mark.parametrize("our_by_value", [False, True])
def test_their_initiator_our_responder(our_by_value: bool, their_by_value: bool) -> None:
    ini = lakers.EdhocInitiator()
    res = Responder(CcsCredential(BE_KEY, BE_CCS, by_value=our_by_value), CcsAuthenticator(REGISTRY, "device"),
                    c_r=b"\x42\x42", suites=[2], methods=[3], random_bytes=os.urandom)
    m1_info = res.process_message_1(ini.prepare_message_1(b"\x0e", None))
    assert (m1_info.method, m1_info.suite, m1_info.c_i) == (3, 2, b"\x0e")
    c_r, id_cred_r, _ = ini.parse_message_2(res.create_message_2())
    assert bytes(c_r) == b"\x42\x42"
    ini.verify_message_2(raw_key(DEV_KEY), DEV_CCS, lakers.credential_check_or_fetch(id_cred_r, BE_CCS))
    message_3, their_prk_out = ini.prepare_message_3(transfer(their_by_value), None)
    info = res.process_message_3(message_3)
    assert info.peer.identity.name == "dev-l"
    ini.process_message_4(res.create_message_4())
    assert_same_keys(res.result(), ini, their_prk_out)


def test_their_initiator_is_refused_when_not_registered() -> None:
    """A lakers device whose CCS the backend never registered: UNKNOWN_CREDENTIAL, typed."""
    stranger = p256_key(33)
    ccs = encode_ccs("urn:sealmq:device:stranger", b"\x99\x99", stranger.public_key())
    ini = lakers.EdhocInitiator()
    res = Responder(CcsCredential(BE_KEY, BE_CCS), CcsAuthenticator(REGISTRY, "device"),
                    c_r=b"\x42\x42", suites=[2], methods=[3], random_bytes=os.urandom)
    res.process_message_1(ini.prepare_message_1(b"\x0e", None))
    _, id_cred_r, _ = ini.parse_message_2(res.create_message_2())
    ini.verify_message_2(raw_key(stranger), ccs, lakers.credential_check_or_fetch(id_cred_r, BE_CCS))
    message_3, _ = ini.prepare_message_3(lakers.CredentialTransfer.ByReference, None)
    with pytest.raises(EdhocError) as info:
        res.process_message_3(message_3)
    assert info.value.reason is Reason.UNKNOWN_CREDENTIAL


def test_their_responder_refuses_our_tampered_message_3() -> None:
    ini = Initiator(CcsCredential(DEV_KEY, DEV_CCS), CcsAuthenticator(REGISTRY, "backend"),
                    c_i=-8, suites=[2], method=3, random_bytes=os.urandom)
    res = lakers.EdhocResponder(raw_key(BE_KEY), BE_CCS)
    res.process_message_1(ini.create_message_1())
    ini.process_message_2(res.prepare_message_2(lakers.CredentialTransfer.ByReference, b"\x05", None))
    m3 = bytearray(ini.create_message_3())
    m3[-1] ^= 1
    with pytest.raises(ValueError, match="MacVerificationFailed"):
        res.parse_message_3(bytes(m3))


def test_lakers_exporter_labels_from_24_are_not_cbor_encoded() -> None:
    """A deviation found here: RFC 9528 4.1.2 makes ``info`` the CBOR sequence (label, context,
    length), so label 24 is ``18 18``. lakers 0.6.2 writes the label as one raw byte (``18`` =
    "uint follows"), the same kind of bug as its EAD labels > 23 (lake-rs/lakers#329). sealmq only
    exports labels 0 and 1 (OSCORE), where both agree. If this test fails, lakers was fixed."""
    ini = lakers.EdhocInitiator()
    res = Responder(CcsCredential(BE_KEY, BE_CCS), CcsAuthenticator(REGISTRY, "device"),
                    c_r=b"\x42\x42", suites=[2], methods=[3], random_bytes=os.urandom)
    res.process_message_1(ini.prepare_message_1(b"\x0e", None))
    _, id_cred_r, _ = ini.parse_message_2(res.create_message_2())
    ini.verify_message_2(raw_key(DEV_KEY), DEV_CCS, lakers.credential_check_or_fetch(id_cred_r, BE_CCS))
    message_3, _ = ini.prepare_message_3(lakers.CredentialTransfer.ByReference, None)
    res.process_message_3(message_3)
    ini.completed_without_message_4()
    prk_exporter = kdf.prk_exporter(res.result().prk_out)
    for label in (24, 40, 255):
        theirs = bytes(ini.edhoc_exporter(label, b"", 16))
        assert res.result().exporter(label, b"", 16) != theirs
        raw_label_info = bytes([label]) + b"\x40" + bytes([16])  # label byte, h'', 16
        assert kdf.hkdf_expand(prk_exporter, raw_label_info, 16, "sha256") == theirs


def test_pki_issued_minimal_ccs_by_reference(tmp_path: Path) -> None:
    """Credentials as ``sealmq pki ccs issue --days 0`` writes them interoperate by reference."""
    pki_ccs.issue_ccs(tmp_path, "device", "dev-0001", days=None)
    pki_ccs.issue_ccs(tmp_path, "backend", "backend", days=None)
    dev = pki_ccs.load_credential(tmp_path, "device", "dev-0001")
    be = pki_ccs.load_credential(tmp_path, "backend", "backend")
    ini = lakers.EdhocInitiator()
    res = Responder(be, CcsAuthenticator(pki_ccs.load_registry(tmp_path), "device"),
                    c_r=b"\x42\x42", suites=[2], methods=[3], random_bytes=os.urandom)
    res.process_message_1(ini.prepare_message_1(b"\x0e", None))
    _, id_cred_r, _ = ini.parse_message_2(res.create_message_2())
    ini.verify_message_2(raw_key(dev._private_key), dev.cred, lakers.credential_check_or_fetch(id_cred_r, be.cred))
    message_3, prk_out = ini.prepare_message_3(lakers.CredentialTransfer.ByReference, None)
    assert res.process_message_3(message_3).peer.identity.name == "dev-0001"
    ini.completed_without_message_4()
    assert_same_keys(res.result(), ini, prk_out)


def test_lakers_parses_only_minimal_ccs() -> None:
    """A limitation found here: lakers 0.6.2 parses a CCS only as {2: sub, 8: cnf}; iat/exp/iss
    (valid RFC 8392 claims, which ``pki.ccs`` writes by default) make it fail. Devices driven by
    lakers therefore use ``--days 0`` credentials (revocation via the registry still applies)."""
    for kw in ({"issued_at": 1_764_000_000}, {"expires": 1_795_536_000}, {"issuer": "x"}):
        ccs = encode_ccs("urn:sealmq:device:d", b"\x01", DEV_KEY.public_key(), **kw)
        assert decode_ccs(ccs).subject == "urn:sealmq:device:d"  # fine for us
        with pytest.raises(ValueError, match="ParsingError"):
            lakers.Credential(ccs)


def test_lakers_mis_encodes_kdf_contexts_over_255_bytes() -> None:
    """A deviation found here: with a CCS sent by value, context_2 (C_R, ID_CRED_R, TH_2, CRED_R)
    of a production-sized CCS is longer than 255 bytes. RFC 9528 4.1.2 encodes it as a CBOR byte
    string (``59 01 03`` for 259 bytes); lakers 0.6.2 writes ``58`` and the length's low byte, so
    MAC_2 differs and we refuse message_2 with MAC_FAILED. Our MAC over lakers' encoding matches
    theirs, which pins the cause. If this test fails, lakers was fixed."""
    be = encode_ccs("urn:sealmq:backend:backend-with-a-long-name", b"\x05\x06\x07\x08", BE_KEY.public_key())
    reg = CcsRegistry([CcsEntry.from_bytes(DEV_CCS), CcsEntry.from_bytes(be)])
    ini = Initiator(CcsCredential(DEV_KEY, DEV_CCS), CcsAuthenticator(reg, "backend"),
                    c_i=-8, suites=[2], method=3, random_bytes=os.urandom, debug=True)
    ini._fail = lambda: None  # type: ignore[method-assign]  # keep the transcript for the check
    res = lakers.EdhocResponder(raw_key(BE_KEY), be)
    res.process_message_1(ini.create_message_1())
    with pytest.raises(EdhocError) as info:
        ini.process_message_2(res.prepare_message_2(lakers.CredentialTransfer.ByValue, b"\x05", None))
    assert info.value.reason is Reason.MAC_FAILED
    t = ini.transcript
    context_2 = cbor.dumps(5) + cbor.dumps({14: cbor.loads(be)}) + cbor.dumps(t["TH_2"]) + be
    assert len(context_2) > 255
    their_info = b"\x02\x58" + bytes([len(context_2) & 0xFF]) + context_2 + b"\x08"
    their_mac = kdf.hkdf_expand(t["PRK_3e2m"], their_info, 8, "sha256")
    assert cbor.loads_seq(t["PLAINTEXT_2"])[2] == their_mac != t["MAC_2"]
