"""Backend media store: receives sealed-record plaintexts of media transfers and puts files on disk.

Layout under ``data_dir`` (directories 0700, files 0600)::

    incoming/<device>/<tid>.part    chunks written at their offset as they arrive (sparse file)
    incoming/<device>/<tid>.state   CBOR {1: signed manifest}, written once     } what a restart resumes
    incoming/<device>/<tid>.bits    received bitmap, updated in place block-wise } (backend.transfer_state)
    media/<device>/<safe-name>      verified files only (hash and device signature checked)
    quarantine/<device>/<tid>.part  files whose hash or signature failed; never listed as received;
                                    kept for ``quarantine_ttl`` seconds, at most ``quarantine_keep``
                                    per device (the newest)

Only verified files get a row in the table ``media`` of the backend's database, written and read
through the backend's store (:class:`backend.store.BackendStore`), which owns it. Memory stays flat:
chunks go straight to disk, the SHA-256 is computed over the contiguous prefix as it grows, reading
back from disk the chunks that arrived out of order. The protocol decisions are in
:mod:`sealmq.media_receiver`; this module does the I/O.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from backend.quotas import QuotaGuard
from backend.storage import MediaRecord, Storage
from backend.store import BackendStore
from backend.transfer_state import BitmapFile, open_state, read_state
from runtime.files import private_dir
from sealmq.errors import DecodeError, MediaError, Reason, SealmqError
from sealmq.media import (
    Ack,
    AckStatus,
    ControlOp,
    Manifest,
    PublicKey,
    decode_chunk,
    decode_control,
    parse_signed_manifest,
    rejected_ack,
    verify_manifest,
)
from sealmq.media_receiver import (
    ChunkVerdict,
    MediaLimits,
    MediaReceiver,
    ReceiverState,
    TransferTable,
    accept_manifest,
)
from sealmq.topics import RecordKind, valid_device_id


@dataclass(frozen=True)
class Reply:
    """A body to seal and publish to the device on its media/down topic."""

    kind: RecordKind
    body: bytes


@dataclass(frozen=True)
class Received:
    record: MediaRecord


StoreOutput = Reply | Received


class MediaRejected(MediaError):
    """A MediaError that ends a transfer (or refuses to start one); send ``reply`` to the device
    so that it stops, or re-offers the manifest when the reason is UNKNOWN_TRANSFER."""

    def __init__(self, reason: Reason, detail: str, reply: Reply) -> None:
        super().__init__(reason, detail)
        self.reply = reply


def _reply(ack: Ack) -> Reply:
    return Reply(RecordKind.MEDIA_ACK, ack.encode())


def _rejection(tid: bytes, err: SealmqError) -> MediaRejected:
    return MediaRejected(err.reason, err.detail, _reply(rejected_ack(tid, err.reason)))


DEFAULT_QUARANTINE_TTL = 7 * 86400.0  # seconds a failed file is kept for inspection
DEFAULT_QUARANTINE_KEEP = 8  # failed files kept per device (the newest)
_SWEEP_INTERVAL = 3600.0  # how often expire() looks for quarantined files past their time
_MAX_NAME_ATTEMPTS = 1000  # names tried for one verified file before giving up
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_OPEN_PARTS = 32  # .part files kept open, the most recently used (a transfer's chunks reuse one)


def safe_name(name: str) -> str:
    """A file name that cannot escape its directory or hide itself."""
    base = re.split(r"[/\\]", name)[-1]
    cleaned = _UNSAFE.sub("_", base).lstrip(".")[:120]
    return cleaned or "file"


@dataclass
class _Hashing:
    hasher: hashlib._Hash
    upto: int = 0  # chunks [0, upto) are hashed


def _close_all(fds: OrderedDict[tuple[str, bytes], int]) -> None:
    while fds:
        os.close(fds.popitem()[1])


class MediaStore:
    def __init__(
        self, data_dir: str | os.PathLike[str], storage: BackendStore, *,
        limits: MediaLimits | None = None, durable: bool = True, quota: QuotaGuard | None = None,
        quarantine_ttl: float = DEFAULT_QUARANTINE_TTL, quarantine_keep: int = DEFAULT_QUARANTINE_KEEP,
    ) -> None:
        self.root = Path(data_dir)
        self.storage = storage
        self.quota = quota  # per-device stored bytes: checked when a transfer opens
        self.quarantine_ttl = quarantine_ttl
        self.quarantine_keep = quarantine_keep
        self._next_sweep = float("-inf")
        self.limits = limits or MediaLimits()
        self.durable = durable  # fsync data before an ack claims it (off only in tests)
        private_dir(self.root)
        for sub in ("incoming", "media", "quarantine"):
            private_dir(self.root / sub)
        self.table = TransferTable(self.limits)
        self._hashing: dict[tuple[str, bytes], _Hashing] = {}
        self._bitmaps: dict[tuple[str, bytes], BitmapFile] = {}
        # (device, transfer id) -> an open descriptor of its .part file: every chunk is written,
        # hashed and synced through it instead of opening and closing the file each time. Closed
        # when the transfer ends (completed, failed, expired or cancelled), by close(), and beyond
        # _OPEN_PARTS (the least recently used; it is opened again if its transfer goes on).
        self._fds: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        self._closer = weakref.finalize(self, _close_all, self._fds)  # a store dropped unclosed
        self._load()

    def close(self) -> None:
        """Close the .part files held open (the transfers stay resumable: their state is on disk)."""
        _close_all(self._fds)

    # --- entry points -------------------------------------------------------------------------
    def handle(
        self, device_id: str, public_key: PublicKey, kind: RecordKind, body: bytes, now: float,
    ) -> list[StoreOutput]:
        """One opened media record from an authenticated device. ``public_key`` is the device's
        key from its authenticated session. Raises MediaError/DecodeError for bad input
        (MediaRejected carries the reply to send); other transfers are never affected."""
        if not valid_device_id(device_id):
            raise MediaError(Reason.WRONG_TYPE, "bad device id")
        if kind is RecordKind.MEDIA_MANIFEST:
            return self._on_manifest(device_id, public_key, body, now)
        if kind is RecordKind.MEDIA_CHUNK:
            return self._on_chunk(device_id, public_key, body, now)
        if kind is RecordKind.MEDIA_CONTROL:
            return self._on_control(device_id, public_key, body, now)
        raise MediaError(Reason.UNEXPECTED_MESSAGE, f"record kind {kind.name} is not for the media store")

    def expire(self, now: float) -> list[tuple[str, bytes]]:
        """Drop transfers idle past the limit and their partial files; returns (device, tid) pairs."""
        gone = self.table.expire(now)
        for device_id, r in gone:
            self._discard(device_id, r.transfer_id)
        if now >= self._next_sweep:
            self._next_sweep = now + min(_SWEEP_INTERVAL, self.quarantine_ttl)
            self._sweep_quarantine(now)
        return [(d, r.transfer_id) for d, r in gone]

    def _sweep_quarantine(self, now: float) -> None:
        """Delete quarantined files older than ``quarantine_ttl`` (their mtime is when they failed)."""
        for qdir in (self.root / "quarantine").iterdir():
            for path in qdir.glob("*.part"):
                with contextlib.suppress(OSError):
                    if now - path.stat().st_mtime >= self.quarantine_ttl:
                        path.unlink()
            with contextlib.suppress(OSError):
                qdir.rmdir()  # only if empty

    def _quarantine(self, device_id: str, part: Path, now: float) -> None:
        """Keep a failed file for inspection, within the device's share of the quarantine."""
        qdir = self.root / "quarantine" / device_id
        private_dir(qdir)
        dest = qdir / part.name
        os.replace(part, dest)
        os.utime(dest, (now, now))
        others = sorted((p for p in qdir.glob("*.part") if p != dest), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in [dest, *others][self.quarantine_keep:]:
            old.unlink(missing_ok=True)

    def open_transfers(self) -> list[tuple[str, Manifest, int]]:
        """(device, manifest, chunks received) of every transfer in progress."""
        return [(d, r.manifest, r.received.count) for d, r in self.table.items()]

    # --- messages -----------------------------------------------------------------------------
    def _on_manifest(self, device_id: str, pk: PublicKey, body: bytes, now: float) -> list[StoreOutput]:
        tid = parse_signed_manifest(body).manifest.transfer_id
        try:
            manifest = accept_manifest(body, device_id=device_id, public_key=pk, limits=self.limits)
        except MediaError as err:
            raise _rejection(tid, err) from None
        if self._finished(device_id, tid):
            return [self._complete_reply(manifest)]
        r = self.table.find(device_id, tid)
        if r is not None:
            if r.manifest.chunk_size != manifest.chunk_size:
                clash = MediaError(Reason.ALREADY_EXISTS, "transfer open with another chunk size")
                raise _rejection(tid, clash)
            r.last_activity = now
            if r.state is ReceiverState.VERIFYING:
                return self._finalize(device_id, pk, r, now)
            return [self._ack(device_id, r)]
        self._check_quota(device_id, manifest)
        r = MediaReceiver(manifest, body, limits=self.limits, now=now)
        try:
            self.table.add(device_id, r)
        except MediaError as err:
            raise _rejection(tid, err) from None
        part = self._part(device_id, tid)
        private_dir(part.parent)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, manifest.size)  # sparse: no space used until chunks land
        finally:
            os.close(fd)
        if r.state is ReceiverState.VERIFYING:  # an empty file has nothing to wait for
            return self._finalize(device_id, pk, r, now)
        return [self._ack(device_id, r)]

    def _check_quota(self, device_id: str, manifest: Manifest) -> None:
        """Refuse a new transfer that, with the device's open ones, would pass its stored-bytes quota."""
        if self.quota is None:
            return
        opening = manifest.size + sum(r.manifest.size for d, r in self.table.items() if d == device_id)
        if not self.quota.fits(device_id, opening):
            raise _rejection(manifest.transfer_id, MediaError(Reason.QUOTA_EXCEEDED, "storage quota used up"))

    def _on_chunk(self, device_id: str, pk: PublicKey, body: bytes, now: float) -> list[StoreOutput]:
        chunk = decode_chunk(body)
        r = self.table.find(device_id, chunk.transfer_id)
        if r is None:
            return [self._unknown(device_id, chunk.transfer_id)]
        verdict = r.check_chunk(chunk, now)
        if verdict is ChunkVerdict.DUPLICATE:
            return []
        offset, _ = r.manifest.chunk_range(chunk.index)
        os.pwrite(self._part_fd(device_id, r.transfer_id), chunk.data, offset)
        ack = r.commit(chunk.index, now)
        self._advance_hash(device_id, r, chunk.index, chunk.data)
        if r.state is ReceiverState.VERIFYING:
            return self._finalize(device_id, pk, r, now)
        if ack is not None:
            self._persist(device_id, r)
            return [_reply(ack)]
        return []

    def _on_control(self, device_id: str, pk: PublicKey, body: bytes, now: float) -> list[StoreOutput]:
        control = decode_control(body)
        tid = control.transfer_id
        r = self.table.find(device_id, tid)
        if control.op is ControlOp.ABORT:
            if r is not None:
                self.table.remove(device_id, tid)
                self._discard(device_id, tid)
            return []
        if r is None:
            return [self._unknown(device_id, tid)]
        r.last_activity = now
        if r.state is ReceiverState.VERIFYING:
            return self._finalize(device_id, pk, r, now)
        return [self._ack(device_id, r)]

    def _unknown(self, device_id: str, tid: bytes) -> Reply:
        """A chunk or status request for a transfer we do not hold: finished, or unknown."""
        if self._finished(device_id, tid):
            return _reply(Ack(tid, AckStatus.COMPLETE, 0, b""))
        raise _rejection(tid, MediaError(Reason.UNKNOWN_TRANSFER, "no open transfer with this id"))

    # --- completion ---------------------------------------------------------------------------
    def _finalize(self, device_id: str, pk: PublicKey, r: MediaReceiver, now: float) -> list[StoreOutput]:
        m = r.manifest
        tid = r.transfer_id
        part = self._part(device_id, tid)
        self._advance_hash(device_id, r, None, b"")
        h = self._hashing.pop((device_id, tid))
        failure: Reason | None = None
        if h.upto != m.chunk_count or not hmac.compare_digest(h.hasher.digest(), m.sha256):
            failure = Reason.HASH_MISMATCH
        else:
            try:  # again, at the end: the signed bytes persisted on disk are what we vouch for
                verified = verify_manifest(r.signed_manifest, pk)
                if verified.device_id != device_id or verified != m:
                    failure = Reason.BAD_SIGNATURE
            except SealmqError:
                failure = Reason.BAD_SIGNATURE
        self.table.remove(device_id, tid)
        if failure is not None:
            self._quarantine(device_id, part, now)
            self._forget_state(device_id, tid)
            raise MediaRejected(failure, "transfer failed verification", _reply(r.finish(failure)))
        if self.durable:
            os.fsync(self._part_fd(device_id, tid))
        self._close_part(device_id, tid)  # here, not only in _forget_state: add_media may raise
        dest = self._reserve_destination(device_id, m)
        os.replace(part, dest)  # over the empty placeholder we created, never over another file
        record = MediaRecord(
            device_id, m.name, str(dest.relative_to(self.root)), m.content_type, m.size, m.sha256.hex(),
            True, m.created, now, tid.hex(),
        )
        try:
            self.storage.add_media(record)
        except BaseException:
            dest.unlink(missing_ok=True)  # no file without its row
            raise
        if self.quota is not None:
            self.quota.add(device_id, m.size)
        self._forget_state(device_id, tid)
        return [_reply(r.finish(None)), Received(record)]

    def _reserve_destination(self, device_id: str, m: Manifest) -> Path:
        """Create (O_EXCL, 0600) the first free name for a verified file and return it.

        Candidates: the device's name, then ``<stem>-<tid>.<ext>``, then ``<stem>-<tid>-<n>.<ext>``.
        The transfer id is predictable, so a device could have used that name for an earlier file:
        creating the name exclusively is what guarantees that a verified file is never replaced.
        """
        ddir = self.root / "media" / device_id
        private_dir(ddir)
        name = safe_name(m.name)
        stem, dot, ext = name.rpartition(".")
        if not dot or not stem:
            stem, ext = name, ""
        suffix = f".{ext}" if ext else ""
        for attempt in range(_MAX_NAME_ATTEMPTS):
            if attempt == 0:
                candidate = name
            else:
                candidate = f"{stem}-{m.transfer_id.hex()}{'' if attempt == 1 else f'-{attempt - 1}'}{suffix}"
            dest = ddir / candidate
            try:
                os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                continue
            return dest
        raise MediaError(Reason.ALREADY_EXISTS, "no free file name for this transfer")

    def _complete_reply(self, m: Manifest) -> Reply:
        return _reply(Ack(m.transfer_id, AckStatus.COMPLETE, 0, b""))

    def _finished(self, device_id: str, tid: bytes) -> bool:
        return self.storage.has_media(device_id, tid.hex())

    # --- hashing ------------------------------------------------------------------------------
    def _advance_hash(self, device_id: str, r: MediaReceiver, index: int | None, data: bytes) -> None:
        key = (device_id, r.transfer_id)
        h = self._hashing.get(key)
        if h is None:
            h = self._hashing[key] = _Hashing(hashlib.sha256())
        if h.upto >= r.manifest.chunk_count or h.upto not in r.received:
            return
        while h.upto < r.manifest.chunk_count and h.upto in r.received:
            if h.upto == index:
                h.hasher.update(data)
            else:  # arrived out of order (or before a restart): read it back
                offset, length = r.manifest.chunk_range(h.upto)
                h.hasher.update(os.pread(self._part_fd(device_id, r.transfer_id), length, offset))
            h.upto += 1

    # --- persistence --------------------------------------------------------------------------
    def _part(self, device_id: str, tid: bytes) -> Path:
        return self.root / "incoming" / device_id / f"{tid.hex()}.part"

    def _part_fd(self, device_id: str, tid: bytes) -> int:
        key = (device_id, tid)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        fd = self._fds[key] = os.open(self._part(device_id, tid), os.O_RDWR | os.O_CLOEXEC)
        while len(self._fds) > _OPEN_PARTS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _close_part(self, device_id: str, tid: bytes) -> None:
        fd = self._fds.pop((device_id, tid), None)
        if fd is not None:
            os.close(fd)

    def _state(self, device_id: str, tid: bytes) -> Path:
        return self.root / "incoming" / device_id / f"{tid.hex()}.state"

    def _bits(self, device_id: str, tid: bytes) -> Path:
        return self.root / "incoming" / device_id / f"{tid.hex()}.bits"

    def _ack(self, device_id: str, r: MediaReceiver) -> Reply:
        self._persist(device_id, r)
        return _reply(r.ack())

    def _persist(self, device_id: str, r: MediaReceiver) -> None:
        """Write what changed in the received bitmap (nothing if nothing did: a status request right
        after an ack costs no write and no sync); the data it names is synced first, so a restart
        never believes in chunks the disk does not hold. See :mod:`backend.transfer_state`."""
        key = (device_id, r.transfer_id)
        bitmap = self._bitmaps.get(key)
        if bitmap is None:
            bitmap = self._bitmaps[key] = open_state(
                self._state(device_id, r.transfer_id), self._bits(device_id, r.transfer_id),
                r.signed_manifest, bytes(len(r.received.to_bytes())))
        if bitmap.count == r.received.count:
            return  # bits only ever get set: the same count is the same bitmap
        if self.durable:  # the data (and the size set at creation); no timestamps needed
            os.fdatasync(self._part_fd(device_id, r.transfer_id))
        bitmap.update(r.received.to_bytes(), r.received.count)

    def _forget_state(self, device_id: str, tid: bytes) -> None:
        self._close_part(device_id, tid)
        self._bitmaps.pop((device_id, tid), None)
        self._state(device_id, tid).unlink(missing_ok=True)
        self._bits(device_id, tid).unlink(missing_ok=True)

    def _discard(self, device_id: str, tid: bytes) -> None:
        self._part(device_id, tid).unlink(missing_ok=True)
        self._forget_state(device_id, tid)
        self._hashing.pop((device_id, tid), None)

    def _load(self) -> None:
        for state in sorted((self.root / "incoming").glob("*/*.state")):
            device_id = state.parent.name
            bits_path = state.with_suffix(".bits")
            try:
                signed, bits, legacy = read_state(state, bits_path)
                manifest = parse_signed_manifest(signed).manifest
                if manifest.device_id != device_id or state.stem != manifest.transfer_id.hex():
                    raise DecodeError(Reason.IDENTITY_MISMATCH, "state file in the wrong place")
                if not self._part(device_id, manifest.transfer_id).exists():
                    raise MediaError(Reason.NOT_FOUND, "partial file missing")
                expected = (manifest.chunk_count + 7) // 8
                if bits is not None and len(bits) != expected:
                    bits = None  # created but never written before a crash: start from the legacy or nothing
                received = bits if bits is not None else legacy
                r = MediaReceiver(manifest, signed, limits=self.limits, received=received)
                self.table.add(device_id, r, enforce_limit=False)
                key = (device_id, manifest.transfer_id)
                if bits is not None:
                    self._bitmaps[key] = BitmapFile(bits_path, bits, r.received.count)
                else:  # the previous layout (or a crash between the two files): start the bitmap file
                    self._bitmaps[key] = open_state(state, bits_path, signed, r.received.to_bytes(),
                                                    count=r.received.count)
            except (SealmqError, OSError):
                # Unreadable state: forget it; the device's next offer starts the transfer afresh.
                state.unlink(missing_ok=True)
                bits_path.unlink(missing_ok=True)
                state.with_suffix(".part").unlink(missing_ok=True)


def list_media(db_path: str | os.PathLike[str]) -> list[MediaRecord]:
    """Every verified file received, oldest first, from the database at ``db_path``."""
    storage = Storage(Path(db_path))
    try:
        return storage.media()
    finally:
        storage.close()
