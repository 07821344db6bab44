"""Scale-out (issue 14): records/s and handshakes/s with 1, 2 and 4 backend workers on mosquitto,
where the CPU goes, and what the shared session state adds per record.

Everything runs on this machine, side by side in one run, through one mosquitto child process
(generated config, 127.0.0.1) and one real ``redis-server`` (``tests.redis_server``); every party is its
own process (spawn context) and every time is read on one monotonic clock (``CLOCK_MONOTONIC`` is one
clock for all the machine's processes).

The backend cases (:data:`CASES`):

* ``1 worker, in-process sessions``: today's default: one ``BackendService``, account ``backend``,
  MQTT 3.1.1, sessions in the process;
* ``1 worker, MQTT 5 share group, in-process sessions``: one worker (``backend-w1``) in an MQTT 5 share
  group of one, sessions in the process: what MQTT 5 and the group cost by themselves;
* ``1 worker, shared state (redis)``: the same with its sessions in redis-server (``--state redis://...``):
  the cost of sharing, with nothing to share it with;
* ``2 workers`` and ``4 workers``: ``backend-w1..wN`` in one share group, sessions in redis-server,
  worker 1 the primary (docs/scaling.md).

Every worker clean-starts (MQTT 5 Session Expiry 0, MQTT 3.1.1 clean session) so that no worker of an
earlier run stays in the share group as an offline member (mosquitto would queue its share of the
messages: docs/scaling.md, measured), and each run has a fresh data directory, database and devices.

**Records/s.** 8 real ``DeviceAgent``s (own keys, certificates, broker accounts, fsynced outboxes)
spread over 2 load processes, each device committing ``N`` telemetry readings of 256 random bytes to
its outbox with ``send_telemetry_many`` (64 per call) as fast as it takes them, one record per reading
(``DeviceConfig.telemetry_batch=1``: the per-record load on the workers); the outbox sends
within its window (256 in flight) and drops a message only when the backend's sealed ACK (sent after
its commit) arrives. Measured from "go" (every device holds a session) until the backend's database
holds every message (the orchestrator counts the rows every 10 ms); then every (device, message id)
is checked: **lost** (sent, not stored) and **duplicated** (stored twice) must be 0. Store: the shared
SQLite file under the data directory (the default store, ``synchronous=FULL``, every worker writing
to it with ``BEGIN IMMEDIATE``), and, when PostgreSQL is installed, a real PostgreSQL
(``tests.postgres``; fsync off as in the tests, so its column is the SQL and protocol cost, not the
disk). Per-device record quotas are off (the path is measured, not the bound). The cases are
interleaved, in an order rotated at every repeat; each figure is the median of the repeats.

**CPU split.** CPU seconds (``/proc/<pid>/stat`` utime + stime, between "go" and the last commit) of
the workers (sum), mosquitto, redis-server, PostgreSQL (the postmaster and its children), and the
load processes: on a 2-core machine their sum over the wall time says how busy the cores were.

**Handshakes/s.** ``device.simulator.Simulator`` with ``D`` enrolled devices (own broker logins) over
2 processes, all connecting at once against the case's workers: seconds from "go" until every device
holds a session, and handshakes/s = D / that.

**Shared state per record.** In process, on the real redis-server: one device endpoint, one plain
``BackendEndpoint`` and one ``SharedSessions`` holding the same session; for each record the device
seals, ``endpoint.handle`` and ``SharedSessions.handle`` are each timed (alternating which goes
first), and the difference per record is reported: telemetry (no replay gate: its exactly-once is the
delivery ledger's), MEDIA_CONTROL (the shared replay gate: one Lua script), and the backend sealing
an ACK (``SharedSessions.seal``: a GET of the session to see whether another worker replaced it, and
an INCRBY for the sender number) against ``endpoint.seal``.

Run alone: ``python3 -m bench.workers [--quick] [--messages N] [--repeats R] [--devices D] [--no-postgres]``;
or as the part ``workers`` of ``python3 -m bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.broker import broker_cpu
from bench.stats import collect, fmt, median, percentile, proc_cpu, proc_stat, table

HOST = "127.0.0.1"
PAYLOAD = 256
PER_CALL = 64  # readings per send_telemetry_many call
LOAD_PROCS = 2


@dataclass(frozen=True)
class Case:
    label: str
    workers: int
    group: bool  # MQTT 5, accounts backend-wK in one share group
    state: bool  # sessions in redis-server (BackendSettings.state)


CASES = (
    Case("1 worker, in-process sessions", 1, group=False, state=False),
    # the two halves of what sharing costs: MQTT 5 and the share group alone, then the sessions in redis
    Case("1 worker, MQTT 5 share group, in-process sessions", 1, group=True, state=False),
    Case("1 worker, shared state (redis)", 1, group=True, state=True),
    Case("2 workers", 2, group=True, state=True),
    Case("4 workers", 4, group=True, state=True),
)


# --- the processes (module level: the spawn start method imports them) ----------------------------

def _worker(cfg: dict[str, Any], k: int, ready: Any, stop: Any, results: Any) -> None:
    """Backend worker ``k`` (1-based) of the case: a ``BackendService`` until ``stop``."""
    from app.bootstrap import Deployment
    from backend.quotas import DeviceQuotas
    from backend.service import BackendService, BackendSettings
    from runtime.mqtt import MQTT_5, MqttSettings

    dep = Deployment(Path(cfg["root"]))
    if cfg["group"]:
        from app.workers import account, password_file, share_group_file

        user = account("backend", k)
        mqtt = MqttSettings(host=HOST, port=cfg["port"], username=user, client_id=f"{user}:wbench",
                            password=password_file(dep.pki, "backend", k).read_text().strip(),
                            protocol=MQTT_5, share_group=share_group_file(dep.pki, "backend").read_text().strip(),
                            clean_session=True)  # Clean Start, Session Expiry 0: no offline member left
    else:
        mqtt = MqttSettings(host=HOST, port=cfg["port"], username="backend", client_id="backend:wbench",
                            password=dep.password("backend", "backend"), clean_session=True)
    svc = BackendService(BackendSettings(
        pki_dir=dep.pki, data_dir=Path(cfg["data"]), mqtt=mqtt, poll_interval=0.1, db=cfg["db"],
        quotas=DeviceQuotas(records_per_second=None, stored_bytes=None),
        state=cfg["state_url"] if cfg["state"] else None, state_key=Path(cfg["root"]) / "state.key",
        primary=k == 1))
    svc.start(wait=60)
    if not svc.link.subscribed.wait(60):
        results.put(("worker", k, "not subscribed"))
        svc.stop()
        return
    ready.set()
    stop.wait(cfg["timeout"] + 120)
    shared = svc.shared.counters if svc.shared is not None else {}
    results.put(("worker", k, {"stored": svc.ingest.counters.stored, "duplicates": svc.ingest.counters.duplicates,
                               "batches": svc.ingest.counters.batches, "acks": svc.ingest.counters.acks,
                               "handshakes": svc.counters["handshakes"], "rejected": svc.counters["rejected"],
                               "refreshes": shared.get("refreshes", 0)}))
    svc.stop()


def _devices_mqtt(cfg: dict[str, Any], device_id: str) -> Any:
    from app.bootstrap import Deployment
    from runtime.mqtt import MqttSettings

    dep = Deployment(Path(cfg["root"]))
    return MqttSettings(host=HOST, port=cfg["port"], username=device_id, client_id=f"{device_id}:wbench",
                        password=dep.password("device", device_id), clean_session=True)


def _load(cfg: dict[str, Any], index: int, ids: list[str], ready: Any, go: Any, done: Any, results: Any) -> None:
    """A load process: real ``DeviceAgent``s, each sending ``messages`` readings as fast as it may."""
    from device.agent import DeviceAgent, DeviceConfig
    from pki import layout

    pki = Path(cfg["root"]) / "pki"
    # one record per reading (telemetry_batch=1): the workers are loaded per record, as in the
    # figures recorded before readings were batched; bench.broker's full service shows batching
    agents = [DeviceAgent(DeviceConfig(device_id=d, identity_dir=layout.device_dir(pki, d), pki_dir=pki,
                                       state_dir=Path(cfg["run"]) / "devices" / d, mqtt=_devices_mqtt(cfg, d),
                                       telemetry_batch=1))
              for d in ids]
    try:
        for agent in agents:
            agent.start(wait=None)
        deadline = time.monotonic() + 60
        if not all(a.wait_established(max(0.0, deadline - time.monotonic())) for a in agents):
            results.put(("load", index, "no session"))
            return
        n = cfg["messages"]
        readings = {d: [{"p": os.urandom(PAYLOAD)} for _ in range(n)] for d in ids}
        sent: dict[str, list[int]] = {d: [] for d in ids}

        def send(agent: DeviceAgent) -> None:
            mine = readings[agent.config.device_id]
            for i in range(0, n, PER_CALL):
                sent[agent.config.device_id] += agent.send_telemetry_many(mine[i:i + PER_CALL])

        threads = [threading.Thread(target=send, args=(a,)) for a in agents]
        ready.set()
        go.wait()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results.put(("load", index, {"sent": sent, "outboxed": time.monotonic()}))
        done.wait(cfg["timeout"] + 60)
    finally:
        for agent in agents:
            agent.stop()


def _storm(cfg: dict[str, Any], index: int, ids: list[str], ready: Any, go: Any, results: Any) -> None:
    """Simulated devices, all connecting and handshaking at once at ``go``."""
    from app.bootstrap import Deployment
    from device.simulator import Simulator
    from runtime.mqtt import MqttSettings

    dep = Deployment(Path(cfg["root"]))
    sim = Simulator(dep.pki, Path(cfg["run"]) / f"sim-{index}", ids,
                    MqttSettings(host=HOST, port=cfg["port"], clean_session=True),
                    password_for=lambda d: dep.password("device", d))
    try:
        ready.set()
        go.wait(cfg["timeout"] + 60)
        for agent in sim.agents:
            agent.start(wait=None)
        deadline = time.monotonic() + cfg["timeout"]
        for agent in sim.agents:
            agent.wait_established(max(0.0, deadline - time.monotonic()))
        results.put(("sim", index, time.monotonic(), sim.established()))
    finally:
        sim.stop()


# --- orchestration -------------------------------------------------------------------------------

def _proc_cpu(pid: int) -> float:
    try:
        return proc_cpu(pid)
    except OSError:  # gone
        return 0.0


def _machine_cpu() -> float:
    """CPU seconds every process on the machine has used (all cores, not idle nor waiting for I/O)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _tree_cpu(pid: int) -> float:
    """CPU of ``pid`` and its children (the postmaster and its backends, which come and go)."""
    total = _proc_cpu(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid, cpu = proc_stat(stat)
        except OSError:
            continue
        if ppid == pid:
            total += cpu
    return total


@dataclass
class Env:
    ctx: Any
    root: Path
    port: int
    redis: Any  # tests.redis_server.RedisProcess
    pg: Any | None  # tests.postgres.PostgresProcess
    timeout: float
    runs: int = 0

    def cpu(self, workers: list[Any], loads: list[Any]) -> dict[str, float]:
        return {"workers": sum(_proc_cpu(p.pid) for p in workers), "broker": broker_cpu(),
                "redis": _proc_cpu(self.redis.proc.pid),
                "postgres": _tree_cpu(self.pg.proc.pid) if self.pg is not None else 0.0,
                "load": sum(_proc_cpu(p.pid) for p in loads), "machine": _machine_cpu()}

    def new_run(self) -> Path:
        self.runs += 1
        run_dir = self.root / f"run-{self.runs}"
        run_dir.mkdir()
        self.redis.flush()
        return run_dir


def _join(procs: list[Any], timeout: float = 60) -> None:
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.terminate()
            p.join(5)


@contextlib.contextmanager
def _workers(env: Env, case: Case, run_dir: Path, db: str | None, results: Any) -> Iterator[tuple[list[Any], Any]]:
    """Start the case's workers (each subscribed before this yields); stop them afterwards."""
    cfg = {"root": str(env.root), "port": env.port, "data": str(run_dir / "backend-data"), "db": db,
           "group": case.group, "state": case.state,
           "state_url": env.redis.url, "timeout": env.timeout}
    stop = env.ctx.Event()
    procs = []
    try:
        readies = []
        for k in range(1, case.workers + 1):
            ready = env.ctx.Event()
            p = env.ctx.Process(target=_worker, args=(cfg, k, ready, stop, results))
            p.start()
            procs.append(p)
            readies.append(ready)
        for ready in readies:
            if not ready.wait(120):
                raise RuntimeError(f"{case.label}: a worker did not start")
        yield procs, stop
    finally:
        stop.set()
        _join(procs)


class _Rows:
    """The stored rows of a run's database: counted while the run goes, checked at the end."""

    def __init__(self, data_dir: Path, db: str | None) -> None:
        if db is None:
            import sqlite3

            from backend.storage import db_path

            self._conn: Any = sqlite3.connect(db_path(data_dir), timeout=30)
        else:
            import psycopg

            self._conn = psycopg.connect(db, autocommit=True)

    def count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM messages").fetchone()[0])

    def ids(self) -> list[tuple[str, int]]:
        return [(str(d), int(m)) for d, m in self._conn.execute(
            "SELECT device_id, msg_id FROM messages WHERE msg_id IS NOT NULL")]

    def close(self) -> None:
        self._conn.close()


@dataclass
class Records:
    case: Case
    store: str
    sent: int = 0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    workers_storing: int = 0  # workers that committed records (all of them, with the share group)
    batches: int = 0  # commits (transactions) of all workers
    acks: int = 0  # sealed ACK records the workers sent (one per device per commit)

    @property
    def rate(self) -> float:
        return self.stored / self.seconds if self.seconds > 0 and self.lost == 0 else 0.0


def records_once(env: Env, case: Case, store: str, ids: list[str], messages: int) -> Records:
    run_dir = env.new_run()
    db = env.pg.new_database() if store == "PostgreSQL" and env.pg is not None else None
    results = env.ctx.Queue()
    out = Records(case, store)
    with _workers(env, case, run_dir, db, results) as (workers, stop):
        rows = _Rows(run_dir / "backend-data", db)
        cfg = {"root": str(env.root), "port": env.port, "run": str(run_dir), "messages": messages,
               "timeout": env.timeout}
        go, done = env.ctx.Event(), env.ctx.Event()
        loads = []
        try:
            for i in range(LOAD_PROCS):
                ready = env.ctx.Event()
                p = env.ctx.Process(target=_load, args=(cfg, i, ids[i::LOAD_PROCS], ready, go, done, results))
                p.start()
                loads.append((p, ready))
            for _, ready in loads:
                if not ready.wait(120):
                    raise RuntimeError(f"{case.label}: the devices got no session")
            total = messages * len(ids)
            cpu0 = env.cpu(workers, [p for p, _ in loads])
            t0 = time.monotonic()
            go.set()
            deadline = t0 + env.timeout
            while (stored := rows.count()) < total and time.monotonic() < deadline:
                time.sleep(0.01)
            end = time.monotonic()
            cpu1 = env.cpu(workers, [p for p, _ in loads])
            sent = {}
            for got in collect(results, LOAD_PROCS, 60):
                if not isinstance(got[2], dict):
                    raise RuntimeError(f"{case.label}: load process {got[1]}: {got[2]}")
                sent.update(got[2]["sent"])
            time.sleep(0.2)  # anything committed twice after the count was reached shows below
            stored_ids = rows.ids()
        finally:
            done.set()
            _join([p for p, _ in loads])
            rows.close()
        stop.set()
        reports = [r for r in collect(results, case.workers, 90) if r[0] == "worker"]
    expected = {(d, m) for d, ms in sent.items() for m in ms}
    unique = set(stored_ids)
    out.sent, out.stored = len(expected), stored
    out.lost = len(expected - unique)
    out.duplicated = len(stored_ids) - len(unique)
    out.seconds = end - t0
    out.cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
    out.workers_storing = sum(1 for r in reports if isinstance(r[2], dict) and r[2]["stored"] > 0)
    out.batches = sum(r[2]["batches"] for r in reports if isinstance(r[2], dict))
    out.acks = sum(r[2]["acks"] for r in reports if isinstance(r[2], dict))
    return out


@dataclass
class Storm:
    case: Case
    devices: int
    established: int = 0
    handshakes: int = 0
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)


def storm_once(env: Env, case: Case, sim_ids: list[str]) -> Storm:
    run_dir = env.new_run()
    results = env.ctx.Queue()
    out = Storm(case, len(sim_ids))
    procs = min(LOAD_PROCS, len(sim_ids))
    with _workers(env, case, run_dir, None, results) as (workers, stop):
        cfg = {"root": str(env.root), "port": env.port, "run": str(run_dir), "timeout": env.timeout}
        go = env.ctx.Event()
        sims = []
        try:
            for i in range(procs):
                ready = env.ctx.Event()
                p = env.ctx.Process(target=_storm, args=(cfg, i, sim_ids[i::procs], ready, go, results))
                p.start()
                sims.append((p, ready))
            for _, ready in sims:
                if not ready.wait(120):
                    raise RuntimeError(f"{case.label}: a simulator did not start")
            cpu0 = env.cpu(workers, [p for p, _ in sims])
            t0 = time.monotonic()
            go.set()
            got = collect(results, procs, env.timeout + 60)
            cpu1 = env.cpu(workers, [p for p, _ in sims])
        finally:
            go.set()
            _join([p for p, _ in sims])
        stop.set()
        reports = [r for r in collect(results, case.workers, 90) if r[0] == "worker"]
    out.seconds = max(g[2] for g in got) - t0
    out.established = sum(g[3] for g in got)
    out.handshakes = sum(r[2]["handshakes"] for r in reports if isinstance(r[2], dict))
    out.cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
    return out


# --- the shared state's added latency, in process ----------------------------------------------

def shared_latency(root: Path, redis_url: str, device_id: str, n: int) -> list[list[object]]:
    """Rows (what, p50, p90, p99 in us) of the plain endpoint, the shared path, and their difference."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from app.bootstrap import Deployment
    from backend.session_state_redis import RedisSessionState
    from backend.shared import SharedSessions
    from backend.state_seal import KEY_SIZE, StateSealer
    from pki import layout
    from pki.store import load_identity, load_trust_store
    from sealmq import cbor, topics
    from sealmq.edhoc import X509Credential
    from sealmq.endpoint import (
        BackendConfig,
        BackendEndpoint,
        DeviceEndpoint,
        EndpointConfig,
        Output,
        Publish,
        Received,
    )
    from sealmq.session import SessionConfig
    from sealmq.topics import RecordKind

    dep = Deployment(root)
    no_auto = SessionConfig(auto_key_update=False)  # the same keys for every record timed

    def credential(directory: Path) -> X509Credential:
        ident = load_identity(directory)
        return X509Credential(private_key=ident.private_key,
                              chain_der=[c.public_bytes(Encoding.DER) for c in ident.chain], by_reference=False)

    def backend() -> BackendEndpoint:
        return BackendEndpoint(credentials=[credential(layout.backend_dir(dep.pki, "backend"))],
                               trust_store=load_trust_store(dep.pki), config=BackendConfig(session=no_auto))

    state = RedisSessionState(redis_url, StateSealer(os.urandom(KEY_SIZE)))
    plain, shared = backend(), SharedSessions(backend(), state, lock=state.lock)
    device = DeviceEndpoint(device_id=device_id, credential=credential(layout.device_dir(dep.pki, device_id)),
                            trust_store=load_trust_store(dep.pki), backend_name="backend",
                            config=EndpointConfig(session=no_auto))
    now = time.time()
    queue: list[Output] = list(device.start_handshake(now, os.urandom))
    while queue:  # the handshake through the shared path (its session lands in redis-server)
        out = queue.pop(0)
        if isinstance(out, Publish):
            up = topics.parse(out.topic).direction is topics.Direction.UP
            queue += (shared.handle if up else device.handle)(out.topic, out.payload, now, os.urandom)
    blob = state.get("session", device_id)
    if not device.established or blob is None:
        raise RuntimeError("no shared session")
    plain.import_session(device_id, cbor.as_bytes(cbor.as_list(cbor.loads(blob), "s")[1], "snapshot"), now)

    def timed(step: Callable[[], list[Output]], want: type | None) -> float:
        t0 = time.perf_counter_ns()
        outs = step()
        dt = (time.perf_counter_ns() - t0) / 1000
        if want is not None and not any(isinstance(o, want) for o in outs):
            raise RuntimeError(f"unexpected outputs {outs!r}")
        return dt

    rows: list[list[object]] = []

    def report(label: str, pairs: list[tuple[float, float]]) -> None:
        for what, values in ((f"{label}: endpoint alone", [a for a, _ in pairs]),
                             (f"{label}: SharedSessions (redis)", [b for _, b in pairs]),
                             (f"{label}: **added per record**", [b - a for a, b in pairs])):
            rows.append([what, *(f"{percentile(values, q):.1f}" for q in (50, 90, 99))])

    body = os.urandom(64)
    warmup = max(10, n // 20)
    for kind, label in ((RecordKind.TELEMETRY, "telemetry, handle (no gate: the ledger's)"),
                        (RecordKind.MEDIA_CONTROL, "MEDIA_CONTROL, handle (shared replay gate)")):
        pairs = []
        for i in range(warmup + n):
            pub = device.seal(kind, body, now)[0]
            assert isinstance(pub, Publish)

            def a(pub: Publish = pub) -> list[Output]:
                return plain.handle(pub.topic, pub.payload, now, os.urandom)

            def b(pub: Publish = pub) -> list[Output]:
                return shared.handle(pub.topic, pub.payload, now, os.urandom)

            if i % 2:
                ta, tb = timed(a, Received), timed(b, Received)
            else:
                tb, ta = timed(b, Received), timed(a, Received)
            if i >= warmup:
                pairs.append((ta, tb))
        report(label, pairs)
    pairs = []
    for i in range(warmup + n):
        def sa() -> list[Output]:
            return plain.seal(device_id, RecordKind.ACK, body, now)

        def sb() -> list[Output]:
            return shared.seal(device_id, RecordKind.ACK, body, now)

        if i % 2:
            ta, tb = timed(sa, Publish), timed(sb, Publish)
        else:
            tb, ta = timed(sb, Publish), timed(sa, Publish)
        if i >= warmup:
            pairs.append((ta, tb))
    report("ACK, seal (GET + INCRBY)", pairs)
    import redis

    client = redis.Redis.from_url(redis_url)
    pings = []
    for i in range(warmup + n):
        t0 = time.perf_counter_ns()
        client.ping()
        if i >= warmup:
            pings.append((time.perf_counter_ns() - t0) / 1000)
    client.close()
    rows.append(["redis-server PING (one round trip, for scale)",
                 *(f"{percentile(pings, q):.1f}" for q in (50, 90, 99))])
    state.close()
    return rows


# --- the part -----------------------------------------------------------------------------------

def _cpu_cells(cpu: list[dict[str, float]], seconds: float, pg: bool) -> list[str]:
    """Median CPU seconds per party, their sum, and how busy the cores were: with our processes, and
    with everything (the machine is shared: the difference is other work)."""
    def med(key: str) -> float:
        return median([c[key] for c in cpu])

    keys = ["workers", "broker", "redis", *(["postgres"] if pg else []), "load"]
    total = sum(med(k) for k in keys)
    cores = seconds * (os.cpu_count() or 1)
    return [*(fmt(med(k), 2) for k in keys), fmt(total, 2), f"{total / cores * 100:.0f}%",
            f"{med('machine') / cores * 100:.0f}%"]


def run(*, quick: bool = False, messages: int | None = None, repeats: int | None = None, devices: int | None = None,
        postgres: bool = True, say: Callable[[str], None] | None = None) -> str:
    from app.bootstrap import bootstrap
    from backend.state_seal import load_or_create_key
    from bench.broker import mosquitto_available, running_broker
    from tests.postgres import BINDIR, HAVE_PSYCOPG, postgres_server
    from tests.redis_server import HAVE_REDIS_PY, REDIS_SERVER, redis_server

    if not mosquitto_available() or REDIS_SERVER is None or not HAVE_REDIS_PY:
        return "## Scale-out: workers (issue 14)\n\nskipped: needs mosquitto, redis-server and redis-py\n"
    n = messages or (25 if quick else 1_500)
    reps = repeats or (1 if quick else 3)
    n_sim = devices or (4 if quick else 100)
    n_lat = 100 if quick else 5_000
    dev_ids = [f"wb-dev-{i}" for i in range(2 if quick else 8)]
    sim_ids = [f"wb-sim-{i:03d}" for i in range(n_sim)]
    with_pg = postgres and BINDIR is not None and HAVE_PSYCOPG
    stores = ["SQLite", *(["PostgreSQL"] if with_pg else [])]
    timeout = 60.0 if quick else 180.0
    note = say or (lambda _line: None)
    ctx = mp.get_context("spawn")
    recs: dict[tuple[str, str], list[Records]] = {}
    storms: dict[str, list[Storm]] = {}
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sealmq-bench-workers-")))
        dep, _ = bootstrap(root, [*dev_ids, *sim_ids], iterations=1_000 if quick else 10_000,
                           workers=max(c.workers for c in CASES))
        load_or_create_key(root / "state.key")
        redis = stack.enter_context(redis_server())
        pg = stack.enter_context(postgres_server()) if with_pg else None
        port = stack.enter_context(running_broker("mosquitto", dep.users, root))
        env = Env(ctx, root, port, redis, pg, timeout)
        plan = [(c, s) for c in CASES for s in stores]
        for rep in range(reps):
            # interleaved, in a rotating order: drift in the shared machine's load favours no case
            for case, store in plan[rep % len(plan):] + plan[:rep % len(plan)]:
                r = records_once(env, case, store, dev_ids, n)
                recs.setdefault((case.label, store), []).append(r)
                note(f"[workers] records {case.label}, {store}: {r.rate:,.0f}/s, lost {r.lost}, "
                     f"duplicated {r.duplicated}")
            for case in CASES[rep % len(CASES):] + CASES[:rep % len(CASES)]:
                st = storm_once(env, case, sim_ids)
                storms.setdefault(case.label, []).append(st)
                note(f"[workers] storm {case.label}: {st.established}/{st.devices} in {st.seconds:.2f} s")
        latency = shared_latency(root, redis.url, dev_ids[0], n_lat)
    return _report(recs, storms, latency, stores, n, len(dev_ids), reps, n_sim, n_lat, with_pg)


def _report(recs: dict[tuple[str, str], list[Records]], storms: dict[str, list[Storm]],
            latency: list[list[object]], stores: list[str], n: int, n_dev: int, reps: int, n_sim: int,
            n_lat: int, with_pg: bool) -> str:
    out = [f"## Scale-out: workers (issue 14)\n\n{n_dev} devices (`DeviceAgent`, 2 load processes) x {n:,} "
           f"telemetry readings of {PAYLOAD} B, QoS 1, mosquitto, from \"go\" until every message is committed "
           f"in the backend's database; median of {reps} runs, cases interleaved. SQLite: the shared file under "
           "the data directory (the default store, `synchronous=FULL`)"
           + ("; PostgreSQL: a local server with fsync off." if with_pg else ".") + "\n"]
    base = {s: median([r.rate for r in recs[(CASES[0].label, s)]]) for s in stores}
    rows = []
    for case in CASES:
        for s in stores:
            rs = recs[(case.label, s)]
            rate = median([r.rate for r in rs])
            rows.append([case.label, s, fmt(rate), f"{rate / base[s]:.2f}x" if base[s] else "-",
                         " / ".join(fmt(r.rate) for r in rs), sum(r.lost for r in rs),
                         sum(r.duplicated for r in rs), min(r.workers_storing for r in rs)])
    out.append(table(["backend", "store", "records/s (median)", "vs 1 worker in-process", "each run",
                      "lost", "duplicated", "workers that stored"], rows) + "\n")
    cpu_rows = []
    for case in CASES:
        for s in stores:
            rs = recs[(case.label, s)]
            secs = median([r.seconds for r in rs])
            cpu_rows.append([case.label, s, fmt(secs, 2), *_cpu_cells([r.cpu for r in rs], secs, with_pg),
                             fmt(median([r.cpu["workers"] / r.stored * 1e6 for r in rs]), 0),
                             fmt(median([r.stored / max(1, r.batches) for r in rs]), 1),
                             fmt(median([r.stored / max(1, r.acks) for r in rs]), 1)])
    out.append("### Where the CPU goes (records runs, median CPU seconds between go and the last commit)\n\n"
               + table(["backend", "store", "wall s", "workers", "mosquitto", "redis",
                        *(["PostgreSQL"] if with_pg else []), "load (devices)", "sum",
                        "cores busy (these)", "cores busy (machine)", "worker CPU us per record",
                        "records per commit", "records per ACK"], cpu_rows) + "\n")
    st_rows = []
    for case in CASES:
        ss = storms[case.label]
        secs = median([x.seconds for x in ss])
        st_rows.append([case.label, n_sim, f"{min(x.established for x in ss)}/{n_sim}",
                        min(x.handshakes for x in ss), fmt(secs, 2), fmt(n_sim / secs if secs else 0.0),
                        " / ".join(fmt(x.seconds, 2) for x in ss),
                        *_cpu_cells([x.cpu for x in ss], secs, with_pg)])
    out.append(f"### Handshakes: {n_sim} simulated devices connecting at once (2 simulator processes), "
               f"median of {reps}\n\n"
               + table(["backend", "devices", "established (worst run)", "worker handshakes (worst run)",
                        "s until all established", "handshakes/s", "each run (s)", "workers CPU s",
                        "mosquitto CPU s", "redis CPU s", *(["PostgreSQL CPU s"] if with_pg else []),
                        "simulators CPU s", "CPU sum s", "cores busy (these)", "cores busy (machine)"],
                         st_rows) + "\n")
    out.append(f"### Shared state per record, in process (real redis-server on loopback, {n_lat:,} records "
               "each)\n\n" + table(["path", "p50 us", "p90 us", "p99 us"], latency) + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="sealmq scale-out benchmark: 1, 2 and 4 backend workers")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--messages", type=int, help="telemetry readings per device")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--devices", type=int, help="simulated devices in the handshake storm")
    ap.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = ap.parse_args(argv)
    print(run(quick=args.quick, messages=args.messages, repeats=args.repeats, devices=args.devices,
              postgres=not args.no_postgres, say=lambda line: print(line, flush=True)))


if __name__ == "__main__":
    main()
