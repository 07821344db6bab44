"""``sealmq device ...``: run one device, or simulate many."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.config import add_mqtt_arguments, mqtt_settings
from sealmq.endpoint import EndpointConfig


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("device", help="run a device agent or the device simulator")
    dsub = parser.add_subparsers(dest="device_command", metavar="SUBCOMMAND")

    run = dsub.add_parser("run", help="run one device from its key and certificate")
    run.add_argument("--pki", type=Path, required=True, help="PKI directory (ca/ca.crt, devices/<id>/...)")
    run.add_argument("--id", required=True, help="device id")
    run.add_argument("--state", type=Path, default=None, help="state dir (audit log, media outbox)")
    run.add_argument("--interval", type=float, default=5.0, help="seconds between telemetry records")
    run.add_argument("--count", type=int, default=0, help="stop after this many records (0 = forever)")
    run.add_argument("--by-reference", action="store_true", help="send the certificate as x5t, not x5chain")
    run.add_argument("--method", type=int, choices=[0, 3], default=0,
                     help="EDHOC method: 0 = X.509 signatures (default), 3 = static DH with a CCS (pki ccs issue)")
    add_mqtt_arguments(run)
    run.set_defaults(func=_run)

    send = dsub.add_parser("send", help="send files (images, video): signed, sealed, chunked, resumable")
    send.add_argument("--pki", type=Path, required=True)
    send.add_argument("--id", required=True, help="device id")
    send.add_argument("--state", type=Path, default=None, help="state dir (outbox survives restarts)")
    send.add_argument("--type", default=None, help="content type (default: guessed from the name)")
    send.add_argument("--timeout", type=float, default=3600.0)
    send.add_argument("files", nargs="+", type=Path)
    add_mqtt_arguments(send)
    send.set_defaults(func=_send)

    sim = dsub.add_parser("simulate", help="simulate N enrolled devices publishing telemetry (and images)")
    sim.add_argument("--pki", type=Path, required=True)
    sim.add_argument("--ids", nargs="*", default=None, help="device ids (default: every enrolled device)")
    sim.add_argument("--state", type=Path, default=Path("sealmq-data/devices"))
    sim.add_argument("--duration", type=float, default=30.0)
    sim.add_argument("--interval", type=float, default=1.0)
    sim.add_argument("--images", type=Path, default=None, help="folder of images/videos each device sends")
    add_mqtt_arguments(sim)
    sim.set_defaults(func=_simulate)


def _run(args: argparse.Namespace) -> int:
    from device.agent import DeviceAgent, DeviceConfig
    from device.simulator import telemetry_for
    from pki import layout

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    identity_dir = layout.device_dir(args.pki, args.id)
    settings = mqtt_settings(args, username=args.id, password_file=identity_dir / "mqtt.password")
    agent = DeviceAgent(DeviceConfig(
        device_id=args.id,
        identity_dir=identity_dir,
        pki_dir=args.pki,
        state_dir=args.state or Path("sealmq-data") / "devices" / args.id,
        mqtt=settings,
        endpoint=EndpointConfig(by_reference=args.by_reference),
        method=args.method,
    ))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    agent.start(wait=None)
    sent = 0
    try:
        while not stop.is_set() and (args.count == 0 or sent < args.count):
            if agent.established.is_set():
                agent.send_telemetry(telemetry_for(args.id, sent))
                sent += 1
            stop.wait(args.interval if agent.established.is_set() else 0.2)
        if args.count:
            time.sleep(1.0)  # let the last records leave
    finally:
        agent.stop()
    print(f"device {args.id}: {sent} telemetry records sent, counters {agent.counters}")
    return 0


def _progress_printer(stream: Any) -> Callable[[Any], None]:
    def show(p: Any) -> None:
        total = max(p.total_bytes, 1)
        width = 30
        filled = int(width * p.acked_bytes / total)
        bar = "#" * filled + "-" * (width - filled)
        end = "\n" if p.state in ("done", "rejected", "aborted") else ""
        name = p.name.encode("unicode_escape").decode("ascii")[:40]
        stream.write(f"\r{name:40} [{bar}] {100 * p.acked_bytes / total:5.1f}% {p.state}{end}")
        stream.flush()

    return show


def _send(args: argparse.Namespace) -> int:
    from device.agent import DeviceAgent, DeviceConfig
    from pki import layout

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for f in args.files:
        if not f.is_file():
            print(f"sealmq: error: not a file: {f}", file=sys.stderr)
            return 2
    identity_dir = layout.device_dir(args.pki, args.id)
    settings = mqtt_settings(args, username=args.id, password_file=identity_dir / "mqtt.password")
    agent = DeviceAgent(DeviceConfig(
        device_id=args.id, identity_dir=identity_dir, pki_dir=args.pki,
        state_dir=args.state or Path("sealmq-data") / "devices" / args.id, mqtt=settings,
    ))
    agent.on_progress = _progress_printer(sys.stdout)
    agent.start()
    try:
        if not agent.wait_established(30):
            print("sealmq: error: no session with the backend", file=sys.stderr)
            return 1
        for f in args.files:
            agent.send_file(f, args.type)
        done = agent.wait_transfers(args.timeout)
    finally:
        agent.stop()
    if not done:
        print(f"{agent.pending_transfers()} transfers not finished (they resume on the next run)")
        return 1
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from device.simulator import Simulator
    from pki import layout

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    ids = args.ids or layout.enrolled_devices(args.pki)
    if not ids:
        print("no enrolled devices: run `sealmq pki enroll --pki DIR device NAME` first")
        return 2
    settings = mqtt_settings(args)

    def password_for(device_id: str) -> str | None:
        path = layout.device_dir(args.pki, device_id) / "mqtt.password"
        return path.read_text().strip() if path.exists() else settings.password

    sim = Simulator(args.pki, args.state, ids, settings, password_for=password_for)
    took = sim.start()
    print(f"{sim.established()}/{len(ids)} devices completed their handshakes in {took:.2f} s")
    try:
        if args.images is not None:
            from device.simulator import media_files

            files = media_files(args.images)
            for agent in sim.agents:
                for f in files:
                    agent.send_file(f)
            print(f"each device queued {len(files)} files from {args.images}")
        sent = sim.run(args.duration, args.interval)
        if args.images is not None:
            pending = sum(0 if a.wait_transfers(60) else a.pending_transfers() for a in sim.agents)
            print(f"media transfers {'all complete' if pending == 0 else f'{pending} unfinished'}")
    finally:
        sim.stop()
    print(f"{sent} telemetry records sent")
    return 0
