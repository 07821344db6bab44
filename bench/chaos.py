"""The chaos run (issue 12): nothing measured may disappear, nothing may arrive twice.

``python3 -m bench.chaos [--broker amqtt|mosquitto|both] [--seconds S] [--devices N] [--rate R] [--workers W]``

Several devices (each its own process, a real ``DeviceAgent`` with its state on disk) send
numbered telemetry and a few files through a real broker (the embedded amqtt in its own process,
or a mosquitto child process) to a real ``BackendService`` (its own process, SQLite on disk),
while the broker, the backend and the devices are each killed with SIGKILL at random moments and
restarted. Then the devices stop sending, everything is left to settle (every outbox drained,
every transfer done), and the run counts from the files on disk:

* **sent**: message ids each device committed to its outbox (``send_telemetry`` returned), i.e.
  every id from the device's first to its last; each device also logs the ids it got back, which
  must all be among them;
* **stored**: the backend's stored rows of each device;
* **lost**: sent ids not stored; **duplicated**: stored rows beyond one per id (what the
  application would see twice);
* **files verified**: files the backend stored whose SHA-256 is the sent file's and whose device
  signature verified.

With ``--workers W`` (W >= 2, mosquitto only; issue 14) the backend is W worker processes in one
MQTT 5 share group (accounts ``backend-w1..wW`` from ``bootstrap --workers``), sharing their sessions
in a real ``redis-server`` (sealed under one state key) and one SQLite database under the shared data
directory; worker 1 is the primary (media, commands). The SIGKILLs then pick a worker each time the
backend is chosen, so workers die mid-stream while the others go on.

Exit status 0 only with 0 lost, 0 duplicated and every file verified. ``run_chaos`` is what
``tests/test_chaos.py`` calls with a short duration. The processes are this module with
``--role broker|backend|device`` (internal).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
FILE_SIZES = (48_000, 150_000)


# --- the processes ---------------------------------------------------------------------------

def _stop_event() -> threading.Event:
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    return done


def _write_status(path: Path, status: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # several writers (workers) of one status file
    tmp.write_text(json.dumps(status))
    tmp.replace(path)


def role_broker(root: Path, port: int) -> None:
    from app.bootstrap import Deployment
    from broker.embedded import EmbeddedBroker, EmbeddedBrokerConfig

    done = _stop_event()
    broker = EmbeddedBroker(EmbeddedBrokerConfig(passwd=Deployment(root).users, port=port)).start()
    done.wait()
    broker.stop()


def role_backend(root: Path, port: int, max_batch: int, max_delay: float, idle: float, worker: int = 0,
                 state: str | None = None) -> None:
    from app.bootstrap import Deployment
    from backend.ingest import IngestSettings
    from backend.service import BackendService, BackendSettings
    from runtime.mqtt import MQTT_5, MqttSettings

    dep = Deployment(root)
    done = _stop_event()
    if worker:  # one of several workers: its own account, the deployment's share group
        from app.workers import account, password_file, share_group_file

        user = account("backend", worker)
        mqtt = MqttSettings(host=HOST, port=port, username=user, client_id=f"{user}:chaos",
                            password=password_file(dep.pki, "backend", worker).read_text().strip(),
                            protocol=MQTT_5, share_group=share_group_file(dep.pki, "backend").read_text().strip(),
                            reconnect_min_delay=1, reconnect_max_delay=2)
    else:
        mqtt = MqttSettings(host=HOST, port=port, username="backend", password=dep.password("backend", "backend"),
                            reconnect_min_delay=1, reconnect_max_delay=2)
    svc = BackendService(BackendSettings(pki_dir=dep.pki, data_dir=dep.backend_data, mqtt=mqtt, poll_interval=0.1,
                                         ingest=IngestSettings(max_batch=max_batch, max_delay=max_delay, idle=idle),
                                         state=state, state_key=root / "state.key", primary=worker <= 1))
    svc.start(wait=None)
    status, mine = root / "backend-status.json", root / f"backend-status-{os.getpid()}.json"
    while not done.wait(0.2):
        counts = {"received": svc.counters["received"], "stored": svc.ingest.counters.stored,
                  "duplicates": svc.ingest.counters.duplicates, "pid": os.getpid()}
        _write_status(status, counts)  # the current process's
        _write_status(mine, counts)  # kept after a kill, for the run's totals
    svc.stop()


def role_device(root: Path, port: int, device_id: str, rate: float, files: int) -> None:
    from app.bootstrap import Deployment
    from device.agent import DeviceAgent, DeviceConfig
    from pki import layout
    from runtime.mqtt import MqttSettings
    from sealmq.endpoint import EndpointConfig

    dep = Deployment(root)
    done = _stop_event()
    state = dep.device_state(device_id)
    mqtt = MqttSettings(host=HOST, port=port, username=device_id, password=dep.password("device", device_id),
                        client_id=f"{device_id}:chaos", reconnect_min_delay=1, reconnect_max_delay=2)
    agent = DeviceAgent(DeviceConfig(device_id=device_id, identity_dir=layout.device_dir(dep.pki, device_id),
                                     pki_dir=dep.pki, state_dir=state, mqtt=mqtt, poll_interval=0.05,
                                     endpoint=EndpointConfig(handshake_timeout=3.0)))
    first = state / "first_id"
    if not first.exists():  # before anything is sent: the ids from here on are "sent"
        first.write_text(str(agent.messages.next_id()))
        for i in range(files):
            path = root / "files" / f"{device_id}-{i}.bin"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(os.urandom(random.randint(*FILE_SIZES)))
            agent.send_file(path)
    agent.start(wait=None)
    stop_sending = root / "stop-sending"
    n = 0
    with open(state / "sent.log", "a", encoding="utf-8") as log:
        while not done.is_set():
            if not stop_sending.exists():
                msg_id = agent.send_telemetry({"dev": device_id, "n": n, "pad": "x" * 64})
                log.write(f"{msg_id}\n")
                log.flush()
                n += 1
            _write_status(state / "status.json", {"unacked": agent.unacknowledged(),
                                                  "transfers": agent.pending_transfers(), "pid": os.getpid()})
            done.wait(1.0 / rate)
    agent.stop()


# --- the harness -----------------------------------------------------------------------------

@dataclass
class Proc:
    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    popen: subprocess.Popen[bytes] | None = None
    kills: int = 0

    def run(self) -> None:
        self.popen = self.start()

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)
            self.kills += 1
        self.popen = None

    def terminate(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.popen = None


@dataclass
class ChaosResult:
    broker: str
    seconds: float
    sent: int = 0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    logged_not_sent: int = 0
    files_sent: int = 0
    files_verified: int = 0
    kills: dict[str, int] = field(default_factory=dict)
    settled: bool = False
    backend_duplicates_dropped: int = 0
    workers: int = 1
    backends_storing: int = 0  # backend processes (workers, restarts) that committed records

    @property
    def ok(self) -> bool:
        return (self.settled and self.lost == 0 and self.duplicated == 0 and self.logged_not_sent == 0
                and self.files_verified == self.files_sent and self.sent > 0)

    def line(self) -> str:
        kills = ", ".join(f"{k} {v}" for k, v in sorted(self.kills.items()))
        backend = f"{self.broker}, {self.workers} workers" if self.workers > 1 else self.broker
        return (f"{backend}: {self.seconds:.0f} s, sent {self.sent}, stored {self.stored}, lost {self.lost}, "
                f"duplicated {self.duplicated}, files verified {self.files_verified}/{self.files_sent} "
                f"(SIGKILLs: {kills}; repeats the backend dropped: at least {self.backend_duplicates_dropped}"
                f"{'' if self.settled else '; DID NOT SETTLE'})")


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen([sys.executable, "-m", "bench.chaos", *args], stdout=out, stderr=out,
                                cwd=Path(__file__).resolve().parents[1])
    finally:
        out.close()


def _mosquitto(root: Path, port: int) -> Callable[[], subprocess.Popen[bytes]]:
    import shutil

    from app.bootstrap import Deployment
    from broker.mosquitto_config import MosquittoOptions, current_user, write_config
    from broker.passwd import load_users

    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    conf = write_config(root / "mosquitto", load_users(Deployment(root).users),
                        MosquittoOptions(host=HOST, port=port, run_as=current_user()))

    def start() -> subprocess.Popen[bytes]:
        out = open(root / "mosquitto.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            return subprocess.Popen([exe, "-c", str(conf)], stdout=out, stderr=out)
        finally:
            out.close()
    return start


def _wait_port(port: int, timeout: float = 15.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _device_status(root: Path, device_id: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads((root / "devices" / device_id / "status.json").read_text()))
    except (OSError, ValueError):
        return None


def run_chaos(root: Path, *, broker: str = "amqtt", seconds: float = 20.0, devices: int = 3, rate: float = 20.0,
              files: int = 1, seed: int | None = None, mean_gap: float = 2.0, settle_timeout: float = 90.0,
              say: Callable[[str], None] = print, workers: int = 1,
              victims: tuple[str, ...] = ("broker", "backend", "device")) -> ChaosResult:
    """One chaos run in ``root`` (a fresh directory); see the module docstring."""
    from app.bootstrap import bootstrap

    if workers > 1 and broker != "mosquitto":
        raise ValueError("several workers need MQTT 5 shared subscriptions: mosquitto")
    rng = random.Random(seed)
    ids = [f"chaos-{i}" for i in range(devices)]
    bootstrap(root, ids, iterations=1000, workers=workers if workers > 1 else 0)
    port = _free_port()
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    common = ["--root", str(root), "--port", str(port)]
    broker_proc = Proc("broker", _mosquitto(root, port) if broker == "mosquitto"
                       else lambda: _spawn(["--role", "broker", *common], logs / "broker.log"))
    redis_ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext(None)
    if workers > 1:
        from tests.redis_server import redis_server

        redis_ctx = redis_server()
    devs = [Proc(d, lambda d=d: _spawn(["--role", "device", *common, "--device", d, "--rate", str(rate),  # type: ignore[misc]
                                         "--files", str(files)], logs / f"{d}.log")) for d in ids]
    result = ChaosResult(broker, seconds, workers=workers)
    with redis_ctx as redis:
        if redis is None:
            backends = [Proc("backend", lambda: _spawn(["--role", "backend", *common], logs / "backend.log"))]
        else:
            backends = [Proc(f"backend-w{k}", lambda k=k: _spawn(  # type: ignore[misc]
                ["--role", "backend", *common, "--worker", str(k), "--state", redis.url], logs / f"backend-w{k}.log"))
                for k in range(1, workers + 1)]
        _chaos(root, ids, broker, seconds, rng, mean_gap, settle_timeout, say, port, broker_proc, backends, devs,
               result, files, rate, victims)
    _count(root, ids, result)
    return result


def _chaos(root: Path, ids: list[str], broker: str, seconds: float, rng: random.Random, mean_gap: float,
           settle_timeout: float, say: Callable[[str], None], port: int, broker_proc: Proc, backends: list[Proc],
           devs: list[Proc], result: ChaosResult, files: int, rate: float, victims: tuple[str, ...]) -> None:
    devices = len(devs)
    procs = [broker_proc, *backends, *devs]
    try:
        broker_proc.run()
        _wait_port(port)
        for p in (*backends, *devs):
            p.run()
        say(f"[chaos {broker}] {devices} devices, {rate:g} records/s each, {files} file(s) each, {seconds:.0f} s "
            f"of SIGKILLs (mean gap {mean_gap:g} s)")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(min(rng.expovariate(1.0 / mean_gap), max(end - time.monotonic(), 0)))
            if time.monotonic() >= end:
                break
            kind = rng.choice(victims)
            victim = (broker_proc if kind == "broker" else rng.choice(backends) if kind == "backend"
                      else rng.choice(devs))
            victim.kill()
            time.sleep(rng.uniform(0.1, 1.5))
            victim.run()
            if victim is broker_proc:
                _wait_port(port)
        (root / "stop-sending").touch()
        say(f"[chaos {broker}] SIGKILLs done; settling (every outbox drained, every transfer done)")
        deadline = time.monotonic() + settle_timeout
        while time.monotonic() < deadline:
            statuses = [_device_status(root, d) for d in ids]
            if all(s is not None and s["unacked"] == 0 and s["transfers"] == 0 for s in statuses):
                result.settled = True
                break
            time.sleep(0.5)
    finally:
        for p in reversed(procs):
            p.terminate()
    result.kills = {"broker": broker_proc.kills, "backend": sum(p.kills for p in backends),
                    "devices": sum(p.kills for p in devs)}


def _count(root: Path, ids: list[str], result: ChaosResult) -> None:
    from app.bootstrap import Deployment
    from backend.storage import Storage, db_path
    from device.outbox import DB_FILE

    dep = Deployment(root)
    storage = Storage(db_path(dep.backend_data))
    try:
        for d in ids:
            state = dep.device_state(d)
            first = int((state / "first_id").read_text())
            with sqlite3.connect(state / DB_FILE) as db:
                next_id = int(db.execute("SELECT value FROM meta WHERE key='next_id'").fetchone()[0])
            sent = set(range(first, next_id))
            logged = {int(x) for x in (state / "sent.log").read_text().split()}
            rows = [m.msg_id for m in storage.messages(d, limit=10**9)]
            stored = {i for i in rows if i is not None}
            result.sent += len(sent)
            result.stored += len(rows)
            result.lost += len(sent - stored)
            result.duplicated += len(rows) - len(stored)
            result.logged_not_sent += len(logged - sent)
        media = storage.media()
        for path in sorted((root / "files").glob("*.bin")):
            result.files_sent += 1
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            device = path.name.rsplit("-", 1)[0]
            if any(m.device_id == device and m.sha256 == digest and m.signature_verified
                   and (dep.backend_data / m.stored_path).is_file() for m in media):
                result.files_verified += 1
    finally:
        storage.close()
    for path in root.glob("backend-status-*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            status = json.loads(path.read_text())
            result.backend_duplicates_dropped += int(status["duplicates"])
            result.backends_storing += int(status["stored"]) > 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="chaos run: SIGKILL broker, backend and devices; count losses")
    ap.add_argument("--broker", choices=["amqtt", "mosquitto", "both"], default="both")
    ap.add_argument("--seconds", type=float, default=120.0, help="seconds of SIGKILLs")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--rate", type=float, default=25.0, help="telemetry records per second per device")
    ap.add_argument("--files", type=int, default=2, help="files per device")
    ap.add_argument("--mean-gap", type=float, default=2.0, help="mean seconds between SIGKILLs")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="run here and keep the directory")
    ap.add_argument("--workers", type=int, default=1, help="backend workers (>= 2: mosquitto, redis-server)")
    # internal: the processes of a run
    ap.add_argument("--role", choices=["broker", "backend", "device"], help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--device", help=argparse.SUPPRESS)
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--state", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max-batch", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--max-delay", type=float, default=0.005, help=argparse.SUPPRESS)
    ap.add_argument("--idle", type=float, default=0.0005, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "broker":
        role_broker(args.root, args.port)
        return 0
    if args.role == "backend":
        role_backend(args.root, args.port, args.max_batch, args.max_delay, args.idle, args.worker, args.state)
        return 0
    if args.role == "device":
        role_device(args.root, args.port, args.device, args.rate, args.files)
        return 0
    brokers = ["amqtt", "mosquitto"] if args.broker == "both" else [args.broker]
    if args.workers > 1:
        brokers = ["mosquitto"]  # MQTT 5 shared subscriptions
    ok = True
    for b in brokers:
        with tempfile.TemporaryDirectory(prefix=f"sealmq-chaos-{b}-") as tmp:
            root = args.keep / b if args.keep else Path(tmp)
            root.mkdir(parents=True, exist_ok=True)
            result = run_chaos(root, broker=b, seconds=args.seconds, devices=args.devices, rate=args.rate,
                               files=args.files, seed=args.seed, mean_gap=args.mean_gap, workers=args.workers)
            print(result.line(), flush=True)
            ok = ok and result.ok
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
