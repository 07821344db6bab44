"""Sans-IO receiver of media transfers (the backend side).

:class:`MediaReceiver` is one transfer: it accepts a verified manifest within :class:`MediaLimits`,
checks every chunk (right transfer, index in range, exact length), tells the caller whether the
chunk is new (write it) or a harmless duplicate, and produces acks every ``ack_every`` new
chunks and on request; the final ack comes from :meth:`MediaReceiver.finish`. It never writes:
the caller writes a new chunk and only then calls :meth:`MediaReceiver.commit`, so an ack never
claims a chunk that is not on disk.

:class:`TransferTable` holds the open receivers, bounds them per device and expires idle ones.
Hash and signature checks of the finished file belong to the caller (``backend/media.py``), which
reports the outcome with :meth:`MediaReceiver.finish`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sealmq.errors import LocalProtocolError, MediaError, Reason
from sealmq.media import (
    MAX_CHUNK_SIZE,
    Ack,
    AckStatus,
    Bitmap,
    Chunk,
    Manifest,
    PublicKey,
    verify_manifest,
)

DEFAULT_MAX_SIZE = 1 << 30  # 1 GiB
DEFAULT_MAX_TRANSFERS = 4
DEFAULT_IDLE_TIMEOUT = 600.0
# One ack, hence one data sync, per 32 new chunks (about 2 MiB at the default chunk size): half
# the sender's default window, so the sender never waits for an ack with nothing in flight. A
# sender with a smaller window asks for an ack when its window is full (MediaSender.poll).
DEFAULT_ACK_EVERY = 32


@dataclass(frozen=True)
class MediaLimits:
    max_size: int = DEFAULT_MAX_SIZE
    max_chunk_size: int = MAX_CHUNK_SIZE
    max_transfers_per_device: int = DEFAULT_MAX_TRANSFERS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    ack_every: int = DEFAULT_ACK_EVERY


class ReceiverState(StrEnum):
    RECEIVING = "receiving"
    VERIFYING = "verifying"  # all chunks in; the caller checks hash and signature
    COMPLETE = "complete"
    REJECTED = "rejected"


class ChunkVerdict(StrEnum):
    NEW = "new"  # write it, then commit()
    DUPLICATE = "duplicate"  # already have it: ignore


def accept_manifest(
    signed_manifest: bytes, *, device_id: str, public_key: PublicKey, limits: MediaLimits,
) -> Manifest:
    """Verify the device's signature and the receiver's limits; the device id must be the
    authenticated one (a valid manifest of device A replayed by device B is refused)."""
    manifest = verify_manifest(signed_manifest, public_key)
    if manifest.device_id != device_id:
        raise MediaError(Reason.IDENTITY_MISMATCH, "manifest names another device")
    check_limits(manifest, limits)
    return manifest


def check_limits(manifest: Manifest, limits: MediaLimits) -> None:
    if manifest.size > limits.max_size:
        raise MediaError(Reason.TOO_LARGE, f"file of {manifest.size} bytes over the {limits.max_size} limit")
    if manifest.chunk_size > limits.max_chunk_size:
        raise MediaError(Reason.TOO_LARGE, "chunk size over the limit")


class MediaReceiver:
    def __init__(
        self, manifest: Manifest, signed_manifest: bytes, *, limits: MediaLimits,
        received: bytes | None = None, now: float | None = None,
    ) -> None:
        """``manifest`` must come from :func:`accept_manifest` (or from our own persisted state)."""
        check_limits(manifest, limits)
        self.manifest = manifest
        self.signed_manifest = signed_manifest
        self.transfer_id = manifest.transfer_id
        self.limits = limits
        self.received = Bitmap(manifest.chunk_count, received)
        self.state = ReceiverState.VERIFYING if self.received.complete() else ReceiverState.RECEIVING
        self.reason: Reason | None = None
        # None after a restart: the idle clock starts at the first expiry sweep.
        self.last_activity: float | None = now
        self._since_ack = 0

    def check_chunk(self, chunk: Chunk, now: float) -> ChunkVerdict:
        if chunk.transfer_id != self.transfer_id:
            raise MediaError(Reason.UNKNOWN_TRANSFER, "chunk of another transfer")
        _, length = self.manifest.chunk_range(chunk.index)  # CHUNK_OUT_OF_RANGE
        if len(chunk.data) != length:
            raise MediaError(Reason.MALFORMED, f"chunk {chunk.index} must be {length} bytes")
        self.last_activity = now
        if self.state in (ReceiverState.COMPLETE, ReceiverState.REJECTED):
            raise MediaError(Reason.UNKNOWN_TRANSFER, "transfer already finished")
        return ChunkVerdict.DUPLICATE if chunk.index in self.received else ChunkVerdict.NEW

    def commit(self, index: int, now: float) -> Ack | None:
        """Record that chunk ``index`` is written. Returns an ack when one is due; when the
        last chunk is in, the state becomes VERIFYING and the caller must call finish()."""
        if self.state is not ReceiverState.RECEIVING:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, "commit outside RECEIVING")
        self.manifest.chunk_range(index)
        self.last_activity = now
        if not self.received.add(index):
            return None
        self._since_ack += 1
        if self.received.complete():
            self.state = ReceiverState.VERIFYING
            return None  # the caller verifies, then finish() gives the final ack
        if self._since_ack >= self.limits.ack_every:
            return self.ack()
        return None

    def ack(self) -> Ack:
        self._since_ack = 0
        if self.state is ReceiverState.COMPLETE:
            return Ack(self.transfer_id, AckStatus.COMPLETE, 0, b"")
        if self.state is ReceiverState.REJECTED:
            return Ack(self.transfer_id, AckStatus.REJECTED, 0, b"", self.reason)
        base, bits = self.received.ack_view()
        return Ack(self.transfer_id, AckStatus.IN_PROGRESS, base, bits)

    def finish(self, reason: Reason | None) -> Ack:
        """Outcome of the caller's hash and signature checks (None = verified and stored)."""
        if self.state is not ReceiverState.VERIFYING:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, "finish before all chunks are in")
        self.state = ReceiverState.COMPLETE if reason is None else ReceiverState.REJECTED
        self.reason = reason
        return self.ack()

    def idle(self, now: float) -> bool:
        if self.last_activity is None:
            self.last_activity = now
        return now >= self.last_activity + self.limits.idle_timeout


class TransferTable:
    """Open transfers keyed by (device id, transfer id), at most ``max_transfers_per_device`` each."""

    def __init__(self, limits: MediaLimits) -> None:
        self.limits = limits
        self._open: dict[tuple[str, bytes], MediaReceiver] = {}

    def get(self, device_id: str, tid: bytes) -> MediaReceiver:
        try:
            return self._open[(device_id, tid)]
        except KeyError:
            raise MediaError(Reason.UNKNOWN_TRANSFER, "no open transfer with this id") from None

    def find(self, device_id: str, tid: bytes) -> MediaReceiver | None:
        return self._open.get((device_id, tid))

    def count(self, device_id: str) -> int:
        return sum(1 for dev, _ in self._open if dev == device_id)

    def add(self, device_id: str, receiver: MediaReceiver, *, enforce_limit: bool = True) -> None:
        key = (device_id, receiver.transfer_id)
        if key in self._open:
            raise LocalProtocolError(Reason.ALREADY_EXISTS, "transfer already open")
        if enforce_limit and self.count(device_id) >= self.limits.max_transfers_per_device:
            raise MediaError(Reason.TOO_MANY_TRANSFERS, "too many open transfers for this device")
        self._open[key] = receiver

    def remove(self, device_id: str, tid: bytes) -> MediaReceiver | None:
        return self._open.pop((device_id, tid), None)

    def expire(self, now: float) -> list[tuple[str, MediaReceiver]]:
        """Remove and return the transfers idle for longer than the limit."""
        gone = [(dev, r) for (dev, _), r in self._open.items() if r.idle(now)]
        for dev, r in gone:
            del self._open[(dev, r.transfer_id)]
        return gone

    def items(self) -> list[tuple[str, MediaReceiver]]:
        return [(dev, r) for (dev, _), r in self._open.items()]
