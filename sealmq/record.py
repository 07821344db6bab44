"""The sealmq record: what travels, sealed, on the data and media topics.

Wire format (deterministic CBOR, see docs/protocol.md)::

    record = [kind: uint, kid: bstr .size (0..8), epoch: uint, piv: uint, ciphertext: bstr]

* ``kind``: :class:`sealmq.topics.RecordKind`, visible so that a receiver can route and check it
  against the topic before any crypto;
* ``kid``: the sender's OSCORE Sender ID (names the session);
* ``epoch``: key epoch, 0 after the handshake, +1 per key update;
* ``piv``: the sender's sequence number in that epoch (< 2**40);
* ``ciphertext``: the session's AEAD (AES-CCM-16-64-128 or A128GCM, from the EDHOC suite) of the
  plaintext, tag included.

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
from typing import Any, Protocol

from sealmq import cbor, limits, oscore
from sealmq.cbor import bstr_head, read_head, uint_head
from sealmq.errors import DecodeError, DecryptError, LocalProtocolError, Reason
from sealmq.oscore import SecurityContext
from sealmq.topics import RecordKind


class CompiledFraming(Protocol):
    """sealmq/_speedups.c: the fast path's framing (nonce, AAD, heads, the AEAD call), compiled."""

    def seal(self, aead: Any, base: bytes, header: bytes, prefixes: tuple[bytes, ...], suffix: bytes, piv: int,  # noqa: PLR0917
             plaintext: bytes, tag_len: int) -> bytes: ...

    def open_hot(self, data: bytes, topic: str, state: tuple[Any, ...],
                 window: Any) -> tuple[Any, int, bytes] | None: ...

    def open_known(self, data: bytes, topic: str, record_topics: dict[str, str],
                   sessions: dict[str, Any]) -> list[Any] | None: ...


# The compiled framing of the fast path, or None: then EpochCodec and Session run this package's
# Python code, which is also the reference the tests hold the compiled code to. A test or a
# benchmark sets it to None to run the Python code.
speedups: CompiledFraming | None
try:
    from sealmq import _speedups

    speedups = _speedups
except ImportError:  # pragma: no cover - a build without a C compiler
    speedups = None


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
    ciphertext = cbor.as_bytes(items[4], "ciphertext", max_len=limits.MAX_PLAINTEXT + limits.MAX_TAG_LENGTH)
    if len(ciphertext) < limits.MIN_TAG_LENGTH:
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


# --- the fast path ------------------------------------------------------------------------------
#
# Everything above is the reference: short, close to the RFC text, and what the golden vectors were
# made with. What follows produces the same bytes and the same rejections (proved by
# tests/test_record_fast.py, a Hypothesis property test against the reference) while doing per
# record only what changes between records: the Partial IV, the nonce, the AEAD call and the
# record's piv/ciphertext heads. The rest is precomputed once per epoch and (kind, topic).

KINDS: dict[int, RecordKind] = {int(k): k for k in RecordKind}
_MAX_CIPHERTEXT = limits.MAX_PLAINTEXT + limits.MAX_TAG_LENGTH
# The CBOR head of an unsigned integer of 24 or more whose minimal big-endian bytes are n long is
# _UINT_HEAD_PREFIX[n] + those bytes (3 and 5 bytes widen to the 4- and 8-byte forms).
_UINT_HEAD_PREFIX = (b"", b"\x18", b"\x19", b"\x1a\x00", b"\x1a", b"\x1b\x00\x00\x00")
_AAD_CACHE_SIZE = 16  # (kind, topic) pairs per epoch and direction; a session uses at most 8


RecordFields = tuple[int, bytes, int, int, bytes]  # kind, kid, epoch, piv, ciphertext


def decode_fast(data: bytes) -> RecordFields | None:
    """The record's fields if ``data`` has the common, valid shape; None means: ask :func:`decode`.

    Accepts only what :func:`decode` accepts with the same fields (shortest-form heads, known kind,
    bounded kid, epoch, piv and ciphertext, nothing trailing); anything unusual, valid or not,
    returns None and goes to the reference decoder, which decides.
    """
    try:
        n = len(data)
        if type(data) is not bytes or n > limits.MAX_RECORD_SIZE or data[0] != 0x85:
            return None
        kind = data[1]
        if kind not in KINDS:
            return None
        head = data[2]
        kid_len = head - 0x40
        if not 0 <= kid_len <= limits.MAX_KID_LENGTH:
            return None
        i = 3 + kid_len
        kid = data[3:i]
        epoch = data[i]
        if epoch < 24:  # the usual epoch: one byte, no call
            i += 1
        else:
            got = read_head(data, i, 0, limits.MAX_EPOCH)
            if got is None:
                return None
            epoch, i = got
        tail = read_tail(data, i)
        if tail is None or len(kid) != kid_len:
            return None
        piv, i = tail
        return kind, kid, epoch, piv, data[i:]
    except IndexError:
        return None


def read_tail(data: bytes, i: int) -> tuple[int, int] | None:
    """(piv, where the ciphertext starts) of the record ``data`` whose piv head is at ``data[i]``,
    if both heads are shortest and in bounds and the ciphertext (a tag at least) ends the record;
    None for anything else. Shared by :func:`decode_fast` and the sessions' receive hot path."""
    try:
        piv = data[i]
        if piv < 24:
            i += 1
        elif piv == 0x19:  # the usual sequence numbers, 256..65,535: three bytes, no call
            piv = (data[i + 1] << 8) | data[i + 2]
            if piv < 0x100:
                return None
            i += 3
        else:
            got = read_head(data, i, 0, limits.MAX_PIV)
            if got is None:
                return None
            piv, i = got
        head = data[i]
        if 0x48 <= head < 0x58:  # tag-only to 15-byte ciphertexts
            ct_len, i = head - 0x40, i + 1
        elif head == 0x58:
            ct_len, i = data[i + 1], i + 2
            if ct_len < 24:
                return None
        elif head == 0x59:
            ct_len, i = (data[i + 1] << 8) | data[i + 2], i + 3
            if ct_len < 0x100:
                return None
        elif head == 0x5A:
            ct_len, i = int.from_bytes(data[i + 1:i + 5], "big"), i + 5
            if ct_len < 0x10000 or ct_len > _MAX_CIPHERTEXT:
                return None
        else:
            return None
    except IndexError:
        return None
    return (piv, i) if i + ct_len == len(data) else None


def decode_fields(data: bytes) -> RecordFields:
    """:func:`decode_fast`, falling back to the reference :func:`decode` (which raises if invalid)."""
    fields = decode_fast(data)
    if fields is None:
        rec = decode(data)
        fields = (int(rec.kind), rec.kid, rec.epoch, rec.piv, rec.ciphertext)
    return fields


def nonce_base(common_iv: bytes, id_piv: bytes) -> int:
    """The nonce with a zero Partial IV, as an integer: nonce(piv) = base XOR piv (RFC 8613 5.2)."""
    return int.from_bytes(oscore.nonce(common_iv, id_piv, b"\x00"), "big")


class AadTemplate:
    """OSCORE's AAD (RFC 8613 5.4) for one kid and ``options``, split around the Partial IV: a
    prefix per Partial IV length (1..5 bytes) and the suffix (the options bstr, which closes both
    the aad_array and the Enc_structure)."""

    __slots__ = ("prefixes", "suffix")

    def __init__(self, alg: int, kid: bytes, opts: bytes) -> None:
        self.suffix = cbor.dumps(opts)
        prefixes = [b""]
        for piv_len in range(1, oscore.MAX_PIV_LENGTH + 1):
            piv = b"\x00" * piv_len
            full = oscore.aad(alg, kid, piv, opts)
            prefix = full[:len(full) - len(self.suffix) - piv_len]
            if prefix + piv + self.suffix != full:  # pragma: no cover - the CBOR layout guarantees it
                raise AssertionError("AAD does not split around the Partial IV")
            prefixes.append(prefix)
        self.prefixes = tuple(prefixes)

    def aad(self, piv: int) -> bytes:
        """``oscore.aad(alg, kid, partial_iv(piv), opts)`` (the codec inlines this)."""
        piv_len = (piv.bit_length() + 7) >> 3 or 1
        return self.prefixes[piv_len] + piv.to_bytes(piv_len, "big") + self.suffix


class AadPieces(AadTemplate):
    """An :class:`AadTemplate` for one record (kid, epoch, kind, topic), with the record header."""

    __slots__ = ("header",)

    def __init__(self, alg: int, kid: bytes, epoch: int, kind: RecordKind, topic: str) -> None:
        super().__init__(alg, kid, options(epoch, kind, topic))
        # record = [kind, kid, epoch, piv, ciphertext]: the first three never change here
        self.header = b"\x85" + uint_head(int(kind)) + bstr_head(len(kid)) + kid + uint_head(epoch)


class EpochCodec:
    """The record fast path of one security context under one epoch (both directions).

    Holds only integers and a small bounded cache, so an idle session costs little; the AEAD
    objects are the context's own (built once per key).
    """

    __slots__ = ("_into_tag_len", "_nonce_len", "_recipient_aead", "_recv", "_recv_base", "_send", "_send_base",
                 "_send_base_bytes", "_sender_aead", "_tag_len", "ctx", "epoch")

    def __init__(self, ctx: SecurityContext, epoch: int) -> None:
        if not 0 <= epoch <= limits.MAX_EPOCH:
            raise LocalProtocolError(Reason.WRONG_TYPE, "epoch out of range")
        self.ctx = ctx
        self.epoch = epoch
        self._nonce_len = ctx.alg.nonce_length
        self._tag_len = ctx.alg.tag_length
        # the context's AEAD objects, called directly (not through ctx.encrypt/decrypt): a call less
        # per record. The objects, not their bound methods: those would cost 170 B per session.
        self._sender_aead = ctx.sender_aead
        self._recipient_aead = ctx.recipient_aead
        self._send_base = nonce_base(ctx.common_iv, ctx.sender_id)
        self._send_base_bytes = self._send_base.to_bytes(self._nonce_len, "big")  # for the compiled seal
        # the compiled seal has a large record's ciphertext written in place when the AEAD can
        # (encrypt_into, which older cryptography releases lack); 0 makes it copy, as the Python path does
        self._into_tag_len = self._tag_len if hasattr(self._sender_aead, "encrypt_into") else 0
        self._recv_base = nonce_base(ctx.common_iv, ctx.recipient_id)
        self._send: dict[tuple[int, str], AadPieces] = {}
        self._recv: dict[tuple[int, str], AadPieces] = {}

    def _pieces(self, cache: dict[tuple[int, str], AadPieces], kid: bytes, kind: RecordKind,
                topic: str) -> AadPieces:
        key = (kind, topic)
        pieces = cache.get(key)
        if pieces is None:
            if len(cache) >= _AAD_CACHE_SIZE:
                del cache[next(iter(cache))]  # oldest first: topics are few, this is only a bound
            pieces = cache[key] = AadPieces(self.ctx.alg.cose_id, kid, self.epoch, kind, topic)
        return pieces

    def seal(self, kind: RecordKind, topic: str, piv: int, plaintext: bytes) -> bytes:
        """Same bytes as :func:`seal` with this context and epoch; the caller checked ``kind``."""
        if len(plaintext) > limits.MAX_PLAINTEXT:
            raise LocalProtocolError(Reason.TOO_LARGE, f"plaintext longer than {limits.MAX_PLAINTEXT} bytes")
        if not 0 <= piv <= limits.MAX_PIV:
            raise LocalProtocolError(Reason.SEQUENCE_EXHAUSTED, "sequence number outside 0..2**40-1")
        pieces = self._send.get((kind, topic)) or self._pieces(self._send, self.ctx.sender_id, kind, topic)
        c = speedups
        if c is not None:  # the same bytes, compiled (tests/test_speedups.py)
            return c.seal(self._sender_aead, self._send_base_bytes, pieces.header, pieces.prefixes, pieces.suffix,
                          piv, plaintext, self._into_tag_len)
        piv_len = (piv.bit_length() + 7) >> 3 or 1
        piv_bytes = piv.to_bytes(piv_len, "big")
        ct = self._sender_aead.encrypt((self._send_base ^ piv).to_bytes(self._nonce_len, "big"), plaintext,
                                       pieces.prefixes[piv_len] + piv_bytes + pieces.suffix)
        # uint_head(piv) from the Partial IV's bytes: below 24 the head is that one byte
        piv_head = piv_bytes if piv < 24 else _UINT_HEAD_PREFIX[piv_len] + piv_bytes
        return b"".join((pieces.header, piv_head, bstr_head(len(ct)), ct))

    def open(self, kind: RecordKind, topic: str, piv: int, ciphertext: bytes) -> bytes:
        """Same result as :func:`open_` for a record whose kid is the context's Recipient ID."""
        if not 0 <= piv <= limits.MAX_PIV:
            raise LocalProtocolError(Reason.SEQUENCE_EXHAUSTED, "sequence number outside 0..2**40-1")
        return self.open_under(self.recv_pieces(kind, topic), piv, ciphertext)

    def compiled_open_state(self) -> tuple[bytes, Any, int]:
        """What the compiled receive path (``speedups.open_hot``) needs of this codec: the
        recipient's nonce base as bytes, the recipient AEAD object and its tag length."""
        return self._recv_base.to_bytes(self._nonce_len, "big"), self._recipient_aead, self._tag_len

    def recv_pieces(self, kind: RecordKind, topic: str) -> AadPieces:
        """The AAD pieces of records of ``kind`` received on ``topic``, for :meth:`open_under`."""
        return self._recv.get((kind, topic)) or self._pieces(self._recv, self.ctx.recipient_id, kind, topic)

    def open_under(self, pieces: AadPieces, piv: int, ciphertext: bytes) -> bytes:
        """:meth:`open` with the pieces of its kind and topic (:meth:`recv_pieces`) already at hand,
        and ``piv`` known to be within 0..limits.MAX_PIV (a decoded record's always is)."""
        piv_len = (piv.bit_length() + 7) >> 3 or 1
        aad = pieces.prefixes[piv_len] + piv.to_bytes(piv_len, "big") + pieces.suffix
        # ctx.decrypt inlined (one call less per record): the same check and the same opaque error
        if len(ciphertext) < self._tag_len:
            raise DecryptError()
        try:
            return self._recipient_aead.decrypt((self._recv_base ^ piv).to_bytes(self._nonce_len, "big"),
                                                ciphertext, aad)
        except oscore.AEAD_FAILURES:
            raise DecryptError() from None
