"""The link's paho client reads its socket in large pieces (runtime/mqtt.py, ``Client``).

paho reads a packet with a system call for its first byte, one per byte of its remaining length and
one or more for the rest; ``runtime.mqtt.Client`` asks the socket for up to ``READ_SIZE`` bytes
at once and serves paho's small reads from them. What must hold:

- paho sees the same bytes in the same order: for any stream of packets cut into any pieces, the
  messages handed to ``on_message`` (and the PUBACKs written back) are those of paho's own client
  fed the same pieces, after every piece (nothing is held back: bytes it buffered are read although
  the socket no longer shows them as readable), with fewer ``recv`` calls;
- nothing crosses from one connection to the next;
- against real brokers, with paho's loop thread and with the shared network loop, a burst of QoS 1
  messages arrives whole and in order, every PUBACK goes out (the sender's in-flight window
  empties), and paho's loop thread no longer writes a wake-up byte for each PUBACK it queues.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from runtime.mqtt import READ_SIZE, Client, MqttLink
from runtime.netloop import NetworkLoop
from tests.test_netloop import BROKERS, Inbox, _broker, _settings, _started, _up


# -- a socket fed piece by piece ------------------------------------------------------------------
class PieceSocket:
    """A non-blocking socket whose receive buffer is filled one piece at a time by the test."""

    def __init__(self) -> None:
        self.inbound = bytearray()  # arrived, not yet read
        self.sent = bytearray()
        self.recv_calls = 0
        self.closed = False

    def deliver(self, piece: bytes) -> None:
        self.inbound += piece

    def readable(self) -> bool:
        return bool(self.inbound)

    def recv(self, n: int) -> bytes:
        self.recv_calls += 1
        if not self.inbound:
            raise BlockingIOError
        out = bytes(self.inbound[:n])
        del self.inbound[:n]
        return out

    def send(self, data: bytes | bytearray | memoryview) -> int:
        self.sent += data
        return len(data)

    def close(self) -> None:
        self.closed = True


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(topic: str, payload: bytes, qos: int, mid: int, retain: bool) -> bytes:
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t + (mid.to_bytes(2, "big") if qos else b"") + payload
    return bytes([0x30 | (qos << 1) | int(retain)]) + _remaining_length(len(body)) + body


PINGRESP = b"\xd0\x00"
_BYTES = bytes(range(256)) * (90_000 // 256 + 2)


def _payload(size: int, seed: int) -> bytes:
    return _BYTES[seed:seed + size]


def _client(cls: type[paho.Client], sock: PieceSocket) -> tuple[paho.Client, list[tuple[str, bytes, int, int, bool]]]:
    got: list[tuple[str, bytes, int, int, bool]] = []
    c = cls(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)

    def on_message(client: paho.Client, userdata: object, m: paho.MQTTMessage) -> None:
        got.append((m.topic, bytes(m.payload), m.qos, m.mid, bool(m.retain)))

    c.on_message = on_message
    c._sock = sock  # type: ignore[assignment]  # as connected: paho reads and writes this socket
    return c, got


def _drive(client: paho.Client, sock: PieceSocket) -> None:
    """What a select loop does: read while the socket shows bytes (and only then)."""
    while sock.readable():
        rc = client.loop_read()
        assert rc == paho.MQTTErrorCode.MQTT_ERR_SUCCESS, rc  # a packet read wrong, the connection dropped


_topics = st.text(alphabet="abcxyz/+é0", min_size=1, max_size=40)
_sizes = st.one_of(st.integers(0, 300), st.integers(300, 5_000), st.sampled_from([READ_SIZE - 7, READ_SIZE, 70_000]))
_packets = st.lists(
    st.one_of(
        st.tuples(_topics, _sizes, st.integers(0, 1), st.integers(1, 65535), st.booleans()),
        st.just(None),  # a PINGRESP: two bytes, nothing for on_message
    ),
    min_size=1, max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packets=_packets, cuts=st.lists(st.integers(1, 90_000), max_size=40), seed=st.integers(0, 255))
def test_any_stream_cut_anywhere_reads_as_with_pahos_own_client(
    packets: list[tuple[str, int, int, int, bool] | None], cuts: list[int], seed: int
) -> None:
    stream = b"".join(
        PINGRESP if p is None else publish_packet(p[0], _payload(p[1], seed), p[2], p[3], p[4])
        for p in packets
    )
    pieces, at = [], 0
    for cut in cuts:
        if at >= len(stream):
            break
        pieces.append(stream[at:at + cut])
        at += cut
    if at < len(stream):
        pieces.append(stream[at:])
    ours_sock, stock_sock = PieceSocket(), PieceSocket()
    ours, ours_got = _client(Client, ours_sock)
    stock, stock_got = _client(paho.Client, stock_sock)
    for piece in pieces:
        ours_sock.deliver(piece)
        stock_sock.deliver(piece)
        _drive(ours, ours_sock)
        _drive(stock, stock_sock)
        # after every piece: the same messages so far, nothing left in our buffer unread
        assert ours_got == stock_got
        assert ours.buffered() == 0  # type: ignore[attr-defined]
        assert bytes(ours_sock.sent) == bytes(stock_sock.sent)  # the same PUBACKs, in the same order
    expected = [(p[0], _payload(p[1], seed), p[2], p[3] if p[2] else 0, p[4])
                for p in packets if p is not None]
    assert ours_got == expected
    assert ours_sock.recv_calls <= stock_sock.recv_calls


def test_a_burst_of_small_packets_takes_one_recv_where_paho_takes_several_per_packet() -> None:
    stream = b"".join(publish_packet("sealmq/v1/d/data/up", bytes(256), 1, i + 1, False) for i in range(100))
    ours_sock, stock_sock = PieceSocket(), PieceSocket()
    ours, ours_got = _client(Client, ours_sock)
    stock, stock_got = _client(paho.Client, stock_sock)
    for sock, client in ((ours_sock, ours), (stock_sock, stock)):
        sock.deliver(stream)
        _drive(client, sock)
    assert len(ours_got) == len(stock_got) == 100
    # paho: the first byte, the remaining length a byte at a time (a body over 127 B takes two),
    # then the rest: 4 per packet
    assert stock_sock.recv_calls == 400
    # ours: the whole stream at once (27 KB < READ_SIZE); its last byte ends a packet, so no more
    assert ours_sock.recv_calls == 1


def test_bytes_buffered_from_one_connection_never_reach_the_next() -> None:
    first = PieceSocket()
    c, got = _client(Client, first)
    one = publish_packet("t/1", b"first", 0, 0, False)
    first.deliver(one + publish_packet("t/2", b"never", 0, 0, False)[:5])  # a whole packet, then part of one
    _drive(c, first)
    assert got == [("t/1", b"first", 0, 0, False)]
    # the connection drops with part of a packet read; paho resets its packet state on a new one
    second = PieceSocket()
    c._sock = second  # type: ignore[assignment]
    c._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
                    "remaining_length": 0, "packet": bytearray(b""), "to_process": 0, "pos": 0}
    assert c.buffered() == 0  # type: ignore[attr-defined]
    second.deliver(publish_packet("t/3", b"second", 0, 0, False))
    _drive(c, second)
    assert got == [("t/1", b"first", 0, 0, False), ("t/3", b"second", 0, 0, False)]


def test_a_packet_larger_than_one_read_is_read_whole() -> None:
    sock = PieceSocket()
    c, got = _client(Client, sock)
    payload = bytes(range(256)) * 800  # 204,800 B: several reads of READ_SIZE
    sock.deliver(publish_packet("big", payload, 1, 7, False))
    _drive(c, sock)
    assert got == [("big", payload, 1, 7, False)]
    assert bytes(sock.sent) == b"\x40\x02\x00\x07"  # its PUBACK


# -- against real brokers ---------------------------------------------------------------------------
class CountingWake:
    """Stands in for paho's wake-up socket: counts the bytes written to it, by thread."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.by_thread: dict[str, int] = {}

    def send(self, data: bytes) -> int:
        name = threading.current_thread().name
        self.by_thread[name] = self.by_thread.get(name, 0) + 1
        return self.real.send(data)  # type: ignore[attr-defined, no-any-return]

    def close(self) -> None:
        self.real.close()  # type: ignore[attr-defined]


N_BURST = 2_000


@pytest.mark.parametrize("loop", ["paho thread", "network loop"])
@pytest.mark.parametrize("kind", BROKERS)
def test_a_burst_of_qos1_messages_arrives_whole_in_order_and_every_puback_goes_out(
    kind: str, loop: str, tmp_path: Path
) -> None:
    net = NetworkLoop(name="test-net") if loop == "network loop" else None
    with _broker(kind, tmp_path, n_devices=1) as b:  # type: ignore[attr-defined]
        dev = b.devices[0].username
        inbox = Inbox()
        receiver = MqttLink(_settings(b, b.backend, "rx"), inbox, [_up(dev)], network=net)
        sender = MqttLink(_settings(b, b.devices[0], "tx"), lambda t, p: None, [])
        _started([receiver, sender])
        assert isinstance(receiver.client, Client)
        wake = None
        if net is None:
            wake = CountingWake(receiver.client._sockpairW)
            receiver.client._sockpairW = wake  # type: ignore[assignment]
        for i in range(N_BURST):
            sender.publish(_up(dev), i.to_bytes(4, "big") + bytes(252))
        got = inbox.take(N_BURST, timeout=120)
        assert [int.from_bytes(p[:4], "big") for _, p in got] == list(range(N_BURST))
        assert inbox.quiet(0.3) == []
        # the sender's window empties: the broker had every PUBACK of the receiver's, and sent its own
        deadline = time.monotonic() + 30
        while sender.client._out_messages and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sender.client._out_messages
        if wake is not None:
            loop_thread = receiver.client._thread
            assert loop_thread is not None
            # paho's own client writes one for each PUBACK it queues on this thread
            assert wake.by_thread.get(loop_thread.name, 0) == 0
        receiver.stop()
        sender.stop()
        if net is not None:
            net.stop()


@pytest.mark.parametrize("kind", BROKERS)
def test_pahos_own_client_class_still_works_as_the_links_client(kind: str, tmp_path: Path) -> None:
    """The benchmark's "paho's own client" rows run the link on paho.Client: it must still work."""
    with _broker(kind, tmp_path, n_devices=1) as b:  # type: ignore[attr-defined]
        dev = b.devices[0].username
        inbox = Inbox()
        MqttLink.client_class = paho.Client
        try:
            receiver = MqttLink(_settings(b, b.backend, "rx"), inbox, [_up(dev)])
            sender = MqttLink(_settings(b, b.devices[0], "tx"), lambda t, p: None, [])
        finally:
            MqttLink.client_class = Client
        assert type(receiver.client) is paho.Client
        _started([receiver, sender])
        wake = CountingWake(receiver.client._sockpairW)
        receiver.client._sockpairW = wake  # type: ignore[assignment]
        for i in range(50):
            sender.publish(_up(dev), bytes([i]))
        assert [p for _, p in inbox.take(50, timeout=30)] == [bytes([i]) for i in range(50)]
        # the difference the test above checks: paho's client wakes its own loop for its PUBACKs
        loop_thread = receiver.client._thread
        assert loop_thread is not None and wake.by_thread.get(loop_thread.name, 0) >= 50
        receiver.stop()
        sender.stop()


def test_the_piece_socket_serves_reads_as_a_socket_does() -> None:
    s = PieceSocket()
    with pytest.raises(BlockingIOError):
        s.recv(1)
    s.deliver(b"abc")
    assert s.recv(2) == b"ab" and s.recv(10) == b"c"
    assert not s.readable()
