"""``sealmq demo`` and ``sealmq bootstrap``: the whole system on one machine, in one command.

The demo creates a throwaway deployment (PKI, broker users) if none exists, starts the embedded
broker, the backend and a few simulated devices, lets them talk for a while (telemetry, a command
per device, a key update, media once available), watches the broker's traffic as a read-only
monitor, and prints what happened and where the data is. It also checks what it promises: no
telemetry value ever appears in what the broker relayed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

from app import config, demo_fleet  # demo_fleet: fleet (issue 16)
from app.bootstrap import Deployment, bootstrap
from app.demo_console import port_free, serve_demo, start_demo_console  # console (issue 13)
from backend.service import BackendService, BackendSettings
from broker.embedded import EmbeddedBroker, EmbeddedBrokerConfig
from broker.inspect_format import describe
from device.simulator import Simulator, media_files, telemetry_for
from pki import keys
from runtime import exits
from runtime.mqtt import MqttLink, MqttSettings

MARKER = "demo-plaintext-marker"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    demo = sub.add_parser("demo", help="run broker, backend and simulated devices end to end (one command)")
    demo.add_argument("--dir", type=Path, default=Path("sealmq-demo"),
                      help="deployment directory, kept and reused by the next run (default: %(default)s)")
    demo.add_argument("--devices", type=int, default=3, help="simulated devices (default: %(default)s)")
    demo.add_argument("--duration", type=float, default=12.0, help="seconds of traffic (default: %(default)s)")
    demo.add_argument("--port", type=int, default=1883,
                      help="broker port; 0 or a busy port = any free port (default: %(default)s)")
    demo.add_argument("--images", type=Path, default=None, help="folder of images to send (default: img/)")
    demo.add_argument("--verbose", action="store_true", help="log every connection, handshake and transfer")
    demo.add_argument("--console", default="127.0.0.1:8080", metavar="HOST:PORT",  # console (issue 13)
                      help="serve the operator console here ('off' for none; a busy port: any free port)")
    demo.add_argument("--serve", action="store_true",  # console (issue 13)
                      help="after the summary, keep the devices sending (for the console) until Ctrl-C")
    demo.set_defaults(func=run_demo)

    boot = sub.add_parser("bootstrap", help="create (if missing) CA, identities and broker users in a directory")
    boot.add_argument("--dir", type=Path, required=True,
                      help="deployment directory: pki/, broker/users, broker/monitor.password, backend/")
    boot.add_argument("--devices", type=int, default=0, help="ensure devices dev-001..dev-N (default: none)")
    boot.add_argument("--ids", nargs="*", default=[], help="ensure these device ids")
    boot.add_argument("--key-type", default="p256", choices=list(_KEY_TYPES),
                      help="key type of new device identities (default: %(default)s)")
    boot.add_argument("--backend-key-types", type=_key_types, default=None, metavar="T[,T...]",
                      help="the backend's certificates, the first its main one (default: p256, plus the devices' "
                           "key type if it signs other suites: ed25519 for suite 0, rsa* for -24)")
    boot.add_argument("--broker-host", action="append", default=[],
                      help="a host name or IP the broker's TLS certificate also names (localhost, 127.0.0.1 always)")
    boot.add_argument("--workers", type=int, default=0, metavar="N",
                      help="also make a secret MQTT share group and broker accounts backend-w1..backend-wN for "
                           "`sealmq backend run --workers N` on Mosquitto (docs/scaling.md); default: none")
    boot.set_defaults(func=run_bootstrap)


_KEY_TYPES = tuple(str(k) for k in keys.LEAF_KEY_TYPES)


def _key_types(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in _KEY_TYPES]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"key types from {', '.join(_KEY_TYPES)}, comma-separated")
    return kinds


def device_ids(n: int) -> list[str]:
    return [f"dev-{i:03d}" for i in range(1, n + 1)]


def run_bootstrap(args: argparse.Namespace) -> int:
    ids = [*device_ids(args.devices), *args.ids]
    dep, created = bootstrap(args.dir, ids, key_type=args.key_type, backend_key_types=args.backend_key_types,
                             broker_hosts=args.broker_host, workers=args.workers)
    for what in created:
        print(f"created {what}")
    print(f"deployment ready in {dep.root} ({len(dep.devices())} devices)")
    print(f"to use its paths without flags: export {config.ENV}={(dep.root / config.FILE_NAME).resolve()}")
    return 0


class _Monitor:
    """A read-only wildcard subscriber: records exactly what the broker relays."""

    def __init__(self, dep: Deployment, port: int) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        settings = MqttSettings(port=port, username="monitor", password=dep.password("monitor", "monitor"),
                                client_id="monitor:demo", clean_session=True)
        self.link = MqttLink(settings, self._on, ["sealmq/#"])

    def _on(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.messages.append((topic, payload))


def run_demo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    for noisy in ("amqtt", "transitions", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    say = print
    ids = device_ids(args.devices)
    t0 = time.monotonic()
    dep, created = bootstrap(args.dir, [*ids, demo_fleet.DEVICE])  # + the zero-touch device (issue 16)
    demo_fleet.factory_reset(dep)  # fleet (issue 16): zt-001 holds only a claim until it enrols
    say(f"[1/5] deployment in {dep.root.resolve()}: " + (f"created {len(created)} items" if created else "reused"))
    port = args.port
    if port and not port_free("127.0.0.1", port):  # console (issue 13): one port check for both
        say(f"      port {port} is busy; using a free port instead")
        port = 0
    broker = EmbeddedBroker(EmbeddedBrokerConfig(passwd=dep.users, port=port)).start()
    say(f"[2/5] embedded broker (amqtt, hardened) listening on 127.0.0.1:{broker.port}")
    monitor = _Monitor(dep, broker.port)
    backend = None
    sim = None
    console = None  # console (issue 13)
    stop = threading.Event()  # Ctrl-C / SIGTERM: end at the next check, then the same cleanup
    handlers = exits.stop_on_signals(stop)
    try:
        monitor.link.start()
        backend = BackendService(BackendSettings(
            pki_dir=dep.pki, data_dir=dep.backend_data,
            mqtt=MqttSettings(port=broker.port, username="backend", password=dep.password("backend", "backend")),
        ))
        backend.start()
        # the deployment may be reused: the figures below are this run's, totals are said apart
        before_stored = backend.storage.count_messages()
        before_replied = backend.storage.count_commands("replied")
        before_media = len(backend.storage.media())
        say(f"[3/5] backend connected; data in {dep.backend_data.resolve()}"
            + (f" (kept from earlier runs: {before_stored} records, {before_media} files)" if before_stored else ""))
        console = start_demo_console(backend, dep, broker.port, args.console, say)  # console (issue 13)
        sim = Simulator(dep.pki, dep.root / "devices", ids, MqttSettings(port=broker.port),
                        password_for=lambda d: dep.password("device", d))
        took = sim.start(timeout=30)
        say(f"[4/5] {sim.established()}/{len(ids)} devices authenticated the backend and were authenticated "
            f"(EDHOC, X.509) in {took:.2f} s")
        images = _media_files(args.images)
        for agent in sim.agents:
            for f in images:
                agent.send_file(f)
        if images:
            say(f"      each device sends {len(images)} files from {images[0].parent} (signed, sealed, chunked)")
        step = 0
        end = time.monotonic() + args.duration
        commands_sent = key_updates = False
        while time.monotonic() < end and not stop.is_set():
            for agent in sim.agents:
                values = telemetry_for(agent.config.device_id, step)
                values["note"] = MARKER
                agent.send_telemetry(values)
            if not commands_sent and time.monotonic() > end - args.duration * 0.7:
                for agent in sim.agents:
                    backend.send_command(agent.config.device_id, "status")
                commands_sent = True
            if not key_updates and time.monotonic() > end - args.duration * 0.5:
                for agent in sim.agents:
                    agent.key_update()
                key_updates = True
            step += 1
            stop.wait(0.5)
        if stop.is_set():
            say("      interrupted")
            return exits.INTERRUPTED
        unacked = sum(0 if a.wait_acknowledged(15) else a.unacknowledged() for a in sim.agents)
        fleet_secrets = demo_fleet.run(dep, backend, broker.port, say)  # fleet (issue 16)
        unfinished = sum(0 if a.wait_transfers(30) else a.pending_transfers() for a in sim.agents)
        total_stored = backend.storage.count_messages()
        stored = total_stored - before_stored
        sent = sum(a.counters["sent"] for a in sim.agents)
        acked = sum(a.messages.acked for a in sim.agents)
        say(f"[5/5] this run, {args.duration:.0f} s of traffic:")
        say(f"      telemetry records sent {step * len(ids)}, stored by the backend {stored}"
            + (f" ({total_stored} stored in all, earlier runs included)" if before_stored else "")
            + f", acknowledged to the devices {acked} (telemetry and replies), still in the devices' "
              f"outboxes {unacked}")
        replied = backend.storage.count_commands("replied") - before_replied
        say(f"      handshakes {backend.counters['handshakes']}, key updates {backend.counters['key_updates']}, "
            f"commands answered {replied}, rejected messages {backend.counters['rejected']}")
        all_media = backend.storage.media()
        media = all_media[before_media:]
        verified = sum(1 for m in media if m.signature_verified)
        # a file an earlier run already delivered is acknowledged, not stored twice
        earlier = f", {len(all_media)} stored in all, earlier runs included" if before_media else ""
        say(f"      media files received {len(media)} ({verified} with the device signature verified{earlier}), "
            f"unfinished transfers {unfinished}; list them: sealmq backend media --data {dep.backend_data}")
        with monitor._lock:
            seen = list(monitor.messages)
        leaked = [t for t, p in seen if MARKER.encode() in p]
        leaked += [t for t, p in seen for f in images if f.name.encode() in p]
        leaked += [t for t, p in seen for secret in fleet_secrets if secret in p]  # certificate, firmware
        total = sum(len(p) for _, p in seen)
        say(f"      the broker relayed {len(seen)} messages ({total} bytes); telemetry values found in them: "
            f"{'NONE' if not leaked else len(leaked)}")
        say("      what the broker saw (last 4 messages, as `sealmq inspect` prints them):")
        for topic, payload in seen[-4:]:
            say("        " + describe(topic, payload))
        say(f"      audit logs: {dep.backend_data / 'audit' / 'server_log.jsonl'} and "
            f"{dep.root / 'devices' / '<id>' / 'device_log.jsonl'}")
        say(f"      stored data: sealmq backend messages --data {dep.backend_data}")
        say(f"done in {time.monotonic() - t0:.1f} s; sent {sent} sealed records")
        if args.serve and console is not None:  # console (issue 13)
            serve_demo(sim.agents, step, say, stop)
            return exits.INTERRUPTED  # stopped by Ctrl-C or SIGTERM, as before (130)
        return 0 if not leaked and stored >= step * len(ids) and unacked == 0 and fleet_secrets else 1
    finally:
        exits.restore_signals(handlers)
        if console is not None:  # console (issue 13)
            console.stop()
        if sim is not None:
            sim.stop()
        if backend is not None:
            backend.stop()
        monitor.link.stop()
        broker.stop()


def _media_files(folder: Path | None) -> list[Path]:
    """The demo's images: the given folder, else the samples shipped in the repository's img/."""
    if folder is None:
        folder = Path(__file__).resolve().parents[1] / "img"
        if not folder.is_dir():
            return []
    return media_files(folder)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(1)
