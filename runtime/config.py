"""Command-line and environment options shared by the device and backend commands.

MQTT credentials never appear on a command line: a password comes from a file
(``--mqtt-password-file``, mode 0600 recommended) or from the ``SEALMQ_MQTT_PASSWORD`` variable.

TLS (``mqtts``) is on with ``--tls``, ``SEALMQ_MQTT_TLS=1`` or port 8883. The broker is verified
against the operator's CA (``--tls-ca``, default the PKI's ``ca/ca.crt``), and the client logs in
with the certificate and key it uses for EDHOC (``--tls-cert``/``--tls-key``, default its identity
directory's ``chain.pem``/``key.pem``); no password is sent then. An explicit ``--mqtt-password-file``
(or ``SEALMQ_MQTT_PASSWORD_FILE``) means a password login instead, e.g. a backend worker's own account
on the broker's TLS password listener (docs/scaling.md): no client certificate is sent then.

Scale-out (``add_share_group_arguments``, ``sealmq backend run`` only): ``--share-group-file FILE``
(or ``--share-group NAME``, ``SEALMQ_SHARE_GROUP``) makes the link MQTT 5 and its subscriptions
``$share/<group>/...``; ``--session-expiry`` bounds the MQTT 5 session; ``--mqtt-version 5`` asks for
MQTT 5 without a share group.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from runtime.mqtt import DEFAULT_SESSION_EXPIRY, MQTT_5, MQTT_311, MqttSettings, check_share_group
from sealmq.errors import ConfigError, Reason

TLS_PORT = 8883


def add_mqtt_arguments(parser: argparse.ArgumentParser, *, default_username: str | None = None,
                       connect_timeout: float | None = 30.0) -> None:
    """The broker connection options; ``connect_timeout`` is the command's default (None: no limit)."""
    group = parser.add_argument_group("broker connection")
    group.add_argument("--host", default=os.environ.get("SEALMQ_MQTT_HOST", "127.0.0.1"),
                       help="broker address (default: $SEALMQ_MQTT_HOST or %(default)s)")
    group.add_argument("--port", type=int, default=int(os.environ.get("SEALMQ_MQTT_PORT", "1883")),
                       help="broker port (default: $SEALMQ_MQTT_PORT or %(default)s)")
    group.add_argument("--mqtt-username", default=os.environ.get("SEALMQ_MQTT_USERNAME", default_username),
                       help="broker user name (default: $SEALMQ_MQTT_USERNAME, else the identity's name)")
    group.add_argument("--mqtt-password-file", type=Path, default=os.environ.get("SEALMQ_MQTT_PASSWORD_FILE"),
                       help="file holding the broker password (default: $SEALMQ_MQTT_PASSWORD_FILE, else "
                            "mqtt.password next to the identity's key; or set SEALMQ_MQTT_PASSWORD)")
    group.add_argument("--tls", action="store_true", default=os.environ.get("SEALMQ_MQTT_TLS", "") == "1",
                       help="connect with TLS (implied by port 8883; or set SEALMQ_MQTT_TLS=1)")
    group.add_argument("--tls-ca", type=Path, default=None,
                       help="CA file to verify the broker (default: the PKI's ca/ca.crt)")
    group.add_argument("--tls-cert", type=Path, default=None,
                       help="client certificate chain (default: the identity's chain.pem)")
    group.add_argument("--tls-key", type=Path, default=None, help="its key (default: the identity's key.pem)")
    limit = "no limit" if connect_timeout is None else f"{connect_timeout:g}"
    group.add_argument("--connect-timeout", type=float, default=connect_timeout, metavar="SECONDS",
                       help="give up (exit code 3) if the broker cannot be reached for this long; failed "
                            "attempts are retried with backoff and logged meanwhile; a refused password "
                            f"exits at once (code 4); 0 = retry forever (default: {limit})")


def add_share_group_arguments(parser: argparse.ArgumentParser) -> None:
    """MQTT 5 and shared subscriptions: the options of a backend worker (docs/scaling.md)."""
    group = parser.add_argument_group("scale-out: several workers in one MQTT 5 share group (docs/scaling.md)")
    group.add_argument("--share-group-file", type=Path, default=os.environ.get("SEALMQ_SHARE_GROUP_FILE"),
                       help="file holding the share group name, a secret (sealmq bootstrap --workers N writes "
                            "pki/backend/<name>/share-group): subscribe through $share/<group>/... over MQTT 5 "
                            "(Mosquitto 2; the embedded broker refuses it). Default: $SEALMQ_SHARE_GROUP_FILE")
    group.add_argument("--share-group", default=os.environ.get("SEALMQ_SHARE_GROUP"), metavar="NAME",
                       help="the share group name itself (visible in the process list: prefer "
                            "--share-group-file; default: $SEALMQ_SHARE_GROUP)")
    group.add_argument("--session-expiry", type=int, default=DEFAULT_SESSION_EXPIRY, metavar="SECONDS",
                       help="MQTT 5: the broker keeps this worker's session and its unacknowledged messages this "
                            "long after a disconnect, for the worker's return (default: %(default)s)")
    group.add_argument("--mqtt-version", choices=("3.1.1", "5"), default=None,
                       help="MQTT protocol (default: 3.1.1; 5 with a share group)")


def share_group(args: argparse.Namespace) -> str | None:
    """The share group of ``--share-group`` / ``--share-group-file`` (None: no shared subscription)."""
    name = getattr(args, "share_group", None)
    path = getattr(args, "share_group_file", None)
    if not name and path:  # the name itself wins over a file (which may come from sealmq.toml)
        name = read_secret_file(Path(path))
    return check_share_group(name) if name else None


def connect_limit(args: argparse.Namespace) -> float | None:
    """``--connect-timeout`` as a wait limit: None means retry forever."""
    value = getattr(args, "connect_timeout", None)
    return None if value is None or value <= 0 else float(value)


def read_secret_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(Reason.CONFIG_INVALID, f"cannot read {path}: {exc.strerror}") from None


def tls_wanted(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "tls", False)) or args.port == TLS_PORT or getattr(args, "tls_ca", None) is not None


def mqtt_settings(args: argparse.Namespace, *, username: str | None = None, password_file: Path | None = None,
                  client_id: str = "", ca_file: Path | None = None,
                  client_cert: tuple[Path, Path] | None = None) -> MqttSettings:
    """Settings from the options; ``ca_file`` and ``client_cert`` (chain, key) are the TLS defaults."""
    user = args.mqtt_username or username
    password: str | None = os.environ.get("SEALMQ_MQTT_PASSWORD")
    pw_file = args.mqtt_password_file or password_file
    if password is None and pw_file is not None and Path(pw_file).exists():
        password = read_secret_file(Path(pw_file))
    if args.mqtt_password_file is not None and password is None:
        raise ConfigError(Reason.CONFIG_INVALID, f"cannot read {args.mqtt_password_file}: no such file")
    if not (0 < args.port < 65536):
        raise ConfigError(Reason.CONFIG_INVALID, "port out of range")
    group = share_group(args)
    version = getattr(args, "mqtt_version", None)
    if group is not None and version == "3.1.1":
        raise ConfigError(Reason.CONFIG_INVALID, "a share group needs MQTT 5 (--mqtt-version 5)")
    scale: dict[str, Any] = {"protocol": MQTT_5 if group is not None or version == "5" else MQTT_311,
                             "share_group": group}
    if getattr(args, "session_expiry", None) is not None:
        scale["session_expiry"] = args.session_expiry
    if not tls_wanted(args):
        return MqttSettings(host=args.host, port=args.port, username=user, password=password, client_id=client_id,
                            **scale)
    ca = args.tls_ca or ca_file
    if ca is None:
        raise ConfigError(Reason.CONFIG_INVALID, "TLS needs the CA file (--tls-ca)")
    for explicit in (args.tls_ca, args.tls_cert, args.tls_key):
        if explicit is not None and not Path(explicit).is_file():
            raise ConfigError(Reason.CONFIG_INVALID, f"TLS file missing: {explicit}")
    cert = args.tls_cert or (client_cert[0] if client_cert else None)
    key = args.tls_key or (client_cert[1] if client_cert else None)
    if args.mqtt_password_file is not None and args.tls_cert is None:
        cert = key = None  # an explicit password file is the login (a worker account; docs/scaling.md)
    elif cert is not None and key is not None and Path(cert).exists() and Path(key).exists():
        password = None  # the certificate is the login
    else:
        cert = key = None
    return MqttSettings(host=args.host, port=args.port, username=user, password=password, client_id=client_id,
                        tls_ca=Path(ca), tls_cert=cert, tls_key=key, **scale)
