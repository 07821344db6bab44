"""``sealmq broker {run,passwd,mosquitto-config}`` and ``sealmq inspect``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

from sealmq.errors import ConfigError, Reason

# per-user bounds of the embedded broker (docs/broker.md, "Per-user bounds"): integers
_BOUND_KEYS = {"max_connections_per_user", "max_sessions_per_user", "reserved_backend_connections",
               "max_pending_connects", "max_qos2_pending", "session_expiry", "max_offline_queue",
               "max_offline_queue_backend"}
_TLS_KEYS = {"tls_pki", "tls_name", "tls_port", "tls_password_port", "plain"}
_RUN_KEYS = {"passwd", "host", "port", "max_message_size", "max_connections", "connect_timeout", *_BOUND_KEYS,
             *_TLS_KEYS}
# TOML gives any type: a string port or a list host must be a config error, not a TypeError later
_RUN_TYPES: dict[str, tuple[type, ...]] = {"passwd": (str,), "host": (str,), "port": (int,),
                                           "max_message_size": (int,), "max_connections": (int,),
                                           "connect_timeout": (int, float), "tls_pki": (str,),
                                           "tls_name": (str,), "tls_port": (int,), "tls_password_port": (int,)}


def _add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS (mqtts)")
    group.add_argument("--tls-pki", type=Path,
                       help="PKI directory: serve TLS with DIR/broker/NAME's certificate, accept client "
                       "certificates from DIR/ca/ca.crt, refuse those in DIR/ca/crl.pem")
    group.add_argument("--tls-name", help="the broker certificate's name (default broker)")
    group.add_argument("--tls-port", type=int, help="TLS port (default 8883)")
    group.add_argument("--no-plain", dest="plain", action="store_const", const=False,
                       help="no plain-TCP listener (TLS only)")
    group.add_argument("--tls-password-port", type=int,
                       help="a second TLS listener taking passwords (monitors; e.g. 8884)")


def register(subparsers: Any) -> None:
    broker = subparsers.add_parser("broker", help="run or configure the MQTT broker")
    sub = broker.add_subparsers(dest="broker_command", metavar="SUBCOMMAND", required=True)

    run = sub.add_parser("run", help="run the embedded hardened amqtt broker in the foreground")
    run.add_argument("--config", type=Path, help="TOML file with keys: " + ", ".join(sorted(_RUN_KEYS)))
    run.add_argument("--host", help="address to bind (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="port (default 1883; 0 picks a free one)")
    run.add_argument("--passwd", type=Path, help="user file (sealmq broker passwd)")
    run.add_argument("--max-message-size", type=int, help="largest payload relayed, bytes (default 262144)")
    run.add_argument("--max-connections", type=int, help="simultaneous connections (default 1000)")
    _add_tls_arguments(run)
    run.set_defaults(func=cmd_run)

    pw = sub.add_parser("passwd", help="add, replace or delete a broker user")
    pw.add_argument("--file", type=Path, required=True, help="user file (created 0600 if missing)")
    pw.add_argument("--role", choices=["device", "backend", "monitor"], default="device",
                    help="what the user may publish and subscribe to (default: %(default)s)")
    pw.add_argument("--password-file", type=Path, help="read the password from this file (first line)")
    pw.add_argument("--delete", action="store_true", help="remove the user")
    pw.add_argument("--iterations", type=int, default=None, help="PBKDF2 iterations (default 10000)")
    pw.add_argument("name", help="device id, or the backend/monitor user name")
    pw.set_defaults(func=cmd_passwd)

    mq = sub.add_parser("mosquitto-config", help="write a runnable Mosquitto config directory")
    mq.add_argument("--out", type=Path, required=True, help="directory to write")
    mq.add_argument("--passwd", "--users", dest="passwd", type=Path, required=True, help="sealmq user file")
    mq.add_argument("--host", default="127.0.0.1", help="address mosquitto binds (default: %(default)s)")
    mq.add_argument("--port", type=int, default=1883, help="port (default: %(default)s)")
    mq.add_argument("--max-message-size", type=int, default=None, help="largest payload, bytes (default 262144)")
    mq.add_argument("--no-persistence", action="store_true", help="do not keep sessions and queues on disk")
    mq.add_argument("--run-as", default=os.environ.get("SEALMQ_MOSQUITTO_RUN_AS", "mosquitto"),
                    help="unprivileged user mosquitto drops to when started as root (default: mosquitto, "
                    "or $SEALMQ_MOSQUITTO_RUN_AS); generated as root, the files are handed to it")
    _add_tls_arguments(mq)
    mq.set_defaults(func=cmd_mosquitto_config)

    ins = subparsers.add_parser("inspect", help="print what the broker sees on sealmq/# (no plaintext)")
    ins.add_argument("--host", default="127.0.0.1", help="broker address (default: %(default)s)")
    ins.add_argument("--port", type=int, default=1883, help="broker port (default: %(default)s)")
    ins.add_argument("--username", help="a monitor user (bootstrap creates 'monitor')")
    ins.add_argument("--password", help="its password (visible in the process list: prefer --password-file)")
    ins.add_argument("--password-file", type=Path,
                     help="file holding the password (first line), e.g. DIR/broker/monitor.password")
    ins.add_argument("--count", type=int, help="exit after this many messages (default: run until Ctrl-C)")
    ins.add_argument("--timeout", type=float, help="exit after this many quiet seconds (default: no limit)")
    ins.add_argument("--tls-ca", type=Path, help="connect with TLS, checking the broker against this CA file")
    ins.add_argument("--tls-cert", type=Path, help="a client certificate (chain) instead of a password")
    ins.add_argument("--tls-key", type=Path, help="the key of --tls-cert")
    ins.set_defaults(func=cmd_inspect)


def _read_password_file(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(Reason.CONFIG_INVALID, f"cannot read {path}: {type(exc).__name__}") from None
    if not lines or not lines[0]:
        raise ConfigError(Reason.CONFIG_INVALID, f"{path}: empty password")
    return lines[0]


def load_run_config(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if args.config is not None:
        try:
            values = tomllib.loads(args.config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(Reason.CONFIG_INVALID, f"cannot read {args.config}: {exc}") from None
        unknown = set(values) - _RUN_KEYS
        if unknown:
            raise ConfigError(Reason.CONFIG_INVALID, f"unknown keys in {args.config}: {sorted(unknown)}")
        for key in _BOUND_KEYS & set(values):
            if type(values[key]) is not int:
                raise ConfigError(Reason.CONFIG_INVALID, f"{key} in {args.config} must be an integer")
        wrong = sorted(k for k, v in values.items()
                       if k in _RUN_TYPES and (isinstance(v, bool) or not isinstance(v, _RUN_TYPES[k])))
        wrong += ["plain"] if "plain" in values and not isinstance(values["plain"], bool) else []
        if wrong:
            raise ConfigError(Reason.CONFIG_INVALID, f"keys of the wrong type in {args.config}: {wrong}")
    for key in ("host", "port", "passwd", "max_message_size", "max_connections", *_TLS_KEYS):
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    values.setdefault("port", 1883)
    tls_pki, tls_name = values.pop("tls_pki", None), values.pop("tls_name", "broker")
    if tls_pki is not None:
        from broker.tls import TlsFiles

        values["tls"] = TlsFiles.from_pki(tls_pki, tls_name)
    elif {"tls_port", "tls_password_port"} & set(values) or values.get("plain") is False:
        raise ConfigError(Reason.CONFIG_INVALID, "TLS options need the PKI directory (--tls-pki)")
    if "passwd" not in values:
        raise ConfigError(Reason.CONFIG_INVALID, "a user file is required (--passwd or passwd = in --config)")
    return values


def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from broker.embedded import EmbeddedBroker, EmbeddedBrokerConfig

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("sealmq.broker").setLevel(logging.INFO)
    config = EmbeddedBrokerConfig(**load_run_config(args))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedBroker(config) as broker:
            if config.plain:
                print(f"sealmq broker listening on {broker.host}:{broker.port}", flush=True)
            if config.tls is not None:
                print(f"sealmq broker listening on {broker.host}:{broker.tls_port} (TLS, client certificates)",
                      flush=True)
            if config.tls_password_port is not None:
                print(f"sealmq broker listening on {broker.host}:{broker.tls_password_port} (TLS, passwords)",
                      flush=True)
            while not stop.wait(0.5):
                pass
            print("sealmq broker: shutting down", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    from broker.passwd import DEFAULT_ITERATIONS, add_user, generate_password, remove_user

    if args.delete:
        remove_user(args.file, args.name)
        print(f"removed {args.name}")
        return 0
    generated = args.password_file is None
    password = generate_password() if generated else _read_password_file(args.password_file)
    add_user(args.file, args.name, password, args.role, iterations=args.iterations or DEFAULT_ITERATIONS)
    if generated:
        # printed once, on stdout only; it is not stored anywhere in clear
        print(f"{args.name} ({args.role}) password: {password}")
    else:
        print(f"set password of {args.name} ({args.role})")
    return 0


def cmd_mosquitto_config(args: argparse.Namespace) -> int:
    from broker.mosquitto_config import DEFAULT_MAX_MESSAGE_SIZE, MosquittoOptions, run_command, write_config
    from broker.passwd import load_users
    from broker.tls import DEFAULT_TLS_PORT, TlsFiles

    if args.tls_pki is None and (args.tls_port or args.tls_password_port or args.plain is False):
        raise ConfigError(Reason.CONFIG_INVALID, "TLS options need the PKI directory (--tls-pki)")
    opts = MosquittoOptions(
        host=args.host,
        port=args.port,
        max_message_size=args.max_message_size or DEFAULT_MAX_MESSAGE_SIZE,
        persistence=not args.no_persistence,
        run_as=args.run_as,
        plain=args.plain is not False,
        tls=TlsFiles.from_pki(args.tls_pki, args.tls_name or "broker") if args.tls_pki else None,
        tls_port=args.tls_port or DEFAULT_TLS_PORT,
        tls_password_port=args.tls_password_port,
    )
    conf = write_config(args.out, load_users(args.passwd), opts)
    print(f"wrote {conf}; run: {run_command(conf)}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from broker.inspect import run_inspect

    password = args.password
    if args.password_file is not None:
        password = _read_password_file(args.password_file)
    return run_inspect(
        args.host, args.port, args.username, password, count=args.count, timeout=args.timeout, out=sys.stdout,
        tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
    )
