"""The COSE pieces sealmq uses, in one place: algorithm identifiers, signing and verification
with COSE's signature formats, and the ``COSE_Sign1`` ``Sig_structure``.

Two users: EDHOC signatures (:mod:`sealmq.edhoc.suites`, RFC 9528 5.3.2) and the signed media
manifest (:mod:`sealmq.media`, an untagged ``COSE_Sign1``). Formats (RFC 9053 2.1, RFC 8230 2):

* ECDSA signatures are the raw ``r || s``, each the curve's byte length, not DER; we sign
  deterministically (RFC 6979) so our golden vectors are stable.
* PS256 is RSASSA-PSS with SHA-256, MGF1 with SHA-256 and a 32-byte salt.
* EdDSA signs the message itself (Ed25519 or Ed448).
"""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from sealmq import cbor
from sealmq.errors import LocalProtocolError, Reason

# COSE algorithm identifiers (IANA "COSE Algorithms").
ALG_AES_CCM_16_64_128 = 10
ALG_AES_CCM_16_128_128 = 30
ALG_A128GCM = 1
ALG_A256GCM = 3
ALG_EDDSA = -8
ALG_ES256 = -7
ALG_ES384 = -35
ALG_PS256 = -37
ALG_SHA256 = -16
ALG_SHA384 = -43

SIGNATURE_ALGS = frozenset({ALG_EDDSA, ALG_ES256, ALG_ES384, ALG_PS256})
# The curve (cryptography's name) and hash each ECDSA algorithm is bound to (RFC 9053 2.1).
ECDSA_CURVE = {ALG_ES256: "secp256r1", ALG_ES384: "secp384r1"}
_ECDSA_HASH: dict[int, type[hashes.SHA256] | type[hashes.SHA384]] = {
    ALG_ES256: hashes.SHA256, ALG_ES384: hashes.SHA384,
}

# RFC 8230 section 2: PS256 uses MGF1 with SHA-256 and a salt as long as the hash.
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)

MIN_RSA_BITS = 2048


def sig_structure(protected: bytes, external_aad: bytes, payload: bytes) -> bytes:
    """The ``Sig_structure`` a ``COSE_Sign1`` signs (RFC 9052 4.4)."""
    return cbor.dumps(["Signature1", protected, external_aad, payload])


def ecdsa_der_to_raw(der: bytes, curve: ec.EllipticCurve) -> bytes:
    """DER ``ECDSA-Sig-Value`` (what cryptography produces) to COSE's ``r || s``."""
    r, s = decode_dss_signature(der)
    n = (curve.key_size + 7) // 8
    return r.to_bytes(n, "big") + s.to_bytes(n, "big")


def ecdsa_raw_to_der(raw: bytes) -> bytes:
    """COSE's ``r || s`` (two halves of equal length) to DER, for cryptography's verify."""
    n = len(raw) // 2
    return encode_dss_signature(int.from_bytes(raw[:n], "big"), int.from_bytes(raw[n:], "big"))


def sign(alg: int, private_key: Any, message: bytes) -> bytes:
    """A COSE signature of ``message`` with ``alg``. The caller picked a key that fits ``alg``;
    one that does not is ``LocalProtocolError(UNSUPPORTED_ALGORITHM)``."""
    if alg in _ECDSA_HASH and isinstance(private_key, ec.EllipticCurvePrivateKey) \
            and private_key.curve.name == ECDSA_CURVE[alg]:
        der = private_key.sign(message, ec.ECDSA(_ECDSA_HASH[alg](), deterministic_signing=True))
        return ecdsa_der_to_raw(der, private_key.curve)
    if alg == ALG_PS256 and isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(message, PSS, hashes.SHA256())
    if alg == ALG_EDDSA and isinstance(private_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return private_key.sign(message)
    raise LocalProtocolError(Reason.UNSUPPORTED_ALGORITHM,
                             f"a {type(private_key).__name__} cannot make COSE alg {alg} signatures")


def verify(alg: int, public_key: Any, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid ``alg`` signature of ``message`` by ``public_key``.

    Never raises on bad input: a key that does not fit ``alg``, an ECDSA signature of the wrong
    length or garbage are all simply ``False`` (callers raise their own typed error).
    """
    try:
        if alg in _ECDSA_HASH and isinstance(public_key, ec.EllipticCurvePublicKey):
            n = (public_key.curve.key_size + 7) // 8
            if public_key.curve.name != ECDSA_CURVE[alg] or len(signature) != 2 * n:
                return False
            public_key.verify(ecdsa_raw_to_der(signature), message, ec.ECDSA(_ECDSA_HASH[alg]()))
        elif alg == ALG_PS256 and isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, message, PSS, hashes.SHA256())
        elif alg == ALG_EDDSA and isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            public_key.verify(signature, message)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True
