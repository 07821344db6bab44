"""The console's options of ``sealmq backend run`` (``--http`` and friends), and starting it."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from backend.console.auth import CONSOLE_MONITOR
from runtime.config import read_secret_file
from runtime.mqtt import MQTT_311, MqttSettings


def add_console_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("operator console")
    group.add_argument("--http", default=os.environ.get("SEALMQ_HTTP"), metavar="HOST:PORT",
                       help="serve the console and /metrics here (e.g. 127.0.0.1:8080); off when not given")
    group.add_argument("--console-auth", type=Path, default=None,
                       help="the console password's salted hash (default: DATA/console.auth, from sealmq bootstrap)")
    group.add_argument("--monitor-username", default=CONSOLE_MONITOR,
                       help=f"the broker view's read-only broker user (default {CONSOLE_MONITOR})")
    group.add_argument("--monitor-password-file", type=Path, default=os.environ.get("SEALMQ_MONITOR_PASSWORD_FILE"),
                       help="its password file (DIR/broker/console-monitor.password); no broker view without it")
    env_port = os.environ.get("SEALMQ_MONITOR_PORT")
    group.add_argument("--monitor-port", type=int, default=int(env_port) if env_port else None,
                       help="the broker's port for password logins (its TLS password listener, e.g. 8884; "
                       "default: the backend's port)")
    group.add_argument("--https-cert", type=Path, default=None, help="serve the console over TLS: certificate")
    group.add_argument("--https-key", type=Path, default=None, help="... and its key")


def start_console(service: Any, args: argparse.Namespace, mqtt: MqttSettings) -> Any:
    """Start the console beside ``service`` when ``--http`` was given; returns it (or None)."""
    if not args.http:
        return None
    from backend.console.server import Console, ConsoleSettings, parse_http

    host, port = parse_http(args.http)
    monitor = None
    if args.monitor_password_file is not None:
        # a password login, never the backend's TLS client certificate (Mosquitto would take it for
        # the backend itself and disconnect the backend): on TLS, the broker's password listener
        monitor = replace(mqtt, username=args.monitor_username,
                          password=read_secret_file(Path(args.monitor_password_file)), client_id="",
                          tls_cert=None, tls_key=None, port=args.monitor_port or mqtt.port,
                          protocol=MQTT_311, share_group=None)  # a worker's share group is not the monitor's
    console = Console(service, ConsoleSettings(host=host, port=port, auth_file=args.console_auth, monitor=monitor,
                                               tls_cert=args.https_cert, tls_key=args.https_key)).start()
    print(f"console: {console.url}", flush=True)
    return console
