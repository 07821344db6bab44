"""Run docker-compose.yml's services as plain child processes, the way the containers would run them.

There is no Docker engine on the build machine, so the deployment test reads the compose file and
the Dockerfile and reproduces what Docker would do: each service's command and environment
(``${VAR:-default}`` interpolated), named volumes mapped to temp directories at the service's mount
points, the image's installed scripts (Dockerfile ``COPY ... /usr/local/bin/...``) and the
``sealmq`` console script on PATH, service host names mapped to 127.0.0.1, and the published
port mapped to a free loopback port. Nothing here knows what a service does: a wrong path,
variable or argument in the compose file fails the test.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
MOSQUITTO_OVERRIDE = REPO / "docker" / "compose.mosquitto.yml"
DOCKERFILE = REPO / "Dockerfile"
# the broker's container ports: mqtts with client certificates, mqtts with passwords (the monitor)
CONTAINER_PORTS = ("8883", "8884")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` substitution, recursively."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def merge_service(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Compose's override rules for the keys we use: volumes merge by target, the rest replaces."""
    out = dict(base)
    for key, value in override.items():
        if key == "volumes":
            by_target = {v.split(":")[1]: v for v in base.get("volumes", [])}
            by_target.update({v.split(":")[1]: v for v in value})
            out[key] = list(by_target.values())
        elif key == "environment":
            out[key] = {**base.get("environment", {}), **value}
        else:
            out[key] = value
    return out


def load_compose(env: Mapping[str, str], override: Path | None = None,
                 profiles: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The services Compose would start with these ``profiles`` active (a service with ``profiles``
    only when one of them is)."""
    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text())["services"]
    if override is not None:
        for name, svc in yaml.safe_load(override.read_text())["services"].items():
            services[name] = merge_service(services[name], svc)
    services = {name: svc for name, svc in services.items()
                if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)}
    return interpolate(services, env)


def image_copies() -> dict[str, Path]:
    """Absolute path in the image -> source in the repo, from the Dockerfile's COPY lines."""
    out = {}
    for line in DOCKERFILE.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "COPY" and parts[2].startswith("/"):
            out[parts[2].rstrip("/")] = REPO / parts[1]
    return out


def image_scripts() -> dict[str, Path]:
    """The image's installed commands: COPY ... /usr/local/bin/NAME."""
    return {k: v for k, v in image_copies().items() if k.startswith("/usr/local/bin/")}


def startup_order(services: Mapping[str, dict[str, Any]]) -> list[str]:
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for dep in services[name].get("depends_on", {}):
            visit(dep)
        order.append(name)

    for name in services:
        visit(name)
    return order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Deployment:
    """The compose services mapped onto this machine (see the module docstring)."""

    root: Path
    services: dict[str, dict[str, Any]]
    ports: dict[str, int] = field(default_factory=lambda: {p: free_port() for p in CONTAINER_PORTS})
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bin = self.root / "image-bin"
        self.bin.mkdir(parents=True)
        for installed, source in image_scripts().items():
            (self.bin / Path(installed).name).symlink_to(source)
        # what `pip install .` puts on PATH: the console script
        sealmq = self.bin / "sealmq"
        sealmq.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m app.cli "$@"\n')
        sealmq.chmod(0o755)
        mosquitto = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin")
        if mosquitto:
            (self.bin / "mosquitto").symlink_to(mosquitto)
        self.logs = self.root / "logs"
        self.logs.mkdir()

    # -- mapping container paths, names and ports -------------------------------------------
    def volume_dir(self, volume: str) -> Path:
        path = self.root / "volumes" / volume
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def mounts(self, service: str) -> dict[str, Path]:
        """Container path -> host temp dir for the service's named volumes."""
        out = {}
        for spec in self.services[service].get("volumes", []):
            volume, target = spec.split(":")[:2]
            out[target] = self.volume_dir(volume)
        return out

    def map_token(self, service: str, token: str, *, host: bool = False) -> str:
        if host and token in self.services:  # a service's host name on the compose network
            return "127.0.0.1"
        if token == "0.0.0.0":
            return "127.0.0.1"
        if token.startswith("0.0.0.0:"):  # HOST:PORT (the console): loopback, any free port
            return "127.0.0.1:0"
        if token in self.ports:
            return str(self.ports[token])
        places = {**image_copies(), **self.mounts(service)}
        for target, host in sorted(places.items(), key=lambda kv: -len(kv[0])):
            if token == target or token.startswith(target + "/"):
                return str(host) + token[len(target):]
        return token

    def map_args(self, service: str, args: list[Any]) -> list[str]:
        """Map a command line; a value after --host/-h is a host name."""
        out: list[str] = []
        for arg in args:
            out.append(self.map_token(service, str(arg), host=bool(out) and out[-1] in {"--host", "-h"}))
        return out

    def map_shell(self, service: str, command: str) -> str:
        return " ".join(self.map_args(service, command.split(" ")))

    def command(self, service: str) -> list[str]:
        return self.map_args(service, self.services[service]["command"])

    def env(self, service: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEALMQ_")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = str(REPO)
        env["HOME"] = str(self.root)
        # in the image the pki service is uid 10001, not root: mosquitto then ignores `user` (no chown)
        env["SEALMQ_MOSQUITTO_RUN_AS"] = pwd.getpwuid(os.getuid()).pw_name
        for key, value in (self.services[service].get("environment") or {}).items():
            env[key] = self.map_token(service, str(value), host=key.endswith("_HOST"))
        return env

    def healthcheck(self, service: str) -> list[str] | None:
        test = (self.services[service].get("healthcheck") or {}).get("test")
        if not test:
            return None
        if test[0] == "CMD-SHELL":
            return ["/bin/sh", "-c", self.map_shell(service, test[1])]
        assert test[0] == "CMD"
        return self.map_args(service, test[1:])

    # -- running ---------------------------------------------------------------------------
    def run(self, args: list[str], service: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, env=self.env(service), capture_output=True, text=True, timeout=timeout,
                              check=False, cwd=self.root)

    def run_service(self, service: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """A one-shot service, to completion."""
        return self.run(self.command(service), service, timeout)

    def start(self, service: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{service}.log").open("wb")
        proc = subprocess.Popen(self.command(service), env=self.env(service), stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.root, start_new_session=True)
        log.close()
        self.procs[service] = proc
        return proc

    def healthy(self, service: str) -> bool:
        check = self.healthcheck(service)
        assert check is not None, f"{service} has no healthcheck"
        return self.run(check, service, timeout=15).returncode == 0

    def wait_healthy(self, service: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs.get(service)
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{service} exited with {proc.returncode}:\n{self.log(service)}")
            if self.healthy(service):
                return
            time.sleep(0.3)
        raise AssertionError(f"{service} not healthy after {timeout} s:\n{self.log(service)}")

    def log(self, service: str) -> str:
        path = self.logs / f"{service}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self, service: str, timeout: float = 10.0) -> int:
        """SIGTERM (what `docker compose stop` sends), then SIGKILL after the timeout."""
        proc = self.procs.pop(service)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        for service in list(self.procs):
            self.stop(service, timeout=5)


# ---------------------------------------------------------------------------------------------
# Tests of the compose files themselves (and of the helpers above).
# ---------------------------------------------------------------------------------------------
import pytest  # noqa: E402

COMPOSE_FILES = {"amqtt": [COMPOSE], "mosquitto": [COMPOSE, MOSQUITTO_OVERRIDE]}


def test_interpolate_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET}", env) == "x"
    assert interpolate("${SET:-d}", env) == "x"
    assert interpolate("${EMPTY:-d}", env) == "d"  # ':-' also replaces an empty value
    assert interpolate("${UNSET:-d}/${UNSET}", env) == "d/"
    assert interpolate({"a": ["${SET}", 3]}, env) == {"a": ["x", 3]}


def test_merge_service_replaces_mounts_by_target() -> None:
    merged = merge_service({"volumes": ["a:/x:ro", "b:/y"], "command": ["one"], "environment": {"K": "1"}},
                           {"volumes": ["a:/x"], "command": ["two"], "environment": {"L": "2"}})
    assert sorted(merged["volumes"]) == ["a:/x", "b:/y"]
    assert merged["command"] == ["two"]
    assert merged["environment"] == {"K": "1", "L": "2"}


@pytest.mark.parametrize("variant", sorted(COMPOSE_FILES))
def test_compose_config_validates(variant: str) -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (scripts/setup --test installs it)")
    args = [exe]
    for f in COMPOSE_FILES[variant]:
        args += ["-f", str(f)]
    result = subprocess.run([*args, "config"], capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
                            env={**os.environ, "SEALMQ_DEVICES": "5"})
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    # docker-compose 1.29 lists every service, those of inactive profiles too
    assert {n for n, svc in services.items() if not svc.get("profiles")} == {"pki", "broker", "backend", "simulator"}
    assert services["pki"]["environment"]["SEALMQ_DEVICES"] == "5"
    # docker-compose's own reading agrees with ours (so the end-to-end test runs what Docker runs)
    ours = load_compose({"SEALMQ_DEVICES": "5"}, MOSQUITTO_OVERRIDE if variant == "mosquitto" else None,
                        profiles=("scale",))
    for name, svc in services.items():
        assert [str(a) for a in svc.get("command") or []] == [str(a) for a in ours[name].get("command") or []], name
    broker = services["broker"]
    assert broker["image"] == ("eclipse-mosquitto:2" if variant == "mosquitto" else "sealmq:local")
    assert "build" not in broker  # an override must never build our Dockerfile under mosquitto's name
    # docker-compose 1.29 prints the short form, Compose v2 the long one
    ports = [p.removesuffix("/tcp") if isinstance(p, str) else f"{p['host_ip']}:{p['published']}:{p['target']}"
             for p in broker["ports"]]
    assert ports == ["127.0.0.1:8883:8883", "127.0.0.1:8884:8884"]


@pytest.mark.parametrize("variant", sorted(COMPOSE_FILES))
def test_compose_least_privilege(variant: str) -> None:
    services = load_compose({}, MOSQUITTO_OVERRIDE if variant == "mosquitto" else None, profiles=("scale",))
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        assert not svc.get("privileged"), name
        assert svc.get("cap_drop") == ["ALL"], name
        assert svc.get("read_only") is True, name
        for key, value in (svc.get("environment") or {}).items():
            # passwords come from files in volumes, never from the compose file
            assert "PASSWORD" not in key or key.endswith("_FILE"), f"{name}: {key}={value}"
    # Only the one-shot pki service ever mounts the volume that holds the CA key.
    holders = [name for name, svc in services.items() if any(v.startswith("pki:") for v in svc.get("volumes", []))]
    assert holders == ["pki"]
    # Running services mount their identity read-only.
    for name in ("backend", "simulator"):
        assert any(v.endswith(":/identity:ro") for v in services[name]["volumes"]), name


def test_compose_builds_one_image_and_mounts_only_image_dirs() -> None:
    services = load_compose({})
    assert [name for name, svc in services.items() if "build" in svc] == ["pki"]
    made = re.search(r"install -d .*?((?:/\S+ ?)+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert made is not None
    image_dirs = set(made.group(1).split())
    for name, svc in services.items():
        for spec in svc.get("volumes", []):
            # a fresh named volume takes the ownership of the image's directory: it must exist there
            assert spec.split(":")[1] in image_dirs, f"{name} mounts {spec} on a path the image does not create"


def test_startup_order_follows_depends_on() -> None:
    order = startup_order(load_compose({}))
    assert order.index("pki") < order.index("broker") < order.index("backend") < order.index("simulator")


# -- profile `scale` (docs/scaling.md) -------------------------------------------------------------
SCALE_SERVICES = {"backend-w1", "backend-w2", "backend-w3", "state", "db"}


def _option(command: list[str], flag: str) -> str:
    return str(command[command.index(flag) + 1])


def test_compose_scale_profile_validates() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (scripts/setup --test installs it)")
    result = subprocess.run([exe, "-f", str(COMPOSE), "-f", str(MOSQUITTO_OVERRIDE), "--profile", "scale", "config"],
                            capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {n for n, svc in services.items() if "scale" in (svc.get("profiles") or [])} == SCALE_SERVICES
    ours = load_compose({}, MOSQUITTO_OVERRIDE, profiles=("scale",))
    for name in SCALE_SERVICES:
        assert [str(a) for a in services[name].get("command") or []] == \
            [str(a) for a in ours[name].get("command") or []], name
    # without the profile, none of them runs
    assert not SCALE_SERVICES & set(load_compose({}, MOSQUITTO_OVERRIDE))


def test_compose_scale_workers_each_have_their_own_account_in_one_share_group() -> None:
    services = load_compose({}, MOSQUITTO_OVERRIDE, profiles=("scale",))
    workers = sorted(n for n in services if n.startswith("backend-w"))
    assert workers == ["backend-w1", "backend-w2", "backend-w3"]
    commands = [services[w]["command"] for w in workers]
    # the pki service makes at least as many worker accounts as there are worker services
    assert int(services["pki"]["environment"]["SEALMQ_WORKERS"]) >= len(workers)
    assert [_option(c, "--mqtt-username") for c in commands] == workers
    assert [_option(c, "--mqtt-password-file") for c in commands] == \
        [f"/identity/backend/backend/workers/{w}.password" for w in workers]
    assert {_option(c, "--share-group-file") for c in commands} == {"/identity/backend/backend/share-group"}
    assert {_option(c, "--db") for c in commands} == {"postgresql://sealmq@db/sealmq"}  # no password in it
    assert {_option(c, "--state") for c in commands} == {"redis://state:6379/0"}
    assert all("--share-group" not in c for c in commands)  # the group name never on a command line
    # one primary (media, commands, update pushes); the others --secondary, so media is never served twice
    assert ["--secondary" in c for c in commands] == [False, True, True]
    for w in workers:
        env = services[w]["environment"]
        # the worker account's password login: the broker's TLS password listener
        assert env["SEALMQ_MQTT_PORT"] == "8884" and env["SEALMQ_MQTT_TLS"] == "1"
        assert env["PGPASSFILE"].startswith("/identity/")
        assert set(services[w]["networks"]) == {"default", "state"}
        assert "backend-identity:/identity:ro" in services[w]["volumes"]
    # Valkey and PostgreSQL: only on the internal network with the workers, nothing published
    assert yaml.safe_load(COMPOSE.read_text())["networks"]["state"]["internal"] is True
    for name in ("state", "db"):
        assert services[name]["networks"] == ["state"] and not services[name].get("ports"), name
    for name in ("broker", "simulator", "pki"):
        assert "state" not in (services[name].get("networks") or []), name
    assert services["db"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/secrets/password"
