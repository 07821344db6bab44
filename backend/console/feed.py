"""The console's live feed: what the backend handled, what the broker relayed, and audit entries.

:class:`ConsoleFeed` is a :class:`backend.observer.ServiceObserver`. It keeps bounded in-memory
histories and per-device counters, and numbers every event so that each browser (server-sent events)
reads from its own cursor. Device-supplied text is kept as data here: escaping is the page's job
(it only ever sets ``textContent``).

The broker view pairs two sides of the same message by (topic, payload): the ``monitor`` account's
copy of what the broker relayed (ciphertext, as ``mosquitto_sub -F '%t %x'`` prints it) and what the
backend opened from it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from backend.metrics import REJECTION_EVENTS
from runtime.audit import represented
from sealmq import bodies, topics
from sealmq.endpoint import HandshakeCompleted, HandshakeFailed, Received, Rejected
from sealmq.errors import SealmqError
from sealmq.topics import RecordKind

MAX_HEX_BYTES = 512  # a broker-view line shows at most this much of a payload (media chunks are 32 KiB)
MAX_TEXT = 200  # device-supplied strings are cut to this length


def pair_key(topic: str, payload: bytes) -> str:
    return hashlib.sha256(topic.encode("utf-8", "surrogateescape") + b"\0" + payload).hexdigest()[:32]


def _device_of(topic: str) -> str | None:
    try:
        return topics.parse(topic).device_id
    except SealmqError:
        return None


def _json_safe(value: Any, depth: int = 0) -> Any:
    """Telemetry values as JSON: numbers and short strings as they are, anything else as text."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, dict) and depth < 2:
        return {str(k)[:MAX_TEXT]: _json_safe(v, depth + 1) for k, v in list(value.items())[:50]}
    if isinstance(value, list) and depth < 2:
        return [_json_safe(v, depth + 1) for v in value[:50]]
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return repr(value)[:MAX_TEXT]


def _safe_values(values: dict[str, Any]) -> dict[str, Any]:
    safe = _json_safe(values)
    return safe if isinstance(safe, dict) else {}


def decode_telemetry(plaintext: bytes) -> dict[str, Any]:
    """One stored reading's values, JSON-safe ({} when the body is not valid telemetry)."""
    try:
        return _safe_values(bodies.decode_telemetry(plaintext).values)
    except SealmqError:
        return {}


def decode_readings(plaintext: bytes) -> list[dict[str, Any]]:
    """The values of every reading a TELEMETRY record carries (one, or a batch), JSON-safe;
    [] when the body is not valid telemetry."""
    try:
        readings = bodies.telemetry_readings(plaintext)
    except SealmqError:
        return []
    return [_safe_values(reading.values) for reading, _ in readings]


def _opened_summary(topic: str, outputs: Sequence[object]) -> dict[str, Any]:
    """What the backend made of one uplink message, for the broker view's right-hand column."""
    for out in outputs:
        if isinstance(out, Received):
            text = f"{out.kind.name.lower()} epoch {out.epoch} seq {out.seq}"
            if out.kind is RecordKind.TELEMETRY:
                readings = decode_readings(out.plaintext)
                last = readings[-1] if readings else {}
                shown = ", ".join(f"{k}={v}" for k, v in last.items())
                if len(readings) > 1:
                    shown = f"{len(readings)} readings, the last: {shown}"
                text += ": " + shown[:MAX_TEXT]
            else:
                text += f" ({len(out.plaintext)} bytes of plaintext)"
            return {"status": "opened", "text": text}
        if isinstance(out, Rejected):
            return {"status": "rejected", "text": f"rejected at {out.stage}: {out.reason.value}"}
        if isinstance(out, HandshakeCompleted):
            return {"status": "handshake", "text": f"EDHOC message_3: device authenticated (suite {out.suite})"}
        if isinstance(out, HandshakeFailed):
            return {"status": "rejected", "text": f"EDHOC failed: {out.reason.value}"}
    if "/hs/" in topic:
        return {"status": "handshake", "text": "EDHOC message (handshake in progress)"}
    return {"status": "opened", "text": "session control"}


@dataclass
class DeviceStats:
    records_in: int = 0
    records_out: int = 0
    rejections: int = 0
    last_seen: float = 0.0
    last_epoch: int | None = None


class ConsoleFeed:
    def __init__(self, *, history: int = 1000) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._events: deque[tuple[int, str, dict[str, Any]]] = deque(maxlen=history)
        self.audit: deque[dict[str, Any]] = deque(maxlen=history)
        self.broker: deque[dict[str, Any]] = deque(maxlen=300)
        self._opened: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._broker_by_key: dict[str, dict[str, Any]] = {}
        self.stats: dict[str, DeviceStats] = {}
        self.latest: dict[str, dict[str, Any]] = {}

    # -- event log ------------------------------------------------------------------------------
    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        self._seq += 1
        self._events.append((self._seq, kind, data))

    def events_since(self, cursor: int) -> tuple[int, list[tuple[int, str, dict[str, Any]]]]:
        """Events after ``cursor`` and the new cursor (older events than the history are lost)."""
        with self._lock:
            new = [e for e in self._events if e[0] > cursor]
            return self._seq, new

    @property
    def cursor(self) -> int:
        with self._lock:
            return self._seq

    def _device(self, device_id: str) -> DeviceStats:
        stats = self.stats.get(device_id)
        if stats is None:
            stats = self.stats[device_id] = DeviceStats()
        return stats

    # -- observer -------------------------------------------------------------------------------
    def on_message(self, topic: str, payload: bytes, outputs: Sequence[object], now: float) -> None:
        summary = _opened_summary(topic, outputs)
        key = pair_key(topic, payload)
        with self._lock:
            device_id = _device_of(topic)
            if device_id is not None:
                stats = self._device(device_id)
                stats.last_seen = now
                for out in outputs:
                    if isinstance(out, Received):
                        stats.records_in += 1
                        stats.last_epoch = out.epoch
                        if out.kind is RecordKind.TELEMETRY:
                            for values in decode_readings(out.plaintext):
                                self.latest[device_id] = {"t": now, "values": values}
                                self._emit("telemetry", {"device": device_id, "t": now, "values": values})
            self._remember_opened(key, summary)

    def on_publish(self, topic: str, payload: bytes, now: float) -> None:
        handshake = "/hs/" in topic
        summary = {"status": "sealed", "text": "EDHOC message from the backend" if handshake
                   else "sealed and published by the backend"}
        with self._lock:
            device_id = _device_of(topic)
            if device_id is not None and not handshake:
                self._device(device_id).records_out += 1
            self._remember_opened(pair_key(topic, payload), summary)

    def _remember_opened(self, key: str, summary: dict[str, Any]) -> None:
        self._opened[key] = summary
        while len(self._opened) > 5000:
            self._opened.popitem(last=False)
        entry = self._broker_by_key.get(key)
        if entry is not None and entry.get("backend") is None:
            entry["backend"] = summary
            self._emit("paired", {"id": entry["id"], "backend": summary})

    def on_audit(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.audit.append(entry)
            self._count_rejections(entry)
            self._emit("audit", entry)
            if entry.get("event") == "transfer_completed":
                self._emit("media", {"device": entry.get("device")})

    def preload_audit(self, entries: Sequence[dict[str, Any]]) -> None:
        """Earlier audit entries (the log's tail when the console starts), as history, not as live events."""
        with self._lock:
            for entry in entries[-(self.audit.maxlen or 0):]:
                self.audit.append(entry)
                self._count_rejections(entry)

    def _count_rejections(self, entry: dict[str, Any]) -> None:
        device_id = entry.get("device")
        event, count = represented(entry)  # a throttled trail's summaries count what they stand for
        if isinstance(device_id, str) and event in REJECTION_EVENTS:
            self._device(device_id).rejections += count

    # -- the broker, as the monitor account sees it ---------------------------------------------
    def on_broker(self, topic: str, payload: bytes, now: float) -> None:
        key = pair_key(topic, payload)
        shown = payload[:MAX_HEX_BYTES]
        with self._lock:
            entry: dict[str, Any] = {
                "id": self._seq + 1, "t": now, "topic": topic, "hex": shown.hex(), "size": len(payload),
                "truncated": len(shown) < len(payload), "backend": self._opened.get(key),
            }
            if len(self.broker) == self.broker.maxlen:
                old = self.broker[0]
                self._broker_by_key.pop(old["key"], None)
            entry["key"] = key
            self.broker.append(entry)
            self._broker_by_key[key] = entry
            self._emit("broker", entry)

    # -- snapshots for the views ----------------------------------------------------------------
    def audit_entries(self, *, event: str | None = None, device: str | None = None,
                      limit: int = 200) -> list[dict[str, Any]]:
        with self._lock:
            rows = [e for e in self.audit if (event is None or e.get("event") == event)
                    and (device is None or e.get("device") == device)]
        return rows[-limit:]

    def broker_entries(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in list(self.broker)[-limit:]]

    def latest_values(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self.latest)

    def device_stats(self) -> dict[str, DeviceStats]:
        with self._lock:
            return {k: DeviceStats(**vars(v)) for k, v in self.stats.items()}
