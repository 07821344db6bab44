"""The device's side of signed updates (docs/protocol.md section 7.3): receive, check, install.

An UPDATE_OFFER is checked before a byte is taken (:func:`sealmq.update.accept_manifest`: signed
by the release key this device holds, for this device or its class, a version above the
installed one); chunks are then written in order to ``STATE/updates/<tid>.part`` with the count
in ``<tid>.json``, so a transfer resumes where it stopped after a restart of the device, the
backend or the broker. When the last chunk is in, size and SHA-256 are checked and only then is
the file handed to the installer hook; the installed version is kept in ``installed.json``. Every
refusal is answered with a REJECTED status (and audited), every install with INSTALLED.

The hook is ``installer(manifest, path) -> None`` (raise to refuse); the default, for the
simulator, installs by recording the version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.audit import AuditLog
from runtime.files import atomic_write
from sealmq import update
from sealmq.errors import FleetError, Reason, SealmqError
from sealmq.topics import RecordKind

Installer = Callable[[update.UpdateManifest, Path], None]
Reply = tuple[RecordKind, bytes]

INSTALLED = "installed.json"


def record_only(manifest: update.UpdateManifest, path: Path) -> None:
    """The simulator's installer: nothing to flash; the version is recorded by the caller."""


class UpdateReceiver:
    def __init__(self, state_dir: Path, device_id: str, audit: AuditLog, *, release_key: Any,
                 device_class: str | None = None, installer: Installer = record_only,
                 stall_after: float = 10.0) -> None:
        self.dir = state_dir / "updates"
        self.device_id = device_id
        self.device_class = device_class
        self.release_key = release_key  # None: every update is refused (no release key installed)
        self.audit = audit
        self.installer = installer
        self._current: tuple[update.SignedUpdate, int, int] | None = None  # (signed, chunk size, next)
        self.stall_after = stall_after
        self._last_activity = 0.0

    def _installed(self) -> dict[str, Any]:
        try:
            data = json.loads((self.dir / INSTALLED).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def installed_version(self) -> int:
        try:
            return int(self._installed()["version"])
        except (KeyError, TypeError, ValueError):
            return 0

    def tick(self, now: float) -> list[Reply]:
        """A transfer that stalled (its chunks lost, or a backend that restarted and forgot us): ask
        again; a backend without our session answers with a "no session" notice, so we re-handshake
        and it offers the update anew."""
        cur = self._current
        if cur is None or now - self._last_activity < self.stall_after:
            return []
        self._last_activity = now
        return self._status(cur[0].tid, update.UpdateState.NEED, cur[2])

    def handle(self, kind: RecordKind, body: bytes, now: float = 0.0) -> list[Reply]:
        self._last_activity = now
        try:
            if kind is RecordKind.UPDATE_OFFER:
                return self._offer(update.decode_offer(body))
            return self._chunk(update.decode_chunk(body))
        except SealmqError as err:
            self.audit.event("message_rejected", stage="update", reason=err.reason, detail=err.detail)
            return []

    def _status(self, tid: bytes, state: update.UpdateState, next_index: int = 0, reason: str = "") -> list[Reply]:
        return [(RecordKind.UPDATE_STATUS, update.Status(tid, state, next_index, reason).encode())]

    def _reject(self, tid: bytes, reason: Reason, detail: str, version: int | None = None) -> list[Reply]:
        self.audit.event("update_rejected", device=self.device_id, reason=reason, detail=detail, version=version)
        self._discard(tid)
        return self._status(tid, update.UpdateState.REJECTED, 0, reason.value)

    def _offer(self, offer: update.Offer) -> list[Reply]:
        if self.release_key is None:
            return self._reject(offer.tid, Reason.NOT_AUTHORIZED, "no release key installed")
        if offer.tid.hex() == self._installed().get("transfer"):
            # installed already, but our INSTALLED was lost (session switch, broker restart): say it again
            return self._status(offer.tid, update.UpdateState.INSTALLED)
        try:
            signed = update.accept_manifest(offer.signed_manifest, self.release_key, device_id=self.device_id,
                                            device_class=self.device_class,
                                            installed_version=self.installed_version)
        except SealmqError as err:
            return self._reject(offer.tid, err.reason, err.detail)
        next_index = self._resume(offer.tid, offer.chunk_size)
        self._current = (signed, offer.chunk_size, next_index)
        self.audit.event("update_offered", device=self.device_id, version=signed.manifest.version,
                         size=signed.manifest.size, resume_at=next_index)
        return self._status(offer.tid, update.UpdateState.NEED, next_index)

    def _resume(self, tid: bytes, chunk_size: int) -> int:
        """Where an earlier transfer of ``tid`` stopped (0 if none, or if it used another chunk size)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in [*self.dir.glob("*.json"), *self.dir.glob("*.part")]:
            if stale.name not in (INSTALLED, f"{tid.hex()}.json", f"{tid.hex()}.part"):
                stale.unlink(missing_ok=True)  # an older update this offer replaces
        part, meta = self._paths(tid)
        try:
            state = json.loads(meta.read_text())
            next_index = int(state["next"]) if int(state["chunk_size"]) == chunk_size else 0
        except (OSError, ValueError, KeyError, TypeError):
            next_index = 0
        size = part.stat().st_size if part.exists() else 0
        next_index = min(next_index, size // chunk_size)  # the state may be ahead of the file after a crash
        with open(part, "ab") as f:  # drop bytes written after the last recorded chunk
            f.truncate(next_index * chunk_size)
        self._save(tid, chunk_size, next_index)
        return next_index

    def _chunk(self, chunk: update.UpdateChunk) -> list[Reply]:
        cur = self._current
        if cur is None or cur[0].tid != chunk.tid:
            raise FleetError(Reason.UNKNOWN_TRANSFER, "chunk of no offered update")
        signed, chunk_size, next_index = cur
        total = update.chunk_count(signed.manifest.size, chunk_size)
        if chunk.index != next_index:
            return []  # duplicate or ahead of a gap: the backend re-offers after a stall
        last = chunk.index == total - 1
        expected = signed.manifest.size - chunk_size * (total - 1) if last else chunk_size
        if len(chunk.data) != expected:
            return self._reject(chunk.tid, Reason.HASH_MISMATCH, "chunk of the wrong size", signed.manifest.version)
        part, _ = self._paths(chunk.tid)
        with open(part, "ab") as f:
            f.write(chunk.data)
        next_index += 1
        self._save(chunk.tid, chunk_size, next_index)
        self._current = (signed, chunk_size, next_index)
        if not last:
            return self._status(chunk.tid, update.UpdateState.NEED, next_index)
        return self._finish(signed, part)

    def _finish(self, signed: update.SignedUpdate, part: Path) -> list[Reply]:
        m = signed.manifest
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 16), b""):
                h.update(block)
        if part.stat().st_size != m.size or h.digest() != m.digest:
            return self._reject(signed.tid, Reason.HASH_MISMATCH, "payload does not match the manifest", m.version)
        try:
            self.installer(m, part)
        except Exception as exc:  # the installer is the device's code: its failure is a refusal
            return self._reject(signed.tid, Reason.POLICY_VIOLATION, f"installer: {type(exc).__name__}", m.version)
        atomic_write(self.dir / INSTALLED, json.dumps({"version": m.version, "kind": m.kind, "sha256": m.digest.hex(),
                                                       "transfer": signed.tid.hex()}).encode(), mode=0o600)
        self._discard(signed.tid)
        self.audit.event("update_installed", device=self.device_id, version=m.version, kind=m.kind)
        return self._status(signed.tid, update.UpdateState.INSTALLED)

    def _paths(self, tid: bytes) -> tuple[Path, Path]:
        return self.dir / f"{tid.hex()}.part", self.dir / f"{tid.hex()}.json"

    def _save(self, tid: bytes, chunk_size: int, next_index: int) -> None:
        atomic_write(self._paths(tid)[1], json.dumps({"chunk_size": chunk_size, "next": next_index}).encode(),
                     mode=0o600, durable=False)

    def _discard(self, tid: bytes) -> None:
        for p in self._paths(tid):
            p.unlink(missing_ok=True)
        if self._current is not None and self._current[0].tid == tid:
            self._current = None
