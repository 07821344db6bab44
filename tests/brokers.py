"""Test helpers that start real brokers: the embedded hardened amqtt and a mosquitto child process.

Import the fixtures into a test module (``from tests.brokers import amqtt_broker, mosquitto_broker``)
or use the context managers directly. Each yields a :class:`BrokerHandle` with ``host``, ``port``,
credentials for one backend user, ``n`` device users (``dev0``, ``dev1``, ...) and one monitor
user, plus ``connect(creds)`` returning a connected paho client. Users are hashed with 1,000
PBKDF2 iterations (the floor) to keep fixtures fast; production files use 10,000.

:class:`MosquittoProcess` runs ``mosquitto -c`` on a generated config on a free 127.0.0.1 port,
waits until it accepts connections, and ``restart()`` brings it back on the same port (queued
messages persist across it) for fault tests. Tests are skipped when mosquitto is not installed.
"""

from __future__ import annotations

import contextlib
import queue
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.embedded import EmbeddedBroker, EmbeddedBrokerConfig
from broker.mosquitto_config import OPENSSL_CNF, MosquittoOptions, mosquitto_env, write_config
from broker.passwd import AccountRole, add_user, load_users

TEST_ITERATIONS = 1_000
HOST = "127.0.0.1"
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)
needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto binary not installed")


@dataclass(frozen=True)
class Creds:
    username: str
    password: str


@dataclass
class Received:
    """Messages a test client got, in order (thread-safe queue filled by paho's thread)."""

    q: queue.Queue[mqtt.MQTTMessage] = field(default_factory=queue.Queue)

    def get(self, timeout: float = 5.0) -> mqtt.MQTTMessage:
        return self.q.get(timeout=timeout)

    def drain(self, wait: float = 0.3) -> list[mqtt.MQTTMessage]:
        time.sleep(wait)
        out = []
        while True:
            try:
                out.append(self.q.get_nowait())
            except queue.Empty:
                return out


@dataclass
class BrokerHandle:
    kind: str  # "amqtt" or "mosquitto"
    host: str
    port: int
    backend: Creds
    devices: list[Creds]
    monitor: Creds
    passwd: Path  # the sealmq user file
    broker: Any = None  # EmbeddedBroker or MosquittoProcess
    tls_port: int = 0  # the TLS listener's, when started with tls=
    workers: list[Creds] = field(default_factory=list)  # backend-w1.. (role backend), with workers=N
    _clients: list[mqtt.Client] = field(default_factory=list)

    def connect(
        self,
        creds: Creds | None,
        *,
        client_id: str = "",
        clean_session: bool = True,
        timeout: float = 5.0,
        expect_refused: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> tuple[mqtt.Client, Received]:
        """A paho (MQTT 3.1.1) client with its network loop started; raises unless CONNACK is success.

        With ``expect_refused`` it returns after a refusal and raises if the CONNECT was accepted.
        With ``tls`` it connects to the TLS listener with that client context.
        """
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        if creds is not None:
            client.username_pw_set(creds.username, creds.password)
        got = Received()
        result: queue.Queue[Any] = queue.Queue()
        client.on_connect = lambda c, u, flags, rc, props: result.put(rc)
        client.on_message = lambda c, u, msg: got.q.put(msg)
        if expect_refused:
            client.reconnect_delay_set(60, 120)  # do not hammer the broker while refused
        if tls is not None:
            client.tls_set_context(tls)
        client.connect(self.host, self.tls_port if tls is not None else self.port, keepalive=30)
        client.loop_start()
        self._clients.append(client)
        try:
            rc = result.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no CONNACK") from None
        if expect_refused:
            client.disconnect()
            client.loop_stop()
            assert rc.is_failure, f"CONNECT unexpectedly accepted for {creds}"
            return client, got
        assert not rc.is_failure, f"CONNECT refused: {rc}"
        return client, got

    def subscribe(self, client: mqtt.Client, flt: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        """Subscribe and wait for SUBACK; returns the granted codes (128 = refused)."""
        done: queue.Queue[list[int]] = queue.Queue()
        client.on_subscribe = lambda c, u, mid, rcs, props: done.put([r.value for r in rcs])
        client.subscribe(flt, qos)
        return done.get(timeout=timeout)

    def close_clients(self) -> None:
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.disconnect()
                c.loop_stop()
        self._clients.clear()


def raw_connect(host: str, port: int, username: str | None, password: str | None, client_id: str = "") -> int:
    """Send one MQTT 3.1.1 CONNECT on a fresh socket; return the CONNACK code (-1: closed without one)."""

    def field(b: bytes) -> bytes:
        return len(b).to_bytes(2, "big") + b

    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = field(b"MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big") + field(client_id.encode())
    if username is not None:
        body += field(username.encode())
    if password is not None:
        body += field(password.encode())
    assert len(body) < 128
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(bytes([0x10, len(body)]) + body)
        data = b""
        while len(data) < 4:
            chunk = s.recv(4 - len(data))
            if not chunk:
                return -1
            data += chunk
    assert data[:2] == b"\x20\x02", data
    return data[3]


def make_users(directory: Path, n_devices: int = 2) -> tuple[Path, Creds, list[Creds], Creds]:
    directory.mkdir(parents=True, exist_ok=True)
    passwd = directory / "users"
    backend = Creds("backend", secrets.token_urlsafe(12))
    monitor = Creds("monitor", secrets.token_urlsafe(12))
    devices = [Creds(f"dev{i}", secrets.token_urlsafe(12)) for i in range(n_devices)]
    add_user(passwd, backend.username, backend.password, AccountRole.BACKEND, iterations=TEST_ITERATIONS)
    add_user(passwd, monitor.username, monitor.password, AccountRole.MONITOR, iterations=TEST_ITERATIONS)
    for d in devices:
        add_user(passwd, d.username, d.password, AccountRole.DEVICE, iterations=TEST_ITERATIONS)
    return passwd, backend, devices, monitor


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_listening(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class MosquittoProcess:
    """A mosquitto child process on a generated config; stop() waits for it to exit."""

    def __init__(self, conf_dir: Path, port: int, log_path: Path, also: tuple[int, ...] = ()) -> None:
        self.conf = conf_dir / "mosquitto.conf"
        self.port = port
        self.also = tuple(p for p in also if p)  # further listeners (TLS) to wait for
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MosquittoProcess:
        assert MOSQUITTO is not None
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            # as the product runs it (docs/broker.md): OPENSSL_CONF names the generated openssl.cnf
            env = mosquitto_env(self.conf.parent) if (self.conf.parent / OPENSSL_CNF).exists() else None
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log, env=env)
        finally:
            log.close()
        try:
            for port in (self.port, *self.also):  # mosquitto binds its listeners one after the other
                wait_listening(HOST, port)
        except OSError:
            self.stop()
            raise AssertionError(f"mosquitto did not start:\n{self.log()}") from None
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``text`` appears ``count`` times in mosquitto's log (connection_messages is on)."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not seen {count} time(s) in mosquitto's log:\n{self.log()[-3000:]}")
            time.sleep(0.05)


@contextlib.contextmanager
def running_amqtt(directory: Path, n_devices: int = 2, **config: Any) -> Iterator[BrokerHandle]:
    passwd, backend, devices, monitor = make_users(directory, n_devices)
    if config.get("tls") is not None:
        config.setdefault("tls_port", 0)
    broker = EmbeddedBroker(EmbeddedBrokerConfig(passwd=passwd, **config)).start()
    handle = BrokerHandle("amqtt", HOST, broker.port, backend, devices, monitor, passwd, broker,
                          tls_port=broker.tls_port)
    try:
        yield handle
    finally:
        handle.close_clients()
        broker.stop()


@contextlib.contextmanager
def running_mosquitto(directory: Path, n_devices: int = 2, workers: int = 0, **options: Any) -> Iterator[BrokerHandle]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto binary not installed")
    passwd, backend, devices, monitor = make_users(directory, n_devices)
    worker_creds = [Creds(f"backend-w{k}", secrets.token_urlsafe(12)) for k in range(1, workers + 1)]
    for w in worker_creds:  # backend workers of a share group: one account each (docs/scaling.md)
        add_user(passwd, w.username, w.password, AccountRole.BACKEND, iterations=TEST_ITERATIONS)
    port = options.pop("port", None) or free_port()
    if options.get("tls") is not None:
        options.setdefault("tls_port", free_port())
    # the production default `user mosquitto`: started as root, mosquitto drops to that user, which
    # cannot enter pytest's 0700 tmp dirs; a private dir under /tmp is reachable and removed after
    conf_dir = Path(tempfile.mkdtemp(prefix="sealmq-mosquitto-"))
    try:
        write_config(conf_dir, load_users(passwd), MosquittoOptions(host=HOST, port=port, **options))
        also = (int(options.get("tls_port") or 0), int(options.get("tls_password_port") or 0))
        proc = MosquittoProcess(conf_dir, port, directory / "mosquitto.log", also).start()
        handle = BrokerHandle("mosquitto", HOST, port, backend, devices, monitor, passwd, proc,
                              tls_port=options.get("tls_port", 0), workers=worker_creds)
        try:
            yield handle
        finally:
            handle.close_clients()
            proc.stop()
    finally:
        shutil.rmtree(conf_dir, ignore_errors=True)


@pytest.fixture
def amqtt_broker(tmp_path: Path) -> Iterator[BrokerHandle]:
    with running_amqtt(tmp_path) as handle:
        yield handle


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[BrokerHandle]:
    with running_mosquitto(tmp_path) as handle:
        yield handle


@pytest.fixture(params=["amqtt", pytest.param("mosquitto", marks=[pytest.mark.mosquitto, needs_mosquitto])])
def any_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerHandle]:
    """Runs the test once against each broker."""
    runner = running_amqtt if request.param == "amqtt" else running_mosquitto
    with runner(tmp_path) as handle:
        yield handle
