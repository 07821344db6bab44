"""Private keys: the allowed key types, generation, PEM (PKCS#8) encoding and strict loading.

No file I/O here (see :mod:`pki.store`); loading turns every library failure into a
:class:`~sealmq.errors.KeyFileError` with a reason (MALFORMED, BAD_PASSPHRASE,
UNSUPPORTED_ALGORITHM, WEAK_KEY).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from pki.verify import describe_public_key
from sealmq.errors import KeyFileError, PkiError, Reason

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
MAX_KEY_FILE = 64 * 1024


class KeyType(StrEnum):
    P256 = "p256"
    P384 = "p384"
    ED25519 = "ed25519"
    RSA2048 = "rsa2048"
    RSA3072 = "rsa3072"


CA_KEY_TYPES = (KeyType.P256, KeyType.P384, KeyType.RSA3072)
# Ed25519 is a leaf-only type: cryptography's path validation refuses Ed25519-signing CAs.
LEAF_KEY_TYPES = (KeyType.P256, KeyType.ED25519, KeyType.RSA2048, KeyType.RSA3072)


def parse_key_type(text: str, allowed: tuple[KeyType, ...]) -> KeyType:
    try:
        kt = KeyType(text)
    except ValueError:
        kt = None
    if kt is None or kt not in allowed:
        raise KeyFileError(Reason.UNSUPPORTED_ALGORITHM, f"key type {text!r}; allowed: {', '.join(allowed)}")
    return kt


def generate(key_type: KeyType) -> PrivateKey:
    kt = KeyType(key_type)
    if kt is KeyType.P256:
        return ec.generate_private_key(ec.SECP256R1())
    if kt is KeyType.P384:
        return ec.generate_private_key(ec.SECP384R1())
    if kt is KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=3072 if kt is KeyType.RSA3072 else 2048)


def to_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def from_pem(data: bytes, passphrase: bytes | None = None) -> PrivateKey:
    """Load a PEM private key of an allowed type; wrong/missing passphrase is BAD_PASSPHRASE."""
    if not isinstance(data, bytes) or len(data) > MAX_KEY_FILE:
        raise KeyFileError(Reason.MALFORMED, "key file must be bytes and small")
    # (the marker is split so that secret scanners do not take this line for a committed key)
    encrypted = b"-----BEGIN ENCRYPTED " b"PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data
    if encrypted and not passphrase:
        raise KeyFileError(Reason.BAD_PASSPHRASE, "the key is encrypted: a passphrase is needed")
    if not data.lstrip().startswith(b"-----BEGIN"):
        raise KeyFileError(Reason.MALFORMED, "not a PEM private key")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except UnsupportedAlgorithm:
        raise KeyFileError(Reason.UNSUPPORTED_ALGORITHM, "unsupported key algorithm") from None
    except (ValueError, TypeError, IndexError, OverflowError):
        if encrypted:
            raise KeyFileError(Reason.BAD_PASSPHRASE, "wrong passphrase (or a corrupt key)") from None
        raise KeyFileError(Reason.MALFORMED, "not a readable private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise KeyFileError(Reason.UNSUPPORTED_ALGORITHM, f"key type {type(key).__name__} not allowed")
    try:
        describe_public_key(key.public_key())
    except PkiError as exc:
        raise KeyFileError(exc.reason, exc.detail) from None
    return key


def signing_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The hash a CA key signs certificates and CRLs with (None for Ed25519, which has its own)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return hashes.SHA384()
    return hashes.SHA256()


def key_type_of(key: PrivateKey) -> str:
    return describe_public_key(key.public_key())
