"""Prometheus metrics of one backend service, in a registry of its own (``/metrics`` of the console).

Each :class:`BackendMetrics` owns a :class:`prometheus_client.CollectorRegistry`, never the global
default one, so that several services (tests, benches) can run in one process. It is a
:class:`backend.observer.ServiceObserver`: counters move on the messages, publishes and audit entries the
service reports; gauges (live sessions, open transfers, the command outbox) are read when scraped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from runtime.audit import represented
from sealmq import topics
from sealmq.endpoint import HandshakeCompleted, HandshakeFailed, Received
from sealmq.errors import SealmqError

CONTENT_TYPE = CONTENT_TYPE_LATEST

# audit events that count as a rejection (label "event"), each with its "reason"
REJECTION_EVENTS = ("message_rejected", "handshake_failed", "transfer_rejected")


def _parse(topic: str) -> tuple[str, str]:
    """(channel, device id) of a topic; ("invalid", "") outside the scheme."""
    try:
        parsed = topics.parse(topic)
    except SealmqError:
        return "invalid", ""
    return parsed.channel.value, parsed.device_id


def _counter(service: Any, status: str) -> Callable[[], float]:
    return lambda: float(service.storage.count_commands(status))


class BackendMetrics:
    def __init__(self, service: Any | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages_in = Counter("sealmq_backend_messages_received", "Uplink MQTT messages received, by channel",
                                   ["channel"], registry=r)
        self.records_opened = Counter("sealmq_backend_records_opened", "Sealed records opened, by record kind",
                                      ["kind"], registry=r)
        self.messages_out = Counter("sealmq_backend_messages_published", "Messages published, by channel",
                                    ["channel"], registry=r)
        self.rejections = Counter("sealmq_backend_rejections", "Rejected messages, handshakes and transfers",
                                  ["event", "reason"], registry=r)
        self.handshakes = Counter("sealmq_backend_handshakes", "EDHOC handshakes completed", registry=r)
        self.handshake_seconds = Histogram(
            "sealmq_backend_handshake_seconds", "From message_1 received to the handshake completed",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0), registry=r)
        self.key_updates = Counter("sealmq_backend_key_updates", "Key updates completed", registry=r)
        self.media_bytes = Counter("sealmq_backend_media_bytes", "Bytes of verified media files stored", registry=r)
        self.media_transfers = Counter("sealmq_backend_media_transfers", "Media transfers ended, by outcome",
                                       ["outcome"], registry=r)
        self.sessions = Gauge("sealmq_backend_sessions", "Live device sessions", registry=r)
        self.transfers_open = Gauge("sealmq_backend_media_transfers_open", "Media transfers in progress", registry=r)
        self.commands = Gauge("sealmq_backend_commands", "Commands in the outbox, by status (queued: not yet "
                              "sent under the device's current session; sent: waiting for the reply)", ["status"],
                              registry=r)
        self.expiry_warnings = Counter("sealmq_backend_expiry_warnings", "Certificates and CRLs found close to "
                                       "expiry (issue 16)", ["what"], registry=r)
        self._hs_started: dict[str, float] = {}
        self._lock = threading.Lock()
        if service is not None:
            self.bind(service)

    def bind(self, service: Any) -> None:
        """Gauges read from the service when scraped."""
        self.sessions.set_function(lambda: len(service.endpoint.sessions))
        self.transfers_open.set_function(lambda: len(service.media.open_transfers()))
        for status in ("queued", "sent"):
            self.commands.labels(status).set_function(_counter(service, status))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # -- observer ------------------------------------------------------------------------------
    def on_message(self, topic: str, payload: bytes, outputs: Sequence[object], now: float) -> None:
        channel, device_id = _parse(topic)
        self.messages_in.labels(channel).inc()
        for out in outputs:
            if isinstance(out, Received):
                self.records_opened.labels(out.kind.name.lower()).inc()
        if channel != topics.Channel.HANDSHAKE.value:
            return
        with self._lock:
            if any(isinstance(o, HandshakeCompleted) for o in outputs):
                self.handshakes.inc()
                started = self._hs_started.pop(device_id, None)
                if started is not None:
                    self.handshake_seconds.observe(max(0.0, now - started))
            elif any(isinstance(o, HandshakeFailed) for o in outputs):
                self._hs_started.pop(device_id, None)
            elif len(self._hs_started) < 10_000:  # bounded: a flood of message_1 cannot grow it
                self._hs_started.setdefault(device_id, now)

    def on_publish(self, topic: str, payload: bytes, now: float) -> None:
        self.messages_out.labels(_parse(topic)[0]).inc()

    def on_audit(self, entry: dict[str, Any]) -> None:
        event, count = represented(entry)  # a throttled trail's summaries count what they stand for
        if event in REJECTION_EVENTS:
            self.rejections.labels(str(event), str(entry.get("reason", "unknown"))).inc(count)
        if event == "transfer_rejected":
            self.media_transfers.labels("rejected").inc(count)
        elif event == "transfer_expired":
            self.media_transfers.labels("expired").inc()
        elif event == "transfer_completed":
            self.media_transfers.labels("completed").inc()
            self.media_bytes.inc(int(entry.get("size", 0)))
        elif event == "key_updated":
            self.key_updates.inc()
        elif event in ("certificate_expiring", "crl_expiring"):
            self.expiry_warnings.labels(str(event).split("_")[0]).inc()
