"""RFC 8613 Appendix C byte for byte, and RFC 9528 A.1 (EDHOC -> OSCORE) against RFC 9529 trace 1."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM

from sealmq import cbor, kdf, oscore
from sealmq.errors import DecryptError, LocalProtocolError, Reason, SessionError
from tests.conftest import load_vectors

VEC = load_vectors("oscore.json")["vectors"]
TRACE1 = load_vectors("rfc9529_trace1.json")["values"]

KEY_DERIVATION = [
    ("C.1 Test Vector 1: Key Derivation with Master Salt", "C.1.1 Client"),
    ("C.1 Test Vector 1: Key Derivation with Master Salt", "C.1.2 Server"),
    ("C.2 Test Vector 2: Key Derivation without Master Salt", "C.2.1 Client"),
    ("C.2 Test Vector 2: Key Derivation without Master Salt", "C.2.2 Server"),
    ("C.3 Test Vector 3: Key Derivation with ID Context", "C.3.1 Client"),
    ("C.3 Test Vector 3: Key Derivation with ID Context", "C.3.2 Server"),
]


def h(value: str) -> bytes:
    return bytes.fromhex(value)


def _opt(v: dict[str, str], key: str) -> bytes | None:
    return h(v[key]) if key in v else None


@pytest.mark.parametrize(("section", "side"), KEY_DERIVATION)
def test_key_derivation_c1_c3(section: str, side: str) -> None:
    v = VEC[section][side]
    sender_id, recipient_id = h(v["Sender ID"]), h(v["Recipient ID"])
    id_context = _opt(v, "ID Context")
    assert oscore.derive_info(sender_id, id_context, 10, "Key", 16) == h(v["info (for Sender Key)"])
    assert oscore.derive_info(recipient_id, id_context, 10, "Key", 16) == h(v["info (for Recipient Key)"])
    assert oscore.derive_info(b"", id_context, 10, "IV", 13) == h(v["info (for Common IV)"])
    ctx = oscore.SecurityContext.derive(
        master_secret=h(v["Master Secret"]), master_salt=_opt(v, "Master Salt") or b"",
        sender_id=sender_id, recipient_id=recipient_id, id_context=id_context)
    assert ctx.sender_key == h(v["Sender Key"])
    assert ctx.recipient_key == h(v["Recipient Key"])
    assert ctx.common_iv == h(v["Common IV"])
    # The RFC's "sender/recipient nonce" use Partial IV 0.
    assert ctx.sender_nonce(oscore.partial_iv(0)) == h(v["sender nonce"])
    assert ctx.recipient_nonce(oscore.partial_iv(0)) == h(v["recipient nonce"])
    assert v["Sender Key"] not in repr(ctx)
    assert v["Recipient Key"] not in repr(ctx)


REQUESTS = [
    ("C.4 Test Vector 4: OSCORE Request, Client", "C.1 Test Vector 1: Key Derivation with Master Salt",
     "C.1.1 Client"),
    ("C.5 Test Vector 5: OSCORE Request, Client", "C.2 Test Vector 2: Key Derivation without Master Salt",
     "C.2.1 Client"),
    ("C.6 Test Vector 6: OSCORE Request, Client", "C.3 Test Vector 3: Key Derivation with ID Context",
     "C.3.1 Client"),
]


@pytest.mark.parametrize(("name", "kd_section", "kd_side"), REQUESTS)
def test_request_protection_c4_c6(name: str, kd_section: str, kd_side: str) -> None:
    v = VEC[name]
    kd = VEC[kd_section][kd_side]
    client = oscore.SecurityContext.derive(
        master_secret=h(kd["Master Secret"]), master_salt=_opt(kd, "Master Salt") or b"",
        sender_id=h(kd["Sender ID"]), recipient_id=h(kd["Recipient ID"]),
        id_context=_opt(kd, "ID Context"))
    assert client.sender_key == h(v["Sender Key"]) == h(v["encryption key"])
    assert client.common_iv == h(v["Common IV"])
    piv = oscore.partial_iv(int(v["Sender Sequence Number"]))
    assert piv == h(v["Partial IV"])
    kid = h(v["kid"])
    assert cbor.dumps(oscore.aad_array(10, kid, piv)) == h(v["aad_array"])
    aad = oscore.aad(10, kid, piv)
    assert aad == h(v["AAD"])
    nonce = client.sender_nonce(piv)
    assert nonce == h(v["nonce"])
    assert oscore.option_value(piv, kid, _opt(v, "kid context")) == h(v["OSCORE option value"])
    ciphertext = client.encrypt(nonce, h(v["plaintext"]), aad)
    assert ciphertext == h(v["ciphertext"])
    # The other direction: the server opens the client's request.
    server = oscore.SecurityContext.derive(
        master_secret=h(kd["Master Secret"]), master_salt=_opt(kd, "Master Salt") or b"",
        sender_id=h(kd["Recipient ID"]), recipient_id=h(kd["Sender ID"]),
        id_context=_opt(kd, "ID Context"))
    assert server.decrypt(server.recipient_nonce(piv), ciphertext, aad) == h(v["plaintext"])


def test_response_protection_c7_c8() -> None:
    kd = VEC["C.1 Test Vector 1: Key Derivation with Master Salt"]["C.1.2 Server"]
    secret, salt = h(kd["Master Secret"]), h(kd["Master Salt"])
    server = oscore.SecurityContext.derive(master_secret=secret, master_salt=salt,
                                           sender_id=h("01"), recipient_id=b"")
    client = oscore.SecurityContext.derive(master_secret=secret, master_salt=salt,
                                           sender_id=b"", recipient_id=h("01"))
    request_piv = h("14")  # the response is to C.4's request: AAD uses the request's kid and PIV
    aad = oscore.aad(10, b"", request_piv)

    c7 = VEC["C.7 Test Vector 7: OSCORE Response, Server"]
    assert server.sender_key == h(c7["encryption key"])
    assert aad == h(c7["AAD"])
    # Without its own Partial IV, a response reuses the request's nonce (RFC 8613 section 5.2).
    nonce7 = client.sender_nonce(request_piv)
    assert nonce7 == h(c7["nonce"])
    assert oscore.option_value(None, None) == h(c7["OSCORE option value"]) == b""
    ct7 = server.encrypt(nonce7, h(c7["plaintext"]), aad)
    assert ct7 == h(c7["ciphertext"])
    assert client.decrypt(nonce7, ct7, aad) == h(c7["plaintext"])

    c8 = VEC["C.8 Test Vector 8: OSCORE Response with Partial IV, Server"]
    piv8 = oscore.partial_iv(int(c8["Sender Sequence Number"]))
    assert piv8 == h(c8["Partial IV"])
    nonce8 = server.sender_nonce(piv8)
    assert nonce8 == h(c8["nonce"])
    assert oscore.option_value(piv8, None) == h(c8["OSCORE option value"])
    ct8 = server.encrypt(nonce8, h(c8["plaintext"]), aad)
    assert ct8 == h(c8["ciphertext"])
    assert client.decrypt(client.recipient_nonce(piv8), ct8, aad) == h(c8["plaintext"])


def test_decrypt_failures_are_opaque() -> None:
    kd = VEC["C.1 Test Vector 1: Key Derivation with Master Salt"]["C.1.2 Server"]
    server = oscore.SecurityContext.derive(master_secret=h(kd["Master Secret"]),
                                           master_salt=h(kd["Master Salt"]), sender_id=h("01"),
                                           recipient_id=b"")
    c4 = VEC["C.4 Test Vector 4: OSCORE Request, Client"]
    good = h(c4["ciphertext"])
    nonce = server.recipient_nonce(h("14"))
    aad = oscore.aad(10, b"", h("14"))
    bad_inputs = [
        (nonce, good[:-1] + bytes([good[-1] ^ 1]), aad),
        (nonce, good, aad + b"\x00"),
        (server.recipient_nonce(h("15")), good, aad),
        (nonce, good[:7], aad),  # shorter than the tag
        (nonce, b"", aad),
        (nonce[:-1], good, aad),  # wrong nonce length: still opaque
    ]
    for args in bad_inputs:
        with pytest.raises(DecryptError) as info:
            server.decrypt(*args)
        assert str(info.value) == "decrypt_failed"


def test_partial_iv_encoding() -> None:
    assert oscore.partial_iv(0) == b"\x00"
    assert oscore.partial_iv(255) == b"\xff"
    assert oscore.partial_iv(256) == b"\x01\x00"
    assert oscore.partial_iv(2**40 - 1) == b"\xff" * 5
    with pytest.raises(LocalProtocolError) as info:
        oscore.partial_iv(2**40)
    assert info.value.reason is Reason.SEQUENCE_EXHAUSTED


def test_context_rejects_bad_ids_and_algorithms() -> None:
    with pytest.raises(SessionError):
        oscore.SecurityContext.derive(master_secret=b"k" * 16, sender_id=b"12345678", recipient_id=b"")
    with pytest.raises(SessionError):
        oscore.SecurityContext.derive(master_secret=b"k" * 16, sender_id=b"\x01", recipient_id=b"\x01")
    with pytest.raises(SessionError):  # A192GCM: no EDHOC suite we implement names it
        oscore.SecurityContext.derive(master_secret=b"k" * 16, sender_id=b"\x01", recipient_id=b"",
                                      alg=2)
    # A128GCM's 12-byte nonce leaves room for 6-byte IDs, one less than AES-CCM-16-64-128's 7
    with pytest.raises(SessionError, match="longer than 6 bytes"):
        oscore.SecurityContext.derive(master_secret=b"k" * 16, sender_id=b"1234567", recipient_id=b"",
                                      alg=1)
    oscore.SecurityContext.derive(master_secret=b"k" * 16, sender_id=b"1234567", recipient_id=b"", alg=10)


@pytest.mark.parametrize(("alg", "key_len", "nonce_len", "tag_len"),
                         [(10, 16, 13, 8), (1, 16, 12, 16), (3, 32, 12, 16)])
def test_each_aead_seals_with_its_own_primitive(alg: int, key_len: int, nonce_len: int, tag_len: int) -> None:
    """Each AEAD row derives keys of its length and seals with its primitive, checked against
    cryptography's AESCCM / AESGCM called directly."""
    a = oscore.SecurityContext.derive(master_secret=b"s" * 16, master_salt=b"salt", sender_id=b"\x01",
                                      recipient_id=b"", alg=alg)
    b = oscore.SecurityContext.derive(master_secret=b"s" * 16, master_salt=b"salt", sender_id=b"",
                                      recipient_id=b"\x01", alg=alg)
    assert len(a.sender_key) == key_len and len(a.common_iv) == nonce_len
    nonce = a.sender_nonce(b"\x05")
    ct = a.encrypt(nonce, b"payload", b"aad")
    assert len(ct) == len(b"payload") + tag_len
    direct = AESGCM(a.sender_key) if alg != 10 else AESCCM(a.sender_key, tag_length=8)
    assert direct.encrypt(nonce, b"payload", b"aad") == ct
    assert b.decrypt(b.recipient_nonce(b"\x05"), ct, b"aad") == b"payload"
    with pytest.raises(DecryptError):
        b.decrypt(b.recipient_nonce(b"\x05"), ct[:-1] + bytes([ct[-1] ^ 1]), b"aad")
    with pytest.raises(DecryptError):  # shorter than this AEAD's tag
        b.decrypt(b.recipient_nonce(b"\x05"), ct[:tag_len - 1], b"aad")
    # the algorithm is part of the key derivation (RFC 8613 3.2.1): another AEAD, other keys
    other = oscore.SecurityContext.derive(master_secret=b"s" * 16, master_salt=b"salt", sender_id=b"\x01",
                                          recipient_id=b"", alg=1 if alg != 1 else 10)
    assert other.sender_key[:16] != a.sender_key[:16]


def test_from_edhoc_trace1() -> None:
    prk_out = h(TRACE1["PRK_out"])
    secret, salt = oscore.master_from_edhoc(prk_out)
    assert secret == h(TRACE1["OSCORE_Master_Secret"])
    assert salt == h(TRACE1["OSCORE_Master_Salt"])
    c_i, c_r = h(TRACE1["C_I"]), h(TRACE1["C_R"])
    initiator = oscore.from_edhoc(prk_out, c_i, c_r, True)
    responder = oscore.from_edhoc(prk_out, c_i, c_r, False)
    assert initiator.sender_id == h(TRACE1["Client's_OSCORE_Sender_ID"])
    assert responder.sender_id == h(TRACE1["Server's_OSCORE_Sender_ID"])
    expected = oscore.SecurityContext.derive(master_secret=secret, master_salt=salt,
                                             sender_id=c_r, recipient_id=c_i)
    assert initiator.sender_key == expected.sender_key == responder.recipient_key
    assert initiator.recipient_key == responder.sender_key
    assert initiator.common_iv == responder.common_iv
    # After EDHOC_KeyUpdate (RFC 9528 Appendix H) the exporter gives the trace's new values.
    updated = kdf.key_update(prk_out, h(TRACE1["context_for_KeyUpdate"]))
    assert updated == h(TRACE1["PRK_out_after_KeyUpdate"])
    assert oscore.master_from_edhoc(updated) == (h(TRACE1["OSCORE_Master_Secret_after_KeyUpdate"]),
                                                 h(TRACE1["OSCORE_Master_Salt_after_KeyUpdate"]))

