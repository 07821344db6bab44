"""Media transfer wire formats: the signed manifest, chunk, ack and control bodies.

These bodies are the *plaintexts* of sealed records of kinds ``MEDIA_MANIFEST``, ``MEDIA_CHUNK``,
``MEDIA_ACK`` and ``MEDIA_CONTROL`` (:mod:`sealmq.topics`). The record layer binds epoch, kind
and topic; the transfer id and chunk index live inside the sealed plaintext so they are both
authenticated and hidden from the broker. See ``docs/media.md`` for the CDDL.

The manifest is signed by the device as an untagged ``COSE_Sign1`` (RFC 9052 section 4.2): the
strict CBOR decoder refuses tags, and the record kind already says what the bytes are.
The state machines that use these formats are in :mod:`sealmq.media_sender` and
:mod:`sealmq.media_receiver`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from sealmq import cbor, cose
from sealmq.cose import ALG_EDDSA, ALG_ES256, ALG_PS256, MIN_RSA_BITS
from sealmq.errors import ConfigError, DecodeError, MediaError, Reason
from sealmq.topics import check_device_id

# --- sizes ------------------------------------------------------------------------------------
TID_LEN = 16
MIN_CHUNK_SIZE = 1024
# AES-CCM with a 13-byte nonce refuses plaintexts of 65,536 bytes or more (stack-facts.md); the
# record format keeps that bound for every AEAD.
MAX_RECORD_PLAINTEXT = 65_535
# Worst case of [kind, kid(<=8), epoch(uint64), piv(<2^40), ciphertext bstr head] plus a 16-byte
# GCM tag is 57 bytes; 64 leaves room without tying us to the record layer's exact encoding.
RECORD_OVERHEAD = 64
# [tid(16), index(uint32), data bstr head]: 1 + 17 + 5 + 3 bytes.
CHUNK_ENVELOPE = 26
MAX_CHUNK_SIZE = (MAX_RECORD_PLAINTEXT - CHUNK_ENVELOPE) // 1024 * 1024  # 63 KiB
# The largest chunk the record allows: half the per-chunk work of 32 KiB (sealing, MQTT, writes)
# per byte. Its sealed record (about 63.1 KiB) is far under the brokers' 256 KiB message limit.
DEFAULT_CHUNK_SIZE = MAX_CHUNK_SIZE
MAX_CHUNK_COUNT = 2**32 - 1
MAX_FILE_SIZE = 2**53  # a hard decoder bound; receivers apply a much lower configurable limit
MAX_NAME_BYTES = 255
# 9999-12-31T23:59:59Z: the last second a datetime can show and far below SQLite's INTEGER bound
# (2^63 - 1), so a stored manifest's creation time never overflows where it is kept or shown.
MAX_CREATED = 253_402_300_799
MAX_TYPE_LEN = 127
# Acks carry "everything below base" plus a bitmap after it; past this many bytes the bitmap is
# cut (bits beyond are reported missing, which only causes harmless duplicate chunks).
MAX_ACK_BITMAP = 8192
MAX_SIGNATURE_LEN = 1024  # RSA-8192 PSS is 1024 bytes
MAX_MANIFEST_BODY = 2048

_TID_DOMAIN = b"sealmq media transfer id v1"


def max_chunk_size_for(max_message_size: int | None = None, *, record_overhead: int = RECORD_OVERHEAD) -> int:
    """Largest chunk size (a multiple of 1 KiB) whose sealed record fits the broker's message limit
    and AES-CCM's plaintext limit. ``None`` means the broker sets no limit."""
    body = MAX_RECORD_PLAINTEXT
    if max_message_size is not None:
        body = min(body, max_message_size - record_overhead)
    size = (body - CHUNK_ENVELOPE) // 1024 * 1024
    if size < MIN_CHUNK_SIZE:
        raise ConfigError(Reason.CONFIG_INVALID, f"message limit {max_message_size} too small for media")
    return size


def chunk_count_for(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def transfer_id(device_id: str, sha256: bytes, size: int, name: str) -> bytes:
    """Deterministic, so the same file offered again maps to the same (possibly finished) transfer."""
    material = cbor.dumps([device_id, sha256, size, name])
    return hashlib.sha256(_TID_DOMAIN + material).digest()[:TID_LEN]


# --- manifest ---------------------------------------------------------------------------------
class ManifestKey(IntEnum):
    TRANSFER_ID = 1
    DEVICE_ID = 2
    NAME = 3
    CONTENT_TYPE = 4
    SIZE = 5
    SHA256 = 6
    CREATED = 7
    CHUNK_SIZE = 8
    CHUNK_COUNT = 9


@dataclass(frozen=True)
class Manifest:
    transfer_id: bytes
    device_id: str
    name: str
    content_type: str
    size: int
    sha256: bytes
    created: int  # seconds since the Unix epoch (UTC)
    chunk_size: int
    chunk_count: int

    @classmethod
    def create(
        cls, *, device_id: str, name: str, content_type: str, size: int, sha256: bytes, created: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> Manifest:
        m = cls(
            transfer_id(device_id, sha256, size, name), device_id, name, content_type, size, sha256,
            created, chunk_size, chunk_count_for(size, chunk_size),
        )
        m.check()
        return m

    def check(self) -> None:
        """Self-consistency; raises MediaError (a manifest from the wire goes through decode_manifest)."""
        try:
            check_device_id(self.device_id)
        except DecodeError:
            raise MediaError(Reason.WRONG_TYPE, "bad device id in manifest") from None
        name_len = len(self.name.encode("utf-8", "surrogatepass"))
        if not 0 < name_len <= MAX_NAME_BYTES or any(ord(c) < 0x20 or c == "\x7f" for c in self.name):
            raise MediaError(Reason.WRONG_TYPE, "file name empty, too long or with control characters")
        if not 0 < len(self.content_type) <= MAX_TYPE_LEN or not self.content_type.isascii() \
                or "/" not in self.content_type or not self.content_type.isprintable():
            raise MediaError(Reason.WRONG_TYPE, "content type must be a short ASCII type/subtype")
        if len(self.sha256) != 32 or len(self.transfer_id) != TID_LEN:
            raise MediaError(Reason.WRONG_TYPE, "sha256 must be 32 bytes, transfer id 16")
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise MediaError(Reason.TOO_LARGE, f"chunk size outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        if not 0 <= self.size <= MAX_FILE_SIZE:
            raise MediaError(Reason.TOO_LARGE, "size out of range")
        if not 0 <= self.created <= MAX_CREATED:
            raise MediaError(Reason.MALFORMED, "creation time after the year 9999")
        if self.chunk_count != chunk_count_for(self.size, self.chunk_size) \
                or self.chunk_count > MAX_CHUNK_COUNT:
            raise MediaError(Reason.MALFORMED, "chunk count does not match size and chunk size")
        if self.transfer_id != transfer_id(self.device_id, self.sha256, self.size, self.name):
            raise MediaError(Reason.MALFORMED, "transfer id not derived from the manifest")

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``; raises CHUNK_OUT_OF_RANGE."""
        if not 0 <= index < self.chunk_count:
            raise MediaError(Reason.CHUNK_OUT_OF_RANGE, f"chunk {index} not in 0..{self.chunk_count - 1}")
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def to_cbor(self) -> bytes:
        k = ManifestKey
        return cbor.dumps({
            k.TRANSFER_ID: self.transfer_id, k.DEVICE_ID: self.device_id, k.NAME: self.name,
            k.CONTENT_TYPE: self.content_type, k.SIZE: self.size, k.SHA256: self.sha256,
            k.CREATED: self.created, k.CHUNK_SIZE: self.chunk_size, k.CHUNK_COUNT: self.chunk_count,
        })


def decode_manifest(payload: bytes) -> Manifest:
    """Decode (not verify!) the manifest map inside a COSE_Sign1 payload."""
    m = cbor.as_map(cbor.loads(payload), "manifest")
    if set(m) != {int(k) for k in ManifestKey}:
        raise DecodeError(Reason.WRONG_TYPE, "manifest must have exactly keys 1..9")
    k = ManifestKey
    manifest = Manifest(
        transfer_id=cbor.as_bytes(m[k.TRANSFER_ID], "transfer id", max_len=TID_LEN),
        device_id=cbor.as_text(m[k.DEVICE_ID], "device id", max_len=63),
        name=cbor.as_text(m[k.NAME], "name", max_len=MAX_NAME_BYTES),
        content_type=cbor.as_text(m[k.CONTENT_TYPE], "content type", max_len=MAX_TYPE_LEN),
        size=cbor.as_uint(m[k.SIZE], "size", max_value=MAX_FILE_SIZE),
        sha256=cbor.as_bytes(m[k.SHA256], "sha256", max_len=32),
        created=cbor.as_uint(m[k.CREATED], "created", max_value=MAX_CREATED),
        chunk_size=cbor.as_uint(m[k.CHUNK_SIZE], "chunk size", max_value=MAX_CHUNK_SIZE),
        chunk_count=cbor.as_uint(m[k.CHUNK_COUNT], "chunk count", max_value=MAX_CHUNK_COUNT),
    )
    manifest.check()
    return manifest


# --- COSE_Sign1 (the primitives are in sealmq.cose) ---------------------------------------------
PrivateKey = (
    ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey | rsa.RSAPrivateKey
)
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey | rsa.RSAPublicKey

def alg_for_key(key: PrivateKey | PublicKey) -> int:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if not isinstance(key.curve, ec.SECP256R1):
            raise MediaError(Reason.UNSUPPORTED_ALGORITHM, "ES256 needs a P-256 key")
        return ALG_ES256
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey,
                        ed448.Ed448PrivateKey, ed448.Ed448PublicKey)):
        return ALG_EDDSA
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        if key.key_size < MIN_RSA_BITS:
            raise MediaError(Reason.WEAK_KEY, "RSA keys below 2048 bits are refused")
        return ALG_PS256
    raise MediaError(Reason.UNSUPPORTED_ALGORITHM, f"no COSE algorithm for {type(key).__name__}")


def sign_manifest(private_key: PrivateKey, manifest: Manifest) -> bytes:
    """COSE_Sign1 (untagged) over the manifest; ES256 is deterministic (RFC 6979), so is EdDSA."""
    manifest.check()
    alg = alg_for_key(private_key)
    protected = cbor.dumps({1: alg})
    payload = manifest.to_cbor()
    signature = cose.sign(alg, private_key, cose.sig_structure(protected, b"", payload))
    return cbor.dumps([protected, {}, payload, signature])


@dataclass(frozen=True)
class SignedManifest:
    """A decoded but not yet verified COSE_Sign1."""

    protected: bytes
    alg: int
    payload: bytes
    signature: bytes
    manifest: Manifest


def parse_signed_manifest(cose_bytes: bytes) -> SignedManifest:
    """Decode the COSE_Sign1 structure and the manifest in it, WITHOUT checking the signature."""
    if len(cose_bytes) > MAX_MANIFEST_BODY:
        raise DecodeError(Reason.TOO_LARGE, "manifest message too large")
    arr = cbor.as_list(cbor.loads(cose_bytes), "COSE_Sign1", length=4)
    protected = cbor.as_bytes(arr[0], "protected header")
    header = cbor.as_map(cbor.loads(protected), "protected header map")
    if set(header) != {1}:
        raise DecodeError(Reason.WRONG_TYPE, "protected header must hold exactly alg (1)")
    alg = cbor.as_int(header[1], "alg")
    if alg not in (ALG_ES256, ALG_EDDSA, ALG_PS256):
        raise MediaError(Reason.UNSUPPORTED_ALGORITHM, f"COSE alg {alg} not supported")
    if cbor.as_map(arr[1], "unprotected header"):
        raise DecodeError(Reason.WRONG_TYPE, "unprotected header must be empty")
    payload = cbor.as_bytes(arr[2], "payload")
    signature = cbor.as_bytes(arr[3], "signature", max_len=MAX_SIGNATURE_LEN)
    return SignedManifest(protected, alg, payload, signature, decode_manifest(payload))


def verify_manifest(cose_bytes: bytes, public_key: PublicKey) -> Manifest:
    """Verify a signed manifest against the device's public key and return the manifest.

    The algorithm must be the one the key's type implies: an attacker cannot choose it.
    Raises MediaError(BAD_SIGNATURE) on a bad signature, DecodeError on malformed input.
    """
    signed = parse_signed_manifest(cose_bytes)
    if signed.alg != alg_for_key(public_key):
        raise MediaError(Reason.BAD_SIGNATURE, "COSE alg does not match the device key")
    if not cose.verify(signed.alg, public_key, cose.sig_structure(signed.protected, b"", signed.payload),
                       signed.signature):
        raise MediaError(Reason.BAD_SIGNATURE, "manifest signature does not verify")
    return signed.manifest


# --- chunk ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    transfer_id: bytes
    index: int
    data: bytes


def _tid(value: Any) -> bytes:
    tid = cbor.as_bytes(value, "transfer id", max_len=TID_LEN)
    if len(tid) != TID_LEN:
        raise DecodeError(Reason.WRONG_TYPE, "transfer id must be 16 bytes")
    return tid


def encode_chunk(tid: bytes, index: int, data: bytes) -> bytes:
    if len(tid) != TID_LEN or not 0 <= index <= MAX_CHUNK_COUNT or len(data) > MAX_CHUNK_SIZE:
        raise MediaError(Reason.TOO_LARGE, "chunk outside the format's bounds")
    return cbor.dumps([tid, index, data])


def decode_chunk(body: bytes) -> Chunk:
    if len(body) > MAX_CHUNK_SIZE + CHUNK_ENVELOPE:
        raise DecodeError(Reason.TOO_LARGE, "chunk message too large")
    return _decode_chunk_fast(body) or _decode_chunk_reference(body)


def _decode_chunk_fast(body: bytes) -> Chunk | None:
    """The usual chunk, read in place: ``[h'16 bytes', index, data]`` with shortest heads, an index
    and data within bounds, the data running to the end. None for anything else, valid or not,
    which :func:`_decode_chunk_reference` decides. Same chunks as that path, and one copy of the
    data instead of four (the generic decoder copies it out, then re-encodes the whole item to
    check it is deterministic): tests/test_media_fuzz.py holds the two paths to the same result."""
    try:
        if type(body) is not bytes or body[0] != 0x83 or body[1] != 0x50:  # array(3), bstr(16)
            return None
        got = cbor.read_head(body, 2 + TID_LEN, 0, MAX_CHUNK_COUNT)  # the index
        if got is None:
            return None
        index, i = got
        got = cbor.read_head(body, i, 2, MAX_CHUNK_SIZE)  # the data's length
        if got is None:
            return None
        n, i = got
        if i + n != len(body):
            return None
        return Chunk(body[2:2 + TID_LEN], index, body[i:])
    except IndexError:
        return None


def _decode_chunk_reference(body: bytes) -> Chunk:
    arr = cbor.as_list(cbor.loads(body), "chunk", length=3)
    return Chunk(
        _tid(arr[0]),
        cbor.as_uint(arr[1], "chunk index", max_value=MAX_CHUNK_COUNT),
        cbor.as_bytes(arr[2], "chunk data", max_len=MAX_CHUNK_SIZE),
    )


# --- bitmap -----------------------------------------------------------------------------------
class Bitmap:
    """Set of received chunk indexes. Bit i is byte i // 8, mask 0x80 >> (i % 8) (MSB first)."""

    __slots__ = ("_bits", "_count", "size")

    def __init__(self, size: int, raw: bytes | None = None) -> None:
        self.size = size
        nbytes = (size + 7) // 8
        if raw is None:
            self._bits = bytearray(nbytes)
        else:
            if len(raw) != nbytes:
                raise DecodeError(Reason.WRONG_TYPE, "bitmap length does not match chunk count")
            self._bits = bytearray(raw)
            if size % 8 and self._bits[-1] & (0xFF >> (size % 8)):
                raise DecodeError(Reason.WRONG_TYPE, "bitmap has bits past the last chunk")
        self._count = int.from_bytes(self._bits, "big").bit_count()

    def __contains__(self, index: int) -> bool:
        return 0 <= index < self.size and bool(self._bits[index >> 3] & (0x80 >> (index & 7)))

    def add(self, index: int) -> bool:
        """Mark ``index``; True if it was new."""
        if index in self:
            return False
        self._bits[index >> 3] |= 0x80 >> (index & 7)
        self._count += 1
        return True

    @property
    def count(self) -> int:
        return self._count

    def complete(self) -> bool:
        return self._count == self.size

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def first_missing(self, start: int = 0) -> int:
        """Lowest index >= start not in the set, or ``size``."""
        i = start
        while i < self.size:
            byte = self._bits[i >> 3]
            if byte == 0xFF and i & 7 == 0:
                i += 8
                continue
            if not byte & (0x80 >> (i & 7)):
                return i
            i += 1
        return self.size

    def missing(self, start: int = 0, stop: int | None = None) -> Iterator[int]:
        stop = self.size if stop is None else min(stop, self.size)
        i = self.first_missing(start)
        while i < stop:
            yield i
            i = self.first_missing(i + 1)

    def ack_view(self) -> tuple[int, bytes]:
        """(base, bits): every chunk below base received; bit j of bits = chunk base + j.

        Trimmed of trailing zero bytes and capped at MAX_ACK_BITMAP bytes.
        """
        base = self.first_missing()
        if base == self.size:
            return base, b""
        start = base >> 3
        seg = bytes(self._bits[start:start + MAX_ACK_BITMAP + 1])
        nbits = len(seg) * 8
        # Shift so that chunk ``base`` becomes bit 0 (the MSB of the first byte).
        value = (int.from_bytes(seg, "big") << (base & 7)) & ((1 << nbits) - 1)
        return base, value.to_bytes(len(seg), "big")[:MAX_ACK_BITMAP].rstrip(b"\x00")

    @classmethod
    def from_ack(cls, size: int, base: int, bits: bytes) -> Bitmap:
        nbytes = (size + 7) // 8
        if base > size or len(bits) > (size - base + 7) // 8:
            raise MediaError(Reason.CHUNK_OUT_OF_RANGE, "ack covers chunks past the transfer's end")
        # Lay "all below base" and the bits after it into one integer as wide as both need,
        # then cut it to the bitmap's width: anything cut off or past ``size`` is out of range.
        width = max(nbytes * 8, base + len(bits) * 8)
        value = ((1 << base) - 1) << (width - base)
        value |= int.from_bytes(bits, "big") << (width - base - len(bits) * 8)
        extra = width - nbytes * 8
        if value & ((1 << extra) - 1):
            raise MediaError(Reason.CHUNK_OUT_OF_RANGE, "ack marks a chunk past the end")
        try:
            return cls(size, (value >> extra).to_bytes(nbytes, "big"))
        except DecodeError:
            raise MediaError(Reason.CHUNK_OUT_OF_RANGE, "ack marks a chunk past the end") from None


# --- ack --------------------------------------------------------------------------------------
class AckStatus(IntEnum):
    IN_PROGRESS = 0
    COMPLETE = 1  # all chunks in, hash and signature verified, stored
    REJECTED = 2


@dataclass(frozen=True)
class Ack:
    transfer_id: bytes
    status: AckStatus
    base: int  # every chunk below base is received
    bits: bytes  # bit j (MSB first) = chunk base + j received
    reason: Reason | None = None

    def encode(self) -> bytes:
        arr: list[Any] = [self.transfer_id, int(self.status), self.base, self.bits]
        if self.status is AckStatus.REJECTED:
            arr.append((self.reason or Reason.MALFORMED).value)
        return cbor.dumps(arr)


def rejected_ack(tid: bytes, reason: Reason) -> Ack:
    return Ack(tid, AckStatus.REJECTED, 0, b"", reason)


def decode_ack(body: bytes) -> Ack:
    if len(body) > MAX_ACK_BITMAP + 64:
        raise DecodeError(Reason.TOO_LARGE, "ack too large")
    arr = cbor.as_list(cbor.loads(body), "ack")
    if len(arr) not in (4, 5):
        raise DecodeError(Reason.WRONG_TYPE, "ack must have 4 or 5 elements")
    try:
        status = AckStatus(cbor.as_uint(arr[1], "ack status", max_value=255))
    except ValueError:
        raise DecodeError(Reason.UNSUPPORTED, "unknown ack status") from None
    reason: Reason | None = None
    if status is AckStatus.REJECTED:
        if len(arr) != 5:
            raise DecodeError(Reason.WRONG_TYPE, "a rejected ack carries a reason")
        try:
            reason = Reason(cbor.as_text(arr[4], "reason", max_len=64))
        except ValueError:
            reason = Reason.PEER_ERROR  # a reason from a newer peer: still a rejection
    elif len(arr) != 4:
        raise DecodeError(Reason.WRONG_TYPE, "only a rejected ack carries a reason")
    bits = cbor.as_bytes(arr[3], "ack bitmap", max_len=MAX_ACK_BITMAP)
    if bits.endswith(b"\x00"):
        raise DecodeError(Reason.NOT_DETERMINISTIC, "ack bitmap must be trimmed of zero bytes")
    base = cbor.as_uint(arr[2], "ack base", max_value=MAX_CHUNK_COUNT)
    return Ack(_tid(arr[0]), status, base, bits, reason)


# --- control ----------------------------------------------------------------------------------
class ControlOp(IntEnum):
    STATUS = 1  # please send an ack for this transfer now
    ABORT = 2  # forget this transfer and its partial data


@dataclass(frozen=True)
class Control:
    op: ControlOp
    transfer_id: bytes

    def encode(self) -> bytes:
        return cbor.dumps([int(self.op), self.transfer_id])


def decode_control(body: bytes) -> Control:
    if len(body) > 64:
        raise DecodeError(Reason.TOO_LARGE, "control message too large")
    arr = cbor.as_list(cbor.loads(body), "control", length=2)
    try:
        op = ControlOp(cbor.as_uint(arr[0], "control op", max_value=255))
    except ValueError:
        raise DecodeError(Reason.UNSUPPORTED, "unknown control op") from None
    return Control(op, _tid(arr[1]))
