"""What an operator sees from the real ``sealmq`` command: connection progress, exit codes, commands.

Every test runs the command line as a child process (``python -m app.cli``) against a real
embedded broker and real certificates made by ``sealmq bootstrap``'s code, and checks the exit code
of ``runtime/exits.py`` and the message. Nothing here asserts a duration: a bounded command is only
required to end (the ``subprocess`` timeout is a guard against a hang, not a measurement).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

import device.cli
from app import config as app_config
from app.bootstrap import Deployment, bootstrap
from app.cli import build_parser, main
from backend.service import BackendService, BackendSettings
from backend.storage import Storage, db_path
from broker.embedded import EmbeddedBroker, EmbeddedBrokerConfig
from broker.mosquitto_config import MosquittoOptions, write_config
from broker.passwd import load_users
from device.cli import _progress_printer
from runtime import exits
from runtime.mqtt import MqttLink, MqttSettings
from tests.brokers import MOSQUITTO, MosquittoProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
GUARD = 90  # seconds: a command that has not ended by then hangs (the bug this file is about)


def sealmq(*args: str, env: dict[str, str] | None = None, timeout: float = GUARD) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], check=False, cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@dataclass
class Site:
    dep: Deployment
    port: int

    @property
    def pki(self) -> str:
        return str(self.dep.pki)

    @property
    def data(self) -> str:
        return str(self.dep.backend_data)

    def state(self, device_id: str) -> str:
        return str(self.dep.device_state(device_id))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """dev-001..dev-003 enrolled; dev-003's broker password is wrong; an embedded broker runs."""
    dep, _ = bootstrap(tmp_path_factory.mktemp("deploy"), ["dev-001", "dev-002", "dev-003"], iterations=1000)
    (dep.password_file("device", "dev-003")).write_text("not-the-password\n")
    broker = EmbeddedBroker(EmbeddedBrokerConfig(passwd=dep.users, port=0)).start()
    try:
        yield Site(dep, broker.port)
    finally:
        broker.stop()


@pytest.fixture
def backend(site: Site) -> Iterator[BackendService]:
    service = BackendService(BackendSettings(
        pki_dir=site.dep.pki, data_dir=site.dep.backend_data, poll_interval=0.1,
        mqtt=MqttSettings(port=site.port, username="backend", password=site.dep.password("backend", "backend")),
    ))
    service.start()
    try:
        yield service
    finally:
        service.stop()


def wait_for(condition, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


# -- the broker is down ---------------------------------------------------------------------------
def test_device_run_with_broker_down_says_so_and_ends_at_connect_timeout(site: Site) -> None:
    port = str(free_port())
    r = sealmq("device", "run", "--pki", site.pki, "--id", "dev-001", "--state", site.state("dev-001"),
               "--port", port, "--count", "1", "--connect-timeout", "2")
    assert r.returncode == exits.UNREACHABLE, r.stderr
    assert f"connecting to 127.0.0.1:{port} as dev-001" in r.stderr
    assert f"cannot reach the broker at 127.0.0.1:{port} (attempt 1)" in r.stderr
    assert "sealmq: error: transport_failed: cannot reach the broker" in r.stderr


def test_device_run_count_bounds_the_wait_for_a_broker_by_default(site: Site, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`device run --count 1` with the broker down used to run forever: a count implies a limit
    (30 s; shortened here, in process, so that the test does not idle for it)."""
    monkeypatch.setattr(device.cli, "COUNTED_RUN_CONNECT_TIMEOUT", 1.5)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = main(["device", "run", "--pki", site.pki, "--id", "dev-001", "--state", site.state("dev-001"),
                     "--port", str(free_port()), "--count", "1"])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert code == exits.UNREACHABLE
    assert "cannot reach the broker" in capsys.readouterr().err


@pytest.mark.parametrize(("given", "expected"), [([], 64), (["--telemetry-batch", "1"], 1),
                                               (["--telemetry-batch", "17"], 17)])
def test_device_run_telemetry_batch_reaches_the_agent(site: Site, monkeypatch: pytest.MonkeyPatch,
                                                      given: list[str], expected: int) -> None:
    import device.agent

    seen: list[int] = []

    class Stop(Exception):
        pass

    def spy(config: device.agent.DeviceConfig, **_: object) -> None:
        seen.append(config.telemetry_batch)
        raise Stop

    monkeypatch.setattr(device.agent, "DeviceAgent", spy)
    with pytest.raises(Stop):
        main(["device", "run", "--pki", site.pki, "--id", "dev-001", "--state", site.state("dev-001"),
              "--port", str(free_port()), "--count", "1", *given])
    assert seen == [expected]


@pytest.mark.parametrize("bad", ["0", "65", "x"])
def test_device_run_refuses_a_telemetry_batch_outside_1_to_64(site: Site, bad: str) -> None:
    r = sealmq("device", "run", "--pki", site.pki, "--id", "dev-001", "--telemetry-batch", bad)
    assert r.returncode == 2
    assert "--telemetry-batch: a number of readings from 1 to 64" in r.stderr


def test_simulate_with_broker_down_ends_at_its_duration(site: Site) -> None:
    port = str(free_port())
    r = sealmq("device", "simulate", "--pki", site.pki, "--ids", "dev-001", "dev-002", "--state",
               str(site.dep.root / "devices"), "--duration", "2", "--port", port)
    assert r.returncode == exits.UNREACHABLE, r.stdout + r.stderr
    assert f"2 devices connecting to 127.0.0.1:{port}" in r.stdout
    assert "(attempt 1)" in r.stderr
    assert "cannot reach the broker" in r.stderr


def test_backend_run_with_broker_down_retries_visibly_until_stopped(site: Site, tmp_path: Path) -> None:
    port = str(free_port())
    r = sealmq("backend", "run", "--pki", site.pki, "--data", str(tmp_path / "b1"), "--port", port,
               "--connect-timeout", "2")
    assert r.returncode == exits.UNREACHABLE, r.stderr
    assert f"connecting to 127.0.0.1:{port} as backend" in r.stderr
    # without --connect-timeout it keeps retrying, and says so, until it is told to stop
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "backend", "run", "--pki", site.pki, "--data", str(tmp_path / "b2"),
         "--port", port], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        for line in proc.stderr:
            lines.append(line)
            if "(attempt 2)" in line:
                break
        assert any("(attempt 1)" in line for line in lines), lines
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=GUARD)
    assert proc.returncode == exits.OK, rest
    assert "reconnecting" not in rest


# -- a wrong password ---------------------------------------------------------------------------
WRONG = {"SEALMQ_MQTT_PASSWORD": "not-the-password"}


@pytest.mark.parametrize("command", ["device run", "device send", "device simulate", "backend run", "inspect"])
def test_a_refused_password_ends_every_command_with_code_4(site: Site, command: str, tmp_path: Path) -> None:
    args = {
        "device run": ["device", "run", "--pki", site.pki, "--id", "dev-001", "--state", str(tmp_path), "--count", "1"],
        "device send": ["device", "send", "--pki", site.pki, "--id", "dev-001", "--state", str(tmp_path),
                        str(ROOT / "img" / "checker.png")],
        # simulate reads each device's own mqtt.password: dev-003's is wrong
        "device simulate": ["device", "simulate", "--pki", site.pki, "--ids", "dev-003", "--state", str(tmp_path),
                            "--duration", "60"],
        "backend run": ["backend", "run", "--pki", site.pki, "--data", str(tmp_path)],
        "inspect": ["inspect", "--username", "monitor", "--password", "not-the-password", "--count", "1"],
    }[command]
    r = sealmq(*args, "--port", str(site.port), env=WRONG)
    assert r.returncode == exits.NOT_AUTHORIZED, r.stdout + r.stderr
    user = {"backend run": "backend", "inspect": "monitor", "device simulate": "dev-003"}.get(command, "dev-001")
    assert f"sealmq: error: not_authorized: the broker at 127.0.0.1:{site.port} refused user '{user}'" in r.stderr
    assert "(attempt" not in r.stderr  # no retry


# -- commands -----------------------------------------------------------------------------------
def test_a_command_for_an_unknown_device_is_refused(site: Site, backend: BackendService) -> None:
    for extra in ([], ["--pki", site.pki]):
        r = sealmq("backend", "command", "--data", site.data, *extra, "dev-042", "status")
        assert r.returncode == exits.USAGE, r.stdout + r.stderr
        assert "sealmq: error: unknown device: " in r.stderr
        assert "command not queued" in r.stderr
    assert backend.storage.commands(device_id="dev-042") == []


def test_a_command_for_an_offline_device_stays_queued_then_is_answered(site: Site, backend: BackendService) -> None:
    r = sealmq("backend", "command", "--data", site.data, "--pki", site.pki, "dev-002", "status")
    assert r.returncode == exits.OK, r.stderr
    assert "command " in r.stdout and "for dev-002: queued (enrolled, no handshake yet)" in r.stdout
    command_id = int(r.stdout.split()[1])
    ticks = backend.counters  # the backend keeps polling; the device has no session: nothing is sent
    time.sleep(0.5)
    listed = sealmq("backend", "commands", "--data", site.data, "--device", "dev-002")
    assert listed.returncode == exits.OK
    assert f"{command_id:>6} " in listed.stdout and " queued " in listed.stdout, listed.stdout
    assert ticks["sent"] == 0
    # the device comes online: the command is sent, answered, and the reply is shown
    run = sealmq("device", "run", "--pki", site.pki, "--id", "dev-002", "--state", site.state("dev-002"),
                 "--port", str(site.port), "--count", "2", "--interval", "0.5")
    assert run.returncode == exits.OK, run.stderr
    assert "disconnected from 127.0.0.1" in run.stderr
    assert "reconnecting" not in run.stderr  # a clean stop is not a lost connection
    assert wait_for(lambda: backend.storage.commands(command_id=command_id)[0].state == "replied")
    listed = sealmq("backend", "commands", "--data", site.data, "--state", "replied")
    line = next(x for x in listed.stdout.splitlines() if x.startswith(f"{command_id:>6} "))
    assert "dev-002" in line and " replied " in line and " ok {" in line and '"device": "dev-002"' in line
    assert "of " in listed.stdout.splitlines()[-1]


def test_command_wait_reports_no_reply_with_code_1(site: Site, backend: BackendService) -> None:
    r = sealmq("backend", "command", "--data", site.data, "--pki", site.pki, "dev-001", "ping", "--wait", "1")
    assert r.returncode == exits.INCOMPLETE, r.stdout + r.stderr
    assert "no reply to command" in r.stderr and "(state: queued)" in r.stderr


def test_messages_says_how_many_rows_it_shows(site: Site) -> None:
    store = Storage(db_path(site.dep.backend_data))
    try:
        for i in range(3):
            store.store_message("dev-001", time.time(), "telemetry", 0, 100 + i, b"\xa0")
    finally:
        store.close()
    r = sealmq("backend", "messages", "--data", site.data, "--device", "dev-001", "--limit", "2")
    assert r.returncode == exits.OK, r.stderr
    assert r.stdout.splitlines()[-1].startswith("(the newest 2 of ")
    assert "--limit N shows more" in r.stdout


def test_send_prints_whole_lines_when_not_a_terminal(site: Site, backend: BackendService) -> None:
    r = sealmq("device", "send", "--pki", site.pki, "--id", "dev-001", "--state", site.state("dev-001"),
               "--port", str(site.port), str(ROOT / "img" / "checker.png"))
    assert r.returncode == exits.OK, r.stdout + r.stderr
    assert "\r" not in r.stdout
    assert r.stdout.splitlines()[-1].endswith("100.0% done")


# -- the progress bar ---------------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _progress(acked: int, state: str = "sending") -> SimpleNamespace:
    return SimpleNamespace(transfer_id=b"t", name="clip.mp4", total_bytes=1000, acked_bytes=acked, state=state)


def test_progress_bar_redraws_on_a_terminal_and_writes_lines_elsewhere() -> None:
    steps = [_progress(a) for a in range(0, 1000, 50)] + [_progress(1000, "done")]
    tty, pipe = _Tty(), io.StringIO()
    for out in (tty, pipe):
        show = _progress_printer(out)
        for p in steps:
            show(p)
    assert tty.getvalue().count("\r") == len(steps)
    assert "\r" not in pipe.getvalue()
    lines = pipe.getvalue().splitlines()
    assert lines[0] == "clip.mp4   0.0% sending"
    assert lines[-1] == "clip.mp4 100.0% done"
    assert len(lines) == 5  # 0, 25, 50, 75 % and done: not one per acknowledgement


# -- help texts ---------------------------------------------------------------------------------
def _parsers(parser: argparse.ArgumentParser, path: str = "sealmq") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_option_of_every_command_says_what_it_is() -> None:
    missing = [
        f"{path} {'/'.join(a.option_strings) or a.dest}"
        for path, parser in _parsers(build_parser())
        for a in parser._actions
        if not a.help and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
    ]
    assert missing == []


# -- the demo -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_demo_reports_its_own_figures(tmp_path: Path) -> None:
    args = ("demo", "--dir", str(tmp_path / "demo"), "--duration", "2", "--port", "0", "--console", "off")
    first = sealmq(*args)
    assert first.returncode == exits.OK, first.stdout + first.stderr
    assert "created" in first.stdout.splitlines()[0]
    second = sealmq(*args)
    assert second.returncode == exits.OK, second.stdout + second.stderr
    out = second.stdout
    assert ": reused" in out.splitlines()[0]
    assert "kept from earlier runs:" in out
    sent = int(out.split("telemetry records sent ")[1].split(",")[0])
    stored = int(out.split("stored by the backend ")[1].split(" ")[0])
    in_all = int(out.split("stored by the backend ")[1].split("(")[1].split(" ")[0])
    assert 0 < stored <= sent  # this run's records, not the deployment's total
    assert in_all > stored


# -- sealmq.toml (SEALMQ_CONFIG) ----------------------------------------------------------------
def test_bootstrap_writes_sealmq_toml_whose_paths_become_the_defaults(tmp_path: Path) -> None:
    dep, created = bootstrap(tmp_path / "deploy", ["dev-001"], iterations=1000)
    assert "sealmq.toml" in created
    paths = app_config.load(dep.root / "sealmq.toml")
    assert (paths.pki, paths.data, paths.users) == (dep.pki, dep.backend_data, dep.users)

    def parse(*argv: str) -> argparse.Namespace:
        parser = build_parser()
        app_config.apply(parser, paths)
        args = parser.parse_args(argv)
        app_config.complete(args, paths)
        return args

    assert parse("device", "simulate").state == dep.root / "devices"
    run = parse("device", "run", "--id", "dev-001")
    assert (run.pki, run.state) == (dep.pki, dep.device_state("dev-001"))
    assert parse("backend", "run").data == dep.backend_data
    assert parse("broker", "run").passwd == dep.users
    seen = parse("inspect")
    assert (seen.username, seen.password_file) == ("monitor", dep.monitor_password_file)
    # a flag wins over the file
    assert parse("backend", "messages", "--data", "elsewhere").data == Path("elsewhere")
    assert parse("device", "run", "--id", "dev-001", "--state", "s").state == Path("s")
    # bootstrap keeps an existing file (the operator may have edited it)
    assert "sealmq.toml" not in bootstrap(dep.root, ["dev-001"], iterations=1000)[1]


def test_commands_take_their_paths_from_sealmq_config(tmp_path: Path) -> None:
    dep, _ = bootstrap(tmp_path / "deploy", ["dev-001"], iterations=1000)
    env = {"SEALMQ_CONFIG": str(dep.root / "sealmq.toml")}
    r = sealmq("backend", "command", "dev-001", "status", env=env)
    assert r.returncode == exits.OK, r.stderr
    assert "for dev-001: queued (enrolled, no handshake yet)" in r.stdout  # --pki came from the file
    listed = sealmq("backend", "commands", env=env)
    assert " dev-001 " in listed.stdout and " queued " in listed.stdout
    (tmp_path / "bad.toml").write_text('[deployment]\npki = 3\n')
    bad = sealmq("backend", "commands", env={"SEALMQ_CONFIG": str(tmp_path / "bad.toml")})
    assert bad.returncode == exits.USAGE
    assert "pki must be a non-empty string" in bad.stderr


# -- a refusal that is not about the credentials is retried -----------------------------------------
def test_server_unavailable_is_retried_not_final(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    """The embedded broker answers "server unavailable" to a login over its per-user bound: transient."""
    password = site.dep.password("device", "dev-001")
    with EmbeddedBroker(EmbeddedBrokerConfig(passwd=site.dep.users, port=0, max_connections_per_user=1)) as broker:
        holder = MqttLink(MqttSettings(port=broker.port, username="dev-001", password=password,
                                       client_id="dev-001:holder"), lambda t, p: None)
        holder.start()
        link = MqttLink(MqttSettings(port=broker.port, username="dev-001", password=password,
                                     client_id="dev-001:agent", reconnect_max_delay=1), lambda t, p: None)
        with caplog.at_level(logging.WARNING, logger="sealmq.mqtt"):
            link.start(wait=None)
            try:
                assert wait_for(lambda: "is unavailable" in caplog.text)
                assert link.error is None
                holder.stop()  # the slot frees: the retry gets in
                assert link.wait_connected(30)
            finally:
                link.stop()
                holder.stop()


def test_a_counted_run_without_a_backend_ends_with_code_1(site: Site, tmp_path: Path) -> None:
    """The broker is up but no backend answers: `device run --count` says so instead of waiting forever."""
    r = sealmq("device", "run", "--pki", site.pki, "--id", "dev-001", "--state", str(tmp_path), "--port",
               str(site.port), "--count", "1", "--session-timeout", "2")
    assert r.returncode == exits.INCOMPLETE, r.stderr
    assert "connected, but no session with the backend after 2 s" in r.stderr
    assert "0 telemetry records sent" in r.stdout


@pytest.mark.mosquitto
def test_a_refused_password_ends_device_run_on_mosquitto_too(site: Site, tmp_path: Path) -> None:
    if MOSQUITTO is None:
        pytest.skip("mosquitto binary not installed")
    port = free_port()
    conf_dir = Path(tempfile.mkdtemp(prefix="sealmq-mosquitto-"))  # reachable by `user mosquitto`
    try:
        write_config(conf_dir, load_users(site.dep.users), MosquittoOptions(host="127.0.0.1", port=port))
        proc = MosquittoProcess(conf_dir, port, tmp_path / "mosquitto.log").start()
        try:
            args = ("device", "run", "--pki", site.pki, "--id", "dev-001", "--state", str(tmp_path),
                    "--count", "1", "--port", str(port), "--session-timeout", "1")
            r = sealmq(*args, env=WRONG)
            control = sealmq(*args)  # the right password gets in (and finds no backend there)
        finally:
            proc.stop()
    finally:
        shutil.rmtree(conf_dir, ignore_errors=True)
    assert r.returncode == exits.NOT_AUTHORIZED, r.stderr
    assert f"the broker at 127.0.0.1:{port} refused user 'dev-001'" in r.stderr
    assert control.returncode == exits.INCOMPLETE, control.stderr
