"""The I/O driver of a sans-IO endpoint: the one adapter skeleton the device agent and the backend
service share.

The protocol core (:mod:`sealmq.endpoint`) takes bytes, time and randomness in and gives outputs
back. :class:`EndpointDriver` feeds it: it owns the MQTT link, one lock around the endpoint, the
clock and the random source, a timer thread that polls the endpoint (handshakes, retries, key
updates), the dispatch of its outputs (publish, count, audit) and the connect/stop audit entries.

A subclass keeps only what its application does, through these hooks (all called with the lock
held, except :meth:`_before_tick`):

- ``_on_record(rec, now)``: a record opened under an authenticated session (telemetry, command,
  reply, media); the subclass stores it, answers it or passes it on.
- ``_on_handshake(done, now)``: a handshake completed; audit it and do what follows (store the peer,
  flush queued records).
- ``_on_protocol_event(event, out)``: an audited protocol event (``"session_lost"``, ...) after
  it was written and counted.
- ``_before_tick()`` (without the lock) and ``_on_tick(now)`` (after the endpoint's poll): the
  periodic work of the application (media pumping, queued commands, CRL reloads).
- ``_on_start()`` / ``_on_stop()``: before the link starts, after the audit log is closed.
- ``_after_message(topic, payload, outputs, now)``: an incoming message and every output the endpoint
  made of it, after they were dispatched; ``_on_published(topic, payload, now)``: a message just
  published. For observers (the backend's console and metrics); nothing by default.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from runtime.audit import AuditLog, audit_protocol_event
from runtime.mqtt import MqttLink, MqttSettings
from runtime.netloop import NetworkLoop
from sealmq import topics
from sealmq.endpoint import HandshakeCompleted, Output, Publish, RandomBytes, Received
from sealmq.errors import DecodeError

# audit events that are also counted
_COUNTERS = {"message_rejected": "rejected", "key_updated": "key_updates"}


class Endpoint(Protocol):
    """What the driver needs of a :mod:`sealmq.endpoint` endpoint (device or backend)."""

    @property
    def subscriptions(self) -> Sequence[str]: ...

    def handle(self, topic: str, payload: bytes, now: float, random_bytes: RandomBytes) -> list[Output]: ...

    def poll(self, now: float, random_bytes: RandomBytes) -> list[Output]: ...


def _is_handshake(topic: str) -> bool:
    try:
        return topics.parse(topic).channel is topics.Channel.HANDSHAKE
    except DecodeError:
        return False


class EndpointDriver:
    """Runs one endpoint over one MQTT link; see the module docstring for the hooks."""

    def __init__(
        self,
        endpoint: Endpoint,
        mqtt: MqttSettings,
        audit: AuditLog,
        *,
        role: str,
        timer_name: str,
        default_client_id: str,
        poll_interval: float,
        log: logging.Logger,
        tick_offline: bool = True,
        manual_ack: bool = False,
        network: NetworkLoop | None = None,
        timer: SharedTimer | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.audit = audit
        self.clock: Callable[[], float] = time.time
        self.random: RandomBytes = os.urandom
        self._role = role
        self._timer_name = timer_name
        self._poll_interval = poll_interval
        self._log = log
        self._tick_offline = tick_offline  # False: the timer does nothing while the link is down
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._shared_timer = timer  # None: a timer thread of its own
        self.counters = {"sent": 0, "received": 0, "handshakes": 0, "key_updates": 0, "rejected": 0}
        if not mqtt.client_id:
            # the embedded broker binds client ids to users: "<username>:<anything>"
            mqtt = replace(mqtt, client_id=default_client_id)
        self.link = MqttLink(
            mqtt, self._on_message, endpoint.subscriptions,
            on_connect=lambda: self._connected(mqtt),
            on_disconnect=lambda: self.audit.event("disconnected"),
            manual_ack=manual_ack,
            network=network,
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, wait: float | None = 10.0) -> None:
        self._on_start()
        self.link.start(wait=wait)
        if self._shared_timer is not None:
            self._shared_timer.add(self)
        else:
            self._timer = threading.Thread(target=self._run_timer, name=self._timer_name, daemon=True)
            self._timer.start()

    def stop(self) -> None:
        self._stop.set()
        if self._shared_timer is not None:
            self._shared_timer.remove(self)  # returns once a tick of this driver in progress ended
        if self._timer is not None:
            self._timer.join(5)
        self.link.stop()
        self.audit.event("stopped")
        self.audit.close()
        self._on_stop()

    def _connected(self, mqtt: MqttSettings) -> None:
        self.audit.event("connected", host=mqtt.host, port=mqtt.port)
        self._on_connected()

    # -- driving the endpoint ----------------------------------------------------------------
    def _run(self, step: Callable[[float], list[Output]]) -> None:
        """Run one endpoint step at the current time, under the lock, and dispatch its outputs."""
        with self._lock:
            self._dispatch(step(self.clock()))

    def _on_message(self, topic: str, payload: bytes) -> None:
        with self._lock:
            now = self.clock()
            outputs = self._handle(topic, payload, now)
            self._dispatch(outputs)
            self._after_message(topic, payload, outputs, self.clock())

    def _run_timer(self) -> None:
        while not self._stop.wait(self._poll_interval):
            self.tick()

    def tick(self) -> None:
        """One timer step: the endpoint's poll (handshakes, retries, key updates) and the
        application's periodic work. Run every ``poll_interval`` by this driver's timer thread or
        by a :class:`SharedTimer`."""
        if self._stop.is_set():
            return
        try:
            self.audit.flush_suppressed()  # throttled rejections: summarised, at most once a minute
            if not self._tick_offline and not self.link.connected.is_set():
                return
            self._before_tick()
            with self._lock:
                now = self.clock()
                self._dispatch(self.endpoint.poll(now, self.random))
                self._on_tick(now)
        except Exception:
            self._log.exception("%s timer failed", self._role)

    def _dispatch(self, outputs: list[Output]) -> None:
        now = self.clock()
        for out in outputs:
            if isinstance(out, Publish):
                self.link.publish(out.topic, out.payload)
                self._on_published(out.topic, out.payload, now)
                if not _is_handshake(out.topic):
                    self.counters["sent"] += 1
            elif isinstance(out, Received):
                self.counters["received"] += 1
                self._on_record(out, now)
            elif isinstance(out, HandshakeCompleted):
                self.counters["handshakes"] += 1
                self._on_handshake(out, now)
            else:
                event = audit_protocol_event(self.audit, out)
                if event in _COUNTERS:
                    self.counters[_COUNTERS[event]] += 1
                if event is not None:
                    self._on_protocol_event(event, out)

    def _handle(self, topic: str, payload: bytes, now: float) -> list[Output]:
        """One incoming message through the endpoint (a subclass may wrap it: shared sessions)."""
        return self.endpoint.handle(topic, payload, now, self.random)

    # -- hooks (the application) -------------------------------------------------------------
    def _on_record(self, rec: Received, now: float) -> None:
        raise NotImplementedError

    def _on_handshake(self, done: HandshakeCompleted, now: float) -> None:
        raise NotImplementedError

    def _on_protocol_event(self, event: str, out: Output) -> None:
        """After an audited protocol event; nothing by default."""

    def _before_tick(self) -> None:
        """Periodic work outside the lock (file reloads); nothing by default."""

    def _on_tick(self, now: float) -> None:
        """Periodic work after the endpoint's poll, under the lock; nothing by default."""

    def _on_start(self) -> None:
        """Before the link starts; nothing by default."""

    def _after_message(self, topic: str, payload: bytes, outputs: list[Output], now: float) -> None:
        """After an incoming message was handled and its outputs dispatched; nothing by default."""

    def _on_published(self, topic: str, payload: bytes, now: float) -> None:
        """After a message was published; nothing by default."""

    def _on_connected(self) -> None:
        """On the MQTT thread, once connected and subscribed; nothing by default."""

    def _on_stop(self) -> None:
        """After the link stopped and the audit log closed; nothing by default."""


class SharedTimer:
    """One timer thread for many drivers (the simulator's devices): each is ticked every
    ``poll_interval`` of its own, in turn, instead of by a thread of its own (a thousand simulated
    devices had a thousand timer threads waking each other up)."""

    def __init__(self, name: str = "sealmq-timer") -> None:
        self._name = name
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, EndpointDriver]] = []
        self._seq = itertools.count()
        self._removed: set[int] = set()  # id() of drivers removed while scheduled
        self._ticking: EndpointDriver | None = None
        self._stopped = False
        self._thread: threading.Thread | None = None

    def add(self, driver: EndpointDriver) -> None:
        with self._cv:
            self._removed.discard(id(driver))
            heapq.heappush(self._heap, (time.monotonic() + driver._poll_interval, next(self._seq), driver))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cv.notify()

    def remove(self, driver: EndpointDriver) -> None:
        """Tick ``driver`` no more; returns once a tick of it in progress ended."""
        with self._cv:
            if self._ticking is driver or any(d is driver for _, _, d in self._heap):
                self._removed.add(id(driver))
            if threading.current_thread() is not self._thread:
                self._cv.wait_for(lambda: self._ticking is not driver, timeout=10)

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic()))
                if self._stopped:
                    return
                when, _, driver = heapq.heappop(self._heap)
                if id(driver) in self._removed:
                    self._removed.discard(id(driver))
                    continue
                self._ticking = driver
            try:
                driver.tick()
            except Exception:  # tick() catches what the driver's work raises; this is the timer's
                logging.getLogger("sealmq.timer").exception("shared timer: a tick failed")
            finally:
                with self._cv:
                    self._ticking = None
                    if id(driver) in self._removed:
                        self._removed.discard(id(driver))
                    else:  # on its own period; a late tick does not make the next ones bunch up
                        nxt = max(when + driver._poll_interval, time.monotonic())
                        heapq.heappush(self._heap, (nxt, next(self._seq), driver))
                    self._cv.notify_all()
