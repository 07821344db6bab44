"""docker-compose.yml end to end, without Docker: the services' own commands as child processes.

What runs is read from docker-compose.yml (and docker/compose.mosquitto.yml) by
tests/test_deploy_compose.py's ``Deployment``: commands, environment, volumes mapped to temp
directories, depends_on order and conditions, health checks. The wildcard monitor is the
walk-through's own command (docs/docker.md): ``mosquitto_sub --cafile ... -p 8884 ... -t 'sealmq/#' -v -F '%t %x'``,
over TLS with the monitor's password; devices and backend log in with their certificates on 8883.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.test_deploy_compose import MOSQUITTO_OVERRIDE, Deployment, load_compose, startup_order

SIM_SECONDS = "6"


def _monitor_command(dep: Deployment) -> list[str]:
    deploy = dep.mounts("pki")["/pki"]
    password = (deploy / "broker" / "monitor.password").read_text().strip()
    return ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(dep.ports["8884"]), "--cafile",
            str(deploy / "pki" / "ca" / "ca.crt"), "-i", "monitor:walkthrough",
            "-u", "monitor", "-P", password, "-t", "sealmq/#", "-v", "-F", "%t %x"]


def _media_cli_exists(dep: Deployment) -> bool:
    return dep.run(["sealmq", "backend", "media", "--help"], "backend").returncode == 0


def _satisfy(dep: Deployment, service: str, condition: str) -> None:
    """Wait for what `depends_on: {service: {condition: ...}}` waits for."""
    if condition == "service_completed_successfully":
        return  # one-shot services are run to completion when started (below)
    if condition == "service_healthy":
        dep.wait_healthy(service, timeout=40)
        return
    raise AssertionError(f"unexpected depends_on condition {condition}")


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", ["amqtt", "mosquitto"])
def test_compose_services_end_to_end(tmp_path: Path, variant: str) -> None:
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub (mosquitto-clients) is needed for the walk-through's monitor")
    override = MOSQUITTO_OVERRIDE if variant == "mosquitto" else None
    services = load_compose({"SEALMQ_DEVICES": "2", "SEALMQ_SIM_DURATION": SIM_SECONDS,
                             "SEALMQ_SIM_INTERVAL": "0.5"}, override)
    dep = Deployment(tmp_path, services)
    if variant == "mosquitto" and not (dep.bin / "mosquitto").exists():
        pytest.skip("mosquitto is not installed")
    order = startup_order(services)
    conditions = {dep_name: cond["condition"] for svc in services.values()
                  for dep_name, cond in (svc.get("depends_on") or {}).items()}
    one_shot = {name for name, svc in services.items() if svc.get("restart") == "no"}
    monitor: subprocess.Popen[bytes] | None = None
    monitor_log = tmp_path / "monitor.log"
    try:
        assert not dep.healthy("broker"), "the broker's health check passes with no broker running"
        for name in order:
            if name in one_shot:
                result = dep.run_service(name)
                assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr}"
            elif name == "simulator":
                break  # last: started below, once the monitor listens
            else:
                dep.start(name)
            if name in conditions:
                _satisfy(dep, name, conditions[name])
            if name == "broker":
                if variant == "mosquitto":  # the generated OpenSSL settings (no TLS tickets) are found
                    assert "NumTickets = 0" in Path(dep.env("broker")["OPENSSL_CONF"]).read_text()
                with monitor_log.open("wb") as out:
                    monitor = subprocess.Popen(_monitor_command(dep), stdout=out, stderr=subprocess.STDOUT)
        assert order[-1] == "simulator"
        time.sleep(0.5)  # the monitor's SUBACK
        started = time.monotonic()
        sim_args = dep.services["simulator"]["command"]
        sim = dep.run_service("simulator", timeout=90)
        assert sim.returncode == 0, f"simulator:\n{sim.stdout}\n{sim.stderr}"
        assert "2/2 devices completed their handshakes" in sim.stdout, sim.stdout
        assert time.monotonic() - started < 40
        time.sleep(1.0)  # the last records reach the backend

        backend_data = dep.mounts("backend")["/data"]
        listing = dep.run(["sealmq", "backend", "messages", "--data", str(backend_data), "--limit", "1000"], "backend")
        assert listing.returncode == 0, listing.stderr
        stored_lines = [ln for ln in listing.stdout.splitlines() if "seq=" in ln]
        for device in ("dev-001", "dev-002"):
            assert sum(device in ln for ln in stored_lines) >= 3, listing.stdout
        assert "temperature_c" in listing.stdout  # the backend opened the records
        images: list[bytes] = []
        if _media_cli_exists(dep):
            from device.simulator import media_files

            image_dir = Path(dep.map_token("simulator", sim_args[sim_args.index("--images") + 1]))
            images = [p.read_bytes() for p in media_files(image_dir)]
            assert len(images) >= 3
            assert "media transfers all complete" in sim.stdout, sim.stdout
            media = dep.run(["sealmq", "backend", "media", "--data", str(backend_data)], "backend")
            assert media.returncode == 0, media.stderr
            rows = [ln for ln in media.stdout.splitlines() if "sha256=" in ln]
            for device in ("dev-001", "dev-002"):
                verified = [ln for ln in rows if device in ln and "signature verified" in ln]
                assert len(verified) == len(images), media.stdout
                for image in images:  # arrived intact
                    assert any(f"sha256={hashlib.sha256(image).hexdigest()[:16]}" in ln for ln in verified)
            assert "NOT VERIFIED" not in media.stdout

        # the console answers on the port the backend printed, with the operator's password only
        console = re.search(r"console: (http://127\.0\.0\.1:\d+/)", dep.log("backend"))
        assert console is not None, dep.log("backend")
        password = (dep.mounts("pki")["/pki"] / "console.password").read_text().strip()
        with httpx.Client(base_url=console.group(1), timeout=10) as http:
            assert http.get("/metrics").status_code == 401
            metrics = http.get("/metrics", headers={"Authorization": f"Bearer {password}"})
            assert metrics.status_code == 200
            assert re.search(r'^sealmq_backend_records_opened_total\{kind="telemetry"\} [1-9]', metrics.text, re.M)
            devices = http.get("/api/devices", headers={"Authorization": f"Bearer {password}"}).json()
            assert {d["id"] for d in devices["devices"]} >= {"dev-001", "dev-002"}
            # its broker view logged in as its own monitor user, beside the walk-through's mosquitto_sub
            broker_view = http.get("/api/broker", headers={"Authorization": f"Bearer {password}"}).json()
            assert broker_view["broker_view"] == "" and broker_view["broker"], broker_view

        from backend.storage import Storage, db_path

        store = Storage(db_path(backend_data))
        try:
            plaintexts = [m.payload for m in store.messages(None, limit=10_000)]
        finally:
            store.close()
        assert len(plaintexts) == len(stored_lines)

        # docs/docker.md's `sealmq inspect` (the monitor's password, over TLS) once mosquitto_sub, the
        # same login, is done (Mosquitto keeps one connection per login)
        assert monitor is not None
        monitor.send_signal(signal.SIGINT)
        monitor.wait(5)
        monitor = None
        inspect = dep.run(dep.map_args("pki", [
            "sealmq", "inspect", "--host", "broker", "--port", "8884", "--tls-ca", "/pki/pki/ca/ca.crt",
            "--username", "monitor", "--password-file", "/pki/broker/monitor.password", "--count", "1",
            "--timeout", "2"]), "pki")
        assert inspect.returncode == 0, inspect.stderr
        assert "# subscribed to sealmq/# on 127.0.0.1:" in inspect.stdout
    finally:
        if monitor is not None:
            monitor.send_signal(signal.SIGINT)
            try:
                monitor.wait(5)
            except subprocess.TimeoutExpired:
                monitor.kill()
                monitor.wait(5)
        codes = {name: dep.stop(name) for name in list(reversed(order)) if name in dep.procs}
        dep.stop_all()

    # every long-running service stops cleanly on SIGTERM (what `docker compose stop` sends)
    assert codes == {"backend": 0, "broker": 0}, {n: dep.log(n) for n in codes}

    seen = [line.split(" ", 1) for line in monitor_log.read_text().splitlines() if line.startswith("sealmq/")]
    topics = {topic for topic, _ in seen}
    for device in ("dev-001", "dev-002"):
        assert f"sealmq/v1/{device}/hs/up" in topics, topics
        assert f"sealmq/v1/{device}/data/up" in topics, topics
    data_up = [bytes.fromhex(payload) for topic, payload in seen if topic.endswith("/data/up")]
    assert len(data_up) >= len(plaintexts)
    everything = b"".join(bytes.fromhex(payload) for _, payload in seen)
    assert b"temperature_c" not in everything and b"humidity" not in everything
    for plaintext in plaintexts:
        assert plaintext not in everything, "a stored plaintext crossed the broker in clear"
    if images:
        assert any("/media/up" in topic for topic in topics), topics
        assert b"\x89PNG" not in everything and b"IDAT" not in everything
        for image in images:  # no 32-byte piece of any image, at any of several offsets
            for offset in range(0, len(image) - 32, max(1, len(image) // 8)):
                assert image[offset:offset + 32] not in everything
