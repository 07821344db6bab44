"""The shared network loop (runtime/netloop.py): many MqttLinks served by one thread, against real
brokers (the embedded amqtt, a mosquitto child process; TLS with certificates from a fresh PKI).

What must hold as with paho's own loop thread per link: every message reaches its link and only its
link, publishes from any thread go out, a link reconnects and subscribes again after the broker
restarts, a refused login is not retried, a stop (even from a callback) leaves the others running,
and TLS records already decrypted are not left waiting in the SSL object.
"""

from __future__ import annotations

import itertools
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.tls import TlsFiles
from pki import layout, store
from runtime.driver import SharedTimer
from runtime.mqtt import MqttLink, MqttSettings
from runtime.netloop import NetworkLoop
from sealmq.errors import Reason, TransportError
from tests.brokers import BrokerHandle, Creds, running_amqtt, running_mosquitto
from tests.pki_fixtures import make_pki

BROKERS = ["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)]


def _broker(kind: str, tmp_path: Path, **kw: object) -> object:
    return (running_amqtt if kind == "amqtt" else running_mosquitto)(tmp_path, **kw)  # type: ignore[arg-type]


def _settings(b: BrokerHandle, creds: Creds, tag: str) -> MqttSettings:
    return MqttSettings(host=b.host, port=b.port, username=creds.username, password=creds.password,
                        client_id=f"{creds.username}:{tag}", clean_session=True,
                        reconnect_min_delay=1, reconnect_max_delay=2)


class Inbox:
    def __init__(self) -> None:
        self.q: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.threads: set[str] = set()

    def __call__(self, topic: str, payload: bytes) -> None:
        self.threads.add(threading.current_thread().name)
        self.q.put((topic, payload))

    def take(self, n: int, timeout: float = 15.0) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        got = []
        while len(got) < n:
            got.append(self.q.get(timeout=max(0.01, deadline - time.monotonic())))
        return got

    def quiet(self, wait: float = 0.5) -> list[tuple[str, bytes]]:
        time.sleep(wait)
        extra = []
        while not self.q.empty():
            extra.append(self.q.get_nowait())
        return extra


def _up(dev: str) -> str:
    return f"sealmq/v1/{dev}/data/up"


def _down(dev: str) -> str:
    return f"sealmq/v1/{dev}/data/down"


def _stop(net: NetworkLoop, *links: MqttLink) -> None:
    for link in links:
        link.stop()
    net.stop()


def _started(links: list[MqttLink], timeout: float = 15.0) -> None:
    for link in links:
        link.start(wait=timeout)
        if link._subscriptions:  # a link without filters never sees a SUBACK
            assert link.subscribed.wait(timeout)


@pytest.mark.parametrize("kind", BROKERS)
def test_many_links_on_one_thread_each_get_their_own_messages(kind: str, tmp_path: Path) -> None:
    n, per = 6, 20
    net = NetworkLoop(name="test-net", connectors=2)
    with _broker(kind, tmp_path, n_devices=n) as b:  # type: ignore[attr-defined]
        backend_in = Inbox()
        backend = MqttLink(_settings(b, b.backend, "be"), backend_in, ["sealmq/v1/+/data/up"], network=net)
        inboxes = [Inbox() for _ in range(n)]
        devices = [MqttLink(_settings(b, c, "d"), inboxes[i], [_down(c.username)], network=net)
                   for i, c in enumerate(b.devices)]
        _started([backend, *devices])
        # publishes from this thread and from several others, interleaved
        def send(i: int) -> None:
            dev = b.devices[i].username
            for k in range(per):
                devices[i].publish(_up(dev), f"{dev}:{k}".encode())
                backend.publish(_down(dev), f"to {dev}:{k}".encode())
        senders = [threading.Thread(target=send, args=(i,)) for i in range(n)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(30)
        got = backend_in.take(n * per)
        assert sorted(p for _, p in got) == sorted(f"{c.username}:{k}".encode() for c in b.devices for k in range(per))
        for i, c in enumerate(b.devices):
            mine = inboxes[i].take(per)
            assert [p for _, p in mine] == [f"to {c.username}:{k}".encode() for k in range(per)]  # in order
            assert inboxes[i].quiet(0.1 if i else 0.5) == []
            assert inboxes[i].threads == {"test-net"}  # handled on the loop's thread, not paho's own
        assert backend_in.quiet(0.1) == []
        _stop(net, backend, *devices)
        assert net.thread is not None and not net.thread.is_alive()
        assert not [t for t in threading.enumerate() if t.name.startswith("test-net")]


@pytest.mark.mosquitto
def test_links_reconnect_and_subscribe_again_after_the_broker_restarts(tmp_path: Path) -> None:
    net = NetworkLoop(name="test-net")
    with running_mosquitto(tmp_path, n_devices=3) as b:
        connects = [0]
        backend_in = Inbox()
        backend = MqttLink(_settings(b, b.backend, "be"), backend_in, ["sealmq/v1/+/data/up"], network=net,
                           on_connect=lambda: connects.__setitem__(0, connects[0] + 1))
        inboxes = [Inbox() for _ in b.devices]
        devices = [MqttLink(_settings(b, c, "d"), inboxes[i], [_down(c.username)], network=net)
                   for i, c in enumerate(b.devices)]
        _started([backend, *devices])
        assert connects[0] == 1
        b.broker.restart()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (connects[0] == 2 and all(
                link.connected.is_set() and link.subscribed.is_set() for link in (backend, *devices))):
            time.sleep(0.05)
        assert connects[0] == 2
        for i, c in enumerate(b.devices):
            backend.publish(_down(c.username), b"after restart")
            devices[i].publish(_up(c.username), c.username.encode())
            assert inboxes[i].take(1)[0][1] == b"after restart"
        assert sorted(p for _, p in backend_in.take(len(b.devices))) == sorted(c.username.encode() for c in b.devices)
        _stop(net, backend, *devices)


@pytest.mark.parametrize("kind", BROKERS)
def test_a_refused_login_is_not_retried_and_the_others_keep_going(kind: str, tmp_path: Path) -> None:
    net = NetworkLoop(name="test-net")
    with _broker(kind, tmp_path, n_devices=1) as b:  # type: ignore[attr-defined]
        bad = MqttLink(_settings(b, Creds(b.devices[0].username, "wrong"), "bad"), lambda t, p: None, [], network=net)
        attempts = [0]
        real: Callable[[], object] = bad.client.reconnect

        def counted() -> object:
            attempts[0] += 1
            return real()
        bad.client.reconnect = counted  # type: ignore[method-assign]
        with pytest.raises(TransportError) as info:
            bad.start(wait=10)
        assert info.value.reason is Reason.NOT_AUTHORIZED
        inbox = Inbox()
        good = MqttLink(_settings(b, b.backend, "be"), inbox, ["sealmq/v1/+/data/up"], network=net)
        _started([good])
        time.sleep(2.5)  # past the reconnect delays (1 s, then 2 s): a retry would have happened
        assert attempts[0] == 1
        dev = b.devices[0].username
        good.publish(_down(dev), b"x")  # the loop still serves the good link
        other = MqttLink(_settings(b, b.devices[0], "d"), inbox, [], network=net)
        _started([other])
        other.publish(_up(dev), b"still served")
        assert inbox.take(1)[0] == (_up(dev), b"still served")
        _stop(net, good, other)


@pytest.mark.parametrize("kind", BROKERS)
def test_a_link_stopped_from_its_own_callback_leaves_the_others_running(kind: str, tmp_path: Path) -> None:
    net = NetworkLoop(name="test-net")
    with _broker(kind, tmp_path, n_devices=2) as b:  # type: ignore[attr-defined]
        stopped = threading.Event()
        holder: list[MqttLink] = []

        def stop_on_first(topic: str, payload: bytes) -> None:
            holder[0].stop()
            stopped.set()
        first = MqttLink(_settings(b, b.devices[0], "d"), stop_on_first, [_down(b.devices[0].username)], network=net)
        holder.append(first)
        inbox = Inbox()
        second = MqttLink(_settings(b, b.devices[1], "d"), inbox, [_down(b.devices[1].username)], network=net)
        backend = MqttLink(_settings(b, b.backend, "be"), lambda t, p: None, [], network=net)
        _started([first, second, backend])
        backend.publish(_down(b.devices[0].username), b"stop")
        assert stopped.wait(10)
        deadline = time.monotonic() + 5  # the loop writes the DISCONNECT once the callback returned
        while first.client.socket() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.client.socket() is None and not first.connected.is_set()
        for k in range(5):
            backend.publish(_down(b.devices[1].username), bytes([k]))
        assert [p for _, p in inbox.take(5)] == [bytes([k]) for k in range(5)]
        time.sleep(1.5)  # no reconnect of the stopped link
        assert first.client.socket() is None
        _stop(net, second, backend)


@pytest.fixture(scope="module")
def tls_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki = make_pki(tmp_path_factory.mktemp("netloop-pki") / "pki", ["dev0"]).path
    store.enroll_broker(pki, "broker", ["localhost", "127.0.0.1"])
    return pki


@pytest.mark.parametrize("kind", BROKERS)
def test_a_burst_over_tls_is_read_to_the_end(kind: str, tmp_path: Path, tls_pki: Path) -> None:
    """Small messages arrive many to a TLS record: what the SSL object decrypted but paho did not
    read yet is invisible to epoll. Every message of a burst must arrive without more traffic."""
    net = NetworkLoop(name="test-net")
    with _broker(kind, tmp_path, n_devices=1, tls=TlsFiles.from_pki(tls_pki)) as b:  # type: ignore[attr-defined]
        def tls(role: str, name: str) -> MqttSettings:
            ident = layout.identity_dir(tls_pki, role, name)
            return MqttSettings(host=b.host, port=b.tls_port, client_id=f"{name}:t", clean_session=True,
                                tls_ca=layout.anchor(tls_pki), tls_cert=ident / layout.CHAIN,
                                tls_key=ident / layout.KEY, reconnect_min_delay=1, reconnect_max_delay=2)
        inbox = Inbox()
        device = MqttLink(tls("device", "dev0"), inbox, [_down("dev0")], network=net)
        backend = MqttLink(tls("backend", "backend"), lambda t, p: None, [], network=net)
        _started([device, backend])
        n = 400
        for k in range(n):
            backend.publish(_down("dev0"), k.to_bytes(2, "big") * 8)
        got = inbox.take(n, timeout=20)
        assert [p for _, p in got] == [k.to_bytes(2, "big") * 8 for k in range(n)]
        _stop(net, device, backend)


def _read_packet(conn: ssl.SSLSocket) -> bytes:
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf
    head = exact(1)  # the fixed header, then (not returned) the remaining length
    length, mult = 0, 1
    while True:
        b = exact(1)[0]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    return head + exact(length)


def test_packets_sharing_one_tls_record_are_all_delivered(tls_pki: Path) -> None:
    """A peer that writes several MQTT packets in one TLS record (the brokers here write one record
    per packet, some brokers and TLS terminators coalesce): after the first packet, the others sit
    decrypted in the SSL object, where epoll does not see them. The peer here is a minimal TLS server
    speaking just enough MQTT (CONNACK, SUBACK, then PUBLISHes), since neither broker coalesces."""
    n, topic = 50, _down("dev0")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(layout.broker_dir(tls_pki) / layout.CHAIN),
                        str(layout.broker_dir(tls_pki) / layout.KEY))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    done = threading.Event()

    def serve() -> None:
        raw, _ = listener.accept()
        with ctx.wrap_socket(raw, server_side=True) as conn:
            assert _read_packet(conn)[0] >> 4 == 1  # CONNECT
            conn.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
            sub = _read_packet(conn)
            assert sub[0] >> 4 == 8  # SUBSCRIBE
            pid = sub[1:3]  # the packet id opens the variable header
            conn.sendall(b"\x90\x03" + pid + b"\x01")  # SUBACK, QoS 1 granted
            t = topic.encode()
            batch = b"".join(bytes([0x30, 2 + len(t) + 2]) + len(t).to_bytes(2, "big") + t + k.to_bytes(2, "big")
                             for k in range(n))
            assert len(batch) < 16384  # one TLS record
            conn.sendall(batch)
            done.wait(20)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    net = NetworkLoop(name="test-net")
    inbox = Inbox()
    link = MqttLink(MqttSettings(host="127.0.0.1", port=port, client_id="dev0:t", clean_session=True,
                                 tls_ca=layout.anchor(tls_pki)), inbox, [topic], network=net)
    try:
        _started([link])
        got = inbox.take(n, timeout=5)
        assert [p for _, p in got] == [k.to_bytes(2, "big") for k in range(n)]
    finally:
        done.set()
        link.stop()
        net.stop()
        listener.close()


class _Ticked:
    """What SharedTimer schedules: an object with ``tick()`` and ``_poll_interval`` (a driver)."""

    def __init__(self, interval: float, work: float = 0.0, fail: bool = False) -> None:
        self._poll_interval = interval
        self.ticks: list[float] = []
        self.work, self.fail = work, fail
        self.in_tick = False

    def tick(self) -> None:
        self.in_tick = True
        self.ticks.append(time.monotonic())
        time.sleep(self.work)
        self.in_tick = False
        if self.fail:
            raise RuntimeError("a failing tick")


def test_the_shared_timer_ticks_each_driver_on_its_own_period_and_survives_a_failing_one() -> None:
    timer = SharedTimer(name="test-timer")
    fast, slow, bad = _Ticked(0.05), _Ticked(0.2), _Ticked(0.05, fail=True)
    for d in (fast, slow, bad):
        timer.add(d)  # type: ignore[arg-type]
    time.sleep(1.05)
    timer.stop()
    assert 15 <= len(fast.ticks) <= 21 and 4 <= len(slow.ticks) <= 5 and 15 <= len(bad.ticks) <= 21
    gaps = [b - a for a, b in itertools.pairwise(slow.ticks)]
    assert all(0.15 < g < 0.3 for g in gaps), gaps
    assert not [t for t in threading.enumerate() if t.name == "test-timer"]


def test_removing_a_driver_waits_for_its_tick_and_ends_its_ticks() -> None:
    timer = SharedTimer(name="test-timer")
    busy, other = _Ticked(0.05, work=0.3), _Ticked(0.05)
    timer.add(busy)  # type: ignore[arg-type]
    timer.add(other)  # type: ignore[arg-type]
    deadline = time.monotonic() + 5
    while not busy.in_tick and time.monotonic() < deadline:
        time.sleep(0.005)
    assert busy.in_tick
    timer.remove(busy)  # type: ignore[arg-type]
    assert not busy.in_tick  # returned only once the tick in progress ended
    n = len(busy.ticks)
    before = len(other.ticks)
    time.sleep(0.4)
    assert len(busy.ticks) == n and len(other.ticks) >= before + 4
    timer.stop()
