"""``sealmq backend ...``: run the backend service and look at what it stored."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from backend.console.cli import add_console_arguments, start_console  # console (issue 13)
from backend.storage import Storage, db_path
from runtime.config import add_mqtt_arguments, mqtt_settings
from sealmq import cbor


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("backend", help="run the backend service, inspect its data")
    bsub = parser.add_subparsers(dest="backend_command", metavar="SUBCOMMAND")

    run = bsub.add_parser("run", help="run the backend service (foreground; SIGINT/SIGTERM to stop)")
    run.add_argument("--pki", type=Path, required=True, help="PKI directory (ca/, backend/<name>/)")
    run.add_argument("--data", type=Path, default=Path("sealmq-data/backend"), help="data directory")
    run.add_argument("--name", default="backend", help="backend identity name")
    add_mqtt_arguments(run, default_username="backend")
    add_console_arguments(run)  # console (issue 13)
    run.set_defaults(func=_run)

    devices = bsub.add_parser("devices", help="list devices that completed a handshake")
    devices.add_argument("--data", type=Path, default=Path("sealmq-data/backend"))
    devices.set_defaults(func=_devices)

    messages = bsub.add_parser("messages", help="list stored telemetry")
    messages.add_argument("--data", type=Path, default=Path("sealmq-data/backend"))
    messages.add_argument("--device", default=None)
    messages.add_argument("--limit", type=int, default=20)
    messages.set_defaults(func=_messages)

    media = bsub.add_parser("media", help="list received media files with their verification status")
    media.add_argument("--data", type=Path, default=Path("sealmq-data/backend"))
    media.add_argument("--device", default=None)
    media.set_defaults(func=_media)

    command = bsub.add_parser("command", help="queue a sealed command for a device")
    command.add_argument("--data", type=Path, default=Path("sealmq-data/backend"))
    command.add_argument("device")
    command.add_argument("name")
    command.add_argument("--args", default="null", help="JSON arguments")
    command.set_defaults(func=_command)


def _run(args: argparse.Namespace) -> int:
    from backend.service import BackendService, BackendSettings
    from pki import layout

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = mqtt_settings(args, password_file=layout.backend_dir(args.pki, args.name) / "mqtt.password")
    service = BackendService(BackendSettings(pki_dir=args.pki, data_dir=args.data, mqtt=settings, name=args.name))
    console = start_console(service, args, settings)  # console (issue 13)
    try:
        service.run_forever()
    finally:
        if console is not None:  # console (issue 13)
            console.stop()
    return 0


def _storage(data: Path) -> Storage:
    return Storage(db_path(data))


def _devices(args: argparse.Namespace) -> int:
    for device_id, first, last, handshakes in _storage(args.data).devices():
        print(f"{device_id:24} handshakes={handshakes:<4} first={_ts(first)} last={_ts(last)}")
    return 0


def _messages(args: argparse.Namespace) -> int:
    store = _storage(args.data)
    rows = store.messages(args.device, limit=10**9)[-args.limit:]
    for m in rows:
        try:
            shown = json.dumps(cbor.loads(m.payload), default=str)
        except Exception:
            shown = f"<{m.size} bytes>"
        print(f"{_ts(m.received_at)} {m.device_id:20} {m.kind:10} epoch={m.epoch} seq={m.seq:<6} {shown}")
    print(f"({store.count_messages(args.device)} stored)")
    return 0


def _media(args: argparse.Namespace) -> int:
    if not db_path(args.data).exists():
        print(f"no backend data in {args.data}")
        return 2
    rows = [r for r in _storage(args.data).media() if args.device in (None, r.device_id)]
    for r in rows:
        status = "signature verified" if r.signature_verified else "NOT VERIFIED"
        name = r.name.encode("unicode_escape").decode("ascii")  # device-chosen text: never raw to a terminal
        print(f"{_ts(r.received_at)} {r.device_id:16} {r.size:>12} B  {r.content_type:24} sha256={r.sha256[:16]}..."
              f"  {status}  {args.data / r.stored_path}  (sent as {name!r})")
    print(f"({len(rows)} files)")
    return 0


def _command(args: argparse.Namespace) -> int:
    command_id = _storage(args.data).queue_command(args.device, args.name, cbor.dumps(json.loads(args.args)),
                                                   time.time())
    print(f"queued command {command_id} for {args.device}")
    return 0


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
