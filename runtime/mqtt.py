"""The thin MQTT adapter the device agent, the backend and the tools share (paho-mqtt 2.x).

It only moves bytes: connect (MQTT 3.1.1, which both amqtt and mosquitto speak), reconnect with
exponential backoff, re-subscribe after every (re)connect, publish, and hand every received
message to one callback. No protocol logic lives here.

paho runs callbacks on its network thread, and acknowledges a QoS 1 message when
``on_message`` returns: the callback given here therefore processes the message before
returning, so an acknowledged message has been handled (at-least-once, with the record
layer's replay window removing duplicates).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from sealmq.errors import Reason, TransportError

log = logging.getLogger("sealmq.mqtt")

MessageHandler = Callable[[str, bytes], None]


@dataclass(frozen=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    client_id: str = ""
    keepalive: int = 30
    clean_session: bool = False  # keep QoS 1 subscriptions and queued messages across reconnects
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    reconnect_min_delay: int = 1
    reconnect_max_delay: int = 30


class MqttLink:
    """One paho client: connected in the background, re-subscribing on every connect."""

    def __init__(
        self,
        settings: MqttSettings,
        on_message: MessageHandler,
        subscriptions: Sequence[str] = (),
        *,
        on_connect: Callable[[], object] | None = None,
        on_disconnect: Callable[[], object] | None = None,
        qos: int = 1,
    ) -> None:
        self.settings = settings
        self._subscriptions = list(subscriptions)
        self._qos = qos
        self._handler = on_message
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect
        self.connected = threading.Event()
        self._refused: str | None = None
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            clean_session=settings.clean_session if settings.client_id else True,
            protocol=mqtt.MQTTv311,
        )
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls_ca is not None:
            context = ssl.create_default_context(cafile=str(settings.tls_ca))
            if settings.tls_cert is not None:
                context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key) if settings.tls_key else None)
            client.tls_set_context(context)
        client.reconnect_delay_set(settings.reconnect_min_delay, settings.reconnect_max_delay)
        client.max_inflight_messages_set(64)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client

    # -- paho callbacks (network thread) -------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        if getattr(rc, "is_failure", False):
            self._refused = str(rc)
            log.warning("broker refused the connection: %s", rc)
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):  # TCP (an SSLSocket is one too); not a WebSocket wrapper
            # Small packets (PUBACKs, media acks) must not wait for Nagle's algorithm: with it, a
            # windowed transfer stalls about 40 ms per ack (measured: media 3-4x slower).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for topic_filter in self._subscriptions:
            client.subscribe(topic_filter, qos=self._qos)
        self.connected.set()
        if self._on_connect_cb:
            self._on_connect_cb()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was:
            log.info("disconnected from broker (%s); reconnecting", rc)
            if self._on_disconnect_cb:
                self._on_disconnect_cb()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            self._handler(message.topic, bytes(message.payload))
        except Exception:  # the network thread must survive anything a handler does
            log.exception("message handler failed on %s", message.topic)

    # -- API -------------------------------------------------------------------------------------
    def start(self, wait: float | None = 10.0) -> None:
        """Connect in the background (paho keeps reconnecting with backoff)."""
        self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive)
        self.client.loop_start()
        if wait is not None and not self.wait_connected(wait):
            self.stop()
            why = self._refused or "no answer"
            raise TransportError(
                Reason.TRANSPORT_FAILED,
                f"cannot connect to {self.settings.host}:{self.settings.port} ({why})",
            )

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, qos: int | None = None) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=self._qos if qos is None else qos)

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
            self.connected.clear()
