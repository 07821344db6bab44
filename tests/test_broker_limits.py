"""Per-user bounds, client-id binding, ACL by role, $share and the broadcast race, on the real brokers.

An attacker here holds one valid device login (or none). Bounds are set small in the tests (a cap of
2 rather than 1,000 sockets) so each test stays short.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from tests import brokers
from tests.brokers import BrokerHandle, Creds, raw_connect, running_amqtt

any_broker = brokers.any_broker

UP = "sealmq/v1/{}/data/up"


def _field(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _raw_session(b: BrokerHandle, creds: Creds, client_id: str, clean: bool = True) -> socket.socket:
    """A raw MQTT 3.1.1 session (CONNECT accepted) for packets paho would not send."""
    flags = 0xC2 if clean else 0xC0
    body = _field(b"MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big") + _field(client_id.encode())
    body += _field(creds.username.encode()) + _field(creds.password.encode())
    s = socket.create_connection((b.host, b.port), timeout=5)
    s.sendall(b"\x10" + _varint(len(body)) + body)
    connack = s.recv(4)
    assert connack[:2] == b"\x20\x02" and connack[3] == 0, connack  # accepted (session present or not)
    return s


def _closed_by_broker(s: socket.socket) -> bool:
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        return False
    return True


def _wait(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- finding 1: client-id takeover -------------------------------------------------------------

def test_no_user_takes_over_another_users_client_id(any_broker: BrokerHandle) -> None:
    b = any_broker
    dev0, dev1 = b.devices
    backend, got = b.connect(b.backend, client_id="backend:backend")
    drops: list[object] = []
    backend.on_disconnect = lambda *a: drops.append(a)
    b.subscribe(backend, "sealmq/v1/+/+/up")
    victim, _ = b.connect(dev1, client_id="dev1:agent")
    victim.on_disconnect = lambda *a: drops.append(a)
    for cid in ("backend:backend", "backend", "backend:worker-2", "dev1", "dev1:agent", "monitor"):
        if b.kind == "amqtt":  # refused outright (CONNACK 2)
            assert raw_connect(b.host, b.port, dev0.username, dev0.password, cid) == 2, cid
        else:  # mosquitto: accepted, but the id is replaced by the user name
            attacker, _ = b.connect(dev0, client_id=cid)
            time.sleep(0.3)  # mosquitto kicks the holder of a reused id at once
            attacker.disconnect()
            attacker.loop_stop()
    sender, _ = b.connect(dev0)
    sender.publish(UP.format(dev0.username), b"still-here", qos=1).wait_for_publish(5)
    assert got.get().payload == b"still-here"
    assert drops == [], "a device's CONNECT disconnected another user's client"
    assert backend.is_connected() and victim.is_connected()


# --- finding 2: bounds per user (embedded broker) ----------------------------------------------

def test_per_user_connection_cap_and_backend_reserve(tmp_path: Path) -> None:
    with running_amqtt(tmp_path, n_devices=4, max_connections=10, max_connections_per_user=2,
                       reserved_backend_connections=3, max_pending_connects=1) as b:
        d = b.devices
        held = [b.connect(d[0], client_id=f"dev0:{i}")[0] for i in range(2)]
        assert raw_connect(b.host, b.port, d[0].username, d[0].password, "dev0:2") == 3  # over its own cap
        held += [b.connect(c, client_id=f"{c.username}:{i}")[0] for c in d[1:3] for i in range(2)]
        # 6 = 10 - 3 reserved - 1 pending slots open to non-backend users: all taken
        assert raw_connect(b.host, b.port, d[3].username, d[3].password, "dev3") == 3
        assert raw_connect(b.host, b.port, b.monitor.username, b.monitor.password, "monitor") == 3
        backends = [b.connect(b.backend, client_id=f"backend:{i}")[0] for i in range(3)]  # the reserve
        assert all(c.is_connected() for c in held + backends)
        assert b.broker.stats.refused_user_limit == 3
        held[0].disconnect()
        held[0].loop_stop()
        assert _wait(lambda: raw_connect(b.host, b.port, d[3].username, d[3].password, "dev3") == 0)


def test_persistent_sessions_per_user_bounded_and_expire(tmp_path: Path) -> None:
    with running_amqtt(tmp_path, max_sessions_per_user=2, session_expiry=1) as b:
        dev = b.devices[0]
        for cid in ("dev0:s1", "dev0:s2"):
            c, _ = b.connect(dev, client_id=cid, clean_session=False)
            c.disconnect()
            c.loop_stop()
        b.connect(dev, client_id="dev0:s3", clean_session=False, expect_refused=True)
        b.connect(b.devices[1], client_id="dev1:s1", clean_session=False)  # other users unaffected
        sessions = b.broker._broker._sessions
        assert _wait(lambda: "dev0:s1" not in sessions and "dev0:s2" not in sessions)  # expired after 1 s
        b.connect(dev, client_id="dev0:s3", clean_session=False)


def test_qos2_without_pubrel_bounded(tmp_path: Path) -> None:
    with running_amqtt(tmp_path, max_qos2_pending=5) as b:
        s = _raw_session(b, b.devices[0], "dev0:raw")
        topic = _field(UP.format("dev0").encode())
        with s:
            for pid in range(1, 7):  # never sends PUBREL
                body = topic + pid.to_bytes(2, "big") + b"x" * 1000
                s.sendall(b"\x34" + _varint(len(body)) + body)
            assert _closed_by_broker(s)
        assert b.broker.stats.bad_framing == 1


def _qos2(s: socket.socket, pid: int) -> None:
    body = _field(UP.format("dev0").encode()) + pid.to_bytes(2, "big") + b"x" * 1000
    s.sendall(b"\x34" + _varint(len(body)) + body)


def test_qos2_without_pubrel_bounded_across_reconnects(tmp_path: Path) -> None:
    with running_amqtt(tmp_path, max_qos2_pending=5) as b:
        with _raw_session(b, b.devices[0], "dev0:raw", clean=False) as s:
            for pid in (1, 2, 3):
                _qos2(s, pid)
            s.settimeout(1)
            assert not _closed_by_broker(s)  # 3 PUBRECs, still open
        session = b.broker._broker._sessions["dev0:raw"][0]
        assert _wait(lambda: session.transitions.state == "disconnected")
        with _raw_session(b, b.devices[0], "dev0:raw", clean=False) as s:
            for pid in (4, 5, 6):  # 3 held by the session + 3 > 5
                _qos2(s, pid)
            assert _closed_by_broker(s)
        assert len(session.inflight_in) <= 5


def test_offline_queue_bounded_for_devices_not_for_backend(tmp_path: Path) -> None:
    with running_amqtt(tmp_path, max_offline_queue=5) as b:
        dev = b.devices[0]
        c, _ = b.connect(dev, client_id="dev0:parked", clean_session=False)
        b.subscribe(c, "sealmq/v1/dev0/+/down")
        c.disconnect()
        c.loop_stop()
        be, _ = b.connect(b.backend, client_id="backend:parked", clean_session=False)
        b.subscribe(be, "sealmq/v1/+/+/up")
        be.disconnect()
        be.loop_stop()
        time.sleep(0.3)
        pub_be, _ = b.connect(b.backend, client_id="backend:pub")
        pub_dev, _ = b.connect(b.devices[1])
        for i in range(12):
            pub_be.publish("sealmq/v1/dev0/data/down", str(i).encode(), qos=1).wait_for_publish(5)
            pub_dev.publish(UP.format("dev1"), str(i).encode(), qos=1).wait_for_publish(5)
        time.sleep(0.3)
        _, dev_got = b.connect(dev, client_id="dev0:parked", clean_session=False)
        _, be_got = b.connect(b.backend, client_id="backend:parked", clean_session=False)
        assert sorted(int(m.payload) for m in dev_got.drain(1.0)) == list(range(5))
        assert sorted(int(m.payload) for m in be_got.drain(0.1)) == list(range(12))
        assert b.broker.stats.offline_dropped == 7


def test_unauthenticated_large_connect_closed_at_once(tmp_path: Path) -> None:
    with running_amqtt(tmp_path, connect_timeout=30) as b, socket.create_connection((b.host, b.port), timeout=5) as s:
        s.sendall(b"\x10" + _varint(200_000) + b"\x00\x04MQTT")  # never finished, announced 200 kB
        assert _closed_by_broker(s)  # not buffered until connect_timeout


def test_refused_connect_logs_no_amqtt_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with running_amqtt(tmp_path) as b:
        assert raw_connect(b.host, b.port, b.devices[0].username, "wrong") == 4
        b.connect(b.devices[0]).__getitem__(0).disconnect()
        time.sleep(0.3)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()] == []
    assert any("refused CONNECT" in r.getMessage() for r in caplog.records)


# --- finding 3: ACL by role, $share ------------------------------------------------------------

def test_backend_and_monitor_cannot_feed_the_uplink(any_broker: BrokerHandle) -> None:
    b = any_broker
    backend, got = b.connect(b.backend)
    b.subscribe(backend, "sealmq/v1/+/+/up")
    mon, _ = b.connect(b.monitor)
    for ch in ("hs", "data", "media"):  # a device named like them would be allowed these
        mon.publish(f"sealmq/v1/monitor/{ch}/up", b"forged-by-monitor", qos=1).wait_for_publish(5)
        backend.publish(f"sealmq/v1/backend/{ch}/up", b"forged-by-backend", qos=1).wait_for_publish(5)
    dev, _ = b.connect(b.devices[0])
    dev.publish(UP.format(b.devices[0].username), b"real", qos=1).wait_for_publish(5)
    assert [m.payload for m in got.drain(0.5)] == [b"real"]


def test_device_share_subscription_steals_nothing(any_broker: BrokerHandle) -> None:
    b = any_broker
    backend, got = b.connect(b.backend)
    b.subscribe(backend, "sealmq/v1/+/+/up")
    thief, stolen = b.connect(b.devices[1])
    codes = b.subscribe(thief, "$share/g/sealmq/v1/+/+/up")
    if b.kind == "amqtt":
        assert codes == [128]
    dev, _ = b.connect(b.devices[0])
    for i in range(20):
        dev.publish(UP.format(b.devices[0].username), str(i).encode(), qos=1).wait_for_publish(5)
    assert sorted(int(m.payload) for m in got.drain(0.5)) == list(range(20))
    assert stolen.drain(0.1) == []


@pytest.mark.mosquitto
@brokers.needs_mosquitto
def test_control_mosquitto_share_group_of_known_name_loses_messages(tmp_path: Path) -> None:
    """Documented limit: mosquitto's acl_file never refuses a SUBSCRIBE, so a device that knows the
    backend's $share group name joins it and the messages routed to it are dropped (read ACL)."""
    with brokers.running_mosquitto(tmp_path) as b:
        backend, got = b.connect(b.backend)
        assert b.subscribe(backend, "$share/workers/sealmq/v1/+/+/up") == [1]
        thief, stolen = b.connect(b.devices[1])
        assert b.subscribe(thief, "$share/workers/sealmq/v1/+/+/up") == [1]
        dev, _ = b.connect(b.devices[0])
        for i in range(20):
            dev.publish(UP.format(b.devices[0].username), str(i).encode(), qos=1).wait_for_publish(5)
        assert len(got.drain(0.5)) < 20
        assert stolen.drain(0.1) == []


# --- finding 4: amqtt broadcast race (issue 12) ------------------------------------------------

def test_broadcast_reaches_steady_subscriber_while_subscriptions_churn(tmp_path: Path) -> None:
    n = 300
    with running_amqtt(tmp_path, n_devices=4) as b:
        mon, mon_got = b.connect(b.monitor)  # a matching filter first: the broadcast awaits on it
        b.subscribe(mon, "sealmq/#")
        backend, got = b.connect(b.backend)
        b.subscribe(backend, "sealmq/v1/+/+/up")
        stop = threading.Event()

        def churn(creds: Creds) -> None:
            i = 0
            while not stop.is_set():
                c, _ = b.connect(creds, client_id=f"{creds.username}:{i % 2}")
                for ch in ("hs", "data", "media"):
                    c.subscribe(f"sealmq/v1/{creds.username}/{ch}/down", 1)
                time.sleep(0.01)
                c.disconnect()
                c.loop_stop()
                i += 1

        threads = [threading.Thread(target=churn, args=(c,), daemon=True) for c in b.devices[1:]]
        for t in threads:
            t.start()
        try:
            dev, _ = b.connect(b.devices[0])
            infos = [dev.publish(UP.format(b.devices[0].username), str(i).encode(), qos=1) for i in range(n)]
            for info in infos:
                info.wait_for_publish(30)
            _wait(lambda: got.q.qsize() >= n, 15)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert sorted(int(m.payload) for m in got.drain(0.3)) == list(range(n))
        assert sorted({int(m.payload) for m in mon_got.drain(0.1)}) == list(range(n))
