"""``sealmq device ...``: run one device, or simulate many."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime import exits
from runtime.config import add_mqtt_arguments, connect_limit, mqtt_settings
from sealmq.endpoint import EndpointConfig

# `device run --count N` without --connect-timeout gives up on an unreachable broker after this long
COUNTED_RUN_CONNECT_TIMEOUT = 30.0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("device", help="run a device agent or the device simulator")
    dsub = parser.add_subparsers(dest="device_command", metavar="SUBCOMMAND")

    run = dsub.add_parser("run", help="run one device from its key and certificate")
    run.add_argument("--pki", type=Path, required=True, help="PKI directory (ca/ca.crt, devices/<id>/...)")
    run.add_argument("--id", required=True, help="device id")
    run.add_argument("--state", type=Path, default=None,
                     help="state dir: audit log, media outbox (default: sealmq-data/devices/<id>, or "
                          "<devices>/<id> from $SEALMQ_CONFIG)")
    run.add_argument("--interval", type=float, default=5.0,
                     help="seconds between telemetry records (default: %(default)s)")
    run.add_argument("--count", type=int, default=0,
                     help="stop after this many records (default 0 = forever); with a count, "
                          "--connect-timeout defaults to 30 s")
    run.add_argument("--session-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="with --count: give up (exit code 1) without a session with the backend after this "
                          "long (default: %(default)s)")
    run.add_argument("--by-reference", action="store_true", help="send the certificate as x5t, not x5chain")
    run.add_argument("--method", type=int, choices=[0, 3], default=0,
                     help="EDHOC method: 0 = X.509 signatures (default), 3 = static DH with a CCS (pki ccs issue)")
    run.add_argument("--suites", type=_suites, default=(), metavar="S[,S...]",
                     help="EDHOC cipher suites in preference order (default: those the credential fits: "
                          "6,2 for P-256, 0 for Ed25519, -24 for RSA, 2,-24 for a CCS)")
    run.add_argument("--class", dest="device_class", default=None,
                     help="device class, matched against the target of signed updates (default: none)")
    run.add_argument("--telemetry-batch", type=_telemetry_batch, default=64, metavar="N",
                     help="readings due together sealed in one TELEMETRY record, 1-64; 1: one record per "
                          "reading (default: %(default)s)")
    add_mqtt_arguments(run, connect_timeout=None)
    run.set_defaults(func=_run)

    en = dsub.add_parser(
        "enrol", help="zero-touch enrolment: obtain a certificate with the claim",
        description="A device that holds only its claim (sealmq pki claim issue) makes its own key, sends a CSR "
                    "over a sealed session authenticated with the claim, and installs the certificate it gets "
                    "as devices/<id>/key.pem, cert.pem and chain.pem. Exit code 2 if the claim is refused.")
    en.add_argument("--pki", type=Path, required=True, help="PKI directory (ca/, devices/<id>/claim/)")
    en.add_argument("--id", required=True, help="device id")
    en.add_argument("--claim", type=Path, default=None, help="claim directory (default: <pki>/devices/<id>/claim)")
    en.add_argument("--state", type=Path, default=None,
                    help="state dir for the audit log (default: sealmq-data/devices/<id>)")
    en.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                    help="give up (exit code 1) without an answer after this long (default: %(default)s)")
    add_mqtt_arguments(en)
    en.set_defaults(func=_enrol)

    send = dsub.add_parser("send", help="send files (images, video): signed, sealed, chunked, resumable")
    send.add_argument("--pki", type=Path, required=True, help="PKI directory (ca/ca.crt, devices/<id>/...)")
    send.add_argument("--id", required=True, help="device id")
    send.add_argument("--state", type=Path, default=None,
                      help="state dir, where the outbox survives restarts (default: sealmq-data/devices/<id>, "
                           "or <devices>/<id> from $SEALMQ_CONFIG)")
    send.add_argument("--type", default=None, help="content type (default: guessed from the name)")
    send.add_argument("--session-timeout", type=float, default=30.0, metavar="SECONDS",
                      help="give up (exit code 1) without a session with the backend after this long "
                           "(default: %(default)s)")
    send.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                      help="give up waiting for the transfers after this long; they resume on the next run "
                           "(default: %(default)s)")
    send.add_argument("files", nargs="+", type=Path, help="files to send")
    add_mqtt_arguments(send)
    send.set_defaults(func=_send)

    sim = dsub.add_parser("simulate", help="simulate N enrolled devices publishing telemetry (and images)")
    sim.add_argument("--pki", type=Path, required=True, help="PKI directory (ca/ca.crt, devices/<id>/...)")
    sim.add_argument("--ids", nargs="*", default=None, help="device ids (default: every enrolled device)")
    sim.add_argument("--state", type=Path, default=Path("sealmq-data/devices"),
                     help="state root, one folder per device (default: %(default)s)")
    sim.add_argument("--duration", type=float, default=30.0,
                     help="seconds the simulation runs, connecting and handshakes included; it ends then "
                          "whatever happens, except that it waits up to --media-timeout for transfers "
                          "(default: %(default)s)")
    sim.add_argument("--interval", type=float, default=1.0,
                     help="seconds between two telemetry records of a device (default: %(default)s)")
    sim.add_argument("--images", type=Path, default=None, help="folder of images/videos each device sends")
    sim.add_argument("--media-timeout", type=float, default=60.0, metavar="SECONDS",
                     help="after --duration, wait this long at most for unfinished transfers (default: %(default)s)")
    add_mqtt_arguments(sim, connect_timeout=None)
    sim.set_defaults(func=_simulate)


def _cli_logging(level: int) -> None:
    # failed connection attempts (WARNING) and a refused password (ERROR) always show
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(message)s")


def _suites(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("comma-separated suite numbers, e.g. 0 or 2,-24") from None


def _telemetry_batch(text: str) -> int:
    from sealmq.bodies import MAX_TELEMETRY_BATCH

    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_TELEMETRY_BATCH:
        raise argparse.ArgumentTypeError(f"a number of readings from 1 to {MAX_TELEMETRY_BATCH}")
    return value


def _run(args: argparse.Namespace) -> int:
    from device.agent import DeviceAgent, DeviceConfig
    from device.simulator import telemetry_for
    from pki import layout

    _cli_logging(logging.INFO)
    identity_dir = layout.device_dir(args.pki, args.id)
    settings = mqtt_settings(args, username=args.id, password_file=identity_dir / "mqtt.password",
                             ca_file=layout.anchor(args.pki),
                             client_cert=(identity_dir / layout.CHAIN, identity_dir / layout.KEY))
    agent = DeviceAgent(DeviceConfig(
        device_id=args.id,
        identity_dir=identity_dir,
        pki_dir=args.pki,
        state_dir=args.state or Path("sealmq-data") / "devices" / args.id,
        mqtt=settings,
        endpoint=EndpointConfig(suites=args.suites, by_reference=args.by_reference),
        method=args.method,
        device_class=args.device_class,
        telemetry_batch=args.telemetry_batch,
    ))
    limit = connect_limit(args)
    if limit is None and args.count and args.connect_timeout is None:
        limit = COUNTED_RUN_CONNECT_TIMEOUT  # a bounded run must end even when the broker is down
    stop = threading.Event()
    exits.stop_on_signals(stop)
    agent.start(wait=None)
    sent = 0
    code = exits.OK
    try:
        agent.link.wait_connected(limit, raise_on_timeout=True, stop=stop)
        if args.count and not _wait_session(agent, args.session_timeout, stop) and not stop.is_set():
            code = exits.INCOMPLETE
        while not stop.is_set() and code == exits.OK and (args.count == 0 or sent < args.count):
            if agent.link.error is not None:
                raise agent.link.error
            if agent.established.is_set():
                agent.send_telemetry(telemetry_for(args.id, sent))
                sent += 1
            stop.wait(args.interval if agent.established.is_set() else 0.2)
        if args.count and sent:
            agent.wait_acknowledged(10.0)  # what is not acknowledged stays in the outbox for the next run
    finally:
        agent.stop()
    print(f"device {args.id}: {sent} telemetry records sent, {agent.messages.acked} acknowledged, "
          f"{agent.unacknowledged()} kept in the outbox, counters {agent.counters}")
    return code


def _enrol(args: argparse.Namespace) -> int:
    from device.enrol import EnrolConfig, enrol
    from pki import claim, layout
    from sealmq.errors import Reason, SealmqError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    identity_dir = layout.device_dir(args.pki, args.id)
    settings = mqtt_settings(args, username=args.id, password_file=identity_dir / "mqtt.password")
    try:
        out = enrol(EnrolConfig(
            device_id=args.id, claim_dir=args.claim or claim.claim_dir(args.pki, args.id), pki_dir=args.pki,
            identity_dir=identity_dir, state_dir=args.state or Path("sealmq-data") / "devices" / args.id,
            mqtt=settings,
        ), timeout=args.timeout)
    except SealmqError as err:
        if err.reason is not Reason.HANDSHAKE_TIMEOUT:
            raise  # refused (exit code 2), broker down (3), password refused (4)
        print(f"device {args.id}: no enrolment answer within {args.timeout:.0f} s", file=sys.stderr)
        return exits.INCOMPLETE
    print(f"device {args.id} enrolled: certificate in {out}")
    return 0


def _progress_printer(stream: Any) -> Callable[[Any], None]:
    """A progress bar redrawn in place on a terminal; elsewhere one line per state and per 25%."""
    tty = bool(getattr(stream, "isatty", lambda: False)())
    last: dict[bytes, tuple[str, int]] = {}

    def show(p: Any) -> None:
        total = max(p.total_bytes, 1)
        percent = 100 * p.acked_bytes / total
        final = p.state in ("done", "rejected", "aborted")
        name = p.name.encode("unicode_escape").decode("ascii")[:40]
        if not tty:
            step = (p.state, int(percent // 25))
            if last.get(p.transfer_id) == step and not final:
                return
            last[p.transfer_id] = step
            stream.write(f"{name} {percent:5.1f}% {p.state}\n")
            stream.flush()
            return
        width = 30
        filled = int(width * p.acked_bytes / total)
        bar = "#" * filled + "-" * (width - filled)
        end = "\n" if final else ""
        stream.write(f"\r{name:40} [{bar}] {percent:5.1f}% {p.state}{end}")
        stream.flush()

    return show


def _send(args: argparse.Namespace) -> int:
    from device.agent import DeviceAgent, DeviceConfig
    from pki import layout

    _cli_logging(logging.WARNING)
    for f in args.files:
        if not f.is_file():
            print(f"sealmq: error: not a file: {f}", file=sys.stderr)
            return exits.USAGE
    identity_dir = layout.device_dir(args.pki, args.id)
    settings = mqtt_settings(args, username=args.id, password_file=identity_dir / "mqtt.password",
                             ca_file=layout.anchor(args.pki),
                             client_cert=(identity_dir / layout.CHAIN, identity_dir / layout.KEY))
    agent = DeviceAgent(DeviceConfig(
        device_id=args.id, identity_dir=identity_dir, pki_dir=args.pki,
        state_dir=args.state or Path("sealmq-data") / "devices" / args.id, mqtt=settings,
    ))
    agent.on_progress = _progress_printer(sys.stdout)
    stop = threading.Event()
    exits.stop_on_signals(stop)
    print(f"{args.id} connecting to {settings.host}:{settings.port} ...", file=sys.stderr, flush=True)
    agent.start(wait=None)
    try:
        agent.link.wait_connected(connect_limit(args), raise_on_timeout=True, stop=stop)
        if not _wait_session(agent, args.session_timeout, stop):
            return exits.INCOMPLETE
        for f in args.files:
            agent.send_file(f, args.type)
        done = _wait(lambda: agent.pending_transfers() == 0, args.timeout, agent, stop)
    finally:
        agent.stop()
    if not done:
        print(f"{agent.pending_transfers()} transfers not finished (they resume on the next run)")
        return exits.INCOMPLETE
    return exits.OK


def _wait_session(agent: Any, timeout: float, stop: threading.Event) -> bool:
    """Wait for a session with the backend; say why not if none came (unless told to stop)."""
    if _wait(agent.established.is_set, timeout, agent, stop):
        return True
    if not stop.is_set():
        print(f"sealmq: error: connected, but no session with the backend after {timeout:g} s"
              " (is `sealmq backend run` running?)", file=sys.stderr)
    return False


def _wait(condition: Callable[[], bool], timeout: float, agent: Any, stop: threading.Event) -> bool:
    """Wait for ``condition``; False on timeout or stop; raise if the broker refused the agent."""
    deadline = time.monotonic() + timeout
    while not condition():
        if agent.link.error is not None:
            raise agent.link.error
        if stop.is_set() or time.monotonic() >= deadline:
            return False
        stop.wait(0.05)
    return True


def _simulate(args: argparse.Namespace) -> int:
    from device.simulator import Simulator
    from pki import layout

    _cli_logging(logging.WARNING)
    ids = args.ids or layout.enrolled_devices(args.pki)
    if not ids:
        print(f"sealmq: error: no enrolled devices in {args.pki}: run `sealmq bootstrap` or "
              "`sealmq pki enroll` first", file=sys.stderr)
        return exits.USAGE
    settings = mqtt_settings(args, ca_file=layout.anchor(args.pki))

    def password_for(device_id: str) -> str | None:
        path = layout.device_dir(args.pki, device_id) / "mqtt.password"
        return path.read_text().strip() if path.exists() else settings.password

    stop = threading.Event()
    exits.stop_on_signals(stop)
    end = time.monotonic() + args.duration
    sim = Simulator(args.pki, args.state, ids, settings, password_for=password_for)
    print(f"{len(ids)} devices connecting to {settings.host}:{settings.port} ...", flush=True)
    unfinished = 0
    complete = False
    try:
        limit = connect_limit(args)
        took = sim.start(timeout=args.duration if limit is None else min(limit, args.duration), stop=stop)
        established = sim.established()
        print(f"{established}/{len(ids)} devices completed their handshakes in {took:.2f} s", flush=True)
        if established < len(ids) and not stop.is_set():
            print("  (the others keep trying: is `sealmq backend run` running?)", flush=True)
        if args.images is not None:
            from device.simulator import media_files

            files = media_files(args.images)
            for agent in sim.agents:
                for f in files:
                    agent.send_file(f)
            print(f"each device queued {len(files)} files from {args.images}", flush=True)
        sent = sim.run(max(0.0, end - time.monotonic()), args.interval, stop=stop)
        sim.raise_refusal()
        if args.images is not None:
            deadline = time.monotonic() + args.media_timeout
            while time.monotonic() < deadline and not stop.is_set() and any(a.pending_transfers() for a in sim.agents):
                stop.wait(0.1)
            unfinished = sum(a.pending_transfers() for a in sim.agents)
            print(f"media transfers {'all complete' if unfinished == 0 else f'{unfinished} unfinished'}")
        complete = sim.established() == len(ids) and unfinished == 0
    finally:
        sim.stop()
    print(f"{sent} telemetry records sent")
    return exits.OK if complete else exits.INCOMPLETE
