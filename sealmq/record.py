"""The sealmq record: what travels, sealed, on the data and media topics.

Wire format (deterministic CBOR, see docs/protocol.md)::

    record = [kind: uint, kid: bstr .size (0..8), epoch: uint, piv: uint, ciphertext: bstr]

* ``kind``: :class:`sealmq.topics.RecordKind`, visible so that a receiver can route and check it
  against the topic before any crypto;
* ``kid``: the sender's OSCORE Sender ID (names the session);
* ``epoch``: key epoch, 0 after the handshake, +1 per key update;
* ``piv``: the sender's sequence number in that epoch (< 2**40);
* ``ciphertext``: AES-CCM-16-64-128 of the plaintext (tag included).

The nonce is RFC 8613 section 5.2's, from the epoch's Common IV, the Sender ID and the Partial IV
(minimal big-endian ``piv``). The AAD is OSCORE's own structure (section 5.4)::

    Enc_structure = ["Encrypt0", h'', bstr .cbor aad_array]
    aad_array     = [1, [alg], kid, piv_bytes, options]
    options       = bstr .cbor [epoch, kind, topic]

so the MQTT topic, the record kind and the epoch are bound into every tag: the broker cannot move a
valid ciphertext to another topic, device, kind or epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

from sealmq import cbor, limits, oscore
from sealmq.errors import DecodeError, LocalProtocolError, Reason
from sealmq.oscore import SecurityContext
from sealmq.topics import RecordKind


@dataclass(frozen=True)
class Record:
    """A parsed (still sealed) record."""

    kind: RecordKind
    kid: bytes
    epoch: int
    piv: int
    ciphertext: bytes

    def encode(self) -> bytes:
        return cbor.dumps([int(self.kind), self.kid, self.epoch, self.piv, self.ciphertext])


def decode(data: bytes) -> Record:
    """Strictly decode a record; anything else raises :class:`DecodeError` with a reason."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(Reason.WRONG_TYPE, "record must be bytes")
    if len(data) > limits.MAX_RECORD_SIZE:
        raise DecodeError(Reason.TOO_LARGE, "record too large")
    items = cbor.as_list(cbor.loads(data), "record", length=5)
    kind_value = cbor.as_uint(items[0], "kind", max_value=255)
    try:
        kind = RecordKind(kind_value)
    except ValueError:
        raise DecodeError(Reason.UNSUPPORTED, "unknown record kind") from None
    kid = cbor.as_bytes(items[1], "kid", max_len=limits.MAX_KID_LENGTH)
    epoch = cbor.as_uint(items[2], "epoch", max_value=limits.MAX_EPOCH)
    piv = cbor.as_uint(items[3], "piv", max_value=limits.MAX_PIV)
    ciphertext = cbor.as_bytes(items[4], "ciphertext", max_len=limits.MAX_PLAINTEXT + limits.TAG_LENGTH)
    if len(ciphertext) < limits.TAG_LENGTH:
        raise DecodeError(Reason.MALFORMED, "ciphertext shorter than the tag")
    return Record(kind, kid, epoch, piv, ciphertext)


def options(epoch: int, kind: RecordKind, topic: str) -> bytes:
    """Our binding, carried in OSCORE's ``options`` slot of the AAD."""
    return cbor.dumps([epoch, int(kind), topic])


def record_aad(alg: int, *, kid: bytes, piv: int, epoch: int, kind: RecordKind, topic: str) -> bytes:
    """The AEAD's AAD for a record (exposed for golden vectors and other implementations)."""
    return oscore.aad(alg, kid, oscore.partial_iv(piv), options(epoch, kind, topic))


def seal(ctx: SecurityContext, *, kind: RecordKind, epoch: int, piv: int, topic: str,
         plaintext: bytes) -> bytes:
    """Encrypt ``plaintext`` with the context's Sender Key; return the encoded record."""
    if len(plaintext) > limits.MAX_PLAINTEXT:
        raise LocalProtocolError(Reason.TOO_LARGE, f"plaintext longer than {limits.MAX_PLAINTEXT} bytes")
    if not 0 <= epoch <= limits.MAX_EPOCH:
        raise LocalProtocolError(Reason.WRONG_TYPE, "epoch out of range")
    piv_bytes = oscore.partial_iv(piv)
    aad = oscore.aad(ctx.alg.cose_id, ctx.sender_id, piv_bytes, options(epoch, kind, topic))
    ciphertext = ctx.encrypt(ctx.sender_nonce(piv_bytes), plaintext, aad)
    return Record(kind, ctx.sender_id, epoch, piv, ciphertext).encode()


def open_(ctx: SecurityContext, rec: Record, topic: str) -> bytes:
    """Decrypt ``rec`` (received on ``topic``) with the context's Recipient Key.

    Raises the opaque :class:`~sealmq.errors.DecryptError` on any mismatch (key, kid, piv, epoch,
    kind, topic). The caller checks ``rec.kid`` and the replay window; this function is pure.
    """
    piv_bytes = oscore.partial_iv(rec.piv)
    aad = oscore.aad(ctx.alg.cose_id, rec.kid, piv_bytes, options(rec.epoch, rec.kind, topic))
    return ctx.decrypt(oscore.nonce(ctx.common_iv, ctx.recipient_id, piv_bytes), rec.ciphertext, aad)
