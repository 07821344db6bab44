"""Device media outbox: files waiting to be sent, their signed manifests and how far each got.

``Outbox(state_dir, device_id, private_key)``; ``add(path)`` hashes the file (streaming), signs
its manifest and persists ``<state_dir>/<tid>.out`` = CBOR {1: file path, 2: signed manifest,
3: acked bitmap}, so a device restart resumes every unfinished transfer. ``stream(now)`` yields
the (record kind, plaintext) pairs to seal and publish (``poll(now)``: the same as a list); chunks
are read from disk one at a time as they are asked for, so memory stays flat whatever the file
size, and the first chunk of a window goes out before the rest are read. ``handle(kind, body,
now)`` takes acks from the backend. The protocol itself is :class:`sealmq.media_sender.MediaSender`.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath

from runtime.files import atomic_write, private_dir
from sealmq import cbor
from sealmq.errors import LocalProtocolError, MediaError, Reason, SealmqError
from sealmq.media import (
    DEFAULT_CHUNK_SIZE,
    ControlOp,
    Manifest,
    PrivateKey,
    decode_ack,
    decode_control,
    sign_manifest,
)
from sealmq.media_sender import (
    DEFAULT_RESEND_AFTER,
    DEFAULT_WINDOW,
    Completed,
    MediaSender,
    Rejected,
    SendChunk,
    SendControl,
    SenderEvent,
    SenderState,
    SendManifest,
)
from sealmq.topics import RecordKind

_READ_BLOCK = 1 << 20
# The acknowledged bitmap in the outbox state only seeds progress after a restart (the backend's
# next ack is authoritative), so it is written every few acks or seconds, not at every ack: each
# write is a durable atomic replace (two syncs) that would hold the sending thread up.
PERSIST_EVERY_ACKS = 16
PERSIST_EVERY_SECONDS = 2.0


@dataclass(frozen=True)
class TransferProgress:
    """What a progress bar needs."""

    transfer_id: bytes
    name: str
    state: SenderState  # a StrEnum: compares equal to its value ("done", ...)
    acked_bytes: int
    total_bytes: int
    reason: Reason | None = None


ProgressHook = Callable[[TransferProgress], None]


@dataclass
class OutgoingTransfer:
    path: Path
    sender: MediaSender
    acks_unsaved: int = 0  # acks since the state was last written
    saved_at: float | None = None  # when the first of them came (None: none since the last write)

    @property
    def transfer_id(self) -> bytes:
        return self.sender.transfer_id

    @property
    def manifest(self) -> Manifest:
        return self.sender.manifest


# Content types of what cameras and sensors send, by suffix, so that a file's type does not
# depend on the host: the first mimetypes lookup in a process reads the system's tables
# (/etc/mime.types and others: 2-4 ms, measured on every first transfer: docs/benchmarks.md,
# issue #11, stop 32), and they differ between hosts (Debian's maps .ts to a Qt translation
# file). Other suffixes still ask mimetypes. ".mjpeg" has no registered type.
MEDIA_TYPES: dict[str, str] = {
    ".png": "image/png", ".apng": "image/apng", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
    ".gif": "image/gif", ".webp": "image/webp", ".avif": "image/avif", ".heic": "image/heic",
    ".heif": "image/heif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
    ".mp4": "video/mp4", ".m4v": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime",
    ".mkv": "video/x-matroska", ".avi": "video/x-msvideo", ".ts": "video/mp2t",
    ".mjpeg": "application/octet-stream",
    ".json": "application/json", ".csv": "text/csv", ".txt": "text/plain", ".bin": "application/octet-stream",
}


def content_type_of(name: str) -> str:
    """The content type a manifest gives a file called ``name`` when the caller names none."""
    known = MEDIA_TYPES.get(PurePath(name).suffix.lower())
    if known is not None:
        return known
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def file_sha256(path: Path) -> tuple[bytes, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
            size += len(block)
    return h.digest(), size


class Outbox:
    def __init__(
        self, state_dir: str | os.PathLike[str], device_id: str, private_key: PrivateKey, *,
        chunk_size: int = DEFAULT_CHUNK_SIZE, window: int = DEFAULT_WINDOW,
        resend_after: float = DEFAULT_RESEND_AFTER, on_progress: ProgressHook | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        private_dir(self.state_dir)
        self.device_id = device_id
        self.private_key = private_key
        self.chunk_size = chunk_size
        self.window = window
        self.resend_after = resend_after
        self.on_progress = on_progress
        self._transfers: dict[bytes, OutgoingTransfer] = {}
        self._load()

    @property
    def transfers(self) -> list[OutgoingTransfer]:
        return list(self._transfers.values())

    def add(self, path: str | os.PathLike[str], content_type: str | None = None, *,
            created: int | None = None) -> OutgoingTransfer:
        """Queue a file. The same file added twice is one transfer (the id is deterministic)."""
        p = Path(path).resolve()
        digest, size = file_sha256(p)
        manifest = Manifest.create(
            device_id=self.device_id, name=p.name,
            content_type=content_type or content_type_of(p.name),
            size=size, sha256=digest,
            created=int(p.stat().st_mtime) if created is None else created, chunk_size=self.chunk_size,
        )
        existing = self._transfers.get(manifest.transfer_id)
        if existing is not None:
            return existing
        t = OutgoingTransfer(p, self._sender(sign_manifest(self.private_key, manifest), None))
        self._transfers[t.transfer_id] = t
        self._persist(t)
        return t

    def poll(self, now: float) -> list[tuple[RecordKind, bytes]]:
        """Record plaintexts to seal and publish now (manifests, chunks, status requests)."""
        return list(self.stream(now))

    def stream(self, now: float) -> Iterator[tuple[RecordKind, bytes]]:
        """:meth:`poll`, one record at a time: each chunk is read from the file as it is asked
        for, so the caller can seal and publish the first while the rest are still on disk (the
        device agent does: its first chunk goes out without waiting for a whole window to be read).
        Consume it to the end, and before the next call."""
        for t in list(self._transfers.values()):
            try:
                yield from self._poll_one(t, now)
            except OSError:
                # The file vanished or shrank since add(): the signed hash can never match.
                yield RecordKind.MEDIA_CONTROL, t.sender.abort()
                self._finish(t, Reason.NOT_FOUND)

    def next_deadline(self) -> float | None:
        deadlines = [d for t in self._transfers.values() if (d := t.sender.next_deadline()) is not None]
        return min(deadlines, default=None)

    def handle(self, kind: RecordKind, body: bytes, now: float) -> list[SenderEvent]:
        """A decrypted record from the backend's media/down topic."""
        if kind is RecordKind.MEDIA_CONTROL:
            control = decode_control(body)
            t = self._transfers.get(control.transfer_id)
            if t is None:
                return []
            if control.op is ControlOp.ABORT:
                t.sender.abort()
                self._finish(t, Reason.PEER_ERROR)
                return [Rejected(t.transfer_id, Reason.PEER_ERROR)]
            return []
        if kind is not RecordKind.MEDIA_ACK:
            raise MediaError(Reason.UNEXPECTED_MESSAGE, f"record kind {kind.name} is not for the outbox")
        ack = decode_ack(body)
        t = self._transfers.get(ack.transfer_id)
        if t is None:
            return []  # a duplicate or late ack of a transfer already finished: expected, harmless
        events = t.sender.handle_ack(ack, now)
        for ev in events:
            if isinstance(ev, Completed):
                self._finish(t, None)
            elif isinstance(ev, Rejected):
                self._finish(t, ev.reason)
        if t.transfer_id in self._transfers:
            t.acks_unsaved += 1
            if t.saved_at is None:
                t.saved_at = now
            if t.acks_unsaved >= PERSIST_EVERY_ACKS or now - t.saved_at >= PERSIST_EVERY_SECONDS:
                self._persist(t)
                t.acks_unsaved, t.saved_at = 0, None
            self._report(t)
        return events

    def abort(self, tid: bytes) -> tuple[RecordKind, bytes]:
        t = self._get(tid)
        body = t.sender.abort()
        self._finish(t, None)
        return RecordKind.MEDIA_CONTROL, body

    # --- internals ----------------------------------------------------------------------------
    def _poll_one(self, t: OutgoingTransfer, now: float) -> Iterator[tuple[RecordKind, bytes]]:
        actions = t.sender.poll(now)
        if not actions:
            return
        with t.path.open("rb") as f:
            for action in actions:
                if isinstance(action, SendManifest):
                    yield RecordKind.MEDIA_MANIFEST, action.body
                elif isinstance(action, SendChunk):
                    f.seek(action.offset)
                    data = f.read(action.length)
                    if len(data) != action.length:
                        raise OSError("file shorter than its manifest")
                    yield RecordKind.MEDIA_CHUNK, t.sender.chunk_body(action.index, data)
                elif isinstance(action, SendControl):
                    yield RecordKind.MEDIA_CONTROL, action.body

    def _get(self, tid: bytes) -> OutgoingTransfer:
        t = self._transfers.get(tid)
        if t is None:
            raise MediaError(Reason.UNKNOWN_TRANSFER, "no such outgoing transfer")
        return t

    def _sender(self, signed: bytes, acked: bytes | None) -> MediaSender:
        return MediaSender(signed, acked=acked, window=self.window, resend_after=self.resend_after)

    def _finish(self, t: OutgoingTransfer, reason: Reason | None) -> None:
        self._transfers.pop(t.transfer_id, None)
        self._state_path(t.transfer_id).unlink(missing_ok=True)
        self._report(t, reason)

    def _report(self, t: OutgoingTransfer, reason: Reason | None = None) -> None:
        if self.on_progress is None:
            return
        p = t.sender.progress()
        state = t.sender.state
        if reason is not None and t.sender.state is not SenderState.REJECTED:
            state = SenderState.ABORTED
        self.on_progress(TransferProgress(t.transfer_id, t.manifest.name, state, p.acked_bytes,
                                          p.total_bytes, reason or t.sender.reason))

    def _state_path(self, tid: bytes) -> Path:
        return self.state_dir / f"{tid.hex()}.out"

    def _persist(self, t: OutgoingTransfer) -> None:
        state = {1: str(t.path), 2: t.sender.signed_manifest, 3: t.sender.acked.to_bytes()}
        atomic_write(self._state_path(t.transfer_id), cbor.dumps(state), mode=0o600)

    def _load(self) -> None:
        for path in sorted(self.state_dir.glob("*.out")):
            try:
                saved = cbor.as_map(cbor.loads(path.read_bytes()), "outbox state")
                sender = self._sender(
                    cbor.as_bytes(saved.get(2), "signed manifest"), cbor.as_bytes(saved.get(3), "acked"),
                )
                if sender.manifest.device_id != self.device_id or path.stem != sender.transfer_id.hex():
                    raise LocalProtocolError(Reason.IDENTITY_MISMATCH, "outbox state of another device")
                t = OutgoingTransfer(Path(cbor.as_text(saved.get(1), "path")), sender)
            except SealmqError:
                path.unlink(missing_ok=True)  # unreadable: the file can be added again
                continue
            self._transfers[t.transfer_id] = t
