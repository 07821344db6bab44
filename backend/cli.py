"""``sealmq backend ...``: run the backend service and look at what it stored."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from backend.console.cli import add_console_arguments, start_console  # console (issue 13)
from backend.quotas import DeviceQuotas
from backend.storage import COMMAND_STATES, db_path
from backend.store import BackendStore, open_store
from runtime import exits
from runtime.config import add_mqtt_arguments, add_share_group_arguments, connect_limit, mqtt_settings
from sealmq import cbor
from sealmq.bodies import decode_telemetry
from sealmq.errors import ConfigError, DecodeError, Reason

_DATA_HELP = "backend data directory (default: %(default)s; the README's walk-through uses deploy/backend)"
_STATES = COMMAND_STATES  # queued -> sent -> replied, or expired


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("backend", help="run the backend service, inspect its data")
    bsub = parser.add_subparsers(dest="backend_command", metavar="SUBCOMMAND")

    run = bsub.add_parser("run", help="run the backend service (foreground; SIGINT/SIGTERM to stop)")
    run.add_argument("--pki", type=Path, required=True, help="PKI directory (ca/, backend/<name>/)")
    run.add_argument("--data", type=Path, default=Path("sealmq-data/backend"), help=_DATA_HELP)
    _add_db_argument(run)
    scale = run.add_argument_group("several workers (docs/scaling.md)")
    scale.add_argument("--state", default=None, metavar="URL",
                       help="shared session state: a redis:// or rediss:// URL (Redis or Valkey) the workers share "
                            "(needs sealmq[scale]); default: sessions stay in this process")
    scale.add_argument("--state-key", type=Path, default=None, metavar="FILE",
                       help="the 32-byte key that seals session snapshots in the shared state (0600; the same file "
                            "on every worker; made if missing); default: <data>/state.key")
    scale.add_argument("--state-password-file", type=Path, default=None, metavar="FILE",
                       help="the state server's password (first line); keeps it out of the URL and the process list")
    scale.add_argument("--secondary", action="store_true",
                       help="a worker that serves handshakes and records only; the primary also serves media, queued "
                            "commands and update pushes")
    run.add_argument("--name", default="backend", help="backend identity name (default: %(default)s)")
    quotas = run.add_argument_group("per-device bounds (docs/operations.md)")
    quotas.add_argument("--device-records-per-second", type=float, default=DeviceQuotas.records_per_second,
                        help="records a device may send per second, beyond a burst of twice that "
                             "(default: %(default)s; 0: no limit)")
    quotas.add_argument("--device-stored-bytes", type=int, default=DeviceQuotas.stored_bytes,
                        help="telemetry and media bytes stored per device (default: %(default)s; 0: no limit)")
    add_mqtt_arguments(run, default_username="backend", connect_timeout=None)
    add_share_group_arguments(run)  # scale-out (issue 14): --share-group-file, MQTT 5
    add_console_arguments(run)  # console (issue 13)
    run.set_defaults(func=_run)

    devices = bsub.add_parser("devices", help="list devices that completed a handshake")
    devices.add_argument("--data", type=Path, default=Path("sealmq-data/backend"), help=_DATA_HELP)
    _add_db_argument(devices)
    devices.set_defaults(func=_devices)

    messages = bsub.add_parser("messages", help="list stored telemetry (the newest --limit rows)")
    messages.add_argument("--data", type=Path, default=Path("sealmq-data/backend"), help=_DATA_HELP)
    _add_db_argument(messages)
    messages.add_argument("--device", default=None, help="only this device")
    messages.add_argument("--limit", type=int, default=20, help="show the newest N rows (default: %(default)s)")
    messages.set_defaults(func=_messages)

    media = bsub.add_parser("media", help="list received media files with their verification status")
    media.add_argument("--data", type=Path, default=Path("sealmq-data/backend"), help=_DATA_HELP)
    _add_db_argument(media)
    media.add_argument("--device", default=None, help="only this device")
    media.set_defaults(func=_media)

    command = bsub.add_parser(
        "command", help="queue a sealed command for a device and show its state",
        description="Queue a command for an enrolled device. The running backend seals and sends it when the "
                    "device has a session; the reply is stored (see `sealmq backend commands`). A device "
                    "that is neither enrolled in --pki nor known to the backend is refused (exit code 2).",
    )
    command.add_argument("--data", type=Path, default=Path("sealmq-data/backend"), help=_DATA_HELP)
    _add_db_argument(command)
    command.add_argument("--pki", type=Path, default=None,
                         help="PKI directory: devices enrolled there are accepted even before their first "
                              "handshake (without it, only devices that completed one)")
    command.add_argument("device", help="device id")
    command.add_argument("name", help="command name (the device agent knows: status, ping)")
    command.add_argument("--args", default="null", help="JSON arguments (default: %(default)s)")
    command.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                         help="wait this long for the reply and print it; exit code 1 if none came "
                              "(default: 0, do not wait)")
    command.set_defaults(func=_command)

    commands = bsub.add_parser("commands", help="list commands with their state and reply")
    commands.add_argument("--data", type=Path, default=Path("sealmq-data/backend"), help=_DATA_HELP)
    _add_db_argument(commands)
    commands.add_argument("--device", default=None, help="only this device")
    commands.add_argument("--state", choices=_STATES, default=None, help="only commands in this state")
    commands.add_argument("--limit", type=int, default=20, help="show the newest N commands (default: %(default)s)")
    commands.set_defaults(func=_commands)

    push = bsub.add_parser(
        "push", help="send a release-signed update package to a device",
        description="Check an update package (structure, size, digest, target) and queue it for the device; "
                    "the running backend sends it, sealed and resumable, when the device is online. The backend "
                    "cannot sign packages: make them offline with `sealmq pki release-key sign`.")
    push.add_argument("--data", type=Path, default=Path("sealmq-data/backend"), help=_DATA_HELP)
    push.add_argument("device", help="device id")
    push.add_argument("package", type=Path, help="package file made by `sealmq pki release-key sign`")
    push.set_defaults(func=_push)


def _add_db_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, metavar="URL",
                        help="database: a postgresql:// URL shared by several workers (needs sealmq[scale]; keep "
                             "the password in PGPASSFILE or PGPASSWORD); default: the SQLite file under --data")


def _run(args: argparse.Namespace) -> int:
    from backend.service import BackendService, BackendSettings
    from pki import layout

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    identity_dir = layout.backend_dir(args.pki, args.name)
    settings = mqtt_settings(args, password_file=identity_dir / "mqtt.password", ca_file=layout.anchor(args.pki),
                             client_cert=(identity_dir / layout.CHAIN, identity_dir / layout.KEY))
    rate, stored = args.device_records_per_second, args.device_stored_bytes
    if (rate is not None and rate < 0) or (stored is not None and stored < 0):
        raise ConfigError(Reason.CONFIG_INVALID, "per-device bounds must be >= 0 (0: no limit)")
    quotas = DeviceQuotas(records_per_second=rate or None, records_burst=max(1, int(2 * (rate or 0))),
                          stored_bytes=stored or None)
    service = BackendService(BackendSettings(pki_dir=args.pki, data_dir=args.data, mqtt=settings, name=args.name,
                                             db=args.db, quotas=quotas, state=args.state,
                                             state_key=args.state_key, primary=not args.secondary,
                                             state_password_file=args.state_password_file))
    console = start_console(service, args, settings)  # console (issue 13)
    try:
        service.run_forever(connect_timeout=connect_limit(args))
    finally:
        if console is not None:  # console (issue 13)
            console.stop()
    return 0


def _storage(args: argparse.Namespace) -> BackendStore:
    return open_store(args.db, args.data)


def _devices(args: argparse.Namespace) -> int:
    if args.db is None and not db_path(args.data).exists():
        return _no_data(args.data)
    for device_id, first, last, handshakes in _storage(args).devices():
        print(f"{device_id:24} handshakes={handshakes:<4} first={_ts(first)} last={_ts(last)}")
    return 0


def _messages(args: argparse.Namespace) -> int:
    if args.db is None and not db_path(args.data).exists():
        return _no_data(args.data)
    store = _storage(args)
    rows = store.messages(args.device, limit=10**9)[-args.limit:] if args.limit > 0 else []
    for m in rows:
        try:
            body = decode_telemetry(m.payload)
            shown = json.dumps({"t": body.time, "v": body.values}, default=str)
        except DecodeError:  # stored before bodies were validated
            shown = f"<{m.size} bytes, not a telemetry body>"
        print(f"{_ts(m.received_at)} {m.device_id:20} {m.kind:10} epoch={m.epoch} seq={m.seq:<6} {shown}")
    total = store.count_messages(args.device)
    more = "; --limit N shows more" if total > len(rows) else ""
    print(f"(the newest {len(rows)} of {total} stored{more})")
    return 0


def _no_data(data: Path) -> int:
    if data.is_dir():  # bootstrap made it; the backend has not run yet
        print(f"nothing stored in {data} yet: `sealmq backend run --data {data}` has not run")
        return exits.OK
    print(f"sealmq: error: no backend data in {data} (is it the --data of `sealmq backend run`?)", file=sys.stderr)
    return exits.USAGE


def _media(args: argparse.Namespace) -> int:
    if args.db is None and not db_path(args.data).exists():
        return _no_data(args.data)
    rows = [r for r in _storage(args).media() if args.device in (None, r.device_id)]
    for r in rows:
        status = "signature verified" if r.signature_verified else "NOT VERIFIED"
        name = r.name.encode("unicode_escape").decode("ascii")  # device-chosen text: never raw to a terminal
        print(f"{_ts(r.received_at)} {r.device_id:16} {r.size:>12} B  {r.content_type:24} sha256={r.sha256[:16]}..."
              f"  {status}  {args.data / r.stored_path}  (sent as {name!r})")
    print(f"({len(rows)} files)")
    return 0


def _enrolled(pki: Path, device_id: str) -> str | None:
    """Why ``device_id`` may (None) or may not receive commands, according to the PKI's records.

    The CA's index (``ca/index.json``: every certificate it issued) and the CCS registry decide,
    not the files under ``devices/``: a device that made its own key has no key there.
    """
    from pki import ccs, layout
    from pki.store import read_index

    entries = [e for e in read_index(pki)["certificates"] if e.get("role") == "device" and e.get("name") == device_id]
    if layout.ccs_registry(pki).exists():
        entries += [{"revoked_at": "x" if e.get("revoked") else None}
                    for e in ccs.read_registry(pki) if e.get("role") == "device" and e.get("name") == device_id]
    if not entries:
        return f"{device_id} is not enrolled in {pki}"
    if all(e.get("revoked_at") for e in entries):
        return f"every credential of {device_id} in {pki} is revoked"
    return None


def _command(args: argparse.Namespace) -> int:
    try:
        command_args = cbor.dumps(json.loads(args.args))
    except (ValueError, TypeError) as exc:
        print(f"sealmq: error: --args is not JSON: {exc}", file=sys.stderr)
        return exits.USAGE
    if args.db is None and not args.data.is_dir():  # a mistyped --data must not start a database no backend reads
        return _no_data(args.data)
    store = _storage(args)
    seen = {d[0]: d for d in store.devices()}
    refusal = None if args.device in seen else (
        _enrolled(args.pki, args.device) if args.pki is not None
        else f"{args.device} never completed a handshake with this backend (give --pki DIR to accept a device "
             "enrolled there that has not connected yet)"
    )
    if refusal is not None:
        print(f"sealmq: error: unknown device: {refusal}; command not queued", file=sys.stderr)
        return exits.USAGE
    command_id = store.queue_command(args.device, args.name, command_args, time.time())
    where = f"last seen {_ts(seen[args.device][2])}" if args.device in seen else "enrolled, no handshake yet"
    print(f"command {command_id} ({args.name}) for {args.device}: queued ({where}); the running backend "
          f"sends it when {args.device} has a session", flush=True)
    if args.wait <= 0:
        print(f"see its state and reply: sealmq backend commands --data {args.data} --device {args.device}")
        return exits.OK
    deadline = time.monotonic() + args.wait
    state = "queued"
    while True:
        row = store.commands(command_id=command_id)[0]
        if row.state != state:
            state = row.state
            print(f"command {command_id}: {state}", flush=True)
        if state in ("replied", "expired") or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if state != "replied":
        print(f"sealmq: no reply to command {command_id} within {args.wait:g} s (state: {state})", file=sys.stderr)
        return exits.INCOMPLETE
    print(_describe_reply(row.reply))
    return exits.OK


def _describe_reply(reply: bytes | None) -> str:
    """A stored reply ``[id, ok, result]`` as one line: ``ok {...}`` or ``error <text>``."""
    if reply is None:
        return "-"
    try:
        body = cbor.loads(reply)
        ok, result = bool(body[1]), body[2]
        return ("ok " if ok else "error ") + json.dumps(result, default=str)
    except Exception:
        return f"<{len(reply)} bytes, not a reply>"


def _commands(args: argparse.Namespace) -> int:
    if args.db is None and not db_path(args.data).exists():
        return _no_data(args.data)
    everything = _storage(args).commands(device_id=args.device, state=args.state)
    rows = everything[-args.limit:] if args.limit > 0 else []
    for c in rows:
        print(f"{c.id:>6} {_ts(c.created_at)} {c.device_id:16} {c.name:12} {c.state:8} {_describe_reply(c.reply)}")
    more = "; --limit N shows more" if len(everything) > len(rows) else ""
    print(f"(the newest {len(rows)} of {len(everything)} commands{more})")
    return 0


def _push(args: argparse.Namespace) -> int:
    from backend.update import push

    m = push(args.data, args.device, args.package)
    print(f"queued {m.kind} version {m.version} ({m.size} bytes) for {args.device}; "
          "the running backend sends it when the device is online")
    return 0


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
