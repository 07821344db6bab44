"""EDHOC key derivation shared by the handshake and the record layer (RFC 9528 4.1-4.2).

``EDHOC_KDF(PRK, label, context, length) = HKDF-Expand(PRK, info, length)`` with
``info = label (int) || context (bstr) || length (uint)`` as a CBOR sequence.
After the handshake only ``PRK_out`` is kept; the exporter and key update below are all a
session needs to (re)derive record keys, which is why they live outside ``sealmq.edhoc``.
"""

from __future__ import annotations

import hashlib
import hmac

from sealmq import cbor

HASH_SHA256 = "sha256"
HASH_SHA384 = "sha384"

_HASH_LEN = {HASH_SHA256: 32, HASH_SHA384: 48}

LABEL_PRK_EXPORTER = 10
LABEL_KEY_UPDATE = 11

EXPORTER_OSCORE_MASTER_SECRET = 0
EXPORTER_OSCORE_MASTER_SALT = 1


def hash_len(hash_name: str) -> int:
    return _HASH_LEN[hash_name]


def hkdf_extract(salt: bytes, ikm: bytes, hash_name: str = HASH_SHA256) -> bytes:
    return hmac.digest(salt, ikm, hash_name)  # one-shot HMAC in C (hmac.new builds Python objects)


def hkdf_expand(prk: bytes, info: bytes, length: int, hash_name: str = HASH_SHA256) -> bytes:
    hlen = _HASH_LEN[hash_name]
    if length > 255 * hlen:
        raise ValueError("HKDF-Expand length too large")
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), hash_name)
        out += block
        counter += 1
    return out[:length]


_UINT_END = 2**64  # cbor.uint_head's range
_BSTR_END = 2**32  # cbor.bstr_head's


def edhoc_info(label: int, context: bytes, length: int) -> bytes:
    """``info`` as the CBOR sequence (label, context, length). The key schedule's labels and lengths
    are unsigned and its contexts short: their heads are written directly (a dozen calls per
    handshake and side went through the generic encoder); anything else goes through it."""
    if type(label) is int and type(context) is bytes and type(length) is int and 0 <= label < _UINT_END \
            and 0 <= length < _UINT_END and len(context) < _BSTR_END:
        return cbor.uint_head(label) + cbor.bstr_head(len(context)) + context + cbor.uint_head(length)
    return cbor.dumps_seq(label, context, length)


def edhoc_kdf(prk: bytes, label: int, context: bytes, length: int, hash_name: str = HASH_SHA256) -> bytes:
    return hkdf_expand(prk, edhoc_info(label, context, length), length, hash_name)


def prk_exporter(prk_out: bytes, hash_name: str = HASH_SHA256) -> bytes:
    return edhoc_kdf(prk_out, LABEL_PRK_EXPORTER, b"", _HASH_LEN[hash_name], hash_name)


def exporter(prk_out: bytes, label: int, context: bytes, length: int, hash_name: str = HASH_SHA256) -> bytes:
    """EDHOC_Exporter(label, context, length) = EDHOC_KDF(PRK_exporter, label, context, length)."""
    return edhoc_kdf(prk_exporter(prk_out, hash_name), label, context, length, hash_name)


def key_update(prk_out: bytes, context: bytes, hash_name: str = HASH_SHA256) -> bytes:
    """EDHOC_KeyUpdate (RFC 9528 Appendix H): PRK_out' = EDHOC_KDF(PRK_out, 11, context, hash_length)."""
    return edhoc_kdf(prk_out, LABEL_KEY_UPDATE, context, _HASH_LEN[hash_name], hash_name)


def hash_bytes(data: bytes, hash_name: str = HASH_SHA256) -> bytes:
    return hashlib.new(hash_name, data).digest()
