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


def add_mqtt_arguments(parser: argparse.ArgumentParser, *, default_username: str | None = None) -> None:
    group = parser.add_argument_group("broker connection")
    group.add_argument("--host", default=os.environ.get("SEALMQ_MQTT_HOST", "127.0.0.1"))
    group.add_argument("--port", type=int, default=int(os.environ.get("SEALMQ_MQTT_PORT", "1883")))
    group.add_argument("--mqtt-username", default=os.environ.get("SEALMQ_MQTT_USERNAME", default_username))
    group.add_argument("--mqtt-password-file", type=Path, default=os.environ.get("SEALMQ_MQTT_PASSWORD_FILE"),
                       help="file holding the broker password (or set SEALMQ_MQTT_PASSWORD)")
    group.add_argument("--tls-ca", type=Path, default=None, help="CA file to verify a TLS broker")


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
