"""EDHOC cipher suites (RFC 9528 section 3.6) and the primitives each one names.

A :class:`Suite` is a row of the registry plus the operations the handshake needs from it:
ephemeral key generation, ECDH with x-coordinate-only P-256/P-384 points, COSE signatures
(raw ``r || s`` for ECDSA, deterministic so our own golden vectors are stable), and the
EDHOC AEAD used for message_3/message_4.

Suite -24 is private use (sealmq): suite 2 with PS256 (RSASSA-PSS, COSE -37) signatures so
that fleets with RSA device keys can use EDHOC. Its ECDH stays P-256: RSA is only ever used
to sign, never to transport keys, so forward secrecy is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM

from sealmq import cose
from sealmq.cose import (
    ALG_A128GCM,
    ALG_A256GCM,
    ALG_AES_CCM_16_64_128,
    ALG_AES_CCM_16_128_128,
    ALG_EDDSA,
    ALG_ES256,
    ALG_ES384,
    ALG_PS256,
    MIN_RSA_BITS,
)
from sealmq.errors import DecryptError, EdhocError, LocalProtocolError, Reason

CURVE_X25519 = "X25519"
CURVE_P256 = "P-256"
CURVE_P384 = "P-384"


@dataclass(frozen=True)
class Suite:
    """One EDHOC cipher suite: algorithms and lengths, as in the RFC 9528 registry."""

    ident: int
    aead: int  # COSE alg of the EDHOC AEAD
    hash_name: str  # "sha256" / "sha384"
    mac_length: int  # EDHOC MAC length for static-DH authentication
    curve: str  # ECDH curve
    sig_alg: int  # COSE signature algorithm
    app_aead: int
    app_hash: str

    @property
    def hash_length(self) -> int:
        return 48 if self.hash_name == "sha384" else 32

    @property
    def key_length(self) -> int:
        return 32 if self.aead == ALG_A256GCM else 16

    @property
    def iv_length(self) -> int:
        return 12 if self.aead in (ALG_A128GCM, ALG_A256GCM) else 13

    @property
    def tag_length(self) -> int:
        return 8 if self.aead == ALG_AES_CCM_16_64_128 else 16

    @property
    def point_length(self) -> int:
        return 48 if self.curve == CURVE_P384 else 32

    # --- ECDH ----------------------------------------------------------------------------

    def ephemeral_public(self, private: bytes) -> bytes:
        """G_X / G_Y for a raw ephemeral private key (x-coordinate only for NIST curves)."""
        return public_bytes(self.private_key_from_bytes(private).public_key())

    def ecdh(self, private: bytes, peer_public: bytes) -> bytes:
        """The shared secret of our ephemeral private key and a peer point from the wire."""
        return exchange(self.private_key_from_bytes(private), self.load_public(peer_public))

    def ephemeral_public_and_ecdh(self, private: bytes, peer_public: bytes) -> tuple[bytes, bytes]:
        """:meth:`ephemeral_public` and :meth:`ecdh` of one private key, derived once (the
        responder needs both at once; a P-256 derivation is a scalar multiplication)."""
        key = self.private_key_from_bytes(private)
        return public_bytes(key.public_key()), exchange(key, self.load_public(peer_public))

    def load_public(self, raw: bytes) -> x25519.X25519PublicKey | ec.EllipticCurvePublicKey:
        """Decode a wire public key; invalid points raise ``EdhocError(INVALID_POINT)``."""
        if len(raw) != self.point_length:
            raise EdhocError(Reason.INVALID_POINT, f"public key must be {self.point_length} bytes")
        try:
            if self.curve == CURVE_X25519:
                return x25519.X25519PublicKey.from_public_bytes(raw)
            # RFC 9528 3.7: the sign of y is not used; any consistent choice gives the same secret.
            return ec.EllipticCurvePublicKey.from_encoded_point(_nist_curve(self.curve), b"\x02" + raw)
        except ValueError:
            raise EdhocError(Reason.INVALID_POINT, "not a point on the curve") from None

    def private_key_from_bytes(self, private: bytes) -> x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey:
        try:
            if self.curve == CURVE_X25519:
                if len(private) != 32:
                    raise ValueError("X25519 private key must be 32 bytes")
                return x25519.X25519PrivateKey.from_private_bytes(private)
            if len(private) != self.point_length:
                raise ValueError("wrong scalar length")
            return ec.derive_private_key(int.from_bytes(private, "big"), _nist_curve(self.curve))
        except ValueError as exc:
            raise LocalProtocolError(Reason.CONFIG_INVALID, f"bad ephemeral private key: {exc}") from None

    # --- signatures ----------------------------------------------------------------------

    def sign(self, private_key: Any, message: bytes) -> bytes:
        """COSE signature of ``message`` with the suite's signature algorithm."""
        if self.sig_alg in (ALG_ES256, ALG_ES384) and isinstance(private_key, ec.EllipticCurvePrivateKey) \
                and private_key.curve.name != cose.ECDSA_CURVE[self.sig_alg]:
            raise LocalProtocolError(Reason.UNSUPPORTED_ALGORITHM, "signing key on the wrong curve")
        if (self.sig_alg == ALG_EDDSA and isinstance(private_key, ed25519.Ed25519PrivateKey)) or (
            self.sig_alg in (ALG_ES256, ALG_ES384) and isinstance(private_key, ec.EllipticCurvePrivateKey)
        ) or (self.sig_alg == ALG_PS256 and isinstance(private_key, rsa.RSAPrivateKey)):
            return cose.sign(self.sig_alg, private_key, message)
        raise LocalProtocolError(
            Reason.UNSUPPORTED_ALGORITHM,
            f"local key {type(private_key).__name__} cannot sign suite {self.ident}",
        )

    def signature_key_matches(self, key: Any) -> bool:
        """Whether a (private or public) key can make/verify this suite's signatures."""
        if self.sig_alg == ALG_EDDSA:
            return isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey))
        if self.sig_alg in (ALG_ES256, ALG_ES384):
            want = cose.ECDSA_CURVE[self.sig_alg]
            return isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) and (
                key.curve.name == want
            )
        if self.sig_alg == ALG_PS256:
            return isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)) and key.key_size >= MIN_RSA_BITS
        return False

    def verify(self, public_key: Any, message: bytes, signature: bytes) -> None:
        """Verify a COSE signature; any failure is ``EdhocError(SIGNATURE_FAILED)``."""
        if not self.signature_key_matches(public_key):
            raise EdhocError(
                Reason.UNSUPPORTED_ALGORITHM,
                f"peer key {type(public_key).__name__} does not fit suite {self.ident}",
            )
        if not cose.verify(self.sig_alg, public_key, message, signature):
            raise EdhocError(Reason.SIGNATURE_FAILED, "signature does not verify")

    # --- EDHOC AEAD (message_3, message_4) -------------------------------------------------

    def encrypt(self, key: bytes, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead(key).encrypt(iv, plaintext, aad)

    def decrypt(self, key: bytes, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return self._aead(key).decrypt(iv, ciphertext, aad)
        except (InvalidTag, ValueError):
            raise DecryptError from None

    def _aead(self, key: bytes) -> AESCCM | AESGCM:
        if self.aead in (ALG_A128GCM, ALG_A256GCM):
            return AESGCM(key)
        return AESCCM(key, tag_length=self.tag_length)


def _nist_curve(name: str) -> ec.EllipticCurve:
    return ec.SECP384R1() if name == CURVE_P384 else ec.SECP256R1()


def public_bytes(key: Any) -> bytes:
    """Wire form of an ECDH public key: raw X25519, or the x-coordinate of a NIST point."""
    if isinstance(key, x25519.X25519PublicKey):
        return key.public_bytes_raw()
    if isinstance(key, ec.EllipticCurvePublicKey):
        n = (key.curve.key_size + 7) // 8
        return key.public_numbers().x.to_bytes(n, "big")
    raise LocalProtocolError(Reason.UNSUPPORTED_ALGORITHM, f"not an ECDH key: {type(key).__name__}")


def exchange(private: Any, peer: Any) -> bytes:
    """ECDH between a private key and a peer public key of the same curve (G_XY, G_RX, G_IY)."""
    try:
        if isinstance(private, x25519.X25519PrivateKey) and isinstance(peer, x25519.X25519PublicKey):
            return private.exchange(peer)
        if isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(peer, ec.EllipticCurvePublicKey):
            if private.curve.name != peer.curve.name:
                raise ValueError("curve mismatch")
            return private.exchange(ec.ECDH(), peer)
    except ValueError:
        # e.g. an X25519 small-order point: the shared secret would be all zeros.
        raise EdhocError(Reason.INVALID_POINT, "ECDH failed") from None
    raise EdhocError(Reason.INVALID_POINT, "ECDH keys of different types")


_CCM8 = ALG_AES_CCM_16_64_128

SUITES: dict[int, Suite] = {
    s.ident: s
    for s in (
        Suite(0, ALG_AES_CCM_16_64_128, "sha256", 8, CURVE_X25519, ALG_EDDSA, _CCM8, "sha256"),
        Suite(1, ALG_AES_CCM_16_128_128, "sha256", 16, CURVE_X25519, ALG_EDDSA, _CCM8, "sha256"),
        Suite(2, ALG_AES_CCM_16_64_128, "sha256", 8, CURVE_P256, ALG_ES256, _CCM8, "sha256"),
        Suite(3, ALG_AES_CCM_16_128_128, "sha256", 16, CURVE_P256, ALG_ES256, _CCM8, "sha256"),
        Suite(6, ALG_A128GCM, "sha256", 16, CURVE_X25519, ALG_ES256, ALG_A128GCM, "sha256"),
        Suite(24, ALG_A256GCM, "sha384", 16, CURVE_P384, ALG_ES384, ALG_A256GCM, "sha384"),
        Suite(-24, ALG_AES_CCM_16_64_128, "sha256", 8, CURVE_P256, ALG_PS256, _CCM8, "sha256"),
    )
}

DEFAULT_SUITES: tuple[int, ...] = (2,)

# What the endpoints use unless configured otherwise, in preference order: the suites whose
# signature keys the PKI issues (6 and 2: P-256, 0: Ed25519, -24: RSA). The backend serves those
# its credentials fit; a device offers those its own credential fits (``credentials.suites_for``).
# Suite 6 comes first: RFC 9528 names it for non-constrained applications; its A128GCM has a
# 16-byte tag, and seals a 64 KiB media record for about half the CPU of AES-CCM-16-64-128 (at
# 64 B the record's own framing dominates and both cost about the same; docs/benchmarks.md, stop
# 26); its X25519 key exchange needs no key of that kind in the certificate (the signatures stay
# ES256). Its costs: 8 more bytes per record and about 4.7 KiB more RSS per held session. A device
# or backend configured without it, or a CCS (static-DH, P-256) device, negotiates suite 2, the
# one every constrained EDHOC stack implements.
PREFERRED_SUITES: tuple[int, ...] = (6, 2, 0, -24)


def get_suite(ident: int) -> Suite:
    try:
        return SUITES[ident]
    except KeyError:
        raise LocalProtocolError(Reason.UNSUPPORTED, f"cipher suite {ident} not implemented") from None


def generate_ephemeral(suite: int | Suite, random_bytes: Callable[[int], bytes]) -> bytes:
    """A fresh ephemeral private key for ``suite`` from an injected randomness source."""
    s = suite if isinstance(suite, Suite) else get_suite(suite)
    if s.curve == CURVE_X25519:
        raw = random_bytes(32)
        if len(raw) != 32:
            raise LocalProtocolError(Reason.CONFIG_INVALID, "random_bytes returned the wrong length")
        return raw
    order = _ORDERS[s.curve]
    n = s.point_length
    # Rejection sampling keeps the scalar uniform in [1, order - 1].
    for _ in range(64):
        raw = random_bytes(n)
        if len(raw) != n:
            raise LocalProtocolError(Reason.CONFIG_INVALID, "random_bytes returned the wrong length")
        if 0 < int.from_bytes(raw, "big") < order:
            return raw
    raise LocalProtocolError(Reason.CONFIG_INVALID, "random_bytes does not look random")


_ORDERS = {
    CURVE_P256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    CURVE_P384: int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973", 16
    ),
}
