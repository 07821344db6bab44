"""Issue 19, at rest: what the backend and a device leave on disk is theirs alone (0700
directories, 0600 files, SQLite's -wal/-shm included), a CRL never goes backwards (a restored
older CRL does not re-admit a revoked device, across restarts), and a device reloads its CRL."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from backend.service import BackendService, BackendSettings
from backend.storage import Storage
from device.agent import DeviceAgent, DeviceConfig
from pki import layout, store
from runtime.audit import AuditLog
from runtime.mqtt import MqttSettings
from sealmq.errors import CertificateError, Reason
from sealmq.identity import Role
from tests.e2e import System, wait_for
from tests.pki_fixtures import make_pki


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _loose(root: Path) -> list[str]:
    """Every path under ``root`` (root included) that grants anything to group or others."""
    found = []
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        if mode & 0o077:
            found.append(f"{p.relative_to(root.parent)} {mode:o}")
    return found


def test_backend_and_device_files_are_private_under_umask_022(tmp_path: Path, umask_022: None) -> None:
    system = System(tmp_path, ["cam-1"])
    try:
        system.start_backend()
        agent = system.agent("cam-1")
        agent.send_telemetry({"temp": 21.5})
        src = tmp_path / "pic.jpg"
        src.write_bytes(os.urandom(50_000))
        agent.send_file(src)
        assert agent.wait_transfers(20)
        backend = system.backend
        assert backend is not None
        assert wait_for(lambda: backend.storage.count_messages("cam-1") == 1)
        data = system.dep.backend_data
        names = {p.name for p in data.rglob("*")}
        assert {"backend.sqlite3", "backend.sqlite3-wal", "server_log.jsonl", "pic.jpg"} <= names
        state = system.dep.device_state("cam-1")
        assert (state / "device_log.jsonl").exists()
        assert _loose(data) == []
        assert _loose(state) == []
    finally:
        system.close()


# --- CRLs: never backwards, reloaded by devices too ---------------------------------------------
def _replace_crl(pki: Path, data: bytes, stamp: float) -> None:
    """Put ``data`` at ``ca/crl.pem`` with a distinct mtime (what the file watches look at)."""
    path = layout.crl(pki)
    path.write_bytes(data)
    os.utime(path, (stamp, stamp))


def _backend(pki: Path, data: Path) -> BackendService:
    return BackendService(BackendSettings(pki_dir=pki, data_dir=data, mqtt=MqttSettings(port=1)))


def test_a_restored_older_crl_does_not_readmit_a_revoked_device(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    tp = make_pki(pki, ["dev-1", "dev-2"])
    revoked_chain = tp.identity("device", "dev-1").chain
    old_crl = layout.crl(pki).read_bytes()  # number 1, validly signed, valid for 30 days
    data = tmp_path / "backend"
    svc = _backend(pki, data)
    now = datetime.now(UTC)
    svc.endpoint.trust_store.verify(revoked_chain, role=Role.DEVICE, now=now)

    store.revoke(pki, cert_path=layout.device_dir(pki, "dev-1") / layout.CERT)
    os.utime(layout.crl(pki), (time.time() + 10, time.time() + 10))
    svc._reload_crl()
    with pytest.raises(CertificateError) as revoked:
        svc.endpoint.trust_store.verify(revoked_chain, role=Role.DEVICE, now=now)
    assert revoked.value.reason is Reason.REVOKED

    _replace_crl(pki, old_crl, time.time() + 20)  # the attacker's rollback
    svc._reload_crl()
    with pytest.raises(CertificateError):
        svc.endpoint.trust_store.verify(revoked_chain, role=Role.DEVICE, now=now)
    failed = [e for e in svc.audit.counts if e == "crl_reload_failed"]
    assert failed == ["crl_reload_failed"]
    svc.storage.close()
    svc.audit.close()

    # a restart remembers: the mark is in the data directory, and the old CRL is refused
    marks = data / store.CRL_SEEN_FILE
    assert stat.S_IMODE(marks.stat().st_mode) == 0o600
    with pytest.raises(CertificateError) as refused:
        _backend(pki, data)
    assert refused.value.reason is Reason.CRL_INVALID and "rollback" in refused.value.detail
    # the same CRL again, or a newer one, is fine
    store.issue_crl(pki)
    _backend(pki, data).storage.close()


def test_the_crl_high_water_mark_moves_only_for_a_validly_signed_crl(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    make_pki(pki, ["dev-1"])
    other = tmp_path / "other"
    make_pki(other, [])
    for _ in range(3):  # another CA's CRL with a higher number
        store.issue_crl(other)
    marks = tmp_path / "state" / store.CRL_SEEN_FILE
    store.load_trust_store(pki, crl_seen=marks)
    before = marks.read_bytes()
    forged = layout.crl(pki).read_bytes() + layout.crl(other).read_bytes()
    layout.crl(pki).write_bytes(forged)
    store.load_trust_store(pki, crl_seen=marks)
    assert marks.read_bytes() == before
    marks.write_text("{not json")
    with pytest.raises(CertificateError) as garbage:
        store.load_trust_store(pki, crl_seen=marks)
    assert garbage.value.reason is Reason.CRL_INVALID


def test_a_device_reloads_its_crl_when_it_changes(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    tp = make_pki(pki, ["dev-1"])
    backend_chain = tp.identity("backend", "backend").chain
    old_crl = layout.crl(pki).read_bytes()
    config = DeviceConfig(device_id="dev-1", identity_dir=layout.device_dir(pki, "dev-1"), pki_dir=pki,
                          state_dir=tmp_path / "dev-1", mqtt=MqttSettings(port=1))
    agent = DeviceAgent(config)
    later = datetime.now(UTC) + timedelta(days=31)  # the CRL the agent loaded has expired by then
    with pytest.raises(CertificateError) as stale:
        agent.endpoint.trust_store.verify(backend_chain, role=Role.BACKEND, now=later)
    assert stale.value.reason is Reason.CRL_INVALID

    store.issue_crl(pki, now=later - timedelta(days=1))  # the CA's cron published a fresh one
    os.utime(layout.crl(pki), (time.time() + 10, time.time() + 10))
    agent._before_tick()  # what the agent's timer does on every tick
    agent.endpoint.trust_store.verify(backend_chain, role=Role.BACKEND, now=later)
    assert agent.audit.counts.get("crl_reloaded") == 1

    _replace_crl(pki, old_crl, time.time() + 20)  # rolled back: refused, the fresh one stays
    agent._before_tick()
    agent.endpoint.trust_store.verify(backend_chain, role=Role.BACKEND, now=later)
    assert agent.audit.counts.get("crl_reload_failed") == 1
    agent.audit.close()


def test_files_an_older_version_left_readable_are_tightened(tmp_path: Path, umask_022: None) -> None:
    data = tmp_path / "data"
    (data / "audit").mkdir(parents=True)
    for name in ("audit/server_log.jsonl", "audit/server_log.jsonl.1", "backend.sqlite3"):
        (data / name).touch(mode=0o644)
    audit = AuditLog(data / "audit" / "server_log.jsonl", component="backend")
    audit.event("started")
    storage = Storage(data / "backend.sqlite3")
    storage.store_message("dev-1", 1.0, "telemetry", 0, 0, b"secret")
    assert _loose(data) == []
    audit.close()
    storage.close()


def test_a_ca_created_afresh_starts_its_own_crl_numbering(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    make_pki(pki, ["dev-1"])
    marks = tmp_path / "state" / store.CRL_SEEN_FILE
    store.issue_crl(pki)
    store.issue_crl(pki)
    store.load_trust_store(pki, crl_seen=marks)  # number 3 seen
    store.init_ca(pki, force=True)  # same name, new key, CRL number 1
    store.load_trust_store(pki, crl_seen=marks)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def small_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki = tmp_path_factory.mktemp("marks") / "pki"
    make_pki(pki, [])
    return pki


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200) | _JSON.map(lambda v: json.dumps(v).encode()))
@example(content=b'{"k": {"number": 1, "this_update": "2020-01-01T00:00:00"}}')  # naive time
@example(content=b'{"k": {"number": true, "this_update": "2020-01-01T00:00:00+00:00"}}')
def test_a_garbage_marks_file_is_a_crl_error_never_a_crash(small_pki: Path, tmp_path: Path, content: bytes) -> None:
    marks = tmp_path / "garbage" / store.CRL_SEEN_FILE
    marks.parent.mkdir(exist_ok=True)
    marks.write_bytes(content)
    try:
        store.load_trust_store(small_pki, crl_seen=marks)
    except CertificateError as err:
        assert err.reason is Reason.CRL_INVALID


def test_a_marks_file_with_a_naive_time_for_the_real_issuer_is_a_crl_error(small_pki: Path, tmp_path: Path) -> None:
    ca = x509.load_pem_x509_certificate(layout.anchor(small_pki).read_bytes())
    spki = ca.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    marks = tmp_path / store.CRL_SEEN_FILE
    naive = {"number": 1, "this_update": "2020-01-01T00:00:00"}
    marks.write_text(json.dumps({hashlib.sha256(spki).hexdigest(): naive}))
    with pytest.raises(CertificateError):
        store.load_trust_store(small_pki, crl_seen=marks)
