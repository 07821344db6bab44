"""``sealmq device ...``: run one device, or simulate many."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from pathlib import Path

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
    add_mqtt_arguments(run)
    run.set_defaults(func=_run)

    sim = dsub.add_parser("simulate", help="simulate N enrolled devices publishing telemetry")
    sim.add_argument("--pki", type=Path, required=True)
    sim.add_argument("--ids", nargs="*", default=None, help="device ids (default: every enrolled device)")
    sim.add_argument("--state", type=Path, default=Path("sealmq-data/devices"))
    sim.add_argument("--duration", type=float, default=30.0)
    sim.add_argument("--interval", type=float, default=1.0)
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


def enrolled_devices(pki_dir: Path) -> list[str]:
    """Device ids that have an identity (key + certificate) under ``<pki>/devices/``."""
    from pki import layout

    root = layout.device_dir(pki_dir, "x").parent
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "key.pem").exists() and (p / "cert.pem").exists())


def _simulate(args: argparse.Namespace) -> int:
    from device.simulator import Simulator
    from pki import layout

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    ids = args.ids or enrolled_devices(args.pki)
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
        sent = sim.run(args.duration, args.interval)
    finally:
        sim.stop()
    print(f"{sent} telemetry records sent")
    return 0
