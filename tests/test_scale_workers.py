"""Scale-out, process side (issue 14): ``sealmq bootstrap --workers N`` and ``sealmq backend run --workers N``.

- bootstrap makes a secret share group and broker accounts that work on a real mosquitto with the
  generated ACL (``$share`` subscriptions of the ``backend-wK`` accounts receive the uplink);
- ``backend run --share-group`` against the embedded broker exits 2 with a clear message;
- the supervisor starts N real workers, restarts one that is killed, stops all on SIGTERM, and its
  workers die with it when it is killed; a worker's configuration error stops everything.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import config as app_config
from app import workers
from app.bootstrap import bootstrap
from broker.embedded import EmbeddedBroker, EmbeddedBrokerConfig
from broker.mosquitto_config import MosquittoOptions, current_user, write_config
from broker.passwd import load_users
from broker.tls import TlsFiles
from runtime import exits
from runtime.config import add_mqtt_arguments, add_share_group_arguments, mqtt_settings
from runtime.mqtt import MQTT_5, MQTT_311, MqttLink, MqttSettings
from sealmq.errors import ConfigError
from tests import brokers
from tests.e2e import wait_for

REPO = Path(__file__).resolve().parent.parent
ITERATIONS = 1000


def _sealmq(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, **(env or {})}, check=False)


@pytest.fixture
def deployment(tmp_path: Path) -> Path:
    root = tmp_path / "deploy"
    bootstrap(root, ["dev-001"], iterations=ITERATIONS, workers=2)
    return root


@pytest.fixture
def mosquitto(deployment: Path, tmp_path: Path) -> Iterator[brokers.MosquittoProcess]:
    """A real mosquitto on the deployment's own user file and generated ACL: plain TCP on ``port``,
    TLS with client certificates on ``tls_port``, TLS with passwords on ``tls_password_port``."""
    if brokers.MOSQUITTO is None:
        pytest.skip("mosquitto binary not installed")
    port, tls_port, tls_password_port = brokers.free_port(), brokers.free_port(), brokers.free_port()
    conf = Path(tempfile.mkdtemp(prefix="sealmq-mosquitto-"))
    write_config(conf, load_users(deployment / "broker" / "users"),
                 MosquittoOptions(host=brokers.HOST, port=port, run_as=current_user(),
                                  tls=TlsFiles.from_pki(deployment / "pki"), tls_port=tls_port,
                                  tls_password_port=tls_password_port))
    proc = brokers.MosquittoProcess(conf, port, tmp_path / "mosquitto.log").start()
    proc.tls_port, proc.tls_password_port = tls_port, tls_password_port  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(conf, ignore_errors=True)


def test_bootstrap_workers_writes_a_secret_group_accounts_and_config(deployment: Path) -> None:
    group_file = workers.share_group_file(deployment / "pki", "backend")
    group = group_file.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{32}", group)  # 128 random bits
    users = load_users(deployment / "broker" / "users")
    for k in (1, 2):
        assert users[f"backend-w{k}"].role.value == "backend"
        pw = workers.password_file(deployment / "pki", "backend", k)
        assert stat.S_IMODE(pw.stat().st_mode) == 0o600
    assert stat.S_IMODE(group_file.stat().st_mode) == 0o600
    paths = app_config.load(deployment / "sealmq.toml")
    assert paths.share_group_file == group_file and paths.workers == 2
    assert group not in (deployment / "sealmq.toml").read_text()  # a path, never the secret
    # idempotent: the group is kept (every worker must read the same one); more workers, more accounts
    _, created = bootstrap(deployment, ["dev-001"], iterations=ITERATIONS, workers=3)
    assert created == ["broker user backend-w3", "sealmq.toml: workers"]
    assert group_file.read_text().strip() == group
    assert app_config.load(deployment / "sealmq.toml").workers == 3
    assert bootstrap(deployment, ["dev-001"], iterations=ITERATIONS, workers=3)[1] == []


@pytest.mark.mosquitto
@brokers.needs_mosquitto
def test_bootstrap_worker_accounts_share_the_uplink_on_mosquitto(deployment: Path,
                                                                 mosquitto: brokers.MosquittoProcess) -> None:
    """The generated ACL grants backend accounts ``sealmq/v1/+/+/up``; mosquitto checks a ``$share``
    subscription's deliveries against the filter without the prefix, so the workers receive."""
    pki = deployment / "pki"
    group = workers.share_group_file(pki, "backend").read_text().strip()
    got: dict[str, list[bytes]] = {"backend-w1": [], "backend-w2": []}
    links = []
    try:
        for k, name in enumerate(got, start=1):
            settings = MqttSettings(port=mosquitto.port, username=name, client_id=name, protocol=MQTT_5,
                                    password=workers.password_file(pki, "backend", k).read_text().strip(),
                                    share_group=group)
            link = MqttLink(settings, lambda t, p, name=name: got[name].append(p), ["sealmq/v1/+/+/up"])  # type: ignore[misc]
            links.append(link)
            link.start(wait=10)
            assert link.subscribed.wait(10)
        device = MqttLink(MqttSettings(port=mosquitto.port, username="dev-001",
                                       password=(pki / "devices" / "dev-001" / "mqtt.password").read_text().strip()),
                          lambda t, p: None)
        links.append(device)
        device.start(wait=10)
        for i in range(40):
            device.publish("sealmq/v1/dev-001/data/up", str(i).encode()).wait_for_publish(5)
        assert wait_for(lambda: sum(len(v) for v in got.values()) >= 40, 10)
        received = sorted(int(p) for v in got.values() for p in v)
        assert received == list(range(40))
        assert all(got.values())  # both accounts in the group took a share
    finally:
        for link in links:
            link.stop()


def test_share_group_on_the_embedded_broker_exits_2_with_a_clear_error(deployment: Path, tmp_path: Path) -> None:
    broker = EmbeddedBroker(EmbeddedBrokerConfig(passwd=deployment / "broker" / "users", port=0)).start()
    try:
        result = _sealmq("backend", "run", "--pki", str(deployment / "pki"), "--data", str(tmp_path / "data"),
                         "--port", str(broker.port), "--connect-timeout", "20",
                         "--share-group-file", str(workers.share_group_file(deployment / "pki", "backend")))
    finally:
        broker.stop()
    assert result.returncode == exits.USAGE, result.stderr
    assert "does not speak MQTT 5" in result.stderr
    assert "embedded broker is MQTT 3.1.1 only" in result.stderr
    group = workers.share_group_file(deployment / "pki", "backend").read_text().strip()
    assert group not in result.stderr + result.stdout


def test_workers_need_a_share_group_and_their_accounts(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    bootstrap(root, [], iterations=ITERATIONS)  # no --workers: neither group nor accounts
    base = ["backend", "run", "--pki", str(root / "pki"), "--data", str(tmp_path / "d"), "--workers", "2"]
    no_group = _sealmq(*base)
    assert no_group.returncode == exits.USAGE
    assert "without a share group would each receive every message" in no_group.stderr
    no_accounts = _sealmq(*base, "--share-group", "g")
    assert no_accounts.returncode == exits.USAGE
    assert "sealmq bootstrap --workers 2" in no_accounts.stderr


class _Supervised:
    """``sealmq backend run --workers N`` as a child process, its output parsed as it comes."""

    def __init__(self, deployment: Path, port: int, n: int, *extra: str) -> None:
        env = {**os.environ, app_config.ENV: str(deployment / "sealmq.toml"), "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "backend", "run", "--port", str(port), "--workers", str(n), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def started(self) -> list[tuple[int, int]]:
        """(worker, pid) for each start, in order."""
        return [(int(m[1]), int(m[2])) for line in list(self.lines)
                if (m := re.search(r"worker (\d+) started \(pid (\d+)\)", line))]

    def serving(self, index: int) -> int:
        return sum(line.startswith(f"[w{index}] ") and "serving devices" in line for line in list(self.lines))

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(pid, 0)
    status = Path(f"/proc/{pid}/stat")
    return not status.exists() or status.read_text().split(") ")[-1].startswith("Z")


@pytest.mark.slow
@pytest.mark.mosquitto
@brokers.needs_mosquitto
def test_supervisor_starts_n_restarts_a_killed_one_and_stops_all(deployment: Path,
                                                                 mosquitto: brokers.MosquittoProcess) -> None:
    """Over TLS, as in the compose profile: the workers log in with their own passwords on the password
    listener (the backend's certificate would log them all in as `backend`, one connection)."""
    sup = _Supervised(deployment, mosquitto.tls_password_port, 2, "--tls")  # type: ignore[attr-defined]
    try:
        assert wait_for(lambda: sup.serving(1) and sup.serving(2), 60), sup.output()
        first = dict(sup.started())
        assert set(first) == {1, 2}
        for name in ("backend-w1", "backend-w2"):  # each with its own account, MQTT 5, clean start off
            mosquitto.wait_log(f"as {name} (p5, c0")
        os.kill(first[1], signal.SIGKILL)
        assert wait_for(lambda: len(sup.started()) == 3 and sup.serving(1) == 2, 60), sup.output()
        again = sup.started()[-1]
        assert again[0] == 1 and again[1] != first[1]
        assert "worker 1 exited (signal SIGKILL)" in sup.output()
        assert sup.started().count((2, first[2])) == 1 and not _gone(first[2])  # the other one untouched
        mosquitto.wait_log("as backend-w1 (p5, c0", count=2)
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(60) == exits.OK, sup.output()
        assert "all 2 workers stopped" in sup.output()
        assert _gone(again[1]) and _gone(first[2])
    finally:
        sup.close()


@pytest.mark.slow
@pytest.mark.mosquitto
@brokers.needs_mosquitto
def test_workers_die_with_a_killed_supervisor(deployment: Path, mosquitto: brokers.MosquittoProcess) -> None:
    sup = _Supervised(deployment, mosquitto.port, 2)
    try:
        assert wait_for(lambda: len(sup.started()) == 2, 60), sup.output()
        pids = [pid for _, pid in sup.started()]
        sup.proc.kill()  # SIGKILL: no chance to forward anything
        sup.proc.wait(10)
        assert wait_for(lambda: all(_gone(p) for p in pids), 30), pids
    finally:
        sup.close()


def test_supervisor_stops_everything_on_a_workers_configuration_error(tmp_path: Path) -> None:
    events: list[tuple[str, int, int]] = []
    marker = tmp_path / "second-started"
    script = ("import sys, time, pathlib\n"
              "if sys.argv[1] == '1': sys.exit(2)\n"
              "pathlib.Path(sys.argv[2]).touch(); time.sleep(600)\n")
    sup = workers.Supervisor(2, lambda k: [sys.executable, "-c", script, str(k), str(marker)],
                             on_event=lambda *e: events.append(e), stop_timeout=10)
    assert sup.run() == exits.USAGE
    assert ("exited", 1, 2) in events
    assert [e[:2] for e in events if e[0] == "started"] == [("started", 1), ("started", 2)]  # no restart
    assert ("exited", 2, -signal.SIGTERM) in events  # the other one was stopped


def test_supervisor_restarts_a_crashed_worker_with_growing_delays(tmp_path: Path) -> None:
    count = tmp_path / "runs"
    script = ("import sys, pathlib\n"
              "p = pathlib.Path(sys.argv[1]); n = len(p.read_text()) if p.exists() else 0\n"
              "p.write_text('x' * (n + 1)); print('run', n + 1); sys.exit(1)\n")
    events: list[tuple[str, int, int]] = []
    out = tmp_path / "out.txt"
    with out.open("w") as sink:
        sup = workers.Supervisor(1, lambda k: [sys.executable, "-c", script, str(count)], min_delay=0.05,
                                 max_delay=0.2, out=sink, on_event=lambda *e: events.append(e))
        runner = threading.Thread(target=sup.run)
        runner.start()
        try:
            assert wait_for(lambda: count.exists() and len(count.read_text()) >= 4, 30)
        finally:
            sup.stop()
            runner.join(30)
    assert [e for e in events if e[0] == "exited"][:3] == [("exited", 1, 1)] * 3
    assert "[w1] run 1" in out.read_text()  # each worker's lines, prefixed


def _options(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_mqtt_arguments(parser)
    add_share_group_arguments(parser)
    return parser.parse_args(list(argv))


def test_worker_options_make_mqtt5_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SEALMQ_SHARE_GROUP", "SEALMQ_SHARE_GROUP_FILE", "SEALMQ_MQTT_PASSWORD", "SEALMQ_MQTT_TLS"):
        monkeypatch.delenv(var, raising=False)
    group_file = tmp_path / "share-group"
    group_file.write_text("abc123\n")
    s = mqtt_settings(_options())
    assert (s.protocol, s.share_group) == (MQTT_311, None)  # the default is as it always was
    s = mqtt_settings(_options("--share-group-file", str(group_file), "--session-expiry", "30"))
    assert (s.protocol, s.share_group, s.session_expiry) == (MQTT_5, "abc123", 30)
    s = mqtt_settings(_options("--share-group-file", str(group_file), "--share-group", "other"))
    assert s.share_group == "other"  # the name given wins over the file (which sealmq.toml may name)
    assert mqtt_settings(_options("--mqtt-version", "5")).protocol == MQTT_5
    with pytest.raises(ConfigError):
        mqtt_settings(_options("--share-group", "g", "--mqtt-version", "3.1.1"))
    with pytest.raises(ConfigError):
        mqtt_settings(_options("--share-group", "a/b"))


def test_an_explicit_password_file_is_the_login_over_tls(tmp_path: Path) -> None:
    """A worker logs in with its own account even where its identity has a certificate."""
    ca, chain, key, pw = (tmp_path / n for n in ("ca.crt", "chain.pem", "key.pem", "w1.password"))
    for f in (ca, chain, key):
        f.write_text("x")
    pw.write_text("secret\n")
    s = mqtt_settings(_options("--tls", "--mqtt-password-file", str(pw), "--mqtt-username", "backend-w1"),
                      ca_file=ca, client_cert=(chain, key))
    assert (s.username, s.password, s.tls_ca, s.tls_cert, s.tls_key) == ("backend-w1", "secret", ca, None, None)
    s = mqtt_settings(_options("--tls"), password_file=pw, ca_file=ca, client_cert=(chain, key))
    assert (s.password, s.tls_cert) == (None, chain)  # without it: the certificate, as before
    with pytest.raises(ConfigError):
        mqtt_settings(_options("--mqtt-password-file", str(tmp_path / "missing")))
