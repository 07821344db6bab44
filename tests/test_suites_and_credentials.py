"""Which suites a device offers and a backend serves, by the keys they hold (issue 18): an Ed25519
or RSA device negotiates the suite its key fits, a backend holds one certificate per signature key
type, method 3 starts without a restart, and certificate rotation (``enroll --force``) keeps what
it does not replace. Real PKI, real brokers and the real agent and service where it matters."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from app.bootstrap import bootstrap
from backend.service import BackendService, BackendSettings
from device.agent import DeviceAgent
from pki import ccs as pki_ccs
from pki import layout, store
from runtime.audit import read_audit
from runtime.mqtt import MqttSettings
from sealmq.edhoc import SUITES, X509Credential, suites_for
from sealmq.endpoint import BackendConfig, BackendEndpoint, DeviceEndpoint, EndpointConfig
from sealmq.errors import ConfigError, LocalProtocolError, PkiError, Reason
from sealmq.oscore import aead_algorithm
from tests.e2e import System, wait_for
from tests.pki_fixtures import TestPki, make_pki

pytestmark = pytest.mark.slow


def _load(d: Path) -> X509Credential:
    from cryptography.hazmat.primitives.serialization import Encoding

    ident = store.load_identity(d)
    return X509Credential(private_key=ident.private_key, chain_der=[c.public_bytes(Encoding.DER) for c in ident.chain])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("pki"), ["p-1", "ed-1", "rsa-1"],
                    key_types={"ed-1": "ed25519", "rsa-1": "rsa2048"})


def _device(pki: TestPki, device_id: str, **config: object) -> DeviceEndpoint:
    return DeviceEndpoint(device_id=device_id, credential=pki.credential("device", device_id),
                          trust_store=pki.trust_store(), config=EndpointConfig(**config))  # type: ignore[arg-type]


# -- the suite table is the registry's -----------------------------------------------------------

# RFC 9528 section 10.2 (IANA "EDHOC Cipher Suites"): [EDHOC AEAD, hash, MAC length, ECDH curve,
# signature algorithm, application AEAD, application hash], as COSE identifiers.
REGISTRY = {
    0: [10, -16, 8, 4, -8, 10, -16],
    1: [30, -16, 16, 4, -8, 10, -16],
    2: [10, -16, 8, 1, -7, 10, -16],
    3: [30, -16, 16, 1, -7, 10, -16],
    6: [1, -16, 16, 4, -7, 1, -16],
    24: [3, -43, 16, 2, -35, 3, -43],
}


def test_the_suite_table_is_the_registrys() -> None:
    """Every standard suite we implement, field by field (suite 6's application AEAD was once
    AES-CCM-16-64-128 here, where the registry says A128GCM), and each opens a session with its
    application AEAD."""
    hashes, curves = {"sha256": -16, "sha384": -43}, {"X25519": 4, "P-256": 1, "P-384": 2}
    for ident, row in REGISTRY.items():
        s = SUITES[ident]
        assert [s.aead, hashes[s.hash_name], s.mac_length, curves[s.curve], s.sig_alg, s.app_aead,
                hashes[s.app_hash]] == row, ident
        assert aead_algorithm(s.app_aead).cose_id == s.app_aead
    assert sorted(i for i in SUITES if i >= 0) == sorted(REGISTRY)


# -- the device: suites from its credential, an impossible configuration fails at start ----------

def test_a_device_offers_the_suites_its_key_fits(pki: TestPki) -> None:
    assert _device(pki, "p-1").suites == (6, 2)
    assert _device(pki, "ed-1").suites == (0,)
    assert _device(pki, "rsa-1").suites == (-24,)


def test_a_device_whose_key_fits_no_configured_suite_fails_at_construction(pki: TestPki) -> None:
    # was: accepted, then "credential fits none of the offered suites" from every poll, 5 times a second
    with pytest.raises(LocalProtocolError) as info:
        _device(pki, "ed-1", suites=(2,))
    assert info.value.reason is Reason.UNSUPPORTED_ALGORITHM
    assert _device(pki, "ed-1", suites=(2, 0)).suites == (2, 0)  # explicit order kept when one fits


def test_a_device_whose_credential_does_not_fit_its_method_fails_at_construction(pki: TestPki) -> None:
    for method in (3, 7):  # static DH with a signature key; no such method
        with pytest.raises(LocalProtocolError) as info:
            DeviceEndpoint(device_id="p-1", credential=pki.credential("device", "p-1"),
                           trust_store=pki.trust_store(), method=method)
        assert info.value.reason is Reason.UNSUPPORTED_METHOD


def test_a_ccs_device_offers_the_p256_suites(pki: TestPki, tmp_path: Path) -> None:
    own = make_pki(tmp_path / "pki", [])
    pki_ccs.issue_ccs(own.path, "device", "tiny-1")
    assert suites_for(pki_ccs.load_credential(own.path, "device", "tiny-1")) == (2, -24)


# -- the backend: one certificate per key type, selected by the suite ---------------------------

def test_backend_serves_the_suites_of_the_key_types_it_holds(tmp_path: Path) -> None:
    dep, created = bootstrap(tmp_path, [], iterations=1000, backend_key_types=("p256", "ed25519", "rsa2048"))
    assert "backend identity backend (ed25519)" in created and "backend identity backend (rsa2048)" in created
    svc = BackendService(BackendSettings(pki_dir=dep.pki, data_dir=dep.backend_data, mqtt=MqttSettings()))
    try:
        assert svc.endpoint.served_suites() == {0: [6, 2, 0, -24]}
    finally:
        svc.storage.close()
    # only P-256: suites 6 and 2 alone, whatever BackendConfig.suites lists
    only = bootstrap(tmp_path / "p", [], iterations=1000)[0]
    svc = BackendService(BackendSettings(pki_dir=only.pki, data_dir=only.backend_data, mqtt=MqttSettings()))
    try:
        assert svc.endpoint.config.suites == (6, 2, 0, -24)
        assert svc.endpoint.served_suites() == {0: [6, 2]}
    finally:
        svc.storage.close()


def test_bootstrap_gives_the_backend_the_devices_key_type(tmp_path: Path) -> None:
    dep = bootstrap(tmp_path, ["ed-1"], iterations=1000, key_type="ed25519")[0]
    assert (layout.extra_dir(layout.backend_dir(dep.pki), "ed25519") / layout.CERT).exists()
    with pytest.raises(ConfigError):
        bootstrap(tmp_path / "x", [], iterations=1000, backend_key_types=("rsa2048", "rsa3072"))


def test_bootstrap_cli_backend_key_types(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "app.cli", "bootstrap", "--dir", str(tmp_path),
                          "--backend-key-types", "p256,rsa3072"], capture_output=True, text=True, check=True)
    assert "backend identity backend (rsa3072)" in out.stdout
    assert store.load_identity(layout.extra_dir(layout.backend_dir(tmp_path / "pki"), "rsa3072")).name == "backend"


def test_two_backend_certificates_for_the_same_suites_are_a_start_error(tmp_path: Path) -> None:
    dep = bootstrap(tmp_path, [], iterations=1000)[0]
    store.enroll(dep.pki, "backend", "backend", "p256", extra=True)  # a second P-256: which would sign?
    with pytest.raises(ConfigError):
        BackendService(BackendSettings(pki_dir=dep.pki, data_dir=dep.backend_data, mqtt=MqttSettings()))
    with pytest.raises(PkiError):
        store.enroll(dep.pki, "device", "dev-1", "ed25519", extra=True)  # devices hold one certificate


def test_responder_picks_the_certificate_of_the_selected_suite(pki: TestPki, tmp_path: Path) -> None:
    own = make_pki(tmp_path / "pki", ["p-1", "ed-1", "rsa-1"], key_types={"ed-1": "ed25519", "rsa-1": "rsa2048"})
    for kt in ("ed25519", "rsa2048"):
        store.enroll(own.path, "backend", "backend", kt, extra=True)
    creds = [_load(layout.backend_dir(own.path)),
             *(_load(layout.extra_dir(layout.backend_dir(own.path), kt)) for kt in ("ed25519", "rsa2048"))]
    from tests.test_endpoint import Net, completed

    backend = BackendEndpoint(credentials=creds, trust_store=own.trust_store(), config=BackendConfig())
    devices = [_device(own, d) for d in ("p-1", "ed-1", "rsa-1")]
    net = Net(backend, devices)
    events = net.run([o for d in devices for o in d.start_handshake(net.now, os.urandom)])
    suites = {e.device_id: e.suite for e in completed(events) if e.peer_name == e.device_id}
    assert suites == {"p-1": 6, "ed-1": 0, "rsa-1": -24}


# -- end to end: an Ed25519 device runs; against a P-256-only backend it backs off -----------------

@pytest.fixture
def ed_system(tmp_path: Path) -> Iterator[System]:
    sys_ = System(tmp_path, ["ed-1", "p-1"], key_type="ed25519")
    try:
        yield sys_
    finally:
        sys_.close()


def test_ed25519_device_runs_with_suite_0_beside_a_p256_device(ed_system: System) -> None:
    store.enroll(ed_system.dep.pki, "device", "p-1", "p256", force=True)  # one device of each kind
    backend = ed_system.start_backend()
    ed, p = ed_system.agent("ed-1"), ed_system.agent("p-1")
    ed.send_telemetry({"n": 1})
    p.send_telemetry({"n": 2})
    assert wait_for(lambda: backend.storage.count_messages() == 2)
    suites = {e["device"]: e["suite"] for e in ed_system.audit() if e["event"] == "handshake_completed"}
    assert suites == {"ed-1": 0, "p-1": 6}


def test_ed25519_device_against_a_p256_only_backend_fails_the_handshake_and_backs_off(tmp_path: Path) -> None:
    sys_ = System(tmp_path, ["ed-1"], key_type="ed25519", backend_key_types=("p256",))
    try:
        sys_.start_backend()
        agent = sys_.agent("ed-1", endpoint=EndpointConfig(handshake_timeout=3.0, retry_min=30.0), wait=False)
        log = sys_.dep.device_state("ed-1") / "device_log.jsonl"
        assert wait_for(lambda: any(e["event"] == "handshake_failed" for e in read_audit(log)))
        failed = [e for e in read_audit(log) if e["event"] == "handshake_failed"]
        assert failed[0]["reason"] == "unsupported_suite"  # negotiated (SUITES_R = [2]), not a crash
        assert not agent.established.is_set()
        assert agent.endpoint.state.value == "waiting"  # backing off (30 s), not retrying in a loop
        refused = [e for e in sys_.audit() if e["event"] == "message_rejected" and e.get("stage") == "handshake"]
        assert [e["reason"] for e in refused] == ["unsupported_suite"]
    finally:
        sys_.close()


def test_device_run_with_an_impossible_suite_exits_with_an_error(tmp_path: Path) -> None:
    dep = bootstrap(tmp_path, ["ed-1"], iterations=1000, key_type="ed25519")[0]
    out = subprocess.run([sys.executable, "-m", "app.cli", "device", "run", "--pki", str(dep.pki), "--id", "ed-1",
                          "--state", str(tmp_path / "st"), "--port", "1", "--count", "1", "--suites", "2"],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unsupported_algorithm" in out.stderr


# -- method 3 without a restart ------------------------------------------------------------------

def test_backend_serves_method_3_once_it_has_a_ccs_no_restart(tmp_path: Path) -> None:
    sys_ = System(tmp_path, ["cam-1", "tiny-1"])
    try:
        backend = sys_.start_backend()
        assert backend.endpoint.config.methods == (0,)
        pki_ccs.issue_ccs(sys_.dep.pki, "backend", "backend")
        pki_ccs.issue_ccs(sys_.dep.pki, "device", "tiny-1")
        assert wait_for(lambda: any(e["event"] == "ccs_credential_loaded" for e in sys_.audit()))
        assert backend.endpoint.served_suites() == {0: [6, 2], 3: [2, -24]}
        template = sys_.agent("tiny-1", start=False)
        tiny = DeviceAgent(replace(template.config, method=3))
        tiny.start()
        sys_.closers.append(tiny.stop)
        assert tiny.wait_established(10)
    finally:
        sys_.close()


# -- rotation: enroll --force replaces the certificate and keeps the rest -------------------------

def test_enroll_force_rotates_the_certificate_and_keeps_the_rest(tmp_path: Path) -> None:
    dep = bootstrap(tmp_path, ["tiny-1"], iterations=1000, backend_key_types=("p256", "ed25519"))[0]
    pki_ccs.issue_ccs(dep.pki, "device", "tiny-1")
    pki_ccs.issue_ccs(dep.pki, "backend", "backend")
    kept = {}
    for d in (layout.device_dir(dep.pki, "tiny-1"), layout.backend_dir(dep.pki)):
        before = {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}
        old_serial = store.load_identity(d).chain[0].serial_number
        role, name = ("device", "tiny-1") if "devices" in d.parts else ("backend", "backend")
        out = subprocess.run([sys.executable, "-m", "app.cli", "pki", "enroll", "--pki", str(dep.pki), role, name,
                              "--force"], capture_output=True, text=True, check=True)
        assert "enrolled" in out.stdout
        after = {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}
        assert set(after) == set(before)
        changed = {str(p) for p in before if before[p] != after[p]}
        assert changed == {"key.pem", "csr.pem", "cert.pem", "chain.pem"}
        assert store.load_identity(d).chain[0].serial_number != old_serial
        for secret in ("key.pem", "mqtt.password", "ccs_key.pem"):
            assert (d / secret).stat().st_mode & 0o777 == 0o600
        kept[role] = after
    assert Path("extra/ed25519/key.pem") in kept["backend"]  # the backend's other certificate too
    # the CCS stays registered and usable
    assert pki_ccs.load_credential(dep.pki, "device", "tiny-1").ccs.kid
