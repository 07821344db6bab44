"""TLS settings without a broker: the clients' options (runtime/config.py) and the generated
Mosquitto listeners (broker/mosquitto_config.py). The brokers themselves: tests/test_broker_tls.py."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from broker.mosquitto_config import MosquittoOptions, render, write_config
from broker.passwd import AccountRole, User, hash_password
from broker.tls import TlsFiles
from runtime.config import add_mqtt_arguments, mqtt_settings
from sealmq.errors import ConfigError


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_mqtt_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def identity(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    ca, chain, key, pw = (tmp_path / n for n in ("ca.crt", "chain.pem", "key.pem", "mqtt.password"))
    for f in (ca, chain, key):
        f.write_text("x")
    pw.write_text("secret\n")
    return ca, chain, key, pw


def test_plain_by_default_with_the_password(identity: tuple[Path, Path, Path, Path],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEALMQ_MQTT_TLS", raising=False)
    ca, chain, key, pw = identity
    s = mqtt_settings(_args(), username="dev-1", password_file=pw, ca_file=ca, client_cert=(chain, key))
    assert (s.port, s.password, s.tls_ca, s.tls_cert) == (1883, "secret", None, None)


@pytest.mark.parametrize("argv", [["--port", "8883"], ["--tls", "--port", "9000"]])
def test_tls_logs_in_with_the_identity_certificate(identity: tuple[Path, Path, Path, Path], argv: list[str]) -> None:
    ca, chain, key, pw = identity
    s = mqtt_settings(_args(*argv), username="dev-1", password_file=pw, ca_file=ca, client_cert=(chain, key))
    assert (s.tls_ca, s.tls_cert, s.tls_key) == (ca, chain, key)
    assert s.password is None  # the certificate is the login: the password is not sent


def test_tls_from_the_environment(identity: tuple[Path, Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEALMQ_MQTT_TLS", "1")
    ca, _, _, pw = identity
    s = mqtt_settings(_args(), username="monitor", password_file=pw, ca_file=ca)
    assert (s.tls_ca, s.tls_cert, s.password) == (ca, None, "secret")  # no certificate: the password


def test_tls_refuses_missing_files(identity: tuple[Path, Path, Path, Path], tmp_path: Path) -> None:
    ca, chain, key, _ = identity
    with pytest.raises(ConfigError, match="CA file"):
        mqtt_settings(_args("--tls"))
    with pytest.raises(ConfigError, match="missing"):
        mqtt_settings(_args("--tls", "--tls-ca", str(tmp_path / "nope.crt")))
    with pytest.raises(ConfigError, match="missing"):
        mqtt_settings(_args("--tls-cert", str(tmp_path / "nope.pem"), "--port", "8883"), ca_file=ca,
                      client_cert=(chain, key))


def _users() -> dict[str, User]:
    h = hash_password("pw", iterations=1000)
    return {"dev-1": User("dev-1", AccountRole.DEVICE, h), "monitor": User("monitor", AccountRole.MONITOR, h)}


def test_mosquitto_listeners(tmp_path: Path, identity: tuple[Path, Path, Path, Path]) -> None:
    ca, chain, key, _ = identity
    crl = tmp_path / "crl.pem"
    crl.write_text("crl")
    tls = TlsFiles(ca, chain, key, crl)
    opts = MosquittoOptions(tls=tls, tls_port=8883, tls_password_port=8884)
    conf = render(tmp_path, _users(), opts)["mosquitto.conf"]
    plain, cert, password = conf.split("\nlistener ")[1:4]
    assert plain.startswith("1883 127.0.0.1\n") and "cafile" not in plain.split("# A packet")[0]
    assert cert.startswith("8883 127.0.0.1\n")
    for line in ("require_certificate true", "use_identity_as_username true", "tls_version tlsv1.2",
                 f"crlfile {tmp_path}/tls/crl.pem", f"keyfile {tmp_path}/tls/broker-key.pem",
                 "use_username_as_clientid true"):
        assert line in cert
    assert password.startswith("8884 127.0.0.1\n") and "require_certificate" not in password
    assert "tls_version tlsv1.2" in password
    only_tls = render(tmp_path, _users(), MosquittoOptions(tls=tls, plain=False))["mosquitto.conf"]
    assert only_tls.count("\nlistener ") == 1
    with pytest.raises(ConfigError):
        render(tmp_path, _users(), MosquittoOptions(plain=False))


def test_mosquitto_tls_files_are_private_copies(tmp_path: Path, identity: tuple[Path, Path, Path, Path]) -> None:
    ca, chain, key, _ = identity
    out = tmp_path / "conf"
    write_config(out, _users(), MosquittoOptions(tls=TlsFiles(ca, chain, key), run_as=_me()))
    assert sorted(p.name for p in (out / "tls").iterdir()) == ["broker-chain.pem", "broker-key.pem", "ca.crt"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in (out / "tls").iterdir())
    assert "\ncrlfile " not in (out / "mosquitto.conf").read_text()  # no CRL given: none referenced


def _me() -> str:
    from broker.mosquitto_config import current_user

    return current_user()


def test_broker_run_config_takes_the_tls_keys(tmp_path: Path) -> None:
    from broker.cli import load_run_config

    def load(text: str) -> dict[str, object]:
        config = tmp_path / "broker.toml"
        config.write_text(text)
        ns = argparse.Namespace(config=config, **dict.fromkeys(
            ["host", "port", "passwd", "max_message_size", "max_connections", "tls_pki", "tls_name", "tls_port",
             "tls_password_port", "plain"]))
        return load_run_config(ns)

    values = load(f'passwd = "u"\ntls_pki = "{tmp_path}"\ntls_password_port = 8884\nplain = false\n')
    assert values["tls"] == TlsFiles.from_pki(tmp_path) and values["tls_password_port"] == 8884
    assert values["plain"] is False and "tls_pki" not in values
    for bad in ('plain = "no"', "tls_port = '8883'"):
        with pytest.raises(ConfigError, match="wrong type"):
            load(f'passwd = "u"\ntls_pki = "{tmp_path}"\n{bad}\n')
    with pytest.raises(ConfigError, match="--tls-pki"):
        load('passwd = "u"\ntls_port = 8883\n')
