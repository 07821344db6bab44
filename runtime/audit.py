"""Audit log: one JSON object per line, rotated, for both the backend and the device.

An audit entry records *what happened* (handshakes, rejections with their reason, key updates,
connects, transfers) and never carries secrets or plaintext payloads: callers pass only
identifiers, reasons, sizes and counters. :meth:`AuditLog.event` refuses values that are bytes,
so a payload cannot be logged by accident.

Rejections are throttled per (event, device, reason) so that one peer sending garbage cannot
rotate everyone else's history out of the log: past the bucket, entries are counted instead of
written, and :meth:`AuditLog.flush_suppressed` (the driver's timer) writes one
``audit_suppressed`` entry per key with how many were not written. Counters count every event.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.files import PRIVATE_FILE, private_dir, private_mode
from runtime.ratelimit import TokenBuckets
from sealmq.errors import SealmqError

_SCALARS = (str, int, float, bool, type(None))


class _AuditFile:
    """The trail on disk: whole lines appended to a 0600 file, rotated as ``logging``'s
    RotatingFileHandler does (``log`` -> ``log.1`` -> ... -> ``log.<backups>``, the oldest dropped),
    with one ``write`` system call per entry and no buffer: each entry is in the file (the OS's
    page cache) when :meth:`AuditLog.event` returns, as with the handler's flush after each entry.

    The handler stat-ed the file, sought to its end and formatted a log record for every entry;
    this keeps the file's size itself. A write that fails (disk full, the directory gone) does not
    raise into the caller, as with ``logging``: it is reported on the ``sealmq.audit`` logger, once
    until a write succeeds again, and the entry's counter is kept.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd: int | None = None
        self._size = 0
        self._failing = False
        self._open()

    def _open(self) -> None:
        private_mode(self.path)  # left readable by an older version: tightened
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
        self._size = os.fstat(self._fd).st_size

    def write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8")
        try:
            if self._fd is None:
                self._open()
            if 0 < self.max_bytes <= self._size + len(data) and self.backups > 0 and self._size > 0:
                self._rollover()
            fd = self._fd
            assert fd is not None
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            self._size += len(data)
            self._failing = False
        except OSError:
            if not self._failing:
                self._failing = True
                logging.getLogger("sealmq.audit").exception("cannot write the audit trail %s", self.path)

    def _rollover(self) -> None:
        self.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# What a peer can cause as often as it likes: these are throttled (never the others).
THROTTLED_EVENTS = frozenset({
    "message_rejected", "handshake_failed", "transfer_rejected", "command_rejected", "quota_exceeded",
})


@dataclass(frozen=True)
class AuditThrottle:
    """Bounds on throttled entries; see docs/operations.md for what happens at each."""

    rate: float = 0.5  # entries per second per (event, device, reason)...
    burst: int = 20  # ...after a burst of this many
    total_rate: float = 100.0  # all throttled entries together, whatever their key...
    total_burst: int = 1000
    summary_interval: float = 60.0  # at most one audit_suppressed entry per key this often
    max_keys: int = 4096  # keys tracked; beyond, new keys share one bucket


_Key = tuple[str, str, str]  # (event, device, reason)


class AuditLog:
    def __init__(
        self,
        path: Path | None,
        *,
        component: str,
        max_bytes: int = 5 * 1024 * 1024,
        backups: int = 5,
        echo: logging.Logger | None = None,
        throttle: AuditThrottle | None = AuditThrottle(),  # frozen: sharing the default is safe
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.component = component
        self._lock = threading.Lock()
        self._echo = echo
        self._file: _AuditFile | None = None
        self._clock = clock
        self.counts: dict[str, int] = {}
        # called with each entry after it is written (the backend console and metrics); must not raise
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.throttle = throttle
        if throttle is not None:
            self._buckets: TokenBuckets[_Key] = TokenBuckets(throttle.rate, throttle.burst, max_keys=throttle.max_keys)
            self._total: TokenBuckets[str] = TokenBuckets(throttle.total_rate, throttle.total_burst)
            self._next_summary = clock() + throttle.summary_interval
        self.suppressed: dict[_Key, int] = {}  # not yet summarised
        if path is not None:
            private_dir(path.parent)
            for backup in path.parent.glob(f"{path.name}.*"):  # rotated by an older version, 0644
                private_mode(backup)
            self._file = _AuditFile(path, max_bytes, backups)
        self.path = path

    def event(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one entry (unless throttled: then it is counted, and summarised later)."""
        entry: dict[str, Any] = {"ts": round(self._clock(), 6), "component": self.component, "event": event}
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
        with self._lock:
            self.counts[event] = self.counts.get(event, 0) + 1
            if self.throttle is not None and event in THROTTLED_EVENTS:
                who: _Key = (event, str(entry.get("device")), str(entry.get("reason")))
                now = entry["ts"]
                if not (self._buckets.take(who, now) and self._total.take("all", now)):
                    self.suppressed[who] = self.suppressed.get(who, 0) + 1
                    return entry
            self._write(entry)
        self._notify(entry)
        self._echo_entry(entry)
        return entry

    def flush_suppressed(self, *, force: bool = False) -> None:
        """Write one ``audit_suppressed`` entry per key with entries not written since the last one.

        Called by the driver's timer (it writes at most every ``summary_interval``) and on close
        (``force``), so every suppressed entry is accounted for in the trail (and for listeners:
        see :func:`represented`).
        """
        if self.throttle is None:
            return
        with self._lock:
            now = self._clock()
            if not force and now < self._next_summary:
                return
            self._next_summary = now + self.throttle.summary_interval
            pending, self.suppressed = self.suppressed, {}
            summaries = []
            for (event, device, reason), count in sorted(pending.items()):
                summary = {"ts": round(now, 6), "component": self.component, "event": "audit_suppressed",
                           "suppressed_event": event, "device": None if device == "None" else device,
                           "reason": None if reason == "None" else reason, "suppressed": count}
                self._write(summary)
                summaries.append(summary)
            self._buckets.prune(now)
            self._total.prune(now)
        for summary in summaries:
            self._notify(summary)

    def _write(self, entry: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(entry, sort_keys=True, separators=(",", ":")))

    def _notify(self, entry: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(entry)
            except Exception:
                logging.getLogger("sealmq.audit").exception("audit listener failed")

    def _echo_entry(self, entry: dict[str, Any]) -> None:
        if self._echo is not None:
            event = entry["event"]
            level = logging.WARNING if event.endswith(("rejected", "failed")) else logging.INFO
            if not self._echo.isEnabledFor(level):  # the message is built only if it is shown
                return
            self._echo.log(level, "%s %s", event, " ".join(f"{k}={v}" for k, v in entry.items()
                                                             if k not in {"ts", "component", "event"}))

    def close(self) -> None:
        self.flush_suppressed(force=True)
        if self._file is not None:
            with self._lock:
                self._file.close()


def represented(entry: dict[str, Any]) -> tuple[str, int]:
    """(the event an entry stands for, how many of it): an ``audit_suppressed`` summary stands for
    ``suppressed`` entries of its ``suppressed_event`` (same device and reason); any other entry for
    one of itself. Listeners that count (metrics, the console) count with this, so throttling the
    trail does not make them undercount."""
    if entry.get("event") == "audit_suppressed":
        return str(entry.get("suppressed_event")), int(entry.get("suppressed", 0))
    return str(entry.get("event")), 1


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
