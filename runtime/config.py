"""Command-line and environment options shared by the device and backend commands.

MQTT credentials never appear on a command line: a password comes from a file
(``--mqtt-password-file``, mode 0600 recommended) or from the ``SEALMQ_MQTT_PASSWORD`` variable.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from runtime.mqtt import MqttSettings
from sealmq.errors import ConfigError, Reason


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
    group.add_argument("--tls-ca", type=Path, default=None, help="CA file to verify a TLS broker")
    limit = "no limit" if connect_timeout is None else f"{connect_timeout:g}"
    group.add_argument("--connect-timeout", type=float, default=connect_timeout, metavar="SECONDS",
                       help="give up (exit code 3) if the broker cannot be reached for this long; failed "
                            "attempts are retried with backoff and logged meanwhile; a refused password "
                            f"exits at once (code 4); 0 = retry forever (default: {limit})")


def connect_limit(args: argparse.Namespace) -> float | None:
    """``--connect-timeout`` as a wait limit: None means retry forever."""
    value = getattr(args, "connect_timeout", None)
    return None if value is None or value <= 0 else float(value)


def read_secret_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(Reason.CONFIG_INVALID, f"cannot read {path}: {exc.strerror}") from None


def mqtt_settings(args: argparse.Namespace, *, username: str | None = None, password_file: Path | None = None,
                  client_id: str = "") -> MqttSettings:
    user = args.mqtt_username or username
    password: str | None = os.environ.get("SEALMQ_MQTT_PASSWORD")
    pw_file = args.mqtt_password_file or password_file
    if password is None and pw_file is not None and Path(pw_file).exists():
        password = read_secret_file(Path(pw_file))
    if not (0 < args.port < 65536):
        raise ConfigError(Reason.CONFIG_INVALID, "port out of range")
    return MqttSettings(host=args.host, port=args.port, username=user, password=password,
                        client_id=client_id, tls_ca=args.tls_ca)
