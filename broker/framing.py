"""MQTT 3.1.1 framing in front of amqtt: whole packets, size limits, and CONNECT checked first.

amqtt reads packets straight off the socket and buffers whatever length a client announces
(16 MiB relayed, measured), and it creates, deletes and takes over sessions *before* it asks
the authentication plugins (so an unauthenticated CONNECT with a victim's client id drops the
victim's subscriptions). :class:`FramedReader` sits between the socket and amqtt and hands amqtt
only whole, bounded packets:

- the first packet must be a CONNECT within ``connect_timeout`` seconds; it is parsed here and
  judged by the gate (credentials, client id, will topic) *before* amqtt sees it; a refused
  CONNECT gets its CONNACK here and amqtt only ever sees end-of-stream;
- a PUBLISH whose payload exceeds ``max_message_size`` is read off the socket in 64 KiB pieces
  and dropped (never buffered), acknowledged for QoS 1 so the sender does not retry it, and
  logged with its topic and size (never its payload); QoS 2 oversize closes the connection;
- any other packet larger than ``max_packet_size`` closes the connection, a CONNECT larger than
  ``max_connect_size`` (it arrives before authentication) too;
- more than ``max_qos2_pending`` QoS 2 PUBLISHes without their PUBREL close the connection
  (amqtt keeps each one in the session forever);
- the retain flag is cleared: sealmq does not use retained messages, and amqtt re-sends retained
  messages of *every* active subscription to each connecting client, whatever its ACL.

Every ``readexactly`` is atomic under cancellation and progress is kept in attributes, so amqtt's
keep-alive ``wait_for`` around a read can cancel it without desynchronising the stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from amqtt.adapters import ReaderAdapter

log = logging.getLogger("sealmq.broker")

CONNECT, PUBLISH, PUBREL = 1, 3, 6
CONNACK_ACCEPTED = 0
CONNACK_BAD_PROTOCOL = 1
CONNACK_ID_REJECTED = 2
CONNACK_UNAVAILABLE = 3
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5
_SKIP_CHUNK = 65536


class ConnectParseError(Exception):
    """The CONNECT packet is malformed (local to this module; never leaves the reader)."""


@dataclass(frozen=True)
class ConnectInfo:
    proto_name: str
    proto_level: int
    clean_session: bool
    keep_alive: int
    client_id: str
    will_topic: str | None
    will_qos: int
    will_retain: bool
    username: str | None
    password: str | None
    creds_offset: int = 0  # where the user name (or the end of the payload) starts in the body
    flags_offset: int = 0


def mqtt_field(b: bytes) -> bytes:
    """An MQTT length-prefixed field (a string or binary data: two bytes of length, then ``b``)."""
    return len(b).to_bytes(2, "big") + b


def mqtt_packet(first: int, body: bytes) -> bytes:
    """A whole MQTT packet: the fixed header's first byte, the remaining length (the variable
    byte integer), then ``body``."""
    n, length = len(body), bytearray()
    while True:
        n, digit = divmod(n, 128)
        length.append(digit | (0x80 if n else 0))
        if not n:
            return bytes([first]) + bytes(length) + body


def with_credentials(body: bytes, info: ConnectInfo, username: str, password: str) -> bytes:
    """The CONNECT (fixed header included) with its user name and password replaced.

    For a client authenticated by its TLS certificate: amqtt then sees the account the
    certificate names, whatever (if anything) the client put in the CONNECT.
    """
    new = bytearray(body[: info.creds_offset] + mqtt_field(username.encode()) + mqtt_field(password.encode()))
    new[info.flags_offset] |= 0xC0
    return mqtt_packet(CONNECT << 4, bytes(new))


def _take(body: bytes, pos: int, n: int) -> tuple[bytes, int]:
    if pos + n > len(body):
        raise ConnectParseError("truncated")
    return body[pos : pos + n], pos + n


def _take_field(body: bytes, pos: int) -> tuple[bytes, int]:
    raw, pos = _take(body, pos, 2)
    (length,) = struct.unpack("!H", raw)
    return _take(body, pos, length)


def _text(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConnectParseError("bad UTF-8") from None
    if "\x00" in text:
        raise ConnectParseError("NUL in string")
    return text


def protocol_level(body: bytes) -> int | None:
    """The protocol level of a CONNECT whose protocol name is "MQTT" (4: 3.1.1, 5: MQTT 5); None otherwise."""
    try:
        name_raw, pos = _take_field(body, 0)
        level_raw, _ = _take(body, pos, 1)
    except ConnectParseError:
        return None
    return level_raw[0] if name_raw == b"MQTT" else None


def parse_connect(body: bytes) -> ConnectInfo:
    """Parse the variable header and payload of an MQTT 3.1.1 CONNECT (after the fixed header)."""
    name_raw, pos = _take_field(body, 0)
    proto_name = _text(name_raw)
    level_raw, pos = _take(body, pos, 1)
    flags_offset = pos
    flags_raw, pos = _take(body, pos, 1)
    ka_raw, pos = _take(body, pos, 2)
    flags = flags_raw[0]
    if flags & 0x01:
        raise ConnectParseError("reserved flag set")
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if not will_flag and (will_qos or will_retain):
        raise ConnectParseError("will qos/retain without will flag")
    if will_qos == 3:
        raise ConnectParseError("will qos 3")
    cid_raw, pos = _take_field(body, pos)
    will_topic: str | None = None
    if will_flag:
        wt_raw, pos = _take_field(body, pos)
        will_topic = _text(wt_raw)
        _, pos = _take_field(body, pos)  # will message: never looked at
    username: str | None = None
    password: str | None = None
    creds_offset = pos
    if flags & 0x80:
        u_raw, pos = _take_field(body, pos)
        username = _text(u_raw)
    if flags & 0x40:
        p_raw, pos = _take_field(body, pos)
        password = p_raw.decode("utf-8", "surrogateescape")
    if pos != len(body):
        raise ConnectParseError("trailing bytes")
    return ConnectInfo(
        proto_name=proto_name,
        proto_level=level_raw[0],
        clean_session=bool(flags & 0x02),
        keep_alive=struct.unpack("!H", ka_raw)[0],
        client_id=_text(cid_raw),
        will_topic=will_topic,
        will_qos=will_qos,
        will_retain=will_retain,
        username=username,
        password=password,
        creds_offset=creds_offset,
        flags_offset=flags_offset,
    )


@dataclass
class BrokerStats:
    """Counters the embedded broker keeps; tests and operators read them."""

    active_connections: int = 0
    refused_limit: int = 0  # closed at accept: too many connections
    refused_connect: int = 0  # CONNECT refused by the gate (credentials, client id, will)
    refused_user_limit: int = 0  # CONNECT refused: the user's connection/session bound is reached
    pending_connects: int = 0  # sockets whose CONNECT has not been accepted yet
    offline_dropped: int = 0  # messages not queued for a disconnected session: its queue was full
    bad_framing: int = 0  # closed for malformed/oversized control packets or CONNECT timeout
    oversize_dropped: int = 0  # PUBLISH payloads over the limit, dropped
    retain_cleared: int = 0


ConnectGate = Callable[[ConnectInfo], Awaitable[int]]


@dataclass(frozen=True)
class FramingLimits:
    max_message_size: int
    max_packet_size: int
    connect_timeout: float
    # a CONNECT is judged before anyone is authenticated: keep what a stranger can make us buffer small
    max_connect_size: int = 65536
    # QoS 2 PUBLISHes awaiting their PUBREL on one connection: amqtt keeps each one forever otherwise
    max_qos2_pending: int = 64


class FramedReader(ReaderAdapter):  # type: ignore[misc]  # amqtt is untyped
    """A ReaderAdapter that gives amqtt whole, checked packets (see the module docstring)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        limits: FramingLimits,
        gate: ConnectGate,
        stats: BrokerStats,
        *,
        peer: str,
        connect_as: tuple[str, str] | None = None,
    ) -> None:
        self._connect_as = connect_as  # (user, password) amqtt sees instead of the CONNECT's own
        self._r = reader
        self._w = writer
        self._limits = limits
        self._gate = gate
        self._stats = stats
        self._peer = peer
        self._buf = b""
        self._pos = 0
        self._closed = False
        self._seen_connect = False
        # progress of the packet being framed (kept across cancellations)
        self._hdr = bytearray()
        self._topic_len: bytes | None = None
        self._skip_left = 0
        self._skip_ack: bytes | None = None
        self._qos2_ids: set[bytes] = set()
        self.accepted: ConnectInfo | None = None  # the CONNECT the gate accepted

    async def accept_connect(self) -> ConnectInfo | None:
        """Frame and judge the first packet (the CONNECT); None if refused or closed.

        The accepted CONNECT stays buffered for amqtt, so a refused socket never reaches amqtt
        at all (amqtt logs an ERROR for every stream that ends before a CONNECT).
        """
        while self.accepted is None and not self._closed:
            await self._fill()
        return self.accepted

    def seed_qos2(self, packet_ids: Iterable[int]) -> None:
        """QoS 2 messages the resumed session still holds without PUBREL count against the bound."""
        self._qos2_ids.update(pid.to_bytes(2, "big") for pid in packet_ids)

    def refuse(self, code: int) -> None:
        """Answer an accepted-by-the-gate CONNECT with CONNACK ``code`` after all, and close."""
        self._w.write(bytes([0x20, 0x02, 0x00, code]))
        self._close()

    async def _fill(self) -> None:
        if not self._seen_connect:
            try:
                async with asyncio.timeout(self._limits.connect_timeout):
                    packet = await self._next_packet()
            except TimeoutError:
                self._stats.bad_framing += 1
                log.warning("closing %s: no CONNECT in %.0f s", self._peer, self._limits.connect_timeout)
                self._close()
                return
        else:
            packet = await self._next_packet()
        if packet:
            self._buf = self._buf[self._pos :] + packet
            self._pos = 0

    async def read(self, n: int = -1) -> bytes:
        if n < 0:  # amqtt never asks for "all"; give what is buffered
            n = max(len(self._buf) - self._pos, 1)
        while len(self._buf) - self._pos < n:
            if self._closed:
                return b""
            await self._fill()
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def feed_eof(self) -> None:
        self._r.feed_eof()

    def _close(self) -> None:
        self._closed = True
        self._w.close()

    def _fail(self, why: str) -> bytes:
        self._stats.bad_framing += 1
        log.warning("closing %s: %s", self._peer, why)
        self._close()
        return b""

    async def _next_packet(self) -> bytes:
        """Frame the next packet; b"" when it was dropped or the connection is closed."""
        try:
            return await self._frame()
        except (asyncio.IncompleteReadError, ConnectionError):
            self._close()
            return b""

    async def _frame(self) -> bytes:
        r = self._r
        if self._skip_left:
            return await self._skip()
        if not self._hdr:
            self._hdr += await r.readexactly(1)
        while len(self._hdr) == 1 or self._hdr[-1] & 0x80:
            if len(self._hdr) >= 5:
                return self._fail("malformed remaining length")
            self._hdr += await r.readexactly(1)
        remaining = 0
        for i, byte in enumerate(self._hdr[1:]):
            remaining |= (byte & 0x7F) << (7 * i)
        ptype = self._hdr[0] >> 4
        if not self._seen_connect and ptype != CONNECT:
            return self._fail("first packet is not CONNECT")
        if ptype == PUBLISH:
            return await self._publish(remaining)
        if ptype == CONNECT and remaining > self._limits.max_connect_size:
            return self._fail(f"CONNECT of {remaining} bytes over the limit")
        if remaining > self._limits.max_packet_size:
            return self._fail(f"packet type {ptype} of {remaining} bytes over the limit")
        body = await r.readexactly(remaining)
        header = bytes(self._hdr)
        self._hdr.clear()
        if ptype == CONNECT and not self._seen_connect:
            self._seen_connect = True
            return await self._connect(header, body)
        if ptype == PUBREL:
            self._qos2_ids.discard(body[:2])
        return header + body

    async def _connect(self, header: bytes, body: bytes) -> bytes:
        level = protocol_level(body)
        if level is not None and level != 4:
            # MQTT 3.1.1 [MQTT-3.1.2-2]: CONNACK 1 (unacceptable protocol level), then close. An MQTT 5
            # client (a backend worker with --share-group) then learns why instead of retrying forever.
            self._stats.refused_connect += 1
            log.warning("refused CONNECT from %s: MQTT protocol level %d (this broker speaks 3.1.1 only)",
                        self._peer, level)
            self.refuse(CONNACK_BAD_PROTOCOL)
            return b""
        try:
            info = parse_connect(body)
        except ConnectParseError as exc:
            return self._fail(f"malformed CONNECT ({exc})")
        code = await self._gate(info)
        if code != CONNACK_ACCEPTED:
            self._stats.refused_connect += 1
            log.warning("refused CONNECT from %s (user %r): code %d", self._peer, info.username, code)
            self.refuse(code)
            return b""
        if self._connect_as is not None:
            user, password = self._connect_as
            self.accepted = dataclasses.replace(info, username=user, password=None)
            return with_credentials(body, info, user, password)
        self.accepted = info
        return header + body

    async def _publish(self, remaining: int) -> bytes:
        r = self._r
        flags = self._hdr[0] & 0x0F
        qos = (flags >> 1) & 0x03
        if qos == 3:
            return self._fail("PUBLISH with QoS 3")
        if self._topic_len is None:
            self._topic_len = await r.readexactly(2)
        (topic_len,) = struct.unpack("!H", self._topic_len)
        id_len = 2 if qos else 0
        payload_len = remaining - 2 - topic_len - id_len
        if payload_len < 0:
            return self._fail("PUBLISH shorter than its headers")
        if payload_len > self._limits.max_message_size:
            topic_and_id = await r.readexactly(topic_len + id_len)
            topic = topic_and_id[:topic_len].decode("utf-8", "replace")
            self._hdr.clear()
            self._topic_len = None
            self._stats.oversize_dropped += 1
            log.warning(
                "dropped PUBLISH from %s on %r: payload %d bytes > limit %d",
                self._peer, topic, payload_len, self._limits.max_message_size,
            )
            if qos == 2:
                return self._fail("oversize QoS 2 PUBLISH")
            self._skip_ack = (b"\x40\x02" + topic_and_id[topic_len:]) if qos == 1 else None
            self._skip_left = payload_len
            return await self._skip()
        rest = await r.readexactly(remaining - 2)
        if qos == 2:
            self._qos2_ids.add(rest[topic_len : topic_len + 2])
            if len(self._qos2_ids) > self._limits.max_qos2_pending:
                return self._fail(f"over {self._limits.max_qos2_pending} QoS 2 messages without PUBREL")
        first = self._hdr[0]
        if first & 0x01:
            first &= 0xFE
            self._stats.retain_cleared += 1
        packet = bytes([first]) + bytes(self._hdr[1:]) + self._topic_len + rest
        self._hdr.clear()
        self._topic_len = None
        return packet

    async def _skip(self) -> bytes:
        while self._skip_left:
            chunk = await self._r.read(min(self._skip_left, _SKIP_CHUNK))
            if not chunk:
                self._close()
                return b""
            self._skip_left -= len(chunk)
        if self._skip_ack is not None:
            self._w.write(self._skip_ack)  # PUBACK: one write, so it never splits another packet
            self._skip_ack = None
        return b""
