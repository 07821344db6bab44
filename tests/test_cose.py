"""sealmq.cose: the one copy of COSE signing the EDHOC suites and the media manifest share."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from sealmq import cbor, cose
from sealmq.errors import LocalProtocolError

P256 = ec.generate_private_key(ec.SECP256R1())
P384 = ec.generate_private_key(ec.SECP384R1())
ED = ed25519.Ed25519PrivateKey.generate()
ED448 = ed448.Ed448PrivateKey.generate()
RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEYS = [(cose.ALG_ES256, P256), (cose.ALG_ES384, P384), (cose.ALG_EDDSA, ED), (cose.ALG_EDDSA, ED448),
        (cose.ALG_PS256, RSA)]


@pytest.mark.parametrize(("alg", "key"), KEYS, ids=lambda v: str(v)[:12])
def test_sign_verify_and_tamper(alg: int, key: object) -> None:
    sig = cose.sign(alg, key, b"message")
    assert cose.verify(alg, key.public_key(), b"message", sig)  # type: ignore[attr-defined]
    assert not cose.verify(alg, key.public_key(), b"messagE", sig)  # type: ignore[attr-defined]
    assert not cose.verify(alg, key.public_key(), b"message", sig[:-1])  # type: ignore[attr-defined]


def test_ecdsa_is_raw_r_s_and_deterministic() -> None:
    sig = cose.sign(cose.ALG_ES256, P256, b"m")
    assert len(sig) == 64 and sig == cose.sign(cose.ALG_ES256, P256, b"m")
    assert len(cose.sign(cose.ALG_ES384, P384, b"m")) == 96
    # the DER form cryptography verifies is the same signature
    P256.public_key().verify(cose.ecdsa_raw_to_der(sig), b"m", ec.ECDSA(hashes.SHA256()))


@given(st.integers(1, 2**256 - 1), st.integers(1, 2**256 - 1))
def test_r_s_der_round_trip(r: int, s: int) -> None:
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert cose.ecdsa_der_to_raw(cose.ecdsa_raw_to_der(raw), ec.SECP256R1()) == raw


def test_key_that_does_not_fit_the_alg() -> None:
    with pytest.raises(LocalProtocolError):
        cose.sign(cose.ALG_ES256, P384, b"m")  # ES256 is bound to P-256
    with pytest.raises(LocalProtocolError):
        cose.sign(cose.ALG_PS256, ED, b"m")
    sig = cose.sign(cose.ALG_ES384, P384, b"m")
    assert not cose.verify(cose.ALG_ES256, P384.public_key(), b"m", sig)
    assert not cose.verify(cose.ALG_EDDSA, RSA.public_key(), b"m", sig)
    assert not cose.verify(-999, ED.public_key(), b"m", cose.sign(cose.ALG_EDDSA, ED, b"m"))


def test_sig_structure() -> None:
    assert cose.sig_structure(b"\xa1\x01\x26", b"", b"p") == cbor.dumps(["Signature1", b"\xa1\x01\x26", b"", b"p"])
