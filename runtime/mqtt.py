"""The thin MQTT adapter the device agent, the backend and the tools share (paho-mqtt 2.x).

It only moves bytes: connect (MQTT 3.1.1 by default, which both amqtt and mosquitto speak), reconnect
with exponential backoff, re-subscribe after every (re)connect, publish, and hand every received
message to one callback. No protocol logic lives here.

MQTT 5 (``MqttSettings.protocol = 5``) is for backend workers sharing a subscription
(``MqttSettings.share_group``: every filter becomes ``$share/<group>/<filter>``; docs/scaling.md).
The session then lives ``session_expiry`` seconds past a disconnect (Clean Start off, Session Expiry
Interval set), so a worker that comes back with its own login gets its unacknowledged messages
again; mosquitto 2.0 does not hand them to the other members of the group (measured, docs/scaling.md).
A broker that does not speak MQTT 5 (the embedded amqtt) or refuses a subscription of a share
group is a configuration error, not a transient fault: :attr:`MqttLink.error` holds a
:class:`~sealmq.errors.TransportError` with ``Reason.UNSUPPORTED`` (exit code 2).

What an operator sees: ``connecting to HOST:PORT as USER ...`` (INFO), every failed attempt
(WARNING, numbered), a lost connection as lost; a requested stop is not reported as a loss. A broker
that refuses the credentials (or the client id) is not a transient fault: the link stops retrying at
once and keeps the refusal in :attr:`MqttLink.error` (a :class:`~sealmq.errors.TransportError` with
``Reason.NOT_AUTHORIZED``), which :meth:`MqttLink.wait_connected` raises and the commands turn into
exit code 4 (``runtime/exits.py``). "Server unavailable" is retried like an unreachable broker.

paho runs callbacks on its network thread, and acknowledges a QoS 1 message when
``on_message`` returns: the callback given here therefore processes the message before
returning, so an acknowledged message has been handled (at-least-once, with the record
layer's replay window removing duplicates). With ``manual_ack=True`` the handler may instead
take the message's acknowledgement (:meth:`MqttLink.defer_ack`) and run it later, after the
message is committed (the backend's batched ingest); messages it does not take are acknowledged
when it returns.

A publish made inside the message callback (an ack, the next chunks of a file) is written to the
socket at once, not when the callback returns as paho would: see :meth:`MqttLink.publish`.

paho runs as :class:`Client`, which reads the socket in pieces of up to 64 KiB rather than paho's
three or more system calls per packet, and does not wake paho's loop thread from that thread itself
(every PUBACK did): a 256 B QoS 1 message costs the receiver 5 system calls and a ``select`` less
(docs/benchmarks.md, issue #11, stop 34). paho sees the same bytes (tests/test_mqtt_reads.py).

With ``network`` (a :class:`runtime.netloop.NetworkLoop`) the link has no thread of its own: the
loop's thread does its I/O and keepalive, and its connector threads (re)connect it, with the same
backoff; everything above holds the same (the simulator's devices share one such loop).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from runtime.netloop import NetworkLoop
from sealmq.errors import ConfigError, Reason, TransportError

log = logging.getLogger("sealmq.mqtt")

MessageHandler = Callable[[str, bytes], None]

# CONNACK refusals worth retrying, as paho reports them (MQTT 5 reason codes; a 3.1.1 code 3 is 136):
# Server unavailable, Server busy. Any other refusal (credentials, client id, protocol) is final.
_TRANSIENT_REFUSALS = frozenset({136, 137})
_UNSUPPORTED_PROTOCOL = 132  # paho's code for a 3.1.1 broker's "unacceptable protocol level" too
_SHARED_NOT_SUPPORTED = 158  # SUBACK: Shared Subscriptions not supported
_NOT_AUTHORIZED = 135

MQTT_311 = 4  # the protocol levels of MqttSettings.protocol
MQTT_5 = 5
DEFAULT_SESSION_EXPIRY = 600  # seconds an MQTT 5 session (and its queue) outlives its connection


READ_SIZE = 65536  # bytes asked of the socket at once (paho asks for a packet's 1, 1 and n)


class Client(mqtt.Client):
    """paho's client, reading its socket in large pieces and not waking its own loop.

    paho reads a packet with three or more ``recv`` calls (its first byte, the remaining length a
    byte at a time, then the rest), each a system call: at 256 B QoS 1 that is five per message,
    and a ``select`` per message. Here :meth:`_sock_recv` (paho's one read primitive) takes up to
    :data:`READ_SIZE` bytes from the socket and serves paho's small reads from them, and
    :meth:`loop_read` goes on reading packets while any are buffered: the socket would not show
    them as readable again. The bytes paho sees, in the same order, are unchanged.

    paho also writes a byte to its loop's wake-up socket for every packet it queues, even from the
    loop's own thread (every PUBACK), where the loop is awake anyway and sees the packet before it
    next waits: :meth:`_packet_queue` skips that byte there.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._rsock: object = None  # the socket the buffered bytes came from
        self._rbuf = b""
        self._rpos = 0

    def buffered(self) -> int:
        """Bytes read from the current socket that paho has not taken yet."""
        if self._rsock is not self._sock:
            return 0
        return len(self._rbuf) - self._rpos

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rsock is not self._sock:  # a new connection, or none: nothing from the old one
            self._rsock, self._rbuf, self._rpos = self._sock, b"", 0
        buf, pos = self._rbuf, self._rpos
        if pos < len(buf):
            end = pos + bufsize
            if end >= len(buf):
                self._rbuf, self._rpos = b"", 0
                return buf[pos:] if pos else buf
            self._rpos = end
            return buf[pos:end]
        data = super()._sock_recv(max(bufsize, READ_SIZE))  # raises as paho's does (BlockingIOError ...)
        if len(data) <= bufsize:
            return data
        self._rbuf, self._rpos = data, bufsize
        return data[:bufsize]

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self.buffered():
            rc = super().loop_read(max_packets)  # every call takes at least one buffered byte
        return rc

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: mqtt.MQTTMessageInfo | None = None) -> MQTTErrorCode:
        wake = self._sockpairW
        if wake is None or self._thread is not threading.current_thread():
            return super()._packet_queue(command, packet, mid, qos, info)
        # On paho's loop thread: the loop asks want_write() before it next waits, so the packet
        # goes out without the wake-up byte (a send, and a select that returns for it). Another
        # thread queueing meanwhile finds no wake-up socket, and needs none: the loop is awake.
        self._sockpairW = None
        try:
            return super()._packet_queue(command, packet, mid, qos, info)
        finally:
            self._sockpairW = wake


def check_share_group(name: str) -> str:
    """A share group name as MQTT 5 allows it (no ``/``, ``+``, ``#``; not empty); returns it."""
    if not name or any(c in name for c in "/+#") or not name.isprintable() or len(name) > 256:
        raise ConfigError(Reason.CONFIG_INVALID, "a share group name is 1-256 printable characters "
                          "without '/', '+' or '#'")
    return name


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
    protocol: int = MQTT_311  # MQTT_5: the backend workers of a share group (docs/scaling.md)
    share_group: str | None = None  # subscribe through $share/<group>/...; needs protocol MQTT_5
    session_expiry: int = DEFAULT_SESSION_EXPIRY  # MQTT 5 only; 3.1.1 sessions: the broker's setting

    def __post_init__(self) -> None:
        if self.protocol not in (MQTT_311, MQTT_5):
            raise ConfigError(Reason.CONFIG_INVALID, f"MQTT protocol level {self.protocol}: 4 (3.1.1) or 5")
        if self.share_group is not None:
            check_share_group(self.share_group)
            if self.protocol != MQTT_5:
                raise ConfigError(Reason.CONFIG_INVALID, "shared subscriptions need MQTT 5")
        if not 0 <= self.session_expiry <= 0xFFFFFFFF:
            raise ConfigError(Reason.CONFIG_INVALID, "session expiry: 0 to 4294967295 seconds")

    # Filters subscribed as they are even in a share group: one worker's own (the primary's media).
    unshared: tuple[str, ...] = ()

    def subscription(self, topic_filter: str) -> str:
        """The filter as subscribed: ``$share/<group>/<filter>`` in a share group (unless unshared)."""
        if self.share_group is None or topic_filter in self.unshared:
            return topic_filter
        return f"$share/{self.share_group}/{topic_filter}"


class MqttLink:
    """One paho client: connected in the background, re-subscribing on every connect."""

    # the paho client class (the benchmark's "paho's own client" rows set mqtt.Client here)
    client_class: type[mqtt.Client] = Client

    def __init__(
        self,
        settings: MqttSettings,
        on_message: MessageHandler,
        subscriptions: Sequence[str] = (),
        *,
        on_connect: Callable[[], object] | None = None,
        on_disconnect: Callable[[], object] | None = None,
        qos: int = 1,
        manual_ack: bool = False,
        network: NetworkLoop | None = None,
    ) -> None:
        self.settings = settings
        self._network = network  # None: paho's own loop thread (loop_start)
        self._manual_ack = manual_ack
        self._current: tuple[int, int] | None = None  # (mid, qos) of the message being handled
        self._generation = 0  # connections so far: an ack never crosses to another connection
        self._subscriptions = [settings.subscription(f) for f in subscriptions]
        self._pending_subacks: dict[int, list[str]] = {}  # mid -> its filters, until the SUBACK
        self._qos = qos
        self._handler = on_message
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # every filter granted on the current connection
        self.error: TransportError | None = None  # set once, when the broker refused the credentials
        self._stopping = False
        # Held while a callback's publish is written at once, and while the link is ended (the
        # flag set, then DISCONNECT queued): the write never sends a DISCONNECT (see publish).
        self._write_lock = threading.Lock()
        self._handling: int | None = None  # the thread running the message callback, while it runs
        self._attempts = 0  # failed attempts since the last successful connect
        self.ever_connected = False
        self._started = time.monotonic()
        if settings.protocol == MQTT_5:
            # paho takes Clean Start and the session expiry with connect(), not here
            client = self.client_class(CallbackAPIVersion.VERSION2, client_id=settings.client_id,
                                 protocol=mqtt.MQTTv5, manual_ack=manual_ack)
        else:
            client = self.client_class(
                CallbackAPIVersion.VERSION2,
                client_id=settings.client_id,
                clean_session=settings.clean_session if settings.client_id else True,
                protocol=mqtt.MQTTv311,
                manual_ack=manual_ack,
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
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self.client = client
        # paho's write of its queued packets, without loop_write()'s error handling (see publish);
        # None in a paho without it: a callback's publishes then go out when it returns
        self._write_queued: Callable[[], object] | None = getattr(client, "_packet_write", None)

    # -- paho callbacks (network thread) -------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        where = f"{self.settings.host}:{self.settings.port}"
        if getattr(rc, "is_failure", False) and getattr(rc, "value", None) in _TRANSIENT_REFUSALS:
            self._attempts += 1
            log.warning("the broker at %s is unavailable (%s, attempt %d); retrying", where, rc, self._attempts)
            return
        if getattr(rc, "is_failure", False) and self.settings.protocol == MQTT_5 \
                and getattr(rc, "value", None) == _UNSUPPORTED_PROTOCOL:
            # the embedded amqtt broker (MQTT 3.1.1 only) answers an MQTT 5 CONNECT like this
            why = "shared subscriptions need (--share-group)" if self.settings.share_group else "was asked for"
            self._fail(TransportError(
                Reason.UNSUPPORTED,
                f"the broker at {where} does not speak MQTT 5, which {why}; the embedded broker is "
                "MQTT 3.1.1 only: run the workers on Mosquitto 2 (docs/scaling.md)"))
            return
        if getattr(rc, "is_failure", False):
            # Wrong user name or password, client id or protocol refused: retrying cannot fix it.
            self.error = TransportError(
                Reason.NOT_AUTHORIZED,
                f"the broker at {where} refused user {self.settings.username!r}: {rc}",
            )
            log.error("%s; not retrying", self.error.detail)
            with self._write_lock:
                client.disconnect()  # ends paho's reconnect loop
            return
        if self._attempts:
            log.warning("connected to %s after %d failed attempts", where, self._attempts)
        self._attempts = 0
        self.ever_connected = True
        if self._network is not None:
            self._network.connected_again(self)
        sock = client.socket()
        if isinstance(sock, socket.socket):  # TCP (an SSLSocket is one too); not a WebSocket wrapper
            # Small packets (PUBACKs, media acks) must not wait for Nagle's algorithm: with it, a
            # windowed transfer stalls about 40 ms per ack (measured: media 3-4x slower).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._generation += 1
        self.subscribed.clear()
        self._pending_subacks.clear()
        if self._subscriptions:
            # one SUBSCRIBE for every filter (one SUBACK, a reason code per filter, in order)
            result, mid = client.subscribe([(f, self._qos) for f in self._subscriptions])
            if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                self._pending_subacks[mid] = list(self._subscriptions)
        self.connected.set()
        if self._on_connect_cb:
            self._on_connect_cb()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self.subscribed.clear()
        if not was:
            return
        where = f"{self.settings.host}:{self.settings.port}"
        if self._stopping:
            log.info("disconnected from %s", where)
        else:
            log.warning("connection to %s lost (%s); reconnecting", where, rc)
        if self._on_disconnect_cb:
            self._on_disconnect_cb()

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, codes: Sequence[object],
                      props: object) -> None:
        filters = self._pending_subacks.pop(mid, [])
        refused = [(filters[i] if i < len(filters) else "?", c) for i, c in enumerate(codes)
                   if getattr(c, "is_failure", False)]
        if not refused:
            if not self._pending_subacks:
                self.subscribed.set()
            return
        where = f"{self.settings.host}:{self.settings.port}"
        topic_filter, code = refused[0]
        if self.settings.share_group is None:
            # as before MQTT 5: the link stays up (a refused filter only means nothing arrives on it)
            for topic_filter, code in refused:
                log.warning("the broker at %s refused the subscription %s (%s)", where, topic_filter, code)
            return
        # a worker that is not in its group receives nothing: stop, say why
        reason = Reason.NOT_AUTHORIZED if getattr(code, "value", None) == _NOT_AUTHORIZED else Reason.UNSUPPORTED
        hint = ("the broker has no shared subscriptions" if getattr(code, "value", None) == _SHARED_NOT_SUPPORTED
                else "a broker without shared subscriptions, or an ACL that does not grant the filter")
        self._fail(TransportError(reason, f"the broker at {where} refused the shared subscription "
                                          f"{self._redacted(topic_filter)} ({code}): {hint}"))

    def _redacted(self, topic_filter: str) -> str:
        """A filter fit for logs: the share group name is a secret (docs/broker.md)."""
        if self.settings.share_group is None:
            return topic_filter
        return topic_filter.replace(f"$share/{self.settings.share_group}/", "$share/<group>/", 1)

    def _fail(self, err: TransportError) -> None:
        """A refusal retrying cannot fix: keep it for the caller and end paho's reconnect loop."""
        log.error("%s; not retrying", err.detail)
        with self._write_lock:
            self.error = err
            self.client.disconnect()

    def wants_connection(self) -> bool:
        """Whether the link should (re)connect: not stopped, no refusal that retrying cannot fix."""
        return not self._stopping and self.error is None

    def connect_failed(self) -> None:
        """A connect attempt failed (the shared network loop's connectors report it here)."""
        self._on_connect_fail(self.client, None)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self._attempts += 1
        # paho waits reconnect_min_delay, doubling up to reconnect_max_delay, between attempts
        log.warning("cannot reach the broker at %s:%d (attempt %d); retrying, at most every %d s",
                    self.settings.host, self.settings.port, self._attempts, self.settings.reconnect_max_delay)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if self._manual_ack:
            self._current = (message.mid, message.qos)
        self._handling = threading.get_ident()
        try:
            self._handler(message.topic, bytes(message.payload))
        except Exception:  # the network thread must survive anything a handler does
            log.exception("message handler failed on %s", message.topic)
        finally:
            self._handling = None
            if self._current is not None:
                self._current = None
                client.ack(message.mid, message.qos)

    def defer_ack(self) -> Callable[[], None] | None:
        """Take the acknowledgement of the message being handled (manual_ack only; call it from
        the handler): the caller runs it once the message is safe. None without manual_ack."""
        current, self._current = self._current, None
        if current is None:
            return None
        mid, qos = current
        generation = self._generation

        def ack() -> None:
            # after a reconnect the broker delivers the message again (and mids are reused)
            if generation == self._generation and self.connected.is_set():
                self.client.ack(mid, qos)
        return ack

    # -- API -------------------------------------------------------------------------------------
    def start(self, wait: float | None = 10.0) -> None:
        """Connect in the background (paho keeps reconnecting with backoff).

        With ``wait``, block until connected; raise :class:`TransportError` if the broker refused the
        credentials (``NOT_AUTHORIZED``) or could not be reached in time (``TRANSPORT_FAILED``).
        """
        log.info("connecting to %s:%d as %s ...", self.settings.host, self.settings.port,
                 self.settings.username or "(anonymous)")
        self._started = time.monotonic()
        if self.settings.protocol == MQTT_5:
            # Clean Start off on every connect, the first one too: a worker restarted after a crash
            # gets the messages its predecessor left unacknowledged (docs/scaling.md, measured).
            # Without a client id nobody could resume the session: none is kept (as with 3.1.1).
            keep = not self.settings.clean_session and bool(self.settings.client_id)
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho
            properties.SessionExpiryInterval = self.settings.session_expiry if keep else 0
            self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive,
                                      clean_start=not keep, properties=properties)
        else:
            self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive)
        if self._network is not None:
            self._network.add(self)  # its connector threads connect; its thread does the I/O
        else:
            self.client.loop_start()
        if wait is not None:
            try:
                self.wait_connected(wait, raise_on_timeout=True)
            except TransportError:
                self.stop()
                raise

    def wait_connected(self, timeout: float | None, *, raise_on_timeout: bool = False,
                       stop: threading.Event | None = None) -> bool:
        """Wait until connected (True), ``timeout`` seconds (None: no limit) or ``stop`` (False).

        Raises the refusal if the broker refused the credentials, and with ``raise_on_timeout`` a
        ``TRANSPORT_FAILED`` error when the time is up.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.error is None and not (stop is not None and stop.is_set()):
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0 or self.connected.wait(left):
                break
        if self.error is not None:
            raise self.error
        if self.connected.is_set():
            return True
        if raise_on_timeout and not (stop is not None and stop.is_set()):
            raise TransportError(
                Reason.TRANSPORT_FAILED,
                f"cannot reach the broker at {self.settings.host}:{self.settings.port} "
                f"({self._attempts} failed attempts in {time.monotonic() - self._started:.0f} s)",
            )
        return False

    def publish(self, topic: str, payload: bytes, qos: int | None = None) -> mqtt.MQTTMessageInfo:
        """Queue a message; from inside the message callback, also write it to the socket now.

        paho writes what a callback publishes only after the callback returns. A handler that
        publishes a burst (the device's media pump: 32 chunks of 63 KiB sealed in one ack's
        callback, about 5 ms) would hold all of it back, and the broker and the backend would wait
        idle meanwhile (measured: docs/benchmarks.md, issue #11, stop 32). So a publish made on the
        thread running the callback writes paho's queue at once (it is the network thread: the
        only one that writes). It uses paho's ``_packet_write``, not the public ``loop_write``: on a
        broken socket ``loop_write`` runs ``on_disconnect``, which waits for the lock paho holds
        around the very callback we are in (a deadlock), while ``_packet_write`` puts the packet
        back and leaves the error to the loop. It would also run ``on_disconnect`` after writing a
        DISCONNECT: the write lock and :meth:`wants_connection` make sure none is queued. What the
        socket does not take now (it is non-blocking) the loop writes later, as before.
        """
        info = self.client.publish(topic, payload, qos=self._qos if qos is None else qos)
        if self._handling == threading.get_ident() and self._write_queued is not None:
            with self._write_lock:
                # on_publish (never set here) would be called for QoS 0 under paho's callback lock
                if self.wants_connection() and self.client.on_publish is None:
                    self._write_queued()
        return info

    def stop(self) -> None:
        try:
            with self._write_lock:
                self._stopping = True
                self.client.disconnect()
        finally:
            if self._network is None:
                self.client.loop_stop()
            elif threading.current_thread() is not self._network.thread:
                # the network thread writes the DISCONNECT, then paho closes the socket
                deadline = time.monotonic() + 2.0
                while self.client.socket() is not None and time.monotonic() < deadline:
                    time.sleep(0.005)
                self._network.remove(self)
                sock = self.client.socket()
                if sock is not None:  # the broker did not take the DISCONNECT in time
                    with contextlib.suppress(OSError):
                        sock.close()
            # else: stopped from one of its callbacks; the loop writes the DISCONNECT after it
            self.connected.clear()
            self.subscribed.clear()
