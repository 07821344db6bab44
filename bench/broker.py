"""End to end through a broker (issue #4): sealed vs plaintext telemetry, and 100 devices handshaking.

Throughput. One publisher process and one subscriber process (separate processes, as in
``/work/shared/design/stack-facts.md``, so they do not share a GIL), QoS 1 both ways, 256-byte
application payloads, through the same broker in the same run:

* ``plaintext``: the product's MQTT adapter (``runtime.mqtt.MqttLink``) publishing the raw
  payload on the device's data topic; the subscriber counts what arrives;
* ``plaintext, paho's own client``: the same on paho's own ``Client`` class, where the link
  normally gives paho ``runtime.mqtt.Client`` (large socket reads, no wake-up byte for packets
  queued on paho's own loop thread; since stop 34): plain paho->paho as it ships, the standard
  alternative the sealed path is also compared with;
* ``AEAD only``: the floor of the sealed path. The publisher seals each payload with A128GCM
  alone, the sealed path's AEAD (one fixed key, the nonce from a 5-byte counter sent in front of
  the ciphertext, the topic as AAD) and the subscriber opens it: no record format, no session, no
  replay window. What the sealed path would cost if all our code around the AEAD were free
  (compiled, say);
* ``sealed``: the device path (``DeviceEndpoint.seal`` + ``MqttLink``) after a real EDHOC
  handshake over the broker (suite 6, A128GCM, as the endpoints negotiate by default), and the
  backend path (``MqttLink`` + ``BackendEndpoint.handle``, which opens every record and checks its
  replay window);
* ``sealed, suite 2``: the same with the device configured to offer only suite 2, whose records
  are AES-CCM-16-64-128 (what a constrained device negotiates, and the default before stop 26);
* ``sealed, full service``: ``DeviceAgent.send_telemetry_many`` (64 readings per call, each
  committed to the device's fsynced outbox first, then sealed within the in-flight window) ->
  ``BackendService`` (its batched ingest: SQLite ``synchronous=FULL``, the broker's QoS 1
  acknowledgement and the device's sealed ACK only after the commit; the device drops a message
  only then): what a deployment gets, durable and exactly once. The payload is the 256 bytes
  as the telemetry value ``{"p": payload}`` (the body adds the time and the message id).

Rate = messages / (last message opened at the subscriber - first publish), on one monotonic
clock shared by the processes. Every message must arrive; a run that loses any says so.

Handshakes. ``device.simulator.Simulator`` with N enrolled devices, each with its own broker
login and connection, against a ``BackendService`` in its own process: the time from the first
CONNECT until every device holds a session. Three variants (``VARIANTS``): amqtt and mosquitto
with password logins (PBKDF2, production strength), and ``mosquitto-tls``: the same mosquitto
process's TLS listener as the product deploys it (``MosquittoOptions.tls``, broker certificate
from the PKI, ``require_certificate`` + ``use_identity_as_username``, the CRL), where the devices
and the backend log in with the certificates they use for EDHOC (``--tls`` on their commands).
Password and TLS storms alternate run by run. ``--profile`` adds one profiled 100-device storm
per variant: cProfile on every thread of the backend and the simulator (``bench/threadprof.py``)
and ``perf record`` on mosquitto when perf is installed.

Brokers: the embedded hardened amqtt (``broker.embedded.EmbeddedBroker``, in this process) and a
mosquitto child process on a generated config (``broker.mosquitto_config.write_config``), both on
127.0.0.1 and an ephemeral port.

Run alone: ``python3 -m bench.broker [--quick] [--messages N] [--devices N] [--storm-only]
[--broker amqtt|mosquitto|mosquitto-tls ...] [--storm-repeats N] [--profile]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.stats import (
    CONTROL,
    FLOOR,
    RATIO_INTERVAL,
    balanced_order,
    collect,
    floor_aead,
    fmt,
    median,
    median_cell,
    proc_cpu,
    ratio_cell,
    table,
    use_python_framing,
)

HOST = "127.0.0.1"
PAYLOAD = 256
DEVICE = "bench-dev"
# FLOOR ("AEAD only", bench.stats) is the floor of the sealed path (no record format, no session):
# here each payload A128GCM-sealed (the AEAD of suite 6, which the sealed path negotiates) under one
# fixed key, its nonce from a 5-byte counter sent in front (as a Partial IV is), the topic as AAD.
# What no record path with that AEAD, compiled or not, can beat.
SEALED_CCM = "sealed, suite 2"
# the same as "sealed" with the record path's compiled framing (sealmq/_speedups.c) switched off in
# both processes: what a build without a C compiler runs, and what the compiled part saves
SEALED_PURE = "sealed, pure Python"
SEALED = ("sealed", SEALED_CCM, SEALED_PURE)
# plaintext through paho's own client class, not the one runtime.mqtt gives paho (runtime.mqtt.Client:
# large socket reads, no wake-up byte from the loop's own thread): the standard alternative as it ships
STOCK = "plaintext, paho's own client"
MODES = ("plaintext", CONTROL, STOCK, FLOOR, "sealed", SEALED_PURE, SEALED_CCM, "sealed, full service")


_FLOOR_NONCE_PAD = bytes(7)  # A128GCM's 12-byte nonce: 7 zero bytes, then the 5-byte counter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# --- broker lifecycle ----------------------------------------------------------------------------

# CPU seconds the running broker has used so far (set by running_broker): the mosquitto child's
# utime + stime, or, for the embedded amqtt, this process's CPU time (it does little else then).
_broker_cpu: list[Any] = [lambda: 0.0]


_broker_pid: list[int | None] = [None]  # the mosquitto child's, for perf


def broker_cpu() -> float:
    return float(_broker_cpu[0]())


@contextmanager
def running_broker(kind: str, users: Path, root: Path, *, tls_port: int | None = None) -> Iterator[int]:
    """Start ``kind`` ("amqtt" or "mosquitto") on a free 127.0.0.1 port; yield the port; stop it.

    With ``tls_port`` mosquitto also serves the product's TLS listener there (``MosquittoOptions.tls``
    from the PKI's standard layout, as ``sealmq broker mosquitto-config --tls-pki`` writes it: the
    broker certificate ``bootstrap`` issued like ``sealmq pki issue-broker``, client certificates as
    logins, ``use_identity_as_username``, the CRL), the way tests/e2e.py starts it.
    """
    port = _free_port()
    if kind == "amqtt":
        _broker_cpu[0] = time.process_time
        from broker.embedded import EmbeddedBroker, EmbeddedBrokerConfig

        # start() returns once the listener is bound (a probe connection would only add log noise)
        broker = EmbeddedBroker(EmbeddedBrokerConfig(passwd=users, host=HOST, port=port, max_connections=4096)).start()
        try:
            yield port
        finally:
            broker.stop()
        return
    from broker.mosquitto_config import MosquittoOptions, current_user, write_config
    from broker.passwd import load_users
    from broker.tls import TlsFiles
    from tests.brokers import MosquittoProcess

    conf_dir = root / f"mosquitto-{port}"
    # room for a 1,000-device storm plus the backend (the shipped default is 1,000 connections)
    opts = MosquittoOptions(host=HOST, port=port, run_as=current_user(), max_connections=4096)
    if tls_port is not None:
        opts = replace(opts, tls=TlsFiles.from_pki(root / "pki"), tls_port=tls_port)
    write_config(conf_dir, load_users(users), opts)
    proc = MosquittoProcess(conf_dir, port, root / f"mosquitto-{port}.log").start()
    popen = proc.proc
    if popen is not None:
        _broker_cpu[0] = lambda: proc_cpu(popen.pid)
        _broker_pid[0] = popen.pid
    try:
        yield port
    finally:
        _broker_pid[0] = None
        proc.stop()


def mosquitto_available() -> bool:
    return shutil.which("mosquitto") is not None or Path("/usr/sbin/mosquitto").exists()


# --- child processes -----------------------------------------------------------------------------
# Module-level functions so that the "spawn" start method can import them.

def _settings(cfg: dict[str, Any], user: str, role: str, suffix: str) -> Any:
    from app.bootstrap import Deployment
    from runtime.mqtt import MqttSettings

    dep = Deployment(Path(cfg["root"]))
    return MqttSettings(host=HOST, port=cfg["port"], username=user, password=dep.password(role, user),
                        client_id=f"{user}:{suffix}", clean_session=True)


def _profiler(cfg: dict[str, Any]) -> Any:
    """A ThreadProfiler installed now (every thread started from here on) when the run is profiled."""
    if not cfg.get("profile"):
        return None
    from bench.threadprof import ThreadProfiler

    prof = ThreadProfiler()
    prof.install()
    return prof


def _process_for(mode: str) -> str:
    """Set this (spawned) process up for ``mode`` and return the path it runs: the Python framing
    for "sealed, pure Python", paho's own client class for STOCK; CONTROL and STOCK run plaintext."""
    if mode == SEALED_PURE:
        use_python_framing()
    if mode == STOCK:
        import paho.mqtt.client as paho_client

        from runtime.mqtt import MqttLink

        MqttLink.client_class = paho_client.Client
    return "plaintext" if mode in (CONTROL, STOCK) else mode


def _subscriber(cfg: dict[str, Any], ready: Any, go: Any, results: Any) -> None:
    """The backend side: counts telemetry (plaintext) or opened records (sealed)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from pki import layout
    from pki.store import load_identity, load_trust_store
    from runtime.mqtt import MqttLink
    from sealmq import topics
    from sealmq.edhoc import X509Credential
    from sealmq.endpoint import BackendEndpoint, Publish, Received, Rejected
    from sealmq.topics import Channel, Direction, RecordKind

    mode, n = _process_for(cfg["mode"]), cfg["messages"]
    pki = Path(cfg["root"]) / "pki"
    settings = _settings(cfg, "backend", "backend", f"bench-{mode[:6]}")
    state = {"count": 0, "last": 0.0, "bad": 0}
    finished = threading.Event()
    lock = threading.Lock()

    def count_one() -> None:
        state["count"] += 1
        if state["count"] == n:
            state["last"] = time.monotonic()
            finished.set()

    if mode == "sealed, full service":
        from backend.quotas import DeviceQuotas
        from backend.service import BackendService, BackendSettings

        # one device at full speed: the per-device record rate would measure the bound, not the path
        svc = BackendService(BackendSettings(pki_dir=pki, data_dir=Path(cfg["root"]) / "backend-data",
                                             mqtt=settings, poll_interval=0.25,
                                             quotas=DeviceQuotas(records_per_second=None, stored_bytes=None)))
        prof = _profiler(cfg)
        svc.start()
        ready.set()
        go.wait(cfg["timeout"] + 120)
        if prof is not None:
            prof.mark()
        deadline = time.monotonic() + cfg["timeout"]
        while svc.ingest.counters.stored < n and time.monotonic() < deadline:
            time.sleep(0.001)  # counted when committed (the default ingest path, nothing added)
        state["count"], state["last"] = svc.ingest.counters.stored, time.monotonic()
        report = prof.report(25) if prof is not None else None
        results.put(("sub", state["count"], state["last"], svc.counters["rejected"], report))
        svc.stop()
        return

    link: MqttLink
    if mode == FLOOR:
        aead = floor_aead(cfg["floor_key"])

        def on_floor(topic: str, payload: bytes) -> None:
            with lock:
                try:
                    aead.decrypt(_FLOOR_NONCE_PAD + payload[:5], payload[5:], topic.encode())
                except Exception:
                    state["bad"] += 1
                count_one()

        link = MqttLink(settings, on_floor, [topics.subscription(Channel.DATA, Direction.UP)])
    elif mode == "plaintext":
        def on_plain(topic: str, payload: bytes) -> None:
            with lock:
                if len(payload) != PAYLOAD:
                    state["bad"] += 1
                count_one()

        link = MqttLink(settings, on_plain, [topics.subscription(Channel.DATA, Direction.UP)])
    else:
        ident = load_identity(layout.backend_dir(pki, "backend"))
        cred = X509Credential(private_key=ident.private_key,
                              chain_der=[c.public_bytes(Encoding.DER) for c in ident.chain], by_reference=False)
        endpoint = BackendEndpoint(credentials=cred, trust_store=load_trust_store(pki))

        def on_sealed(topic: str, payload: bytes) -> None:
            with lock:
                for out in endpoint.handle(topic, payload, time.time(), os.urandom):
                    if isinstance(out, Publish):
                        link.publish(out.topic, out.payload)
                    elif isinstance(out, Received) and out.kind is RecordKind.TELEMETRY:
                        count_one()
                    elif isinstance(out, Rejected):
                        state["bad"] += 1

        link = MqttLink(settings, on_sealed, endpoint.subscriptions)
    prof = _profiler(cfg)
    link.start()
    ready.set()
    go.wait(cfg["timeout"] + 120)
    if prof is not None:
        prof.mark()
    finished.wait(cfg["timeout"])
    report = prof.report(25) if prof is not None else None
    with lock:
        results.put(("sub", state["count"], state["last"], state["bad"], report))
    link.stop()


def _publisher(cfg: dict[str, Any], ready: Any, go: Any, done: Any, results: Any) -> None:
    """The device side: handshake first if sealed, then ``messages`` publishes as fast as paho takes them."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from pki import layout
    from pki.store import load_identity, load_trust_store
    from runtime.mqtt import MqttLink
    from sealmq import topics
    from sealmq.edhoc import X509Credential
    from sealmq.endpoint import DeviceEndpoint, EndpointConfig, HandshakeCompleted, Publish
    from sealmq.topics import Channel, Direction, RecordKind

    mode, n = _process_for(cfg["mode"]), cfg["messages"]
    pki = Path(cfg["root"]) / "pki"
    settings = _settings(cfg, DEVICE, "device", f"bench-{mode[:6]}")
    payloads = [i.to_bytes(4, "big") + os.urandom(PAYLOAD - 4) for i in range(n)]
    wire_size = PAYLOAD

    if mode == "sealed, full service":
        from device.agent import DeviceAgent, DeviceConfig

        agent = DeviceAgent(DeviceConfig(device_id=DEVICE, identity_dir=layout.device_dir(pki, DEVICE), pki_dir=pki,
                                         state_dir=Path(cfg["root"]) / "device-state", mqtt=settings))
        prof = _profiler(cfg)
        agent.start()
        if not agent.wait_established(30):
            results.put(("pub", -1.0, 0, None))
            agent.stop()
            return
        ready.set()
        go.wait()
        if prof is not None:
            prof.mark()
        t0 = time.monotonic()
        for i in range(0, n, 64):
            agent.send_telemetry_many([{"p": p} for p in payloads[i:i + 64]])
        done.wait(cfg["linger"])  # until the backend committed the last one: the ACKs are the device's work too
        results.put(("pub", t0, -1, prof.report(25) if prof is not None else None))
        agent.stop()
        return

    lock = threading.Lock()
    established = threading.Event()
    ident = load_identity(layout.device_dir(pki, DEVICE))
    cred = X509Credential(private_key=ident.private_key,
                          chain_der=[c.public_bytes(Encoding.DER) for c in ident.chain], by_reference=False)
    endpoint = DeviceEndpoint(device_id=DEVICE, credential=cred, trust_store=load_trust_store(pki),
                              config=EndpointConfig(suites=(2,)) if mode == SEALED_CCM else None)

    def on_message(topic: str, payload: bytes) -> None:
        with lock:
            for out in endpoint.handle(topic, payload, time.time(), os.urandom):
                if isinstance(out, Publish):
                    link.publish(out.topic, out.payload)
                elif isinstance(out, HandshakeCompleted):
                    established.set()

    link = MqttLink(settings, on_message, endpoint.subscriptions if mode in SEALED else [])
    prof = _profiler(cfg)
    link.start()
    if mode in SEALED:
        time.sleep(0.2)  # let the SUBACKs land before message_1
        with lock:
            for out in endpoint.start_handshake(time.time(), os.urandom):
                if isinstance(out, Publish):
                    link.publish(out.topic, out.payload)
        if not established.wait(30):
            results.put(("pub", -1.0, 0, None))
            link.stop()
            return
    ready.set()
    go.wait()
    if prof is not None:
        prof.mark()
    topic = topics.topic(DEVICE, Channel.DATA, Direction.UP)
    t0 = time.monotonic()
    if mode == "plaintext":
        for p in payloads:
            link.publish(topic, p)
    elif mode == FLOOR:
        aead = floor_aead(cfg["floor_key"])
        aad = topic.encode()
        for i, p in enumerate(payloads):
            counter = i.to_bytes(5, "big")
            sealed = counter + aead.encrypt(_FLOOR_NONCE_PAD + counter, p, aad)
            wire_size = len(sealed)
            link.publish(topic, sealed)
    else:
        for p in payloads:
            with lock:
                outs = endpoint.seal(RecordKind.TELEMETRY, p, time.time())
            for out in outs:
                if isinstance(out, Publish):
                    wire_size = len(out.payload)
                    link.publish(out.topic, out.payload)
    done.wait(cfg["linger"])  # keep the connection until the subscriber has everything (and its PUBACKs)
    results.put(("pub", t0, wire_size, prof.report(25) if prof is not None else None))
    link.stop()


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed by the broker")
        out += chunk
    return out


def _online_devices(cfg: dict[str, Any], ids: list[str], ready: Any, stop: Any) -> None:
    """Devices online and idle while the throughput rounds run (``--online``): each logs in with its
    own password and subscribes to its three "down" filters, as a device's link does, over a raw
    MQTT 3.1.1 socket (keepalive 0: no pings, no thread per device), and holds them until ``stop``."""
    from app.bootstrap import Deployment
    from broker.framing import mqtt_field, mqtt_packet
    from sealmq import topics
    from sealmq.topics import Channel, Direction

    dep = Deployment(Path(cfg["root"]))
    socks: list[socket.socket] = []
    try:
        for dev in ids:
            s = socket.create_connection((HOST, cfg["port"]), timeout=60)
            socks.append(s)
            body = (mqtt_field(b"MQTT") + bytes([4, 0xC2]) + (0).to_bytes(2, "big")
                    + mqtt_field(f"{dev}:online".encode()) + mqtt_field(dev.encode())
                    + mqtt_field(dep.password("device", dev).encode()))
            s.sendall(mqtt_packet(0x10, body))
            if _recv_exactly(s, 4) != b"\x20\x02\x00\x00":
                raise RuntimeError(f"{dev}: CONNECT refused")
            filters = [topics.topic(dev, ch, Direction.DOWN) for ch in Channel]
            s.sendall(mqtt_packet(0x82, (1).to_bytes(2, "big")
                                   + b"".join(mqtt_field(f.encode()) + b"\x01" for f in filters)))
            granted = b"\x90" + bytes([2 + len(filters)]) + b"\x00\x01" + b"\x01" * len(filters)  # SUBACK, QoS 1 each
            if _recv_exactly(s, len(granted)) != granted:
                raise RuntimeError(f"{dev}: SUBSCRIBE refused")
        ready.set()
        stop.wait()
    finally:
        for s in socks:
            s.close()


@contextmanager
def devices_online(ctx: Any, root: Path, port: int, ids: list[str]) -> Iterator[None]:
    """``ids`` online and idle (``_online_devices``) in a process of their own while the block runs."""
    if not ids:
        yield
        return
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_online_devices, args=({"root": str(root), "port": port}, ids, ready, stop))
    proc.start()
    try:
        deadline = time.monotonic() + 600
        while not ready.wait(0.5):  # the process checks every CONNACK and SUBACK, and exits on a refusal
            if not proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{len(ids)} devices did not come online")
        yield
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)


def _storm_mqtt(cfg: dict[str, Any], role: str, user: str | None, suffix: str) -> Any:
    """The settings a storm's party connects with: the password login on the plain listener, or
    (``cfg["tls"]``) the TLS listener, the broker checked against the CA and the party's own EDHOC
    certificate as its login, as ``sealmq backend run --tls`` / ``sealmq device simulate --tls`` do."""
    from pki import layout
    from runtime.mqtt import MqttSettings

    if not cfg["tls"]:
        if user is None:  # the simulator: each device's own password (password_for)
            return MqttSettings(host=HOST, port=cfg["port"], clean_session=True)
        return _settings(cfg, user, role, suffix)
    pki = Path(cfg["root"]) / "pki"
    if user is None:  # the simulator gives each device its own chain.pem / key.pem
        return MqttSettings(host=HOST, port=cfg["port"], clean_session=True, tls_ca=layout.anchor(pki))
    ident = layout.backend_dir(pki, user)
    return MqttSettings(host=HOST, port=cfg["port"], username=user, client_id=f"{user}:{suffix}",
                        clean_session=True, tls_ca=layout.anchor(pki), tls_cert=ident / layout.CHAIN,
                        tls_key=ident / layout.KEY)


def _backend_service(cfg: dict[str, Any], ready: Any, go: Any, stop: Any, results: Any) -> None:
    from backend.service import BackendService, BackendSettings
    from sealmq.endpoint import BackendConfig

    prof = None
    if cfg["profile"]:
        from bench.threadprof import ThreadProfiler

        prof = ThreadProfiler()
        prof.install(here=False)  # before start(), which starts paho's thread and the timer
    settings = _storm_mqtt(cfg, "backend", "backend", "bench-hs")
    # Every device connects at once: let the half-open bound and per-device admission fit them.
    endpoint = BackendConfig(max_half_open=max(1024, 2 * cfg["devices"]))
    svc = BackendService(BackendSettings(pki_dir=Path(cfg["root"]) / "pki",
                                         data_dir=Path(cfg["root"]) / f"backend-hs-{cfg['run']}",
                                         mqtt=settings, endpoint=endpoint, poll_interval=0.1))
    svc.start()
    ready.set()
    go.wait(cfg["timeout"] + 120)
    cpu0 = time.process_time()
    if prof is not None:
        prof.mark()
    stop.wait(cfg["timeout"] + 30)
    cpu = time.process_time() - cpu0
    report = prof.report() if prof is not None else None
    results.put(("backend", svc.counters["handshakes"], cpu, report))
    svc.stop()


def _simulator(cfg: dict[str, Any], ids: list[str], ready: Any, go: Any, results: Any) -> None:
    from app.bootstrap import Deployment
    from device.simulator import Simulator

    dep = Deployment(Path(cfg["root"]))
    sim = Simulator(dep.pki, Path(cfg["root"]) / f"sim-{cfg['run']}", ids, _storm_mqtt(cfg, "device", None, ""),
                    password_for=None if cfg["tls"] else (lambda d: dep.password("device", d)),
                    shared_threads=cfg["shared"])
    try:
        ready.set()
        go.wait(cfg["timeout"])
        prof = None
        if cfg["profile"]:
            from bench.threadprof import ThreadProfiler

            prof = ThreadProfiler()
            prof.install()  # this thread, and paho's and the timers' threads started below
        # Every device starts connecting at once; then: when was the last one connected, and
        # when did the last one hold a session (one monotonic clock for all processes).
        cpu0 = time.process_time()
        for agent in sim.agents:
            agent.start(wait=None)
        deadline = time.monotonic() + cfg["timeout"]
        for agent in sim.agents:
            agent.link.wait_connected(max(0.0, deadline - time.monotonic()))
        connected = time.monotonic()
        for agent in sim.agents:
            agent.wait_established(max(0.0, deadline - time.monotonic()))
        done = time.monotonic()
        cpu = time.process_time() - cpu0
        report = prof.report() if prof is not None else None
        # Then the devices sit idle with their sessions: what their timers cost (cores busy).
        idle = 0.0
        if not cfg["profile"] and cfg["idle"] > 0:
            i0 = time.process_time()
            time.sleep(cfg["idle"])
            idle = (time.process_time() - i0) / cfg["idle"]
        results.put(("sim", connected, done, sim.established(), cpu, report, idle))
    finally:
        sim.stop()


# --- orchestration -------------------------------------------------------------------------------

@dataclass
class Throughput:
    broker: str
    mode: str
    rates: list[float]
    received: list[int]
    sent: int
    wire: int
    # CPU microseconds per message of each party, between "go" and the last message counted
    cpu: dict[str, list[float]] = field(default_factory=dict)
    # profiled runs only: party -> (profiled CPU seconds, markdown table of the top functions)
    profiles: dict[str, tuple[float, str]] = field(default_factory=dict)


@dataclass
class ThroughputRun:
    rate: float
    count: int
    wire: int
    cpu: dict[str, float]  # party -> CPU us per message
    profiles: dict[str, tuple[float, str]]


def paired_ratios(rates: list[float], plain: list[float]) -> list[float]:
    """Each round's rate over the plaintext rate of the same round (rounds where both delivered)."""
    return [r / p for r, p in zip(rates, plain, strict=False) if r > 0 and p > 0]


def throughput_once(ctx: Any, root: Path, port: int, mode: str, messages: int, timeout: float,
                    *, profile: bool = False) -> ThroughputRun:
    """One run of ``mode``: rate, messages counted, the MQTT payload size, and the CPU each
    party (publisher, subscriber, broker) used per message from "go" until the subscriber counted
    the last one. ``profile`` (full service only) profiles both processes (bench.threadprof)."""
    cfg = {"root": str(root), "port": port, "mode": mode, "messages": messages, "timeout": timeout,
           "linger": min(timeout, 60.0), "profile": profile, "floor_key": os.urandom(16).hex()}
    results = ctx.Queue()
    sub_ready, pub_ready, go, done = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Event()
    sub = ctx.Process(target=_subscriber, args=(cfg, sub_ready, go, results))
    sub.start()
    if not sub_ready.wait(60):
        sub.terminate()
        raise RuntimeError("subscriber did not start")
    pub = ctx.Process(target=_publisher, args=(cfg, pub_ready, go, done, results))
    pub.start()
    got: dict[str, tuple[Any, ...]] = {}
    try:
        if not pub_ready.wait(60):
            raise RuntimeError(f"publisher not ready ({mode})")
        pub_pid, sub_pid = int(pub.pid or 0), int(sub.pid or 0)
        cpu0 = {"publisher": proc_cpu(pub_pid), "subscriber": proc_cpu(sub_pid), "broker": broker_cpu()}
        go.set()
        while "sub" not in got:
            r = collect(results, 1, timeout + 60)[0]
            got[r[0]] = r
        used = {"publisher": proc_cpu(pub_pid), "subscriber": proc_cpu(sub_pid), "broker": broker_cpu()}
        done.set()
        while "pub" not in got:
            r = collect(results, 1, timeout + 60)[0]
            got[r[0]] = r
    finally:
        done.set()
        for p in (pub, sub):
            p.join(timeout + 30)
            if p.is_alive():
                p.terminate()
                p.join(5)
    _, t0, wire, pub_profile = got["pub"]
    _, count, last, bad, sub_profile = got["sub"]
    if bad:
        raise RuntimeError(f"{mode}: {bad} messages rejected or malformed")
    rate = messages / (last - t0) if count == messages and last > t0 else 0.0
    cpu = {party: (used[party] - cpu0[party]) * 1e6 / max(1, count) for party in used}
    profiles = {name: p for name, p in (("publisher", pub_profile), ("subscriber", sub_profile)) if p is not None}
    return ThroughputRun(rate, count, wire, cpu, profiles)


@dataclass
class Storm:
    broker: str  # a storm variant (VARIANTS): the broker and how devices log in
    devices: int
    procs: int
    shared: bool  # the simulator's devices share a network and a timer thread per process (else: two each)
    connected: float  # seconds from "go" until the last device was connected
    seconds: float  # ... until the last device held a session
    established: int
    handshakes: int
    backend_cpu: float  # CPU seconds the backend service used during the storm
    sim_cpu: float  # CPU seconds of the simulator processes
    broker_cpu: float  # CPU seconds of the broker
    sim_idle: float  # cores the simulator processes kept busy afterwards, every device idle with a session
    # profiled runs only: party -> (profiled CPU seconds, markdown table of the top functions)
    profiles: dict[str, tuple[float, str]] = field(default_factory=dict)


# Storm variants: (broker process, devices and backend log in over TLS with their certificates).
# "mosquitto" and "mosquitto-tls" are two listeners of one mosquitto process (the product's config
# with --tls-pki: plain TCP with passwords beside mqtts with client certificates), so their storms
# can alternate run by run.
VARIANTS = {"amqtt": ("amqtt", False), "mosquitto": ("mosquitto", False), "mosquitto-tls": ("mosquitto", True)}
LOGINS = {"amqtt": "password (PBKDF2)", "mosquitto": "password (PBKDF2)",
          "mosquitto-tls": "TLS 1.3, client certificate (P-256)"}

_runs = [0]  # storms so far in this process: each gets fresh backend and device state directories


def handshakes_once(ctx: Any, kind: str, root: Path, port: int, device_ids: list[str], timeout: float,
                    procs: int = 1, *, shared: bool = True, profile: bool = False) -> Storm:
    """All devices, spread over ``procs`` simulator processes, connect and handshake at once.

    ``kind`` is a storm variant (``VARIANTS``), ``port`` the listener it uses. With ``profile``
    the backend and simulator processes are profiled (``bench.threadprof``) and, when ``perf``
    is installed, the mosquitto process is sampled: slower, for where the CPU goes only.
    ``shared``: the simulator's devices share one network thread and one timer thread per
    process (its default, runtime/netloop.py); False: each device runs paho's own loop thread and
    a timer thread, as a lone agent does.
    """
    _runs[0] += 1
    cfg = {"root": str(root), "port": port, "devices": len(device_ids), "timeout": timeout,
           "tls": VARIANTS[kind][1], "profile": profile, "run": _runs[0], "idle": min(2.0, timeout / 15),
           "shared": shared}
    results = ctx.Queue()
    ready, stop, go = ctx.Event(), ctx.Event(), ctx.Event()
    backend = ctx.Process(target=_backend_service, args=(cfg, ready, go, stop, results))
    backend.start()
    sims: list[Any] = []
    perf_out = root / f"perf-{_runs[0]}.data"
    try:
        if not ready.wait(60):
            raise RuntimeError("backend service did not start")
        for i in range(procs):
            sim_ready = ctx.Event()
            sim = ctx.Process(target=_simulator, args=(cfg, device_ids[i::procs], sim_ready, go, results))
            sim.start()
            sims.append(sim)
            if not sim_ready.wait(timeout + 120):
                raise RuntimeError("simulator did not start")
        with _perf(_broker_pid[0] if profile else None, perf_out) as broker_profile:
            cpu0 = broker_cpu()
            t0 = time.monotonic()
            go.set()
            got = collect(results, procs, timeout + 120)
            used = broker_cpu() - cpu0
        stop.set()
        _, handshakes, backend_cpu, backend_profile = collect(results, 1, 60)[0]
    finally:
        stop.set()
        go.set()
        for p in (*sims, backend):
            p.join(60)
            if p.is_alive():
                p.terminate()
                p.join(5)
    profiles: dict[str, tuple[float, str]] = {}
    if backend_profile is not None:
        profiles["backend service"] = backend_profile
    if got[0][5] is not None:
        profiles["simulator" if procs == 1 else "simulator (first process)"] = got[0][5]
    if broker_profile:
        profiles["mosquitto (perf)"] = broker_profile[0]
    return Storm(kind, len(device_ids), procs, shared, max(g[1] for g in got) - t0, max(g[2] for g in got) - t0,
                 sum(g[3] for g in got), handshakes, backend_cpu, sum(g[4] for g in got), used,
                 sum(g[6] for g in got), profiles)


@contextmanager
def _perf(pid: int | None, out: Path) -> Iterator[list[tuple[float, str]]]:
    """Sample ``pid`` with ``perf record`` (CPU clock) while the block runs; afterwards the list
    holds (sampled CPU seconds, a markdown table of the shared objects and symbols by share)."""
    found: list[tuple[float, str]] = []
    perf = shutil.which("perf")
    if pid is None or perf is None:
        yield found
        return
    freq = 4000
    rec = subprocess.Popen([perf, "record", "-q", "-e", "cpu-clock", "-F", str(freq), "-p", str(pid), "-o", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # perf attaches
    try:
        yield found
    finally:
        rec.send_signal(signal.SIGINT)
        try:
            rec.wait(30)
        except subprocess.TimeoutExpired:
            rec.kill()
            rec.wait(5)
    rep = subprocess.run([perf, "report", "-i", str(out), "--stdio", "--no-children", "--sort", "dso,sym",
                          "--percent-limit", "1.5"], capture_output=True, text=True, timeout=120, check=False)
    count = re.search(r"# Event count \(approx\.\): (\d+)", rep.stdout)  # cpu-clock: nanoseconds
    rows = []
    for line in rep.stdout.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.+)", line)
        if m:
            rows.append([m.group(1), m.group(2), m.group(3).strip().replace("|", "/")])
    by_dso = subprocess.run([perf, "report", "-i", str(out), "--stdio", "--no-children", "--sort", "dso",
                             "--percent-limit", "1"], capture_output=True, text=True, timeout=120, check=False)
    dsos = [f"{m.group(2)} {m.group(1)} %" for m in
            (re.match(r"\s+([\d.]+)%\s+(\S+)", line) for line in by_dso.stdout.splitlines()) if m]
    if count and rows:
        found.append((int(count.group(1)) / 1e9, "by shared object: " + ", ".join(dsos) + "\n\n"
                      + table(["% of samples", "shared object", "symbol"], rows[:15])))


def storm_cases(quick: bool, devices: int | None) -> list[tuple[int, int, bool]]:
    """(devices, simulator processes, shared threads) per storm. The simulator's devices share one
    network thread and one timer thread per process (runtime/netloop.py). 100 devices also run on
    2 processes (the machine's cores) and 4, and on 1 process with two threads per device, paho's
    loop and a timer (how the simulator ran before: with 300 devices in one process those threads
    starved each other, so larger storms used one process per 100 devices). Larger storms use one
    process per 500 devices: 1,000 on 2 processes took 6.2 s, on 4 8.6 s, on 10 7.4 s (docs/benchmarks.md)."""
    if devices is not None:
        if devices < 8:
            return [(devices, 1, True), (devices, 1, False)]
        if devices > 100:
            return [(devices, -(-devices // 500), True)]
        return [(devices, 1, True), (devices, 1, False), (devices, 2, True), (devices, 4, True)]
    if quick:
        return [(5, 1, True), (5, 1, False), (6, 2, True)]
    return [(100, 1, True), (100, 1, False), (100, 2, True), (100, 4, True), (1000, 2, True)]


def run_storms(ctx: Any, kinds: list[str], root: Path, ports: dict[str, int], ids: list[str],
               cases: list[tuple[int, int, bool]], reps: int, timeout: float) -> list[Storm]:
    """Storms of the variants ``kinds`` (served by one broker process), alternating: each round
    runs every case with every variant, the variants in a balanced order
    (bench.stats.balanced_order), so that neither drift in the machine's load nor what the
    previous storm left behind favours one login. Storms of more than 100 devices run once."""
    storms: list[Storm] = []
    small = [c for c in cases if c[0] <= 100]
    for rep in range(reps):
        for i, (n, procs, shared) in enumerate(small):
            for kind in balanced_order(kinds, rep + i):
                storms.append(handshakes_once(ctx, kind, root, ports[kind], ids[:n], timeout, procs, shared=shared))
    for n, procs, shared in (c for c in cases if c[0] > 100):
        for kind in kinds:
            storms.append(handshakes_once(ctx, kind, root, ports[kind], ids[:n], timeout, procs, shared=shared))
    return storms


def storm_table(storms: list[Storm]) -> str:
    groups: dict[tuple[str, int, int, bool], list[Storm]] = {}
    for st in storms:
        groups.setdefault((st.broker, st.devices, st.procs, st.shared), []).append(st)
    order = list(VARIANTS)
    rows = []
    for (kind, n, procs, shared), runs in sorted(groups.items(),
                                                 key=lambda g: (g[0][1], g[0][2], not g[0][3], order.index(g[0][0]))):
        def same(values: list[int]) -> str:
            return str(values[0]) if len(set(values)) == 1 else "/".join(str(v) for v in values)

        secs = [r.seconds for r in runs]
        rows.append([kind, n, procs, "shared: 2 per process" if shared else "2 per device",
                     same([r.established for r in runs]), same([r.handshakes for r in runs]),
                     fmt(median([r.connected for r in runs]), 2), median_cell(secs),
                     " / ".join(fmt(x, 2) for x in secs) if len(runs) > 1 else "-",
                     fmt(median([r.seconds / max(1, r.established) for r in runs]) * 1e3, 1),
                     fmt(median([r.backend_cpu for r in runs]), 2), fmt(median([r.broker_cpu for r in runs]), 2),
                     fmt(median([r.sim_cpu for r in runs]), 2),
                     f"{100 * median([r.sim_idle for r in runs]):.0f}", LOGINS[kind]])
    return table(["broker", "devices", "simulator processes", "simulator threads (network, timer)", "established",
                  "backend handshakes",
                  "s until all connected", "s until all established", "each run (s)", "ms per device",
                  "backend CPU (s)", "broker CPU (s)", "simulator CPU (s)",
                  "simulator idle afterwards (% of a core)", "device and backend login"], rows)


def run(*, quick: bool = False, messages: int | None = None, repeats: int | None = None,
        devices: int | None = None, brokers: tuple[str, ...] = tuple(VARIANTS),
        throughput: bool = True, storm: bool = True, storm_repeats: int | None = None,
        profile: bool = False, paths: tuple[str, ...] | None = None, online: int = 0) -> str:
    """Throughput (password logins) on each broker in ``brokers``, and the handshake storms of every
    variant in it. ``profile`` adds one profiled 100-device storm per variant (see handshakes_once).
    ``paths``: only these throughput paths (MODES), with plaintext, the base of every ratio, always
    among them: more rounds of the rows in question in the same time. ``online``: that many devices
    (each with its login and its three "down" filters) stay connected and idle during the rounds."""
    from app.bootstrap import bootstrap

    n = messages or (200 if quick else 10_000)
    modes = tuple(m for m in MODES if m == "plaintext" or paths is None or m in paths)
    # Throughput rounds (the ratios are paired by round) and storm runs: single rounds of one path
    # spread by +-25 % on this host, so 11 rounds and 5 storms, not 7 and 3 (until stop 32).
    reps = repeats or (1 if quick else 11)
    s_reps = storm_repeats or repeats or (1 if quick else 5)
    cases = storm_cases(quick, devices) if storm else []
    n_dev = max((c[0] for c in cases), default=0)
    timeout = 30.0 if quick else 300.0
    kinds = [b for b in brokers if VARIANTS[b][0] != "mosquitto" or mosquitto_available()]
    processes = list(dict.fromkeys(VARIANTS[k][0] for k in kinds))
    ctx = mp.get_context("spawn")
    sim_ids = [f"sim-{i:04d}" for i in range(max(n_dev, online if throughput else 0))]
    storms: list[Storm] = []
    profiled: list[Storm] = []
    rows: list[Throughput] = []
    with tempfile.TemporaryDirectory(prefix="sealmq-bench-broker-") as tmp:
        root = Path(tmp)
        # Production PBKDF2 strength for broker users unless --quick (then the floor, 1,000).
        # bootstrap also issues the broker's TLS certificate (P-256, as `sealmq pki issue-broker`).
        dep, _ = bootstrap(root, [DEVICE, *sim_ids], iterations=1_000 if quick else 10_000)
        for kind in processes:
            variants = [k for k in kinds if VARIANTS[k][0] == kind]
            tls_port = _free_port() if any(VARIANTS[k][1] for k in variants) else None
            with running_broker(kind, dep.users, root, tls_port=tls_port) as port:
                ports = {k: tls_port if VARIANTS[k][1] and tls_port is not None else port for k in variants}
                by_mode = {mode: Throughput(kind, mode, [], [], n, PAYLOAD) for mode in modes}
                do_throughput = throughput and kind in variants  # over the password listener
                with devices_online(ctx, root, port, sim_ids[:online] if do_throughput else []):
                    for rep in range(reps if do_throughput else 0):
                        # Interleaved, in a balanced order (each path once in each position and
                        # after each other path equally often over a cycle of rounds), so that neither
                        # drift in the machine's load nor what one run leaves behind favours one path.
                        for mode in balanced_order(modes, rep):
                            run_ = throughput_once(ctx, root, port, mode, n, timeout)
                            row = by_mode[mode]
                            row.rates.append(run_.rate)
                            row.received.append(run_.count)
                            row.wire = run_.wire
                            for party, us in run_.cpu.items():
                                row.cpu.setdefault(party, []).append(us)
                    for mode in modes if do_throughput and profile else ():
                        # one profiled run of each path: where each side's CPU goes per message
                        by_mode[mode].profiles = throughput_once(ctx, root, port, mode, n, timeout,
                                                                 profile=True).profiles
                if do_throughput:
                    rows.extend(by_mode.values())
                storms += run_storms(ctx, variants, root, ports, sim_ids, cases, s_reps, timeout)
                if profile and cases:
                    n_prof = min(100, n_dev)
                    for k in variants:
                        profiled.append(handshakes_once(ctx, k, root, ports[k], sim_ids[:n_prof], timeout, 1,
                                                        profile=True))
    out = []
    if rows:
        plain = {r.broker: r.rates for r in rows if r.mode == "plaintext"}
        stock = {r.broker: r.rates for r in rows if r.mode == STOCK}
        t_rows = []
        for r in rows:
            rate = median(r.rates)
            lost = "all" if all(c == r.sent for c in r.received) else "/".join(str(c) for c in r.received)
            shown: object = r.wire if r.wire > 0 else "sealed + id, time"
            ratios = paired_ratios(r.rates, plain.get(r.broker, []))
            vs_stock = paired_ratios(r.rates, stock.get(r.broker, []))
            t_rows.append([r.broker, r.mode, shown, fmt(rate),
                           fmt(rate * PAYLOAD / 1e6, 2),
                           ratio_cell(ratios),
                           " / ".join(f"{x:.2f}" for x in ratios) if ratios else "-",
                           ratio_cell(vs_stock),
                           " / ".join(fmt(x) for x in r.rates), lost,
                           *(fmt(median(r.cpu.get(party, [0.0])), 1) for party in ("publisher", "subscriber",
                                                                                  "broker"))])
        throughput_table = table(["broker", "path", "MQTT payload (B)", "msg/s (median)",
                                  "MB/s of 256 B payloads", "vs plaintext (median of rounds)",
                                  "vs plaintext, each round", "vs paho's own client (median of rounds)",
                                  "each run (msg/s)", "delivered",
                                  "publisher CPU (us/msg)", "subscriber CPU (us/msg)", "broker CPU (us/msg)"],
                                 t_rows)
        online_note = (f", {online:,} more devices online (each logged in with its three \"down\" filters, idle)"
                       if online else "")
        out.append(f"### End to end through the broker: {PAYLOAD} B payloads, QoS 1, {n:,} messages, "
                   f"median of {reps} runs{online_note}\n\n"
                   "Rounds: each round runs every path once, in a balanced order "
                   "(a Williams design: over a cycle of rounds each path runs once in each position and right "
                   "after each other path equally often); \"vs plaintext\" is the median over the rounds of "
                   "the path's rate divided by the plaintext rate of the same round, so that the host's "
                   "drift between rounds cancels out of the ratio (the rates alone swing by 30 % from round "
                   f"to round on this host). \"{CONTROL}\" runs the plaintext path a second time in each "
                   "round: its spread is how far two runs of the same code differ here, the noise in every other row. "
                   f"\"{STOCK}\" is the plaintext path on paho's own client class instead of the one the "
                   "product's link gives paho (`runtime.mqtt.Client`: large socket reads, no wake-up byte "
                   "from the loop's own thread; since stop 34): plain paho->paho as it ships, the standard "
                   "alternative; \"vs paho's own client\" is each path's median ratio to it, paired by round. "
                   f"{RATIO_INTERVAL}"
                   "\n\nCPU columns: CPU microseconds per message of each process "
                   "(`/proc/<pid>/stat`) from \"go\" until the subscriber counted the last message; in the "
                   "full service the publisher is the device agent (outbox, sealing, ACKs) and the subscriber "
                   f"the backend service (opening, SQLite, ACKs); amqtt runs in the benchmark's own process, so "
                   f"its broker column counts that whole process.\n\n{throughput_table}\n")
        for r in rows:
            for party, (total, text) in r.profiles.items():
                out.append(f"### Where the CPU goes: one profiled run, {r.broker}, {r.mode}, {party}\n\n"
                           f"cProfile on every thread (CPU clock; slower than the runs above, so only the "
                           f"shares count): {total:.3f} s of CPU profiled, top entries by own CPU time\n\n"
                           f"{text}\n")
    if storms:
        out.append("### Handshake storm: simulated devices connecting and handshaking at once\n\n"
                   "Each device is a real `DeviceAgent` (own key, certificate and paho connection); all "
                   "start at once. Login: a broker user with a PBKDF2 password on the plain listener, or "
                   "(mosquitto-tls) the product's TLS listener of the same mosquitto process, where devices "
                   "and backend log in with the certificate they use for EDHOC (`require_certificate`, "
                   "`use_identity_as_username`, CRL). Storms of up to 100 devices: median of "
                   f"{s_reps} run(s), the variants alternating. CPU columns: seconds of CPU each party used "
                   "during the storm (2 cores: wall time cannot go below their sum / 2); then, with every "
                   "device idle on its session, the share of a core the simulator processes kept busy "
                   "(the devices' timers). In brackets after the median seconds, from 5 runs on: its 90 % "
                   "confidence interval (`bench.stats.median_interval`).\n\n"
                   f"{storm_table(storms)}\n")
    for st in profiled:
        parts = [f"### Where the CPU goes: one profiled storm, {st.broker}, {st.devices} devices, "
                 f"1 simulator process\n\nProfiled run (cProfile on every thread, CPU clock; slower than "
                 f"the runs above, so only the shares count): {st.established} established in "
                 f"{st.seconds:.2f} s; CPU: backend {st.backend_cpu:.2f} s, simulator {st.sim_cpu:.2f} s, "
                 f"broker {st.broker_cpu:.2f} s.\n"]
        for party, (total, text) in st.profiles.items():
            parts.append(f"{party}: {total:.3f} s of CPU profiled, top entries by own CPU time\n\n{text}\n")
        out.append("\n".join(parts))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="sealmq end-to-end broker benchmarks")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--messages", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--devices", type=int)
    ap.add_argument("--broker", choices=list(VARIANTS), action="append",
                    help="repeatable; mosquitto-tls: storms over the TLS listener with client certificates")
    ap.add_argument("--storm-repeats", type=int, help="runs of each storm of up to 100 devices (default 5)")
    ap.add_argument("--profile", action="store_true",
                    help="add one profiled 100-device storm per variant (cProfile; perf on mosquitto) "
                         "and one profiled throughput run per path and broker")
    ap.add_argument("--storm-only", action="store_true", help="only the handshake storm")
    ap.add_argument("--throughput-only", action="store_true", help="only the throughput comparison")
    ap.add_argument("--online", type=int, default=0,
                    help="devices kept online and idle (logged in, three filters each) during the throughput rounds")
    ap.add_argument("--path", choices=list(MODES), action="append",
                    help="repeatable: only these throughput paths (plaintext, the base of the ratios, always runs)")
    args = ap.parse_args(argv)
    print(run(quick=args.quick, messages=args.messages, repeats=args.repeats, devices=args.devices,
              brokers=tuple(args.broker or VARIANTS), throughput=not args.storm_only,
              storm=not args.throughput_only, storm_repeats=args.storm_repeats, profile=args.profile,
              paths=tuple(args.path) if args.path else None, online=args.online))


if __name__ == "__main__":
    main()
