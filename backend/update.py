"""Pushing signed updates to devices: the backend forwards release-signed packages it cannot make
(docs/protocol.md section 7.3, docs/pki.md "Signed updates").

``sealmq backend push`` checks a package's structure, size and digest (not its signature: the
backend has no release key and needs none) and drops it into ``DATA/updates/outgoing/<device>.pkg``;
the running service picks it up. The transfer is a small resumable chunk protocol on the media
topics (the media machinery is device -> backend only, with the manifest signed by the sender's
own session key and acknowledgements by bitmap; an update needs the opposite direction, a
signature by a third party's key and in-order writes on the device, so a window of in-order chunks
acknowledged by "next index wanted" is simpler and enough):

- the backend sends UPDATE_OFFER when the device has a session (again after every handshake, and
  when a transfer stalls for ``resend_after`` seconds);
- the device answers UPDATE_STATUS: NEED with the next chunk index it wants (0, or where it got
  to before a restart), or REJECTED with a reason, or INSTALLED;
- on NEED the backend sends chunks from that index, at most ``window`` ahead.

The package file stays until the device reports INSTALLED or REJECTED, so a transfer survives a
restart of the backend, the device or the broker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.audit import AuditLog
from runtime.files import atomic_write
from sealmq import update
from sealmq.errors import FleetError, PkiError, Reason, SealmqError
from sealmq.topics import RecordKind, valid_device_id

OUTGOING = Path("updates") / "outgoing"
DEFAULT_CHUNK = update.MAX_CHUNK
DEFAULT_WINDOW = 16

Send = Callable[[str, RecordKind, bytes], None]


def outgoing_dir(data_dir: Path) -> Path:
    return data_dir / OUTGOING


def push(data_dir: Path | str, device_id: str, package: Path | str) -> update.UpdateManifest:
    """Queue a package for ``device_id`` (replacing any earlier one not yet installed)."""
    if not valid_device_id(device_id):
        raise PkiError(Reason.POLICY_VIOLATION, "invalid device id")
    path = Path(package)
    try:
        if path.stat().st_size > update.MAX_PAYLOAD + update.MAX_SIGNED_MANIFEST + 64:
            raise FleetError(Reason.TOO_LARGE, "package too large")
        data = path.read_bytes()
    except OSError:
        raise PkiError(Reason.NOT_FOUND, f"{path} not readable") from None
    signed, _ = update.decode_package(data)
    if signed.manifest.devices and device_id not in signed.manifest.devices:
        raise FleetError(Reason.WRONG_TARGET, "the package names other devices")
    out = outgoing_dir(Path(data_dir))
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(out / f"{device_id}.pkg", data, mode=0o600)
    return signed.manifest


@dataclass
class _Transfer:
    path: Path
    mtime: float
    signed: update.SignedUpdate
    payload: bytes
    chunks: int
    offered: bool = False
    sent_upto: int = 0  # chunks below this were sent since the last NEED
    last_activity: float = 0.0


class UpdatePusher:
    def __init__(self, data_dir: Path, audit: AuditLog, *, chunk_size: int = DEFAULT_CHUNK,
                 window: int = DEFAULT_WINDOW, resend_after: float = 10.0) -> None:
        self.dir = outgoing_dir(data_dir)
        self.audit = audit
        self.chunk_size = chunk_size
        self.window = window
        self.resend_after = resend_after
        self.transfers: dict[str, _Transfer] = {}

    def _scan(self) -> None:
        seen = set()
        for path in sorted(self.dir.glob("*.pkg")) if self.dir.is_dir() else []:
            device_id = path.stem
            seen.add(device_id)
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            cur = self.transfers.get(device_id)
            if cur is not None and cur.mtime == mtime:
                continue
            try:
                signed, payload = update.decode_package(path.read_bytes())
            except (OSError, SealmqError) as err:
                self.audit.event("update_rejected", device=device_id, stage="backend",
                                 reason=getattr(err, "reason", Reason.NOT_FOUND))
                path.unlink(missing_ok=True)
                continue
            self.transfers[device_id] = _Transfer(path, mtime, signed, payload,
                                                  update.chunk_count(len(payload), self.chunk_size))
            self.audit.event("update_queued", device=device_id, version=signed.manifest.version,
                             size=signed.manifest.size, transfer=signed.tid.hex())
        for device_id in set(self.transfers) - seen:
            del self.transfers[device_id]

    def tick(self, now: float, live: set[str], send: Send) -> None:
        self._scan()
        for device_id, t in self.transfers.items():
            if device_id not in live:
                continue
            if not t.offered or now - t.last_activity >= self.resend_after:
                self._offer(device_id, t, now, send)

    def on_handshake(self, device_id: str) -> None:
        t = self.transfers.get(device_id)
        if t is not None:
            t.offered = False

    def _offer(self, device_id: str, t: _Transfer, now: float, send: Send) -> None:
        t.offered, t.last_activity, t.sent_upto = True, now, 0
        send(device_id, RecordKind.UPDATE_OFFER, update.Offer(t.signed.tid, t.signed.raw, self.chunk_size).encode())

    def handle(self, device_id: str, body: bytes, now: float, send: Send) -> None:
        try:
            status = update.decode_status(body)
        except SealmqError as err:
            self.audit.event("message_rejected", device=device_id, stage="update", reason=err.reason,
                             detail=err.detail)
            return
        t = self.transfers.get(device_id)
        if t is None or status.tid != t.signed.tid:
            self.audit.event("message_rejected", device=device_id, stage="update", reason=Reason.UNKNOWN_TRANSFER)
            return
        t.last_activity = now
        if status.state is update.UpdateState.NEED:
            if status.next >= t.chunks:
                return
            start = max(status.next, t.sent_upto)  # a gap is repaired by the re-offer after a stall
            stop = min(t.chunks, status.next + self.window)
            for index in range(start, stop):
                data = t.payload[index * self.chunk_size:(index + 1) * self.chunk_size]
                send(device_id, RecordKind.UPDATE_CHUNK, update.UpdateChunk(t.signed.tid, index, data).encode())
            t.sent_upto = max(t.sent_upto, stop)
            return
        del self.transfers[device_id]
        t.path.unlink(missing_ok=True)
        if status.state is update.UpdateState.INSTALLED:
            self.audit.event("update_installed", device=device_id, version=t.signed.manifest.version,
                             transfer=t.signed.tid.hex())
        else:
            self.audit.event("update_rejected", device=device_id, stage="device", reason=status.reason,
                             version=t.signed.manifest.version, transfer=t.signed.tid.hex())
