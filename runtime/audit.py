"""Audit log: one JSON object per line, rotated, for both the backend and the device.

An audit entry records *what happened* (handshakes, rejections with their reason, key updates,
connects, transfers) and never carries secrets or plaintext payloads: callers pass only
identifiers, reasons, sizes and counters. :meth:`AuditLog.event` refuses values that are bytes,
so a payload cannot be logged by accident.
"""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.files import PRIVATE_FILE, private_dir, private_mode
from sealmq.errors import SealmqError

_SCALARS = (str, int, float, bool, type(None))


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Creates the log (and, by renaming, its backups) 0600: it names devices and failures."""

    def _open(self) -> io.TextIOWrapper:
        private_mode(self.baseFilename)
        stream = open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,  # noqa: SIM115
                      opener=lambda path, flags: os.open(path, flags, PRIVATE_FILE))
        assert isinstance(stream, io.TextIOWrapper)
        return stream


class AuditLog:
    def __init__(
        self,
        path: Path | None,
        *,
        component: str,
        max_bytes: int = 5 * 1024 * 1024,
        backups: int = 5,
        echo: logging.Logger | None = None,
    ) -> None:
        self.component = component
        self._lock = threading.Lock()
        self._echo = echo
        self._handler: logging.Handler | None = None
        self.counts: dict[str, int] = {}
        # called with each entry after it is written (the backend console and metrics); must not raise
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        if path is not None:
            private_dir(path.parent)
            self._handler = _PrivateRotatingFileHandler(
                path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
        self.path = path

    def event(self, event: str, **fields: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"ts": round(time.time(), 6), "component": self.component, "event": event}
        for key, value in fields.items():
            if isinstance(value, SealmqError):
                entry["reason"] = value.reason.value
                if value.detail:
                    entry["detail"] = value.detail
                continue
            if hasattr(value, "value") and isinstance(value.value, _SCALARS):  # enums
                value = value.value
            if not isinstance(value, _SCALARS):
                raise TypeError(f"audit field {key!r} must be a scalar, not {type(value).__name__}")
            entry[key] = value
        line = json.dumps(entry, sort_keys=True, separators=(",", ":"))
        with self._lock:
            self.counts[event] = self.counts.get(event, 0) + 1
            if self._handler is not None:
                record = logging.LogRecord("sealmq.audit", logging.INFO, "", 0, line, None, None)
                self._handler.emit(record)
                self._handler.flush()
        for listener in list(self.listeners):
            try:
                listener(entry)
            except Exception:
                logging.getLogger("sealmq.audit").exception("audit listener failed")
        if self._echo is not None:
            level = logging.WARNING if event.endswith(("rejected", "failed")) else logging.INFO
            self._echo.log(level, "%s %s", event, " ".join(f"{k}={v}" for k, v in entry.items()
                                                             if k not in {"ts", "component", "event"}))
        return entry

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Read every entry of an audit log (the current file only)."""
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def audit_protocol_event(audit: AuditLog, out: object) -> str | None:
    """Audit one protocol event that both the device and the backend report the same way.

    Returns the audit event name written (so callers can count), or None when ``out`` is not one
    of these events (publishes, deliveries and completed handshakes stay with the caller).
    """
    from sealmq.endpoint import EpochDropped, HandshakeFailed, KeyUpdateDone, Rejected, SessionLost

    if isinstance(out, HandshakeFailed):
        audit.event("handshake_failed", device=out.device_id, reason=out.reason, detail=out.detail)
        return "handshake_failed"
    if isinstance(out, Rejected):
        audit.event("message_rejected", device=out.device_id, topic=out.topic, stage=out.stage,
                    reason=out.reason, detail=out.detail, size=out.size)
        return "message_rejected"
    if isinstance(out, KeyUpdateDone):
        audit.event("key_updated", device=out.device_id, epoch=out.epoch)
        return "key_updated"
    if isinstance(out, EpochDropped):
        audit.event("old_keys_dropped", device=out.device_id, epoch=out.epoch)
        return "old_keys_dropped"
    if isinstance(out, SessionLost):
        audit.event("session_lost", device=out.device_id, reason=out.reason)
        return "session_lost"
    return None
