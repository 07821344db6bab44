"""Media benchmarks (issue #5): sealed vs plaintext chunked transfer, and peak memory vs file size.

Throughput. The same random file, through the same broker in the same run, twice per repeat:

* ``sealed``: the product path. ``DeviceAgent.send_file`` in one process (hash the file, sign the
  manifest, seal 63 KiB chunks, 64 in flight, resend on timeout) and ``BackendService`` in another
  (open each record, pwrite the chunk, fsync + ack every 32 chunks, verify hash and signature at
  the end, store the file, record it in SQLite). Timed in the device process from ``send_file``
  until the backend's "complete and verified" ack arrives.
* ``sealed, pure Python``: the same with the record framing's compiled part switched off in both
  processes (``sealmq.record.speedups = None``): what an install without a C compiler runs.
* ``AEAD only``: the plaintext scheme below with each chunk sealed by A128GCM (the sealed path's
  AEAD) on the publisher and opened on the subscriber: the floor of the sealed path.
* ``plaintext again (control)``: the plaintext scheme a second time in each round, whose ratio to
  the first shows the noise of these figures.
* ``plaintext``: the fair unsealed baseline. A paho publisher (the same ``runtime.mqtt.MqttLink``,
  QoS 1, same users and topics) hashes the file, offers a tiny plaintext manifest, then sends the
  raw file in the same 63 KiB chunks with the same window (64) and ack scheme (one ack per 32
  chunks, after an fsync); a paho subscriber pwrites each chunk, hashes incrementally, and acks
  "complete" once the SHA-256 matches. No resends: a lost message fails the run instead.

Each side runs in its own process (spawned, so they share no GIL); a fresh backend data
directory and device state per run, so every repeat is a new transfer. MB/s = file bytes / 10^6
/ seconds. Each run's result is checked: the stored file's SHA-256 equals the source's (sealed:
also the manifest signature verified).

Memory. ``sealmq broker run`` (embedded amqtt) or ``mosquitto``, ``sealmq backend run`` and
``sealmq device send FILE`` as three separate child processes (the CLIs a deployment uses), for
a small and a large file. Peak RSS = each process's own VmHWM as it exits (the sealmq CLIs run
under :mod:`bench._media_proc`, which records it; mosquitto's is read from /proc just before its
SIGTERM). Not ``wait4``'s ``ru_maxrss``: Linux folds the parent's high-water mark into it.
Flat figures mean memory does not grow with the file.

Fixed cost and steady state. Each round also moves a file a fifth the size on every path; the
line through a path's two transfers of a round splits its time into a fixed cost per transfer and
a cost per MB, so the steady-state rate can be told from what a transfer costs once.

The issue's size. Issue #11 states its media target for a 30 MB file; since stop 33 each round
also moves one (``ISSUE_SIZE``), in a table of its own, so the recorded run has the figure at the
size the target names as well as at 50 MB.

Run: ``python3 -m bench.bench_media [--quick] [--broker amqtt|mosquitto|both] [--size-mb N]
[--repeats N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import hmac
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import (
    CONTROL,
    FLOOR,
    RATIO_INTERVAL,
    balanced_order,
    floor_aead,
    fmt,
    median,
    ratio_cell,
    table,
    use_python_framing,
)
from sealmq.media import DEFAULT_CHUNK_SIZE
from sealmq.media_receiver import DEFAULT_ACK_EVERY
from sealmq.media_sender import DEFAULT_WINDOW

HOST = "127.0.0.1"
DEVICE = "bench-cam"
MB = 1_000_000
MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]

# The product's defaults, so that the baseline moves data exactly the way the device agent does.
CHUNK = DEFAULT_CHUNK_SIZE  # device.agent.DeviceConfig.chunk_size (63 KiB)
WINDOW = DEFAULT_WINDOW  # DeviceConfig.media_window (64)
ACK_EVERY = DEFAULT_ACK_EVERY  # sealmq.media_receiver.DEFAULT_ACK_EVERY (32)

# "sealed, pure Python": the product path with the record framing's compiled part switched off
# in both processes (what a build without a C compiler runs; sealmq/_speedups.c)
PURE = "sealed, pure Python"
# CONTROL (bench.stats): the plaintext scheme run a second time in each round, its ratio to the
# first the noise of these figures. FLOOR: the floor of the sealed path, the plaintext scheme with
# each chunk sealed by A128GCM (suite 6's AEAD) under one fixed key, its nonce from the chunk's
# index, the topic as AAD; no record, session, manifest signature or store.
MODES = ("plaintext", CONTROL, FLOOR, "sealed", PURE)
# Issue #11's media target is stated for a 30 MB file (the default run also measures 50 MB).
ISSUE_SIZE = 30 * MB
# Rounds by default: the rounds' ratios spread by +-25 % on this host; 9 narrow their median.
ROUNDS = 9
PLAIN = ("plaintext", CONTROL, FLOOR)


def _floor_aead(cfg: dict[str, Any]) -> Any:
    """The "AEAD only" path's cipher (both sides), or None for the plaintext scheme."""
    return floor_aead(cfg["floor_key"]) if cfg["mode"] == FLOOR else None


def _floor_nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


def product_defaults() -> tuple[int, int, int]:
    """(chunk size, window, ack every) as the product has them; the smoke test checks ours match."""
    from device.agent import DeviceConfig
    from sealmq.media_receiver import DEFAULT_ACK_EVERY

    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(DeviceConfig)}
    return int(defaults["chunk_size"]), int(defaults["media_window"]), DEFAULT_ACK_EVERY


# --- files ---------------------------------------------------------------------------------------

def make_file(path: Path, size: int, seed: int = 5) -> str:
    """Write ``size`` pseudo-random (incompressible) bytes; return their SHA-256 (hex)."""
    rnd = random.Random(seed)
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            block = rnd.randbytes(min(left, MiB))
            f.write(block)
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


# --- plaintext baseline wire format --------------------------------------------------------------
# One type byte, then: manifest M | size u64 | chunk u32 | sha256 (32); chunk C | index u64 | data;
# ack A | chunks received u64; done D | 1 if the hash matched else 0.

def plain_manifest(size: int, chunk: int, digest: bytes) -> bytes:
    return b"M" + size.to_bytes(8, "big") + chunk.to_bytes(4, "big") + digest


def plain_chunk(index: int, data: bytes) -> bytes:
    return b"C" + index.to_bytes(8, "big") + data


class PlainReceiver:
    """The baseline's receiving side, I/O-light so the smoke test can drive it directly: it
    writes chunks at their offsets, hashes in order, and returns the reply to publish, if any."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.fd = -1
        self.size = self.chunk = self.count = 0
        self.expected = b""
        self.have = bytearray()
        self.received = 0
        self.hashed = 0  # chunks [0, hashed) are in the hasher
        self.hasher = hashlib.sha256()
        self.ok: bool | None = None

    def handle(self, payload: bytes) -> bytes | None:
        kind, body = payload[:1], payload[1:]
        if kind == b"M" and self.fd < 0:
            self.size = int.from_bytes(body[:8], "big")
            self.chunk = int.from_bytes(body[8:12], "big")
            self.expected = body[12:44]
            self.count = -(-self.size // self.chunk)
            self.have = bytearray(self.count)
            self.fd = os.open(self.out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self.fd, self.size)
            return self._finish() if self.count == 0 else b"A" + (0).to_bytes(8, "big")
        if kind != b"C" or self.fd < 0 or self.ok is not None:
            return None
        index = int.from_bytes(body[:8], "big")
        data = body[8:]
        if index >= self.count or self.have[index]:
            return None  # a duplicate (QoS 1 redelivery): already written
        os.pwrite(self.fd, data, index * self.chunk)
        self.have[index] = 1
        self.received += 1
        if index == self.hashed:
            self.hasher.update(data)
            self.hashed += 1
        if self.received == self.count:
            return self._finish()
        if self.received % ACK_EVERY == 0:
            os.fsync(self.fd)  # as the product's MediaStore: an ack claims only what is on disk
            return b"A" + self.received.to_bytes(8, "big")
        return None

    def _finish(self) -> bytes:
        # Chunks that arrived out of order were not hashed on the fly: read them back.
        while self.hashed < self.count:
            self.hasher.update(os.pread(self.fd, self.chunk, self.hashed * self.chunk))
            self.hashed += 1
        os.fsync(self.fd)
        self.ok = hmac.compare_digest(self.hasher.digest(), self.expected)
        os.close(self.fd)
        return b"D" + (b"\x01" if self.ok else b"\x00")


# --- child processes (module level, for the "spawn" start method) --------------------------------

def _settings(cfg: dict[str, Any], role: str, user: str) -> Any:
    from app.bootstrap import Deployment
    from runtime.mqtt import MqttSettings

    # clean sessions: a repeat must not inherit messages queued for the previous run's session
    return MqttSettings(host=HOST, port=cfg["port"], username=user,
                        password=Deployment(Path(cfg["root"])).password(role, user),
                        client_id=f"{user}:bench-media", clean_session=True)


def _sealed_backend(cfg: dict[str, Any], ready: Any, stop: Any, results: Any) -> None:
    from backend.media import list_media
    from backend.quotas import DeviceQuotas
    from backend.service import BackendService, BackendSettings
    from backend.storage import db_path

    if cfg["mode"] == PURE:
        use_python_framing()
    data = Path(cfg["run_dir"]) / "backend"
    # one device at full speed: the per-device record rate would measure the bound, not the path
    svc = BackendService(BackendSettings(pki_dir=Path(cfg["root"]) / "pki", data_dir=data,
                                         mqtt=_settings(cfg, "backend", "backend"),
                                         quotas=DeviceQuotas(records_per_second=None, stored_bytes=None)))
    svc.start()
    ready.set()
    stop.wait(cfg["timeout"] + 60)
    svc.stop()
    rows = [r for r in list_media(db_path(data)) if r.sha256 == cfg["digest"]]
    ok = (len(rows) == 1 and rows[0].signature_verified and rows[0].size == cfg["size"]
          and sha256_file(data / rows[0].stored_path) == cfg["digest"])
    results.put(("recv", ok, f"{len(rows)} stored, rejected={svc.counters['rejected']}"))


def _sealed_device(cfg: dict[str, Any], ready: Any, go: Any, results: Any) -> None:
    from device.agent import DeviceAgent, DeviceConfig
    from device.media import TransferProgress
    from pki import layout

    if cfg["mode"] == PURE:
        use_python_framing()
    pki = Path(cfg["root"]) / "pki"
    agent = DeviceAgent(DeviceConfig(device_id=DEVICE, identity_dir=layout.device_dir(pki, DEVICE), pki_dir=pki,
                                     state_dir=Path(cfg["run_dir"]) / "device", mqtt=_settings(cfg, "device", DEVICE)))
    finished = threading.Event()
    outcome: dict[str, Any] = {}

    def on_progress(p: TransferProgress) -> None:
        if p.state in ("done", "rejected", "aborted") and not finished.is_set():
            outcome["t"] = time.monotonic()
            outcome["state"] = p.state
            finished.set()

    agent.on_progress = on_progress
    agent.start()
    try:
        if not agent.wait_established(30):
            results.put(("send", False, 0.0, "no session"))
            return
        ready.set()
        go.wait()
        t0 = time.monotonic()
        agent.send_file(Path(cfg["src"]))
        if not finished.wait(cfg["timeout"]):
            results.put(("send", False, 0.0, "timed out"))
            return
        results.put(("send", outcome["state"] == "done", outcome["t"] - t0, outcome["state"]))
    finally:
        agent.stop()


def _plain_subscriber(cfg: dict[str, Any], ready: Any, stop: Any, results: Any) -> None:
    from runtime.mqtt import MqttLink
    from sealmq import topics
    from sealmq.topics import Channel, Direction

    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    receiver = PlainReceiver(run_dir / "received.bin")
    down = topics.topic(DEVICE, Channel.MEDIA, Direction.DOWN)
    aead = _floor_aead(cfg)

    def on_message(topic: str, payload: bytes) -> None:
        if aead is not None and payload[:1] == b"C":  # the floor: open the chunk first
            payload = payload[:9] + aead.decrypt(_floor_nonce(int.from_bytes(payload[1:9], "big")), payload[9:],
                                                 topic.encode())
        reply = receiver.handle(payload)
        if reply is not None:
            link.publish(down, reply)

    link = MqttLink(_settings(cfg, "backend", "backend"), on_message,
                    [topics.subscription(Channel.MEDIA, Direction.UP)])
    link.start()
    ready.set()
    stop.wait(cfg["timeout"] + 60)
    link.stop()
    ok = bool(receiver.ok) and sha256_file(receiver.out) == cfg["digest"]
    results.put(("recv", ok, f"{receiver.received}/{receiver.count} chunks"))


def _plain_publisher(cfg: dict[str, Any], ready: Any, go: Any, results: Any) -> None:
    from device.media import file_sha256
    from runtime.mqtt import MqttLink
    from sealmq import topics
    from sealmq.topics import Channel, Direction

    cond = threading.Condition()
    state = {"acked": -1, "done": -1, "next": 0}

    def on_message(topic: str, payload: bytes) -> None:
        with cond:
            if payload[:1] == b"A":
                state["acked"] = max(state["acked"], int.from_bytes(payload[1:9], "big"))
            elif payload[:1] == b"D":
                state["done"] = payload[1]
            cond.notify_all()

    up = topics.topic(DEVICE, Channel.MEDIA, Direction.UP)
    aead, aad = _floor_aead(cfg), up.encode()
    link = MqttLink(_settings(cfg, "device", DEVICE), on_message, [topics.topic(DEVICE, Channel.MEDIA, Direction.DOWN)])
    link.start()
    time.sleep(0.3)  # let the SUBACK land before the first publish
    src = Path(cfg["src"])
    try:
        ready.set()
        go.wait()
        deadline = time.monotonic() + cfg["timeout"]
        t0 = time.monotonic()
        digest, size = file_sha256(src)  # the device agent hashes the whole file first, too
        count = -(-size // CHUNK)
        link.publish(up, plain_manifest(size, CHUNK, digest))
        with cond:
            if not cond.wait_for(lambda: state["acked"] >= 0, max(0.0, deadline - time.monotonic())):
                results.put(("send", False, 0.0, "no answer to the manifest"))
                return
        with src.open("rb") as f:
            for index in range(count):
                with cond:
                    state["next"] = index
                    if not cond.wait_for(lambda: state["next"] - state["acked"] < WINDOW,
                                         max(0.0, deadline - time.monotonic())):
                        results.put(("send", False, 0.0, f"stalled at chunk {index}"))
                        return
                data = f.read(CHUNK)
                if aead is not None:  # the floor: each chunk sealed
                    data = aead.encrypt(_floor_nonce(index), data, aad)
                link.publish(up, plain_chunk(index, data))
        with cond:
            if not cond.wait_for(lambda: state["done"] >= 0, max(0.0, deadline - time.monotonic())):
                results.put(("send", False, 0.0, "no completion ack"))
                return
        results.put(("send", state["done"] == 1, time.monotonic() - t0, "done"))
    finally:
        link.stop()


# --- throughput orchestration --------------------------------------------------------------------

@dataclass
class Outcome:
    ok: bool
    seconds: float
    detail: str


def _get(results: Any, timeout: float) -> tuple[Any, ...]:
    item: tuple[Any, ...] = results.get(timeout=timeout)
    return item


def transfer_once(ctx: Any, root: Path, port: int, mode: str, src: Path, digest: str, timeout: float) -> Outcome:
    """One timed transfer of ``src`` in ``mode`` through the broker on ``port``; cleans up after."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{MODES.index(mode)}-", dir=root))
    cfg = {"root": str(root), "port": port, "src": str(src), "digest": digest, "size": src.stat().st_size,
           "run_dir": str(run_dir), "timeout": timeout, "mode": mode, "floor_key": os.urandom(16).hex()}
    sealed = mode not in PLAIN
    results = ctx.Queue()
    recv_ready, send_ready, go, stop = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Event()
    recv = ctx.Process(target=_sealed_backend if sealed else _plain_subscriber, args=(cfg, recv_ready, stop, results))
    send = ctx.Process(target=_sealed_device if sealed else _plain_publisher, args=(cfg, send_ready, go, results))
    procs = [recv]
    got: dict[str, tuple[Any, ...]] = {}
    try:
        recv.start()
        if not recv_ready.wait(60):
            raise RuntimeError(f"{mode}: receiver did not start")
        send.start()
        procs.append(send)
        while not send_ready.wait(0.2):
            if not send.is_alive():
                break
            if not results.empty():  # the sender gave up before it was ready (no session)
                break
        else:
            go.set()
        if not send_ready.is_set() and not send.is_alive() and results.empty():
            raise RuntimeError(f"{mode}: sender exited with code {send.exitcode}")
        item = _get(results, timeout + 60)
        got[item[0]] = item
        stop.set()
        item = _get(results, timeout + 60)
        got[item[0]] = item
    finally:
        go.set()
        stop.set()
        for p in procs:
            p.join(timeout + 60)
            if p.is_alive():
                p.terminate()
                p.join(5)
        shutil.rmtree(run_dir, ignore_errors=True)
    _, sent_ok, seconds, why = got["send"]
    _, recv_ok, detail = got["recv"]
    return Outcome(bool(sent_ok and recv_ok), float(seconds), f"{why}; {detail}")


@contextlib.contextmanager
def _broker(kind: str, users: Path, root: Path) -> Iterator[int]:
    from bench.broker import running_broker

    with running_broker(kind, users, root) as port:
        yield port


def throughput(root: Path, users: Path, kinds: list[str], size: int, repeats: int, timeout: float,
               small: int | None = None, also: tuple[int, ...] = ()
               ) -> tuple[list[list[object]], list[list[object]], dict[int, list[list[object]]]]:
    """The throughput table's rows; with ``small``, each round also moves a ``small`` file on
    every path, and the second list splits each path's time into a fixed cost per transfer and a
    cost per MB (the steady state), from the two sizes of the same round (``split_rows``). Each
    size in ``also`` is moved in every round too, its rows in the third result (by size)."""
    ctx = mp.get_context("spawn")
    sizes = tuple(dict.fromkeys((size, *also) + (() if small is None else (small,))))
    srcs = {n: root / f"bench-media-{n}.bin" for n in sizes}
    digests = {n: make_file(src, n, seed=5 + i) for i, (n, src) in enumerate(srcs.items())}
    rows: list[list[object]] = []
    split: list[list[object]] = []
    extra: dict[int, list[list[object]]] = {n: [] for n in also}
    try:
        for kind in kinds:
            with _broker(kind, users, root) as port:
                # per size and round, each path's seconds (None: the transfer failed)
                seconds: dict[int, dict[str, list[float | None]]] = {n: {m: [] for m in MODES} for n in sizes}
                # per size, each path's failed transfers: a table lists its own size's (the main
                # table also the split's small file, which has no table of its own)
                failures: dict[int, dict[str, list[str]]] = {n: {m: [] for m in MODES} for n in sizes}
                for rep in range(repeats):
                    # interleaved, in a balanced order (bench.stats.balanced_order), so that neither
                    # drift in the machine's load nor what one transfer leaves behind (dirty pages
                    # still being written back) falls on one path more than another
                    for k, n in enumerate(sizes):
                        for mode in balanced_order(MODES, rep + k):
                            out = transfer_once(ctx, root, port, mode, srcs[n], digests[n], timeout)
                            seconds[n][mode].append(out.seconds if out.ok else None)
                            if not out.ok:
                                failures[n][mode].append(f"{_size(n)}: {out.detail}")
            main_sizes = [n for n in sizes if n == size or n not in also]
            rows += _rate_rows(kind, seconds[size], size, repeats,
                               {m: [f for n in main_sizes for f in failures[n][m]] for m in MODES})
            for n in also:
                extra[n] += _rate_rows(kind, seconds[n], n, repeats, failures[n])
            if small is not None:
                split += split_rows(kind, seconds[size], seconds[small], size, small)
    finally:
        for src in srcs.values():
            src.unlink(missing_ok=True)
    return rows, split, extra


def _rate_rows(kind: str, seconds: dict[str, list[float | None]], size: int, repeats: int,
               failures: dict[str, list[str]]) -> list[list[object]]:
    """One row per path: median seconds and MB/s, and its time against the plaintext scheme's of
    the same round (the median of the rounds' ratios, stop 27's pairing)."""
    rows: list[list[object]] = []
    for mode in MODES:
        done = [t for t in seconds[mode] if t is not None]
        ratios = [p / t for t, p in zip(seconds[mode], seconds["plaintext"], strict=True)
                  if t is not None and p is not None]
        verified = f"{len(done)}/{repeats}" + (f" ({'; '.join(failures[mode])})" if failures[mode] else "")
        rows.append([kind, mode, fmt(median(done), 2) if done else "-",
                     fmt(size / MB / median(done), 1) if done else "-",
                     ratio_cell(ratios),
                     " / ".join(f"{r:.2f}" for r in ratios) if ratios else "-", verified])
    return rows


def fixed_and_per_mb(large: float, small: float, size: int, small_size: int) -> tuple[float, float]:
    """(ms per transfer, ms per MB) of the line through two transfers of one path and round."""
    per_mb = (large - small) * 1e3 / ((size - small_size) / MB)
    return small * 1e3 - per_mb * small_size / MB, per_mb


def split_rows(kind: str, large: dict[str, list[float | None]], small: dict[str, list[float | None]],
               size: int, small_size: int) -> list[list[object]]:
    """Per path: its cost per MB (median over rounds) and MB/s at that rate, that rate against the
    plaintext scheme's of the same round (median of the rounds' ratios), its fixed cost per
    transfer, and how much more fixed cost than the plaintext scheme it has (paired by round)."""
    lines: dict[str, list[tuple[float, float] | None]] = {
        mode: [fixed_and_per_mb(a, b, size, small_size) if a is not None and b is not None else None
               for a, b in zip(large[mode], small[mode], strict=True)]
        for mode in MODES}
    rows: list[list[object]] = []
    for mode in MODES:
        mine = [x for x in lines[mode] if x is not None]
        pairs = [(x, p) for x, p in zip(lines[mode], lines["plaintext"], strict=True)
                 if x is not None and p is not None]
        if not mine or not pairs:
            rows.append([kind, mode, "-", "-", "-", "-", "-"])
            continue
        per_mb = median([x[1] for x in mine])
        ratios = [p[1] / x[1] for x, p in pairs if x[1] > 0]  # tiny files (smoke test): noise can go below 0
        rows.append([kind, mode, fmt(per_mb, 2), fmt(1e3 / per_mb, 0) if per_mb > 0 else "-",
                     ratio_cell(ratios),
                     fmt(median([x[0] for x in mine]), 1), fmt(median([x[0] - p[0] for x, p in pairs]), 1)])
    return rows


# --- peak memory, three CLI processes ------------------------------------------------------------

def reap(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for ``proc`` (killing it after ``timeout``); return its exit code."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def _cli(hwm_out: Path, *args: str) -> list[str]:
    """A ``sealmq`` command that writes its own peak RSS to ``hwm_out`` as it exits."""
    return [sys.executable, "-m", "bench._media_proc", str(hwm_out), *args]


def _read_kib(path: Path) -> int:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return 0


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("SEALMQ_MQTT_PASSWORD", None)  # each CLI reads its own password file
    return env


def _start_broker_process(kind: str, users: Path, root: Path, hwm: Path, log: Any,
                          ) -> tuple[subprocess.Popen[bytes], int]:
    from tests.brokers import free_port, wait_listening

    port = free_port()
    if kind == "amqtt":
        cmd = _cli(hwm, "broker", "run", "--passwd", str(users), "--host", HOST, "--port", str(port))
        env = _child_env()
    else:
        from broker.mosquitto_config import MosquittoOptions, current_user, mosquitto_env, write_config
        from broker.passwd import load_users
        from tests.brokers import MOSQUITTO

        if MOSQUITTO is None:
            raise RuntimeError("mosquitto is not installed")
        conf = write_config(root / f"mosquitto-rss-{port}", load_users(users),
                            MosquittoOptions(host=HOST, port=port, run_as=current_user()))
        cmd = [MOSQUITTO, "-c", str(conf)]
        env = mosquitto_env(conf.parent, _child_env())
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO)
    try:
        wait_listening(HOST, port, timeout=30)
    except OSError:
        proc.kill()
        reap(proc, 5)
        raise RuntimeError(f"{kind} broker did not start") from None
    return proc, port


def _wait_backend_connected(data: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    from runtime.audit import read_audit

    log = data / "audit" / "server_log.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("backend exited before connecting")
        if log.exists() and any(e.get("event") == "connected" for e in read_audit(log)):
            time.sleep(0.3)  # the SUBSCRIBEs follow the CONNACK
            return
        time.sleep(0.1)
    raise RuntimeError("backend did not connect")


@dataclass
class MemoryRun:
    size: int
    device_kib: int
    backend_kib: int
    broker_kib: int
    seconds: float
    ok: bool


def _stop(proc: subprocess.Popen[bytes], hwm: Path | None) -> int:
    """SIGTERM a long-running child; its peak RSS in KiB (from its own report, or /proc before
    the signal for mosquitto, whose RSS is not ours to instrument)."""
    kib = 0
    if hwm is None:
        from bench._media_proc import vmhwm_kib

        with contextlib.suppress(OSError, RuntimeError):
            kib = vmhwm_kib(proc.pid)
    proc.send_signal(signal.SIGTERM)
    reap(proc, 30)
    return _read_kib(hwm) if hwm is not None else kib


def memory_once(root: Path, users: Path, pki: Path, kind: str, size: int, timeout: float) -> MemoryRun:
    from backend.media import list_media
    from backend.storage import db_path

    run_dir = Path(tempfile.mkdtemp(prefix=f"rss-{size}-", dir=root))
    src = run_dir / "clip.mp4"
    digest = make_file(src, size, seed=size)
    data = run_dir / "backend"
    hwm = {name: run_dir / f"{name}.vmhwm" for name in ("broker", "backend", "device")}
    procs: list[subprocess.Popen[bytes]] = []
    log = (run_dir / "children.log").open("ab")
    try:
        broker, port = _start_broker_process(kind, users, root, hwm["broker"], log)
        procs.append(broker)
        backend = subprocess.Popen(_cli(hwm["backend"], "backend", "run", "--pki", str(pki), "--data", str(data),
                                        "--host", HOST, "--port", str(port)),
                                   stdout=log, stderr=log, env=_child_env(), cwd=REPO)
        procs.append(backend)
        _wait_backend_connected(data, backend, 60)
        t0 = time.monotonic()
        device = subprocess.Popen(_cli(hwm["device"], "device", "send", "--pki", str(pki), "--id", DEVICE,
                                       "--state", str(run_dir / "device"), "--host", HOST, "--port", str(port),
                                       "--timeout", str(timeout), str(src)),
                                  stdout=subprocess.DEVNULL, stderr=log, env=_child_env(), cwd=REPO)
        procs.append(device)
        code = reap(device, timeout + 60)
        seconds = time.monotonic() - t0
        rows = [r for r in list_media(db_path(data)) if r.sha256 == digest] if code == 0 else []
        ok = code == 0 and len(rows) == 1 and rows[0].signature_verified and \
            sha256_file(data / rows[0].stored_path) == digest
        backend_kib = _stop(backend, hwm["backend"])
        broker_kib = _stop(broker, hwm["broker"] if kind == "amqtt" else None)
        return MemoryRun(size, _read_kib(hwm["device"]), backend_kib, broker_kib, seconds, ok)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                reap(p, 5)
        log.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def _size(n: int) -> str:
    return f"{n / MB:g} MB" if n >= MB else f"{n / 1000:g} kB"


def memory(root: Path, users: Path, pki: Path, kinds: list[str], sizes: tuple[int, int], timeout: float,
           ) -> tuple[list[list[object]], list[list[object]]]:
    rows: list[list[object]] = []
    growth: list[list[object]] = []
    for kind in kinds:
        small, large = (memory_once(root, users, pki, kind, s, timeout) for s in sizes)
        for r in (small, large):
            rows.append([kind, _size(r.size), _mib(r.device_kib), _mib(r.backend_kib), _mib(r.broker_kib),
                         fmt(r.seconds, 1), "yes" if r.ok else "NO"])
        growth.append([kind, f"{large.device_kib / small.device_kib:.2f}x",
                       f"{large.backend_kib / small.backend_kib:.2f}x",
                       f"{large.broker_kib / small.broker_kib:.2f}x"])
    return rows, growth


# --- entry points --------------------------------------------------------------------------------

def mosquitto_available() -> bool:
    from tests.brokers import MOSQUITTO

    return MOSQUITTO is not None


def run(quick: bool = False, *, brokers: tuple[str, ...] = ("amqtt", "mosquitto"), size: int | None = None,
        repeats: int | None = None, memory_sizes: tuple[int, int] | None = None,
        also: tuple[int, ...] | None = None) -> str:
    """Both benchmarks; returns markdown. Sizes default to 50 MB (and a fifth of it, for the split
    into fixed and per-MB costs; and the issue's 30 MB in a table of its own) / 2 vs 200 MB
    (quick: 5 MB, no other size / 2 vs 20 MB)."""
    from app.bootstrap import bootstrap

    size = size or (5 if quick else 50) * MB
    split_size = size // 5
    if also is None:
        also = () if quick or size == ISSUE_SIZE else (ISSUE_SIZE,)
    repeats = repeats or (1 if quick else ROUNDS)  # rounds: the ratios are paired by round
    memory_sizes = memory_sizes or (2 * MB, (20 if quick else 200) * MB)
    timeout = 60.0 + max((size, *also)) / MB * 2 + memory_sizes[1] / MB * 1
    kinds = [b for b in brokers if b != "mosquitto" or mosquitto_available()]
    chunk, window, ack_every = product_defaults()
    if (chunk, window, ack_every) != (CHUNK, WINDOW, ACK_EVERY):
        raise RuntimeError("the baseline's chunk/window/ack scheme no longer matches the product's")
    with tempfile.TemporaryDirectory(prefix="sealmq-bench-media-") as tmp:
        root = Path(tmp)
        dep, _ = bootstrap(root, [DEVICE], iterations=1_000 if quick else 10_000)
        t_rows, s_rows, x_rows = throughput(root, dep.users, kinds, size, repeats, timeout, split_size, also)
        m_rows, growth = memory(root, dep.users, dep.pki, kinds, memory_sizes, timeout)
    small, large = (_size(s) for s in memory_sizes)
    columns = ["broker", "path", "seconds", "MB/s", "vs plaintext (median of rounds)", "vs plaintext, each round",
               "verified"]
    others = "".join(
        f"\n\n### Media throughput: one {_size(n)} file"
        + (" (the size of issue #11's target)" if n == ISSUE_SIZE else "")
        + ", the same rounds and scheme\n\n" + table(columns, x_rows[n])
        for n in also)
    return (
        f"### Media throughput: one {_size(size)} file, {CHUNK // 1024} KiB chunks, window {WINDOW}, "
        f"ack every {ACK_EVERY} (fsync), QoS 1, {repeats} rounds\n\n"
        "Each round runs every path once, in a balanced order (a Williams design: over a cycle of rounds "
        "each path runs once in each position and right after each other path equally often); seconds and MB/s are "
        "medians over the rounds; \"vs plaintext\" is the median over the rounds of the plaintext "
        "scheme's seconds over the path's in the same round. "
        + RATIO_INTERVAL + " "
        f"\"{CONTROL}\" is the plaintext scheme run a second time in each round: its spread is how far "
        "two runs of the same code differ here."
        + (" Each round moves every file size below, one size after the other." if also else "")
        + "\n\n" + table(columns, t_rows) + others
        + f"\n\n### Media: fixed cost per transfer and steady state ({_size(size)} and {_size(split_size)} "
          "files in the same rounds)\n\n"
          f"Each round also moves a {_size(split_size)} file on every path. The line through a path's two "
          "transfers of one round splits its time into a cost per MB (the steady state: chunks "
          "flowing) and a fixed cost per transfer (what does not grow with the file: on the sealed "
          "path the signed manifest persisted before sending, the manifest's round trip, the "
          "backend's verification, fsync, rename and SQLite commit at the end). Medians over the "
          "rounds; the ratios and differences are paired by round.\n\n"
        + table(["broker", "path", "ms per MB", "MB/s (steady state)", "steady state vs plaintext",
                 "fixed ms per transfer", "fixed ms more than plaintext"], s_rows)
        + f"\n\n### Peak RSS (MiB) of each process: {small} vs {large} file "
          "(`sealmq broker run` or mosquitto, `sealmq backend run`, `sealmq device send`)\n\n"
        + table(["broker", "file", "device", "backend", "broker", "device wall time (s)", "verified"], m_rows)
        + f"\n\n{large} / {small} peak RSS ratio (1.00x = flat)\n\n"
        + table(["broker", "device", "backend", "broker"], growth)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="sealmq media benchmarks: sealed vs plaintext MB/s, peak RSS")
    ap.add_argument("--quick", action="store_true", help="5 MB throughput, 2 vs 20 MB memory, one repeat")
    ap.add_argument("--broker", choices=["amqtt", "mosquitto", "both"], default="both")
    ap.add_argument("--size-mb", type=float, help="throughput file size in MB")
    ap.add_argument("--repeats", type=int)
    args = ap.parse_args(argv)
    from bench.stats import machine

    brokers = ("amqtt", "mosquitto") if args.broker == "both" else (args.broker,)
    print("## Machine\n")
    print(machine())
    print()
    started = time.monotonic()
    print(run(args.quick, brokers=brokers, size=int(args.size_mb * MB) if args.size_mb else None,
              repeats=args.repeats))
    print(f"_media benchmark time: {time.monotonic() - started:.0f} s_")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
