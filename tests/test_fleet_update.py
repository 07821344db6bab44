"""Signed updates to devices (issue 16), end to end over real brokers with the real backend and
device code: a release-signed package pushed by the backend is installed; it survives a broker and
a device restart mid-transfer; a downgrade, a package for another device or class, one signed by
another key and a corrupted payload are each refused, reported back sealed and audited on both
sides; the broker never relays a payload byte.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.service import BackendService, BackendSettings
from backend.update import push
from device.agent import DeviceAgent
from pki import release
from sealmq import update
from sealmq.errors import Reason, SealmqError
from tests.brokers import needs_mosquitto
from tests.e2e import Recorder, System, wait_for

DEVICE = "cam-1"


BROKERS = ["amqtt", pytest.param("mosquitto", marks=[pytest.mark.mosquitto, needs_mosquitto])]


@pytest.fixture
def system(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[System]:
    s = System(tmp_path, [DEVICE, "cam-2"], broker=getattr(request, "param", "amqtt"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def release_dir(tmp_path: Path) -> Path:
    d = tmp_path / "release-offline"
    release.init_release_key(d)
    return d


def _install_release_key(system: System, release_dir: Path, device_id: str = DEVICE) -> None:
    pub = (release_dir / release.RELEASE_PUB).read_bytes()
    (system.dep.pki / "devices" / device_id / release.RELEASE_PUB).write_bytes(pub)


def _package(release_dir: Path, tmp: Path, *, version: int, size: int = 50_000, devices: tuple[str, ...] = (DEVICE,),
             device_class: str | None = None, name: str = "fw") -> tuple[Path, bytes]:
    payload = os.urandom(size)
    src = tmp / f"{name}-{version}.bin"
    src.write_bytes(payload)
    out = tmp / f"{name}-{version}.pkg"
    release.sign_package(release_dir, src, out, version=version, kind="firmware",
                         device_class=device_class, devices=() if device_class else devices, force=True)
    return out, payload


def _installed(agent: DeviceAgent) -> int:
    return agent.updates.installed_version


def _backend_events(system: System, name: str) -> list[dict]:
    return [e for e in system.audit() if e["event"] == name]


def _device_events(system: System, name: str, device_id: str = DEVICE) -> list[dict]:
    from runtime.audit import read_audit

    return [e for e in read_audit(system.dep.device_state(device_id) / "device_log.jsonl") if e["event"] == name]


def test_a_signed_update_is_installed_and_the_broker_sees_no_payload(system: System, release_dir: Path,
                                                                     tmp_path: Path) -> None:
    _install_release_key(system, release_dir)
    got: list[tuple[int, bytes]] = []
    recorder = Recorder(system)
    system.start_backend()
    agent = system.agent(DEVICE, start=False)
    agent.updates.installer = lambda m, path: got.append((m.version, path.read_bytes()))
    agent.start()
    assert agent.wait_established(10)
    pkg, payload = _package(release_dir, tmp_path, version=3)
    push(system.dep.backend_data, DEVICE, pkg)
    assert wait_for(lambda: _installed(agent) == 3, timeout=20)
    assert got == [(3, payload)]  # the hook saw the verified payload, once
    assert wait_for(lambda: bool(_backend_events(system, "update_installed")))
    assert _backend_events(system, "update_installed")[0]["version"] == 3
    assert not list((system.dep.backend_data / "updates" / "outgoing").glob("*.pkg"))
    time.sleep(0.2)
    relayed = recorder.snapshot()
    recorder.stop()
    assert any("/media/down" in t for t, _ in relayed)
    for _topic, body in relayed:
        for i in range(0, len(payload) - 32, 4096):
            assert payload[i:i + 32] not in body


def _start_small_chunk_backend(system: System) -> BackendService:
    """Many small chunks, few in flight, quick re-offers: restarts land mid-transfer."""
    svc = BackendService(BackendSettings(pki_dir=system.dep.pki, data_dir=system.dep.backend_data,
                                         mqtt=system.mqtt("backend", "backend"), poll_interval=0.1,
                                         update_chunk_size=4096, update_window=2, update_resend_after=1.0))
    svc.start()
    system.backend = svc
    return svc


@pytest.mark.parametrize("system", BROKERS, indirect=True)
def test_an_update_survives_broker_backend_and_device_restarts_mid_transfer(system: System, release_dir: Path,
                                                                       tmp_path: Path) -> None:
    _install_release_key(system, release_dir)
    _start_small_chunk_backend(system)
    agent = system.agent(DEVICE)
    pkg, payload = _package(release_dir, tmp_path, version=7, size=1_200_000)
    chunks = update.chunk_count(len(payload), 4096)
    push(system.dep.backend_data, DEVICE, pkg)

    def progress() -> int:
        if agent.updates.installed_version == 7:
            return chunks
        cur = agent.updates._current
        return cur[2] if cur is not None else 0

    assert wait_for(lambda: progress() >= 10, timeout=20)
    system.restart_broker()
    at_broker_restart = progress()
    assert at_broker_restart < chunks
    assert wait_for(lambda: progress() > at_broker_restart + 10, timeout=30)
    # the backend restarts mid-transfer: it finds the package in its outgoing folder and offers it again
    before_backend_restart = progress()
    system.stop_backend()
    _start_small_chunk_backend(system)
    assert wait_for(lambda: progress() > before_backend_restart + 5, timeout=30)
    # the device stops mid-transfer and comes back: it resumes where its files say, not from 0
    agent.stop()
    stopped_at = progress()
    assert 0 < stopped_at < chunks
    agent2 = system.agent(DEVICE)
    assert wait_for(lambda: _installed(agent2) == 7, timeout=60)
    offered = _device_events(system, "update_offered")
    assert any(e["resume_at"] >= stopped_at - 1 and e["resume_at"] > 0 for e in offered)
    assert wait_for(lambda: bool(_backend_events(system, "update_installed")))


@pytest.mark.parametrize("case", ["downgrade", "other-device", "other-class", "other-key", "corrupt"])
def test_refused_updates_are_reported_and_audited(system: System, release_dir: Path, tmp_path: Path,
                                                  case: str) -> None:
    _install_release_key(system, release_dir)
    (system.dep.device_state(DEVICE) / "updates").mkdir(parents=True, exist_ok=True)
    (system.dep.device_state(DEVICE) / "updates" / "installed.json").write_text('{"version": 5}')
    installs: list[int] = []
    system.start_backend()
    agent = system.agent(DEVICE, start=False)
    agent.updates.device_class = "cam-v2"
    agent.updates.installer = lambda m, path: installs.append(m.version)
    agent.start()
    assert agent.wait_established(10)
    expected = {"downgrade": Reason.DOWNGRADE, "other-device": Reason.WRONG_TARGET,
                "other-class": Reason.WRONG_TARGET, "other-key": Reason.BAD_SIGNATURE,
                "corrupt": Reason.HASH_MISMATCH}[case]
    if case == "downgrade":
        pkg, _ = _package(release_dir, tmp_path, version=5)
    elif case == "other-device":
        pkg, _ = _package(release_dir, tmp_path, version=6, devices=("cam-2",))
        with pytest.raises(SealmqError):  # the backend itself refuses to push it to cam-1...
            push(system.dep.backend_data, DEVICE, pkg)
        # ... so a compromised backend would drop it in by hand
    elif case == "other-class":
        pkg, _ = _package(release_dir, tmp_path, version=6, device_class="thermo-v1")
    elif case == "other-key":
        rogue = tmp_path / "rogue"
        release.init_release_key(rogue)
        pkg, _ = _package(rogue, tmp_path, version=6, name="rogue")
    else:
        pkg, _ = _package(release_dir, tmp_path, version=6)
    out = system.dep.backend_data / "updates" / "outgoing"
    out.mkdir(parents=True, exist_ok=True)
    data = pkg.read_bytes()
    if case == "corrupt":
        # what a compromised backend or a broken disk would send: same manifest, other payload. The
        # backend's own push refuses it; the device must refuse it too when it arrives.
        signed, payload = update.decode_package(data)
        bad = bytearray(payload)
        bad[len(bad) // 2] ^= 1
        with pytest.raises(SealmqError):
            update.decode_package(update.encode_package(signed.raw, bytes(bad)))
        backend = system.backend
        assert backend is not None
        with backend._lock:  # the service's timer cannot send a chunk before the swap
            (out / f"{DEVICE}.pkg").write_bytes(data)
            backend.updates._scan()
            backend.updates.transfers[DEVICE].payload = bytes(bad)  # the bytes that travel
    else:
        (out / f"{DEVICE}.pkg").write_bytes(data)
    assert wait_for(lambda: bool(_backend_events(system, "update_rejected")), timeout=20)
    rejected = _backend_events(system, "update_rejected")[0]
    assert rejected["reason"] == expected.value and rejected["stage"] == "device"
    assert _device_events(system, "update_rejected")[0]["reason"] == expected.value
    assert installs == [] and _installed(agent) == 5
    assert not (out / f"{DEVICE}.pkg").exists()


def test_a_device_without_a_release_key_refuses_every_update(system: System, release_dir: Path,
                                                               tmp_path: Path) -> None:
    system.start_backend()
    agent = system.agent(DEVICE)
    assert agent.updates.release_key is None
    pkg, _ = _package(release_dir, tmp_path, version=1)
    push(system.dep.backend_data, DEVICE, pkg)
    assert wait_for(lambda: bool(_backend_events(system, "update_rejected")), timeout=20)
    assert _backend_events(system, "update_rejected")[0]["reason"] == Reason.NOT_AUTHORIZED.value
    assert _installed(agent) == 0


def test_release_key_cli_and_backend_push_cli(tmp_path: Path) -> None:
    from app.cli import main

    keys_dir = tmp_path / "offline"
    assert main(["pki", "release-key", "init", "--dir", str(keys_dir)]) == 0
    assert (keys_dir / release.RELEASE_KEY).stat().st_mode & 0o777 == 0o600
    assert main(["pki", "release-key", "init", "--dir", str(keys_dir)]) == 2  # no silent overwrite
    backend_dir = tmp_path / "backend"
    (backend_dir / "audit").mkdir(parents=True)
    assert main(["pki", "release-key", "init", "--dir", str(backend_dir)]) == 2  # not where the backend is
    fw = tmp_path / "fw.bin"
    fw.write_bytes(b"firmware" * 1000)
    pkg = tmp_path / "fw.pkg"
    assert main(["pki", "release-key", "sign", str(fw), "--dir", str(keys_dir), "--version", "2",
                 "--class", "cam-v2", "--out", str(pkg)]) == 0
    assert main(["pki", "release-key", "sign", str(fw), "--dir", str(keys_dir), "--version", "2",
                 "--out", str(tmp_path / "x.pkg")]) == 2  # a target is required
    signed = update.verify_signed_manifest(update.decode_package(pkg.read_bytes())[0].raw,
                                           release.load_public(keys_dir / release.RELEASE_PUB))
    assert signed.manifest.version == 2 and signed.manifest.device_class == "cam-v2"
    assert signed.manifest.digest == hashlib.sha256(fw.read_bytes()).digest()
    assert main(["backend", "push", "--data", str(backend_dir), "cam-1", str(pkg)]) == 0
    assert (backend_dir / "updates" / "outgoing" / "cam-1.pkg").read_bytes() == pkg.read_bytes()
    pkg.write_bytes(pkg.read_bytes()[:-10])  # truncated
    assert main(["backend", "push", "--data", str(backend_dir), "cam-2", str(pkg)]) == 2


def test_a_stalled_transfer_asks_again(tmp_path: Path, release_dir: Path) -> None:
    """The device side alone: no chunk for stall_after seconds -> NEED again (after a backend restart
    that lost the transfer, this reaches a backend without our session, which makes us re-handshake)."""
    from device.update import UpdateReceiver
    from runtime.audit import AuditLog
    from sealmq.topics import RecordKind

    audit = AuditLog(tmp_path / "log.jsonl", component="device")
    receiver = UpdateReceiver(tmp_path / "state", DEVICE, audit, stall_after=10.0,
                              release_key=release.load_public(release_dir / release.RELEASE_PUB))
    pkg, payload = _package(release_dir, tmp_path, version=1, size=3000)
    signed, _ = update.decode_package(pkg.read_bytes())
    offer = update.Offer(signed.tid, signed.raw, 1000).encode()
    assert receiver.tick(100.0) == []  # nothing in progress
    (kind, body), = receiver.handle(RecordKind.UPDATE_OFFER, offer, 100.0)
    assert update.decode_status(body) == update.Status(signed.tid, update.UpdateState.NEED, 0)
    assert receiver.tick(105.0) == []
    (kind, body), = receiver.tick(111.0)
    assert kind is RecordKind.UPDATE_STATUS and update.decode_status(body).next == 0
    receiver.handle(RecordKind.UPDATE_CHUNK, update.UpdateChunk(signed.tid, 0, payload[:1000]).encode(), 112.0)
    assert receiver.tick(121.0) == []  # activity resets the timer
    (_, body), = receiver.tick(122.5)
    assert update.decode_status(body).next == 1
    audit.close()
