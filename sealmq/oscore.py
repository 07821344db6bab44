"""OSCORE (RFC 8613) primitives: security context derivation, nonce, AAD, AEAD, and EDHOC -> OSCORE.

What is here, each reproduced byte for byte against RFC 8613 Appendix C (tests/test_oscore.py):

* section 3.2: ``SecurityContext.derive`` -- Sender Key, Recipient Key and Common IV from the Master
  Secret, Master Salt, Sender/Recipient ID and ID Context, with ``info = [id, id_context, alg_aead,
  type, L]`` and HKDF (SHA-256 by default);
* section 5.2: ``nonce`` -- Common IV XOR (size of ID_PIV | ID_PIV left-padded | PIV left-padded);
* section 5.4: ``aad`` -- the COSE ``Enc_structure ["Encrypt0", h'', external_aad]`` whose external_aad
  is ``bstr .cbor [oscore_version, [alg_aead], request_kid, request_piv, options]``;
* section 6.1: ``option_value`` -- the OSCORE option (only needed to check the RFC's vectors);
* RFC 9528 Appendix A.1: ``from_edhoc`` -- Master Secret = EDHOC_Exporter(0, h'', key_length), Master
  Salt = EDHOC_Exporter(1, h'', 8); the initiator's Sender ID is C_R, the responder's is C_I.

The AEADs offered are those the EDHOC cipher suites we implement name as application AEAD:
COSE algorithm 10 (AES-CCM-16-64-128: key 16, nonce 13, tag 8; suites 0, 1, 2, 3 and -24), what
constrained devices implement; 1 (A128GCM: key 16, nonce 12, tag 16; suite 6), the suite RFC 9528
names for non-constrained applications; and 3 (A256GCM: key 32, nonce 12, tag 16; suite 24).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM

from sealmq import cbor, kdf
from sealmq.errors import DecryptError, LocalProtocolError, Reason, SessionError

OSCORE_VERSION = 1
MASTER_SALT_LENGTH = 8  # RFC 9528 Appendix A.1
MAX_PIV_LENGTH = 5  # RFC 8613 section 6.1: n <= 5 bytes, so sequence numbers < 2**40
MAX_SEQUENCE_NUMBER = 2**40 - 1


@dataclass(frozen=True)
class AeadAlgorithm:
    """A COSE AEAD algorithm as OSCORE uses it."""

    cose_id: int
    name: str
    key_length: int
    nonce_length: int
    tag_length: int

    @property
    def max_id_length(self) -> int:
        """Longest Sender/Recipient ID that fits the nonce (RFC 8613 section 5.2)."""
        return self.nonce_length - 6

    def cipher(self, key: bytes) -> AESCCM | AESGCM:
        if self.cose_id in _GCM:  # cryptography's AESGCM: a 12-byte nonce and a 16-byte tag
            return AESGCM(key)
        return AESCCM(key, tag_length=self.tag_length)


_GCM = (1, 2, 3)  # COSE A128GCM, A192GCM, A256GCM
# What cryptography's AEAD decrypt raises for a record that does not open (a wrong tag, or a nonce
# or ciphertext it refuses): all of it is the one opaque DecryptError.
AEAD_FAILURES = (InvalidTag, ValueError, OverflowError)
AES_CCM_16_64_128 = AeadAlgorithm(10, "AES-CCM-16-64-128", 16, 13, 8)
A128GCM = AeadAlgorithm(1, "A128GCM", 16, 12, 16)
A256GCM = AeadAlgorithm(3, "A256GCM", 32, 12, 16)

AEAD_ALGORITHMS: dict[int, AeadAlgorithm] = {a.cose_id: a for a in (AES_CCM_16_64_128, A128GCM, A256GCM)}


def aead_algorithm(cose_id: int) -> AeadAlgorithm:
    try:
        return AEAD_ALGORITHMS[cose_id]
    except KeyError:
        raise SessionError(Reason.UNSUPPORTED_ALGORITHM, f"AEAD algorithm {cose_id} not supported") from None


# --- section 3.2: key derivation --------------------------------------------------------------

def derive_info(id_: bytes, id_context: bytes | None, alg: int, type_: str, length: int) -> bytes:
    """``info = [id, id_context, alg_aead, type, L]`` (RFC 8613 section 3.2.1)."""
    return cbor.dumps([id_, id_context, alg, type_, length])


def _derive(prk: bytes, info: bytes, length: int, hkdf_hash: str) -> bytes:
    return kdf.hkdf_expand(prk, info, length, hkdf_hash)


class SecurityContext:
    """One OSCORE security context: common, sender and recipient parts (no sequence state).

    Sequence numbers, replay windows and usage counters live in :mod:`sealmq.session`, which owns
    the lifetime of a context; this class is only the derived key material and what uses it.
    """

    __slots__ = ("_recipient", "_sender", "alg", "common_iv", "id_context", "recipient_id",
                 "recipient_key", "sender_id", "sender_key")

    def __init__(self, *, alg: AeadAlgorithm, sender_id: bytes, recipient_id: bytes,
                 id_context: bytes | None, sender_key: bytes, recipient_key: bytes,
                 common_iv: bytes) -> None:
        for what, ident in (("Sender ID", sender_id), ("Recipient ID", recipient_id)):
            if len(ident) > alg.max_id_length:
                raise SessionError(Reason.UNSUPPORTED,
                                   f"{what} longer than {alg.max_id_length} bytes for {alg.name}")
        if sender_id == recipient_id:
            # Equal IDs would make both directions use the same nonces under related keys.
            raise SessionError(Reason.CONNECTION_ID_IN_USE, "Sender ID equals Recipient ID")
        self.alg = alg
        self.sender_id = sender_id
        self.recipient_id = recipient_id
        self.id_context = id_context
        self.sender_key = sender_key
        self.recipient_key = recipient_key
        self.common_iv = common_iv
        self._sender = alg.cipher(sender_key)
        self._recipient = alg.cipher(recipient_key)

    def __repr__(self) -> str:  # never print keys
        return (f"SecurityContext(alg={self.alg.cose_id}, sender_id={self.sender_id.hex()}, "
                f"recipient_id={self.recipient_id.hex()})")

    @classmethod
    def derive(cls, *, master_secret: bytes, master_salt: bytes = b"", sender_id: bytes,
               recipient_id: bytes, id_context: bytes | None = None, alg: int = 10,
               hkdf_hash: str = kdf.HASH_SHA256) -> SecurityContext:
        """RFC 8613 section 3.2.1: HKDF(salt = Master Salt, IKM = Master Secret, info, L)."""
        algorithm = aead_algorithm(alg)
        prk = kdf.hkdf_extract(master_salt, master_secret, hkdf_hash)
        key_len, iv_len = algorithm.key_length, algorithm.nonce_length
        return cls(
            alg=algorithm, sender_id=sender_id, recipient_id=recipient_id, id_context=id_context,
            sender_key=_derive(prk, derive_info(sender_id, id_context, alg, "Key", key_len),
                               key_len, hkdf_hash),
            recipient_key=_derive(prk, derive_info(recipient_id, id_context, alg, "Key", key_len),
                                  key_len, hkdf_hash),
            common_iv=_derive(prk, derive_info(b"", id_context, alg, "IV", iv_len), iv_len, hkdf_hash),
        )

    def sender_nonce(self, piv: bytes) -> bytes:
        return nonce(self.common_iv, self.sender_id, piv)

    def recipient_nonce(self, piv: bytes) -> bytes:
        return nonce(self.common_iv, self.recipient_id, piv)

    @property
    def sender_aead(self) -> AESCCM | AESGCM:
        """The AEAD object under the Sender Key. For the record fast path (:class:`sealmq.record.EpochCodec`),
        which calls it without this class's wrappers; everything else uses :meth:`encrypt`."""
        return self._sender

    @property
    def recipient_aead(self) -> AESCCM | AESGCM:
        """The AEAD object under the Recipient Key; see :attr:`sender_aead`. Whoever calls its ``decrypt``
        must map :data:`AEAD_FAILURES` to :class:`DecryptError`, as :meth:`decrypt` does."""
        return self._recipient

    def encrypt(self, nonce_: bytes, plaintext: bytes, aad_: bytes) -> bytes:
        """AEAD-encrypt with the Sender Key."""
        return self._sender.encrypt(nonce_, plaintext, aad_)

    def decrypt(self, nonce_: bytes, ciphertext: bytes, aad_: bytes) -> bytes:
        """AEAD-decrypt with the Recipient Key; any failure is the opaque :class:`DecryptError`."""
        if len(ciphertext) < self.alg.tag_length:
            raise DecryptError()
        try:
            return self._recipient.decrypt(nonce_, ciphertext, aad_)
        except AEAD_FAILURES:
            raise DecryptError() from None


# --- section 5.2: nonce -----------------------------------------------------------------------

def partial_iv(seq: int) -> bytes:
    """The Partial IV of a sequence number: minimal big-endian, 0 -> h'00' (RFC 8613 section 6.1)."""
    if seq < 0 or seq > MAX_SEQUENCE_NUMBER:
        raise LocalProtocolError(Reason.SEQUENCE_EXHAUSTED, "sequence number outside 0..2**40-1")
    return seq.to_bytes(max(1, (seq.bit_length() + 7) // 8), "big")


def nonce(common_iv: bytes, id_piv: bytes, piv: bytes) -> bytes:
    """Common IV XOR (size(ID_PIV) | ID_PIV padded to nonce_len-6 | PIV padded to 5) (section 5.2)."""
    nonce_len = len(common_iv)
    if len(id_piv) > nonce_len - 6 or len(piv) > MAX_PIV_LENGTH:
        raise LocalProtocolError(Reason.WRONG_TYPE, "ID_PIV or PIV too long for the nonce")
    block = bytes([len(id_piv)]) + id_piv.rjust(nonce_len - 6, b"\x00") + piv.rjust(MAX_PIV_LENGTH, b"\x00")
    return bytes(a ^ b for a, b in zip(block, common_iv, strict=True))


# --- section 5.4: additional authenticated data -------------------------------------------------

def aad_array(alg: int, request_kid: bytes, request_piv: bytes, options: bytes = b"") -> list[Any]:
    """``[oscore_version, [alg_aead], request_kid, request_piv, options]``."""
    return [OSCORE_VERSION, [alg], request_kid, request_piv, options]


def aad(alg: int, request_kid: bytes, request_piv: bytes, options: bytes = b"") -> bytes:
    """The COSE Enc_structure ``["Encrypt0", h'', external_aad]`` that is the AEAD's AAD."""
    external_aad = cbor.dumps(aad_array(alg, request_kid, request_piv, options))
    return cbor.dumps(["Encrypt0", b"", external_aad])


# --- section 6.1: OSCORE option (only for the RFC's vectors) ----------------------------------------

def option_value(piv: bytes | None, kid: bytes | None, kid_context: bytes | None = None) -> bytes:
    """Encode the OSCORE option value: flags | PIV | (s | kid context) | kid."""
    piv = piv or b""
    if len(piv) > MAX_PIV_LENGTH or (kid_context is not None and len(kid_context) > 255):
        raise LocalProtocolError(Reason.WRONG_TYPE, "PIV or kid context too long")
    flags = len(piv) | (0x08 if kid is not None else 0) | (0x10 if kid_context is not None else 0)
    if flags == 0:
        return b""
    out = bytes([flags]) + piv
    if kid_context is not None:
        out += bytes([len(kid_context)]) + kid_context
    return out + (kid or b"")


# --- RFC 9528 Appendix A.1: EDHOC -> OSCORE ------------------------------------------------------

def master_from_edhoc(prk_out: bytes, *, hash_name: str = kdf.HASH_SHA256,
                      app_aead: int = 10) -> tuple[bytes, bytes]:
    """(OSCORE Master Secret, OSCORE Master Salt) exported from ``PRK_out``."""
    key_len = aead_algorithm(app_aead).key_length
    secret = kdf.exporter(prk_out, kdf.EXPORTER_OSCORE_MASTER_SECRET, b"", key_len, hash_name)
    salt = kdf.exporter(prk_out, kdf.EXPORTER_OSCORE_MASTER_SALT, b"", MASTER_SALT_LENGTH, hash_name)
    return secret, salt


def from_edhoc(prk_out: bytes, c_i: bytes, c_r: bytes, is_initiator: bool, *,
               hash_name: str = kdf.HASH_SHA256, app_aead: int = 10) -> SecurityContext:
    """Security context of one side after EDHOC (RFC 9528 A.1).

    ``c_i``/``c_r`` are the *raw* connection identifiers (byte strings, e.g. ``b"\\x2d"`` for the
    CBOR int -14), as RFC 9528 section 3.3.2 maps them to OSCORE IDs. The application HKDF is the
    EDHOC hash algorithm (``hash_name``).
    """
    secret, salt = master_from_edhoc(prk_out, hash_name=hash_name, app_aead=app_aead)
    sender_id, recipient_id = (c_r, c_i) if is_initiator else (c_i, c_r)
    return SecurityContext.derive(master_secret=secret, master_salt=salt, sender_id=sender_id,
                                  recipient_id=recipient_id, alg=app_aead, hkdf_hash=hash_name)
