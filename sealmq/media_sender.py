"""Sans-IO sender of one media transfer (the device side).

The sender never touches files or the clock: :meth:`MediaSender.poll` is given ``now`` and says
what to send (the manifest, a chunk by index and offset, a status request); the caller reads the
chunk bytes and wraps them with :meth:`MediaSender.chunk_body`. Acks from the backend go into
:meth:`MediaSender.handle_ack`.

Flow: offer the manifest and wait for the backend's first ack (its bitmap is what resumes a
transfer after a restart of either side); then keep up to ``window`` chunks in flight, resend any
chunk not acknowledged within ``resend_after`` seconds (and ask for an ack then); done when the
backend acknowledges the transfer as complete and verified. The latest ack is authoritative: if
the backend lost chunks (a restart, an expired transfer) they are simply sent again. A rejection
for an unknown or expired transfer re-offers the manifest at once, TOO_MANY_TRANSFERS after
``resend_after``; any other rejection is final.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from enum import StrEnum

from sealmq.errors import LocalProtocolError, MediaError, Reason
from sealmq.media import (
    Ack,
    AckStatus,
    Bitmap,
    Control,
    ControlOp,
    Manifest,
    encode_chunk,
    parse_signed_manifest,
)

# 64 chunks of 63 KiB (4 MiB) in flight; the backend acks every 32 (DEFAULT_ACK_EVERY), so the
# next half window is already on its way while the backend syncs and acks the previous one.
DEFAULT_WINDOW = 64
DEFAULT_RESEND_AFTER = 5.0

# The backend forgot the transfer (expired or lost): offer the manifest again at once.
_REOFFER_NOW = frozenset({Reason.UNKNOWN_TRANSFER, Reason.TRANSFER_EXPIRED})
# The backend is busy with this device's other transfers: offer again after resend_after.
_REOFFER_LATER = frozenset({Reason.TOO_MANY_TRANSFERS})


class SenderState(StrEnum):
    OFFERING = "offering"  # manifest sent, waiting for the first ack
    SENDING = "sending"
    DONE = "done"  # backend acknowledged complete + verified
    REJECTED = "rejected"
    ABORTED = "aborted"


@dataclass(frozen=True)
class SendManifest:
    body: bytes


@dataclass(frozen=True)
class SendChunk:
    """Read ``length`` bytes at ``offset`` and send ``sender.chunk_body(index, data)``."""

    index: int
    offset: int
    length: int


@dataclass(frozen=True)
class SendControl:
    body: bytes


SendAction = SendManifest | SendChunk | SendControl


@dataclass(frozen=True)
class Progress:
    acked_chunks: int
    total_chunks: int
    acked_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class Completed:
    transfer_id: bytes


@dataclass(frozen=True)
class Rejected:
    transfer_id: bytes
    reason: Reason


SenderEvent = Progress | Completed | Rejected


class MediaSender:
    def __init__(
        self, signed_manifest: bytes, *, acked: bytes | None = None, window: int = DEFAULT_WINDOW,
        resend_after: float = DEFAULT_RESEND_AFTER,
    ) -> None:
        if window < 1 or resend_after <= 0:
            raise LocalProtocolError(Reason.CONFIG_INVALID, "window >= 1 and resend_after > 0 required")
        self.signed_manifest = signed_manifest
        self.manifest: Manifest = parse_signed_manifest(signed_manifest).manifest
        self.transfer_id = self.manifest.transfer_id
        self.window = window
        self.resend_after = resend_after
        self.state = SenderState.OFFERING
        # Persisted acks only seed progress reporting: the backend's next ack is authoritative.
        self.acked = Bitmap(self.manifest.chunk_count, acked)
        self.reason: Reason | None = None
        self._manifest_sent_at: float | None = None
        self._in_flight: dict[int, float] = {}
        self._retry: list[int] = []
        self._retry_set: set[int] = set()
        self._cursor = 0  # chunks at or above it were never sent by this object
        self._status_sent_at: float | None = None

    # --- output -----------------------------------------------------------------------------
    def poll(self, now: float) -> list[SendAction]:
        """What to send now. Call after every ack and when :meth:`next_deadline` passes."""
        if self.state is SenderState.OFFERING:
            if self._manifest_sent_at is None or now >= self._manifest_sent_at + self.resend_after:
                self._manifest_sent_at = now
                return [SendManifest(self.signed_manifest)]
            return []
        if self.state is not SenderState.SENDING:
            return []
        actions: list[SendAction] = []
        timed_out = [i for i, t in self._in_flight.items() if now >= t + self.resend_after]
        for i in timed_out:
            del self._in_flight[i]
            self._push_retry(i)
        sent = 0
        while len(self._in_flight) < self.window:
            index = self._next_to_send()
            if index is None:
                break
            offset, length = self.manifest.chunk_range(index)
            self._in_flight[index] = now
            actions.append(SendChunk(index, offset, length))
            sent += 1
        # Ask for an ack when chunks went unanswered (the ack may be what was lost), when this
        # poll filled the window (acknowledgement by window: the backend acks what it has synced,
        # whatever its own ack interval, so a window smaller than that never waits for a
        # timeout), or when everything is acked but the backend has not yet said "complete".
        quiet = not self._in_flight and self.acked.complete()
        window_full = sent > 0 and len(self._in_flight) >= self.window
        if timed_out or window_full or (quiet and (self._status_sent_at is None
                                                   or now >= self._status_sent_at + self.resend_after)):
            self._status_sent_at = now
            actions.append(SendControl(Control(ControlOp.STATUS, self.transfer_id).encode()))
        return actions

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has something to do without new input, if ever."""
        if self.state is SenderState.OFFERING:
            return None if self._manifest_sent_at is None else self._manifest_sent_at + self.resend_after
        if self.state is not SenderState.SENDING:
            return None
        if self._in_flight:
            return min(self._in_flight.values()) + self.resend_after
        if self._status_sent_at is not None:
            return self._status_sent_at + self.resend_after
        return None

    def chunk_body(self, index: int, data: bytes) -> bytes:
        _, length = self.manifest.chunk_range(index)
        if len(data) != length:
            raise LocalProtocolError(Reason.MALFORMED, f"chunk {index} must be {length} bytes")
        return encode_chunk(self.transfer_id, index, data)

    def abort(self) -> bytes:
        """Give up; returns the control body that tells the backend to drop its partial data."""
        self.state = SenderState.ABORTED
        self._in_flight.clear()
        return Control(ControlOp.ABORT, self.transfer_id).encode()

    # --- input ------------------------------------------------------------------------------
    def handle_ack(self, ack: Ack, now: float) -> list[SenderEvent]:
        if ack.transfer_id != self.transfer_id:
            raise MediaError(Reason.UNKNOWN_TRANSFER, "ack for another transfer")
        if self.state in (SenderState.DONE, SenderState.REJECTED, SenderState.ABORTED):
            return []
        if ack.status is AckStatus.REJECTED:
            reason = ack.reason or Reason.PEER_ERROR
            if reason in _REOFFER_NOW or reason in _REOFFER_LATER:
                self._reset_to_offer(now if reason in _REOFFER_LATER else None)
                return []
            self.state = SenderState.REJECTED
            self.reason = reason
            self._in_flight.clear()
            return [Rejected(self.transfer_id, reason)]
        if ack.status is AckStatus.COMPLETE:
            self.acked = Bitmap.from_ack(self.manifest.chunk_count, self.manifest.chunk_count, b"")
            self.state = SenderState.DONE
            self._in_flight.clear()
            return [self.progress(), Completed(self.transfer_id)]
        self.acked = Bitmap.from_ack(self.manifest.chunk_count, ack.base, ack.bits)
        if self.state is SenderState.OFFERING:
            self.state = SenderState.SENDING
        for i in [i for i in self._in_flight if i in self.acked]:
            del self._in_flight[i]
        # Chunks sent earlier that the backend still lacks and that are not in flight: resend.
        for i in self.acked.missing(ack.base, self._cursor):
            if i not in self._in_flight:
                self._push_retry(i)
        return [self.progress()]

    def progress(self) -> Progress:
        m = self.manifest
        acked_bytes = self.acked.count * m.chunk_size
        if m.chunk_count and (m.chunk_count - 1) in self.acked:
            acked_bytes -= m.chunk_count * m.chunk_size - m.size
        return Progress(self.acked.count, m.chunk_count, acked_bytes, m.size)

    # --- internals --------------------------------------------------------------------------
    def _reset_to_offer(self, wait_from: float | None) -> None:
        self.state = SenderState.OFFERING
        self._manifest_sent_at = wait_from
        self._in_flight.clear()
        self._retry.clear()
        self._retry_set.clear()
        self._cursor = 0
        self._status_sent_at = None

    def _push_retry(self, index: int) -> None:
        if index not in self._retry_set:
            self._retry_set.add(index)
            heapq.heappush(self._retry, index)

    def _next_to_send(self) -> int | None:
        while self._retry:
            i = heapq.heappop(self._retry)
            self._retry_set.discard(i)
            if i not in self.acked and i not in self._in_flight:
                return i
        while self._cursor < self.manifest.chunk_count:
            i = self._cursor
            self._cursor += 1
            if i not in self.acked and i not in self._in_flight:
                return i
        return None
