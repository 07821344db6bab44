"""The broker's command line: passwd, mosquitto-config, run (a real foreground process) and inspect."""

from __future__ import annotations

import io
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.cli import main
from broker.inspect import run_inspect
from broker.passwd import load_users, verify_password
from runtime import exits
from sealmq import cbor
from sealmq.errors import ConfigError
from tests.brokers import running_amqtt, wait_listening

ROOT = Path(__file__).resolve().parents[1]


def test_passwd_generates_and_prints_once(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    users = tmp_path / "users"
    args = ["broker", "passwd", "--file", str(users), "--role", "backend", "--iterations", "1000", "backend"]
    assert main(args) == 0
    out = capsys.readouterr().out
    password = re.search(r"password: (\S+)", out).group(1)  # type: ignore[union-attr]
    assert len(password) >= 24
    assert verify_password(password, load_users(users)["backend"].pw_hash)
    assert password not in users.read_text()
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600


def test_passwd_from_file_and_delete(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    users, pwfile = tmp_path / "users", tmp_path / "pw"
    pwfile.write_text("s3cret-from-file\n")
    assert main(["broker", "passwd", "--file", str(users), "--password-file", str(pwfile), "dev7"]) == 0
    assert "s3cret" not in capsys.readouterr().out
    assert verify_password("s3cret-from-file", load_users(users)["dev7"].pw_hash)
    assert main(["broker", "passwd", "--file", str(users), "--delete", "dev7"]) == 0
    assert load_users(users) == {}
    assert main(["broker", "passwd", "--file", str(users), "--password-file", str(pwfile), "Not/Valid"]) == 2


def test_mosquitto_config_cli(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    users = tmp_path / "users"
    main(["broker", "passwd", "--file", str(users), "--role", "monitor", "--iterations", "1000", "mon"])
    out = tmp_path / "mq"
    args = ["broker", "mosquitto-config", "--out", str(out), "--users", str(users), "--port", "18999"]
    if os.geteuid() == 0:  # root: `user mosquitto` could not enter pytest's 0700 tmp dir: refused, not broken
        assert main(args) == 2
        assert "cannot enter" in capsys.readouterr().err
        args += ["--run-as", "root"]
    assert main(args) == 0
    assert "user mosquitto" in (out / "mosquitto.conf").read_text() or os.geteuid() == 0
    assert {p.name for p in out.iterdir()} == {"mosquitto.conf", "acl", "passwd", "openssl.cnf", "data"}
    # the command it prints starts mosquitto with the generated OpenSSL settings (no TLS session tickets)
    assert f"run: OPENSSL_CONF={out.resolve()}/openssl.cnf mosquitto -c {out.resolve()}/mosquitto.conf" in \
        capsys.readouterr().out
    assert "\nNumTickets = 0\n" in (out / "openssl.cnf").read_text()
    assert stat.S_IMODE(os.stat(out / "openssl.cnf").st_mode) == 0o600
    assert "listener 18999 127.0.0.1" in (out / "mosquitto.conf").read_text()
    assert stat.S_IMODE(os.stat(out / "passwd").st_mode) == 0o600


def test_run_foreground_until_sigterm(tmp_path) -> None:  # type: ignore[no-untyped-def]
    users = tmp_path / "users"
    main(["broker", "passwd", "--file", str(users), "--iterations", "1000", "dev0"])
    config = tmp_path / "broker.toml"
    config.write_text(f'passwd = "{users}"\nport = 0\nmax_message_size = 1024\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "broker", "run", "--config", str(config)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        match = re.match(r"sealmq broker listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line + proc.stderr.read()  # type: ignore[union-attr]
        wait_listening("127.0.0.1", int(match.group(1)))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert "shutting down" in proc.stdout.read()  # type: ignore[union-attr]
        assert "listening on" not in proc.stderr.read()  # type: ignore[union-attr]  # said once, on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_refuses_bad_config(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "broker.toml"
    config.write_text('bind_everything = true\n')
    assert main(["broker", "run", "--config", str(config)]) == 2
    assert "unknown keys" in capsys.readouterr().err


@pytest.mark.parametrize("line", ['port = "1883"', "port = [1]", "max_message_size = {}", "host = 1",
                                  "connect_timeout = true", 'passwd = ["users"]'])
def test_run_refuses_wrongly_typed_config(tmp_path, capsys, line) -> None:  # type: ignore[no-untyped-def]
    # found by the fuzz target "config" (fuzz/corpus/config/regression-*): a TypeError escaped before
    config = tmp_path / "broker.toml"
    config.write_text(line + "\n" if line.startswith("passwd") else f'passwd = "users"\n{line}\n')
    assert main(["broker", "run", "--config", str(config)]) == 2
    assert "wrong type" in capsys.readouterr().err


def test_inspect_prints_what_the_broker_sees(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with running_amqtt(tmp_path) as b:
        out = io.StringIO()
        result: list[int] = []
        mon = b.monitor
        t = threading.Thread(
            target=lambda: result.append(
                run_inspect(b.host, b.port, mon.username, mon.password, count=3, timeout=10, out=out)
            )
        )
        t.start()
        deadline = time.monotonic() + 5
        while "# subscribed" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
        dev, _ = b.connect(b.devices[0])
        topic = f"sealmq/v1/{b.devices[0].username}"
        record = cbor.dumps([1, b"\x07", 2, 9, b"\xee" * 30])
        dev.publish(f"{topic}/data/up", record, qos=1).wait_for_publish(5)
        dev.publish(f"{topic}/hs/up", cbor.dumps_seq(True, 0, 2, b"g" * 32, -24), qos=1).wait_for_publish(5)
        dev.publish(f"{topic}/media/up", b"\xff garbage", qos=1).wait_for_publish(5)
        t.join(15)
        assert result == [0]
        lines = out.getvalue().splitlines()[1:]
        assert "record kind=TELEMETRY kid=07 epoch=2 piv=9 ct_len=30 ct=eeee" in lines[0]
        assert "edhoc message_1 method=0 suites=[2]" in lines[1]
        assert "undecodable preview=ff20" in lines[2]


def test_inspect_refused_for_a_device(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    with running_amqtt(tmp_path) as b:
        d = b.devices[0]
        args = ["inspect", "--port", str(b.port), "--username", d.username, f"--password={d.password}"]
        args += ["--timeout", "5"]
        assert main(args) == exits.NOT_AUTHORIZED  # a device may not subscribe to sealmq/#
        assert "not_authorized" in capsys.readouterr().err
        args[5] = "--password=wrong"
        assert main(args) == exits.NOT_AUTHORIZED


def test_run_config_takes_per_user_bounds_as_integers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import argparse

    from broker.cli import load_run_config
    from broker.embedded import EmbeddedBrokerConfig

    config = tmp_path / "broker.toml"
    config.write_text('passwd = "u"\nmax_connections_per_user = 2\nmax_offline_queue = 10\n')
    values = load_run_config(argparse.Namespace(config=config))
    EmbeddedBrokerConfig(**values).validate()
    assert values["max_connections_per_user"] == 2
    config.write_text('passwd = "u"\nmax_connections_per_user = "2"\n')
    with pytest.raises(ConfigError):
        load_run_config(argparse.Namespace(config=config))
    with pytest.raises(ConfigError):  # no room left for devices
        EmbeddedBrokerConfig(passwd="u", max_connections=10, reserved_backend_connections=9).validate()
