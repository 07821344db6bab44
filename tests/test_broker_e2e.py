"""The hardening, shown against the real brokers: embedded amqtt and a mosquitto child process."""

from __future__ import annotations

import socket
import time

import pytest

from broker.mosquitto_config import PACKET_OVERHEAD
from tests import brokers
from tests.brokers import BrokerHandle, Creds, needs_mosquitto, raw_connect, running_amqtt, running_mosquitto
from tests.e2e import wait_for

any_broker = brokers.any_broker
amqtt_broker = brokers.amqtt_broker

DEV = "sealmq/v1/{}/{}/{}"


def test_wrong_password_and_unknown_user_refused(any_broker: BrokerHandle) -> None:
    b = any_broker
    b.connect(Creds(b.devices[0].username, "wrong"), expect_refused=True)
    b.connect(Creds("nobody", "x"), expect_refused=True)
    b.connect(None, expect_refused=True)  # anonymous
    b.connect(Creds(b.devices[1].username, b.devices[0].password), expect_refused=True)
    b.connect(b.devices[0])  # the right password still works


def test_device_confined_to_its_namespace(any_broker: BrokerHandle) -> None:
    b = any_broker
    a, b_ = b.devices[0].username, b.devices[1].username
    backend, backend_got = b.connect(b.backend)
    assert b.subscribe(backend, "sealmq/v1/+/+/up") == [1]
    dev_b, dev_b_got = b.connect(b.devices[1])
    assert b.subscribe(dev_b, DEV.format(b_, "+", "down")) == [1]
    dev_a, dev_a_got = b.connect(b.devices[0])
    assert b.subscribe(dev_a, DEV.format(a, "+", "down")) == [1]
    # wildcards spanning devices: refused (amqtt) or granted but never delivered (mosquitto 2.0)
    for flt in ("sealmq/#", "sealmq/v1/+/data/down", f"sealmq/v1/{b_}/#", "#", "sealmq/v1/+/+/up"):
        codes = b.subscribe(dev_a, flt)
        if b.kind == "amqtt":
            assert codes == [128], flt
    # A publishes on B's topics and on its own .../down: nobody may receive those
    for topic in (DEV.format(b_, "data", "up"), DEV.format(b_, "data", "down"), DEV.format(a, "data", "down"),
                  "sealmq/v1/other/x/up", "elsewhere"):
        dev_a.publish(topic, b"forged:" + topic.encode(), qos=1).wait_for_publish(5)
    # the backend sends to B, B answers: A must see neither
    backend.publish(DEV.format(b_, "data", "down"), b"for-b", qos=1).wait_for_publish(5)
    assert dev_b_got.get().payload == b"for-b"
    dev_b.publish(DEV.format(b_, "data", "up"), b"from-b", qos=1).wait_for_publish(5)
    assert backend_got.get().payload == b"from-b"
    # A's own traffic flows both ways
    dev_a.publish(DEV.format(a, "media", "up"), b"from-a", qos=1).wait_for_publish(5)
    backend.publish(DEV.format(a, "hs", "down"), b"for-a", qos=1).wait_for_publish(5)
    assert backend_got.get().payload == b"from-a"
    leaked = [m.payload for m in dev_a_got.drain(0.5) if m.payload != b"for-a"]
    assert leaked == [], leaked
    assert not any(m.payload.startswith(b"forged") for m in backend_got.drain(0.1) + dev_b_got.drain(0.1))


def test_monitor_reads_all_publishes_nothing(any_broker: BrokerHandle) -> None:
    b = any_broker
    mon, mon_got = b.connect(b.monitor)
    assert b.subscribe(mon, "sealmq/#") == [1]
    backend, backend_got = b.connect(b.backend)
    b.subscribe(backend, "sealmq/v1/+/+/up")
    dev, dev_got = b.connect(b.devices[0])
    b.subscribe(dev, DEV.format(b.devices[0].username, "+", "down"))
    for direction in ("down", "up"):
        topic = DEV.format(b.devices[0].username, "data", direction)
        mon.publish(topic, b"forged", qos=1).wait_for_publish(5)
    dev.publish(DEV.format(b.devices[0].username, "data", "up"), b"up", qos=1).wait_for_publish(5)
    backend.publish(DEV.format(b.devices[0].username, "data", "down"), b"down", qos=1).wait_for_publish(5)
    seen = sorted(m.payload for m in [mon_got.get(), mon_got.get()])
    assert seen == [b"down", b"up"]
    assert [m.payload for m in dev_got.drain(0.3)] == [b"down"]
    assert [m.payload for m in backend_got.drain(0.1)] == [b"up"]
    assert mon_got.drain(0.1) == []


def test_backend_cannot_read_down_or_write_up(any_broker: BrokerHandle) -> None:
    b = any_broker
    a = b.devices[0].username
    backend, backend_got = b.connect(b.backend)
    b.subscribe(backend, "sealmq/v1/+/+/up")
    codes = b.subscribe(backend, "sealmq/v1/+/data/down")
    if b.kind == "amqtt":
        assert codes == [128]
    dev, dev_got = b.connect(b.devices[0])
    b.subscribe(dev, DEV.format(a, "+", "down"))
    backend.publish(DEV.format(a, "data", "up"), b"backend-forged-up", qos=1).wait_for_publish(5)
    dev.publish(DEV.format(a, "data", "up"), b"real", qos=1).wait_for_publish(5)
    backend.publish(DEV.format(a, "data", "down"), b"cmd", qos=1).wait_for_publish(5)
    assert [m.payload for m in backend_got.drain(0.5)] == [b"real"]
    assert [m.payload for m in dev_got.drain(0.1)] == [b"cmd"]


def test_oversized_message_dropped_others_flow(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with running_amqtt(tmp_path, max_message_size=4096) as b:
        a = b.devices[0].username
        backend, got = b.connect(b.backend)
        b.subscribe(backend, "sealmq/v1/+/+/up")
        dev, _ = b.connect(b.devices[0])
        topic = DEV.format(a, "media", "up")
        for qos in (0, 1):
            dev.publish(topic, b"a" * 100, qos=qos).wait_for_publish(5)
            for payload in (b"B" * 4097, b"c" * 4096, b"D" * 300_000):  # over, at, far over the limit
                info = dev.publish(topic, payload, qos=qos)
                info.wait_for_publish(5)
                assert info.is_published(), (qos, len(payload))  # QoS 1: PUBACK even if dropped
            dev.publish(topic, b"e" * 10, qos=qos).wait_for_publish(5)
        sizes = [len(m.payload) for m in got.drain(0.5)]
        assert sizes == [100, 4096, 10] * 2, sizes
        assert dev.is_connected()
        assert b.broker.stats.oversize_dropped == 4


@needs_mosquitto
def test_mosquitto_oversized_packet_closes_sender_never_relayed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """max_packet_size (no deprecated message_size_limit): over the limit, the sender is disconnected."""
    with running_mosquitto(tmp_path, max_message_size=4096) as b:
        topic = DEV.format(b.devices[0].username, "media", "up")
        backend, got = b.connect(b.backend)
        b.subscribe(backend, "sealmq/v1/+/+/up")
        dev, _ = b.connect(b.devices[0])
        dev.publish(topic, b"c" * 4096, qos=1).wait_for_publish(5)
        assert len(got.get().payload) == 4096
        dev.publish(topic, b"D" * 4096 + b"D" * PACKET_OVERHEAD, qos=0)
        deadline = time.monotonic() + 5
        while dev.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not dev.is_connected()
        dev.disconnect()
        dev.loop_stop()
        dev2, _ = b.connect(b.devices[0])
        dev2.publish(topic, b"e" * 10, qos=1).wait_for_publish(5)
        assert [len(m.payload) for m in got.drain(0.5)] == [10]
        assert "message_size_limit" not in b.broker.log()  # no "replace it with max_packet_size" note


def test_refused_connects_do_not_exhaust_slots(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with running_amqtt(tmp_path, max_connections=5) as b:
        for i in range(40):
            assert raw_connect(b.host, b.port, b.devices[0].username, f"wrong{i}") == 4
        for i in range(10):
            assert raw_connect(b.host, b.port, b.devices[0].username, b.devices[0].password, "backend") == 2
            assert raw_connect(b.host, b.port, None, None, f"anon{i}") == 4
        # garbage and silent sockets are closed too
        for _ in range(20):
            with socket.create_connection((b.host, b.port)) as s:
                s.sendall(b"\x10\xff\xff\xff\xff\x7f garbage")
                assert s.recv(10) == b""  # closed by the broker, no CONNACK
        clients = [b.connect(c)[0] for c in (b.backend, *b.devices, b.monitor)]
        assert all(c.is_connected() for c in clients)
        deadline = time.monotonic() + 5
        while b.broker.stats.active_connections != 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b.broker.stats.active_connections == 4
        assert b.broker.stats.refused_connect == 60
        assert b.broker.stats.bad_framing == 20


def test_connection_limit_refuses_instead_of_queueing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with running_amqtt(tmp_path, max_connections=3, max_pending_connects=1) as b:
        b.connect(b.devices[0])
        b.connect(b.devices[1])
        with socket.create_connection((b.host, b.port), timeout=5) as pending:  # no CONNECT yet
            wait_for(lambda: b.broker.stats.pending_connects == 1)
            with socket.create_connection((b.host, b.port), timeout=5) as s:
                assert s.recv(1) == b""  # closed at once, not parked
            assert pending.fileno() >= 0
        assert b.broker.stats.refused_limit == 1


def test_client_id_bound_to_user(amqtt_broker: BrokerHandle) -> None:
    b = amqtt_broker
    backend, got = b.connect(b.backend, client_id="backend")
    b.subscribe(backend, "sealmq/v1/+/+/up")
    # device 0 tries to take over the backend's session, authenticated or not
    b.connect(Creds(b.devices[0].username, "wrong"), client_id="backend", expect_refused=True)
    b.connect(b.devices[0], client_id="backend", expect_refused=True)
    dev, _ = b.connect(b.devices[0], client_id=f"{b.devices[0].username}:agent")
    dev.publish(DEV.format(b.devices[0].username, "data", "up"), b"still-here", qos=1).wait_for_publish(5)
    assert got.get().payload == b"still-here"
    assert backend.is_connected()


@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
def test_binds_loopback_only(kind: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.brokers import MOSQUITTO, running_mosquitto

    if kind == "mosquitto" and MOSQUITTO is None:
        pytest.skip("mosquitto not installed")
    runner = running_amqtt if kind == "amqtt" else running_mosquitto
    with runner(tmp_path) as b:
        if kind == "amqtt":
            assert b.broker.addresses == [("127.0.0.1", b.port)]
        else:
            conf = b.broker.conf.read_text()
            assert f"listener {b.port} 127.0.0.1" in conf
        # the listening socket as the kernel sees it: only 127.0.0.1
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.read().splitlines()[1:]]
        listening = [row[1] for row in rows if row[3] == "0A"]
        ours = [addr for addr in listening if int(addr.split(":")[1], 16) == b.port]
        assert ours == [f"0100007F:{b.port:04X}"], ours
