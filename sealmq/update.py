"""Signed updates to devices (docs/protocol.md section 7.3): the release manifest, the package file,
the three update records, and the device's acceptance rules. Pure: no file, no clock.

A package is made offline with the operator's *release key* (``sealmq pki release-key sign``),
which the backend never holds: the backend only forwards it, so a compromised backend cannot make
a device install anything. The manifest follows the spirit of SUIT (RFC 9019/9124): a monotonic
version (SUIT's sequence number), the target (a device class, or a list of device ids), the
payload's SHA-256 digest and size, and the payload kind; it is an untagged ``COSE_Sign1``
(RFC 9052 4.2) like the media manifest, ES256 or EdDSA.

On the wire (records, sealed, media channel)::

    update-offer  = [ tid, signed-manifest: bstr, chunk-size ]        ; backend -> device
    update-chunk  = [ tid, index: uint, data: bstr ]                  ; backend -> device
    update-status = [ tid, state: 0 / 1 / 2, next: uint, reason: tstr ]  ; device -> backend

``tid`` is the first 16 bytes of SHA-256(signed-manifest), so the same package always has the same
transfer id and a transfer resumes after either side restarts. A device accepts a manifest only
if :func:`accept_manifest` passes: signed by the release key it holds, meant for it, a version
above the installed one. It then checks size and digest of what arrives before the installer
sees a byte.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from sealmq import cbor, cose
from sealmq.errors import DecodeError, FleetError, LocalProtocolError, Reason, SealmqError
from sealmq.media import PrivateKey, PublicKey, alg_for_key
from sealmq.topics import valid_device_id

TID_LEN = 16
MAX_SIGNED_MANIFEST = 4096
MAX_PAYLOAD = 256 * 1024 * 1024
MAX_CHUNK = 63 * 1024  # as media's largest chunk: a sealed chunk stays below the 65,535-byte plaintext limit
MAX_TARGET_DEVICES = 64
MAX_TEXT = 64
PAYLOAD_KINDS = ("firmware", "config")

# manifest map keys
M_VERSION, M_KIND, M_CLASS, M_DEVICES, M_DIGEST, M_SIZE = 1, 2, 3, 4, 5, 6


class UpdateState(IntEnum):
    NEED = 0  # send chunks from ``next`` on
    INSTALLED = 1
    REJECTED = 2


def _load(data: bytes, what: str) -> Any:
    if not isinstance(data, bytes):
        raise FleetError(Reason.WRONG_TYPE, f"{what} must be bytes")
    try:
        return cbor.loads(data)
    except DecodeError as exc:
        raise FleetError(exc.reason, f"{what}: {exc.detail}") from None


def _uint(value: Any, what: str, max_value: int = 2**63 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= max_value:
        raise FleetError(Reason.BAD_BODY, f"{what} must be an integer 0..{max_value}")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value.encode("utf-8", "surrogatepass")) <= MAX_TEXT:
        raise FleetError(Reason.BAD_BODY, f"{what} must be a text of 1..{MAX_TEXT} bytes")
    return value


def _tid(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != TID_LEN:
        raise FleetError(Reason.BAD_BODY, f"tid must be {TID_LEN} bytes")
    return value


# --- the manifest --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UpdateManifest:
    version: int
    kind: str
    digest: bytes  # SHA-256 of the payload
    size: int
    device_class: str | None = None
    devices: tuple[str, ...] = ()

    def check(self) -> None:
        _uint(self.version, "version")
        if self.kind not in PAYLOAD_KINDS:
            raise FleetError(Reason.BAD_BODY, f"kind must be one of {PAYLOAD_KINDS}")
        if not isinstance(self.digest, bytes) or len(self.digest) != 32:
            raise FleetError(Reason.BAD_BODY, "digest must be 32 bytes (SHA-256)")
        if _uint(self.size, "size", MAX_PAYLOAD) == 0:
            raise FleetError(Reason.BAD_BODY, "size must be at least 1")
        if (self.device_class is None) == (not self.devices):
            raise FleetError(Reason.BAD_BODY, "target exactly one of a device class or device ids")
        if self.device_class is not None:
            _text(self.device_class, "device class")
        if len(self.devices) > MAX_TARGET_DEVICES or not all(
            isinstance(d, str) and valid_device_id(d) for d in self.devices
        ):
            raise FleetError(Reason.BAD_BODY, f"devices must be 1..{MAX_TARGET_DEVICES} device ids")

    def to_cbor(self) -> bytes:
        try:
            self.check()
        except FleetError as exc:
            raise LocalProtocolError(Reason.BAD_BODY, exc.detail) from None
        item: dict[int, Any] = {M_VERSION: self.version, M_KIND: self.kind, M_DIGEST: self.digest, M_SIZE: self.size}
        if self.device_class is not None:
            item[M_CLASS] = self.device_class
        else:
            item[M_DEVICES] = list(self.devices)
        return cbor.dumps(item)

    def targets(self, device_id: str, device_class: str | None) -> bool:
        if self.device_class is not None:
            return device_class is not None and self.device_class == device_class
        return device_id in self.devices


def decode_manifest(payload: bytes) -> UpdateManifest:
    item = _load(payload, "update manifest")
    if not isinstance(item, dict) or not all(isinstance(k, int) and not isinstance(k, bool) for k in item):
        raise FleetError(Reason.BAD_BODY, "update manifest must be a map with integer keys")
    required = {M_VERSION, M_KIND, M_DIGEST, M_SIZE}
    if not required <= set(item) or not set(item) <= required | {M_CLASS, M_DEVICES}:
        raise FleetError(Reason.BAD_BODY, "update manifest keys are 1, 2, 5, 6 and one of 3 or 4")
    devices = item.get(M_DEVICES, [])
    if not isinstance(devices, list):
        raise FleetError(Reason.BAD_BODY, "devices must be an array")
    manifest = UpdateManifest(
        version=item[M_VERSION], kind=item[M_KIND], digest=item[M_DIGEST], size=item[M_SIZE],
        device_class=item.get(M_CLASS), devices=tuple(devices),
    )
    manifest.check()
    if M_DEVICES in item and not devices:
        raise FleetError(Reason.BAD_BODY, "devices must not be empty")
    return manifest


def sign_manifest(private_key: PrivateKey, manifest: UpdateManifest) -> bytes:
    """Untagged COSE_Sign1 over the manifest with the release key (ES256 or EdDSA)."""
    alg = alg_for_key(private_key)
    protected = cbor.dumps({1: alg})
    payload = manifest.to_cbor()
    signature = cose.sign(alg, private_key, cose.sig_structure(protected, b"", payload))
    return cbor.dumps([protected, {}, payload, signature])


@dataclass(frozen=True, slots=True)
class SignedUpdate:
    """A parsed, NOT yet verified, signed manifest."""

    raw: bytes
    protected: bytes
    alg: int
    payload: bytes
    signature: bytes
    manifest: UpdateManifest

    @property
    def tid(self) -> bytes:
        return transfer_id(self.raw)


def transfer_id(signed_manifest: bytes) -> bytes:
    return hashlib.sha256(signed_manifest).digest()[:TID_LEN]


def parse_signed_manifest(data: bytes) -> SignedUpdate:
    if not isinstance(data, bytes) or len(data) > MAX_SIGNED_MANIFEST:
        raise FleetError(Reason.TOO_LARGE, "signed manifest too large")
    arr = _load(data, "signed manifest")
    if not isinstance(arr, list) or len(arr) != 4:
        raise FleetError(Reason.BAD_BODY, "signed manifest must be a COSE_Sign1 array of 4")
    protected, unprotected, payload, signature = arr
    if not isinstance(protected, bytes) or not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise FleetError(Reason.BAD_BODY, "COSE_Sign1 fields have the wrong types")
    if unprotected != {}:
        raise FleetError(Reason.BAD_BODY, "unprotected header must be empty")
    header = _load(protected, "protected header")
    if not isinstance(header, dict) or set(header) != {1} or header[1] not in (cose.ALG_ES256, cose.ALG_EDDSA):
        raise FleetError(Reason.UNSUPPORTED_ALGORITHM, "protected header must be {1: ES256 or EdDSA}")
    return SignedUpdate(data, protected, header[1], payload, signature, decode_manifest(payload))


def verify_signed_manifest(data: bytes, release_key: PublicKey) -> SignedUpdate:
    """Parse and verify against the release public key; BAD_SIGNATURE for any other signer."""
    signed = parse_signed_manifest(data)
    try:
        alg = alg_for_key(release_key)
    except SealmqError:
        raise FleetError(Reason.UNSUPPORTED_ALGORITHM, "release key type not usable") from None
    if signed.alg != alg or not cose.verify(
        alg, release_key, cose.sig_structure(signed.protected, b"", signed.payload), signed.signature
    ):
        raise FleetError(Reason.BAD_SIGNATURE, "update manifest not signed by the release key")
    return signed


def accept_manifest(
    data: bytes, release_key: PublicKey, *, device_id: str, device_class: str | None, installed_version: int
) -> SignedUpdate:
    """Everything a device checks before it takes the first byte of an update."""
    signed = verify_signed_manifest(data, release_key)
    if not signed.manifest.targets(device_id, device_class):
        raise FleetError(Reason.WRONG_TARGET, "update is for another device or device class")
    if signed.manifest.version <= installed_version:
        raise FleetError(Reason.DOWNGRADE, f"version {signed.manifest.version} is not above {installed_version}")
    return signed


# --- the package file ----------------------------------------------------------------------
def encode_package(signed_manifest: bytes, payload: bytes) -> bytes:
    """``update-package = [signed-manifest, payload]``: what release-key sign writes and push reads."""
    return cbor.dumps([signed_manifest, payload])


def decode_package(data: bytes) -> tuple[SignedUpdate, bytes]:
    """Parse (not verify: the backend has no release key) and check size and digest."""
    item = _load(data, "update package")
    if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], bytes):
        raise FleetError(Reason.BAD_BODY, "update package must be [signed-manifest, payload]")
    if not isinstance(item[0], bytes):
        raise FleetError(Reason.BAD_BODY, "signed manifest must be a byte string")
    signed = parse_signed_manifest(item[0])
    payload = item[1]
    if len(payload) != signed.manifest.size or hashlib.sha256(payload).digest() != signed.manifest.digest:
        raise FleetError(Reason.HASH_MISMATCH, "payload does not match the manifest's size and digest")
    return signed, payload


# --- records -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Offer:
    tid: bytes
    signed_manifest: bytes
    chunk_size: int

    def encode(self) -> bytes:
        return cbor.dumps([self.tid, self.signed_manifest, self.chunk_size])


def decode_offer(data: bytes) -> Offer:
    item = _load(data, "update offer")
    if not isinstance(item, list) or len(item) != 3:
        raise FleetError(Reason.BAD_BODY, "update offer must be [tid, signed-manifest, chunk-size]")
    tid = _tid(item[0])
    if not isinstance(item[1], bytes) or not 1 <= len(item[1]) <= MAX_SIGNED_MANIFEST:
        raise FleetError(Reason.BAD_BODY, "signed manifest must be a byte string")
    chunk_size = _uint(item[2], "chunk size", MAX_CHUNK)
    if chunk_size == 0:
        raise FleetError(Reason.BAD_BODY, "chunk size must be at least 1")
    if transfer_id(item[1]) != tid:
        raise FleetError(Reason.BAD_BODY, "tid is not the digest of the signed manifest")
    return Offer(tid, item[1], chunk_size)


@dataclass(frozen=True, slots=True)
class UpdateChunk:
    tid: bytes
    index: int
    data: bytes

    def encode(self) -> bytes:
        return cbor.dumps([self.tid, self.index, self.data])

    def __repr__(self) -> str:
        return f"UpdateChunk(index={self.index}, {len(self.data)} bytes)"


def decode_chunk(data: bytes) -> UpdateChunk:
    item = _load(data, "update chunk")
    if not isinstance(item, list) or len(item) != 3:
        raise FleetError(Reason.BAD_BODY, "update chunk must be [tid, index, data]")
    if not isinstance(item[2], bytes) or not 1 <= len(item[2]) <= MAX_CHUNK:
        raise FleetError(Reason.BAD_BODY, f"chunk data must be 1..{MAX_CHUNK} bytes")
    return UpdateChunk(_tid(item[0]), _uint(item[1], "chunk index", MAX_PAYLOAD), item[2])


@dataclass(frozen=True, slots=True)
class Status:
    tid: bytes
    state: UpdateState
    next: int = 0  # NEED: the next chunk index wanted
    reason: str = ""  # REJECTED: a Reason value

    def encode(self) -> bytes:
        return cbor.dumps([self.tid, int(self.state), self.next, self.reason[:MAX_TEXT]])


def decode_status(data: bytes) -> Status:
    item = _load(data, "update status")
    if not isinstance(item, list) or len(item) != 4:
        raise FleetError(Reason.BAD_BODY, "update status must be [tid, state, next, reason]")
    state = _uint(item[1], "state", 2)
    reason = item[3]
    if not isinstance(reason, str) or len(reason.encode("utf-8", "surrogatepass")) > MAX_TEXT:
        raise FleetError(Reason.BAD_BODY, f"reason must be a text of at most {MAX_TEXT} bytes")
    return Status(_tid(item[0]), UpdateState(state), _uint(item[2], "next", MAX_PAYLOAD), reason)


def chunk_count(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))
