"""Command-line and environment options shared by the device and backend commands.

MQTT credentials never appear on a command line: a password comes from a file
(``--mqtt-password-file``, mode 0600 recommended) or from the ``SEALMQ_MQTT_PASSWORD`` variable.

TLS (``mqtts``) is on with ``--tls``, ``SEALMQ_MQTT_TLS=1`` or port 8883. The broker is verified
against the operator's CA (``--tls-ca``, default the PKI's ``ca/ca.crt``), and the client logs in
with the certificate and key it uses for EDHOC (``--tls-cert``/``--tls-key``, default its identity
directory's ``chain.pem``/``key.pem``); no password is sent then.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from runtime.mqtt import MqttSettings
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
    if not (0 < args.port < 65536):
        raise ConfigError(Reason.CONFIG_INVALID, "port out of range")
    if not tls_wanted(args):
        return MqttSettings(host=args.host, port=args.port, username=user, password=password, client_id=client_id)
    ca = args.tls_ca or ca_file
    if ca is None:
        raise ConfigError(Reason.CONFIG_INVALID, "TLS needs the CA file (--tls-ca)")
    for explicit in (args.tls_ca, args.tls_cert, args.tls_key):
        if explicit is not None and not Path(explicit).is_file():
            raise ConfigError(Reason.CONFIG_INVALID, f"TLS file missing: {explicit}")
    cert = args.tls_cert or (client_cert[0] if client_cert else None)
    key = args.tls_key or (client_cert[1] if client_cert else None)
    if cert is not None and key is not None and Path(cert).exists() and Path(key).exists():
        password = None  # the certificate is the login
    else:
        cert = key = None
    return MqttSettings(host=args.host, port=args.port, username=user, password=password, client_id=client_id,
                        tls_ca=Path(ca), tls_cert=cert, tls_key=key)
