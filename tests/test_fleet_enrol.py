"""Zero-touch enrolment and automatic renewal (issue 16), end to end: the real backend service and
device code over the embedded amqtt broker, with a PKI made by the test.

A device that starts with nothing but a claim (``sealmq pki claim issue``) obtains its certificate
over a sealed session and then runs as any device; a used-up, revoked or foreign claim is refused
at the handshake and audited; a claim session can do nothing but enrol; a device with a 10-minute
certificate keeps running for 30 minutes of (passed-in) time by renewing itself; the broker never
relays a CSR or certificate byte.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from backend.enrol import EnrolPolicy
from backend.service import BackendService, BackendSettings
from device.agent import DeviceAgent, DeviceConfig
from device.enrol import EnrolConfig, enrol
from pki import claim, layout, store
from pki.verify import load_chain
from sealmq import cbor
from sealmq.endpoint import BackendConfig, EndpointConfig
from sealmq.errors import Reason, SealmqError
from sealmq.identity import Role
from sealmq.topics import RecordKind
from tests.e2e import Recorder, System, wait_for

DEVICE = "cam-2"


def _strip_identity(system: System, device_id: str) -> Path:
    """Make ``device_id`` a factory-fresh device: no key, no certificate (its broker login stays)."""
    d = layout.device_dir(system.dep.pki, device_id)
    for name in (layout.KEY, layout.CERT, layout.CHAIN, layout.CSR):
        (d / name).unlink(missing_ok=True)
    return d


def _enrol_config(system: System, device_id: str, claim_dir: Path | None = None) -> EnrolConfig:
    return EnrolConfig(
        device_id=device_id, claim_dir=claim_dir or claim.claim_dir(system.dep.pki, device_id),
        pki_dir=system.dep.pki, identity_dir=layout.device_dir(system.dep.pki, device_id),
        state_dir=system.dep.device_state(device_id),
        mqtt=system.mqtt("device", device_id, client_id=f"{device_id}:enrol-{time.monotonic_ns()}"),
        poll_interval=0.05,
    )


def _events(system: System, name: str) -> list[dict]:
    return [e for e in system.audit() if e["event"] == name]


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    s = System(tmp_path, ["cam-1", DEVICE], broker="amqtt")
    try:
        yield s
    finally:
        s.close()


def test_a_device_with_only_a_claim_enrols_and_then_runs(system: System) -> None:
    pki = system.dep.pki
    identity = _strip_identity(system, DEVICE)
    claim.issue_claim(pki, DEVICE)
    recorder = Recorder(system)
    backend = system.start_backend()
    assert enrol(_enrol_config(system, DEVICE)) == identity
    # the device made its own key (0600) and holds a device certificate for its id
    assert (identity / layout.KEY).stat().st_mode & 0o777 == 0o600
    chain = load_chain((identity / layout.CHAIN).read_bytes())
    store.load_trust_store(pki).verify(chain, role=Role.DEVICE, now=datetime.now(UTC), expected_name=DEVICE)
    assert claim.list_claims(pki)[0].uses == 1
    enrolled = _events(system, "device_enrolled")
    assert [e["device"] for e in enrolled] == [DEVICE]
    assert _events(system, "claim_session")
    # ... and now it runs as any device: telemetry and a command round trip
    agent = system.agent(DEVICE)
    agent.send_telemetry({"temp": 20.5})
    assert wait_for(lambda: len(backend.storage.messages(DEVICE)) == 1)
    cmd = backend.send_command(DEVICE, "ping")
    assert wait_for(lambda: (c := backend.storage.command(cmd)) is not None and c.status == "replied")
    time.sleep(0.3)
    relayed = recorder.snapshot()
    recorder.stop()
    # the broker never saw the CSR, the certificate or the device's public key
    # (the CSR carries the public key, the response the certificate: neither may be on the wire)
    claim_cert = load_chain((claim.claim_dir(pki, DEVICE) / claim.CLAIM_CHAIN).read_bytes())[0]
    secrets = [chain[0].public_bytes(Encoding.DER),
               chain[0].public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
               claim_cert.public_bytes(Encoding.DER)]
    assert relayed
    for _topic, payload in relayed:
        for secret in secrets:
            assert secret not in payload
            assert secret[-64:] not in payload


def test_a_used_claim_is_refused_and_audited(system: System) -> None:
    _strip_identity(system, DEVICE)
    claim.issue_claim(system.dep.pki, DEVICE)
    system.start_backend()
    enrol(_enrol_config(system, DEVICE))
    _strip_identity(system, DEVICE)
    with pytest.raises(SealmqError) as exc:
        enrol(_enrol_config(system, DEVICE), timeout=10)
    assert exc.value.reason is not Reason.HANDSHAKE_TIMEOUT
    failed = [e for e in _events(system, "handshake_failed") if e["device"] == DEVICE]
    assert failed and failed[-1]["reason"] == Reason.CLAIM_EXHAUSTED.value
    assert not (layout.device_dir(system.dep.pki, DEVICE) / layout.CERT).exists()


def test_a_claim_usable_twice_enrols_twice_then_no_more(system: System) -> None:
    _strip_identity(system, DEVICE)
    claim.issue_claim(system.dep.pki, DEVICE, max_uses=2)
    system.start_backend()
    for _ in range(2):
        _strip_identity(system, DEVICE)
        enrol(_enrol_config(system, DEVICE))
    _strip_identity(system, DEVICE)
    with pytest.raises(SealmqError):
        enrol(_enrol_config(system, DEVICE), timeout=10)
    assert [c.uses for c in claim.list_claims(system.dep.pki)] == [2]


def test_a_revoked_claim_is_refused_and_audited(system: System) -> None:
    _strip_identity(system, DEVICE)
    claim.issue_claim(system.dep.pki, DEVICE)
    claim.revoke_claim(system.dep.pki, DEVICE)
    system.start_backend()
    with pytest.raises(SealmqError):
        enrol(_enrol_config(system, DEVICE), timeout=10)
    failed = [e for e in _events(system, "handshake_failed") if e["device"] == DEVICE]
    assert failed and failed[-1]["reason"] == Reason.REVOKED.value
    assert _events(system, "device_enrolled") == []


def test_a_claim_for_another_device_is_refused(system: System) -> None:
    """cam-1's claim presented on cam-2's topics (the broker lets cam-2 in: it has the login)."""
    _strip_identity(system, DEVICE)
    claim.issue_claim(system.dep.pki, "cam-1")
    system.start_backend()
    with pytest.raises(SealmqError):
        enrol(_enrol_config(system, DEVICE, claim.claim_dir(system.dep.pki, "cam-1")), timeout=10)
    failed = [e for e in _events(system, "handshake_failed") if e["device"] == DEVICE]
    assert failed and failed[-1]["reason"] == Reason.IDENTITY_MISMATCH.value


def test_a_csr_for_another_device_is_refused_and_the_claim_kept(system: System,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The CA's CSR policy applies: a claim session of cam-2 asking for cam-1's name gets nothing."""
    import device.enrol as device_enrol

    real = device_enrol._new_request
    monkeypatch.setattr(device_enrol, "_new_request", lambda device_id, rnd: real("cam-1", rnd))
    _strip_identity(system, DEVICE)
    claim.issue_claim(system.dep.pki, DEVICE)
    system.start_backend()
    with pytest.raises(SealmqError) as exc:
        enrol(_enrol_config(system, DEVICE), timeout=10)
    assert exc.value.reason is Reason.IDENTITY_MISMATCH
    rejected = _events(system, "enrolment_rejected")
    assert rejected and rejected[0]["reason"] == Reason.IDENTITY_MISMATCH.value
    assert claim.list_claims(system.dep.pki)[0].uses == 0  # a refused CSR does not use the claim up
    assert not (layout.device_dir(system.dep.pki, DEVICE) / layout.CERT).exists()


def test_a_claim_session_may_only_enrol(system: System) -> None:
    """Telemetry, a reply, media and update status over a claim session: refused, audited, nothing stored."""
    from device.enrol import ClaimEnroller

    _strip_identity(system, DEVICE)
    claim.issue_claim(system.dep.pki, DEVICE)
    backend = system.start_backend()
    enroller = ClaimEnroller(_enrol_config(system, DEVICE))
    enroller._on_handshake = lambda done, now: None  # type: ignore[method-assign]  # do not enrol yet
    enroller.start()
    try:
        assert wait_for(lambda: enroller.endpoint.established)
        kinds = [RecordKind.TELEMETRY, RecordKind.REPLY, RecordKind.MEDIA_CONTROL, RecordKind.UPDATE_STATUS]
        for kind in kinds:
            enroller._run(lambda now, k=kind: enroller.endpoint.seal(k, cbor.dumps({"t": 1, "v": {}}), now))
        assert wait_for(lambda: len([e for e in _events(system, "message_rejected")
                                     if e.get("reason") == Reason.CLAIM_CONFINED.value]) == len(kinds))
        assert backend.storage.messages(DEVICE) == []
        assert DEVICE not in {row[0] for row in backend.storage.devices()}
    finally:
        enroller.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_a_ten_minute_certificate_runs_thirty_minutes_without_an_operator(system: System) -> None:
    """Time is passed in: the backend and the device share a clock the test moves a minute at a time."""
    pki = system.dep.pki
    clock = FakeClock()
    identity = layout.device_dir(pki, DEVICE)
    csr = (identity / layout.CSR).read_bytes()
    issued = store.sign_csr(pki, csr, "device", lifetime=timedelta(minutes=10),
                            now=datetime.fromtimestamp(clock.now, UTC), expected_name=DEVICE)
    store.write_issued(issued, identity / layout.CERT, force=True)
    backend = BackendService(BackendSettings(
        pki_dir=pki, data_dir=system.dep.backend_data, mqtt=system.mqtt("backend", "backend"), poll_interval=0.05,
        endpoint=BackendConfig(), revalidate_interval=30.0,
        enrol_policy=EnrolPolicy(cert_lifetime=timedelta(minutes=10), check_interval=30.0)))
    backend.clock = clock
    backend.start()
    system.backend = backend
    agent = DeviceAgent(DeviceConfig(
        device_id=DEVICE, identity_dir=identity, pki_dir=pki, state_dir=system.dep.device_state(DEVICE),
        mqtt=system.mqtt("device", DEVICE, client_id=f"{DEVICE}:agent"), poll_interval=0.05,
        endpoint=EndpointConfig(handshake_timeout=3.0)))
    agent.clock = clock
    system.agents["renew"] = agent
    agent.start()
    assert agent.wait_established(10)
    serials = {issued.certificate.serial_number}
    renewer = agent.renewer
    assert renewer is not None

    def settled() -> bool:
        # a live session and, when renewal was due, renewed and re-authenticated with the new
        # certificate: the clock must not jump mid-handshake
        return (agent.endpoint.established and DEVICE in backend.endpoint.sessions
                and renewer._pending is None and clock.now < renewer.due_at())

    for minute in range(1, 31):
        clock.now += 60
        assert wait_for(settled, timeout=15), f"minute {minute}"
        agent.send_telemetry({"minute": minute})
        assert wait_for(lambda n=minute: len(backend.storage.messages(DEVICE)) == n, timeout=15), f"minute {minute}"
        serials.add(load_chain((identity / layout.CERT).read_bytes())[0].serial_number)
    # 30 minutes on 10-minute certificates: renewed at least four times, each older one revoked
    assert len(serials) >= 5
    renewed = _events(system, "certificate_renewed")
    assert len(renewed) >= 4
    assert len(_events(system, "certificate_superseded")) >= 3
    assert not [e for e in _events(system, "session_lost") if e.get("reason") == Reason.EXPIRED.value]
    store.load_trust_store(pki)  # the CRL the revocations made is valid


def test_early_renewal_is_refused_and_audited(system: System) -> None:
    backend = system.start_backend()
    agent = system.agent(DEVICE)
    renewer = agent.renewer
    assert renewer is not None
    renewer.due_at = lambda: 0.0  # type: ignore[method-assign]  # a device that asks far too early
    assert wait_for(lambda: bool(_events(system, "renewal_rejected")))
    assert _events(system, "renewal_rejected")[0]["reason"] == Reason.POLICY_VIOLATION.value
    assert wait_for(lambda: renewer._pending is None)
    assert backend.endpoint.sessions[DEVICE]


def test_expiry_warnings_for_certificates_and_the_crl(system: System) -> None:
    pki = system.dep.pki
    store.issue_crl(pki, days=3)  # closer to its nextUpdate than the 7-day warning
    identity = layout.device_dir(pki, DEVICE)
    issued = store.sign_csr(pki, (identity / layout.CSR).read_bytes(), "device", lifetime=timedelta(minutes=10),
                            now=datetime.now(UTC) - timedelta(minutes=9), expected_name=DEVICE)
    store.write_issued(issued, identity / layout.CERT, force=True)
    backend = system.start_backend()
    agent = system.agent(DEVICE, start=False)
    agent.config = replace(agent.config, renew_at=None)
    agent.renewer = None
    agent.start()
    assert agent.wait_established(10)
    assert wait_for(lambda: bool(_events(system, "certificate_expiring")))
    warned = _events(system, "certificate_expiring")[0]
    assert warned["device"] == DEVICE and warned["seconds_left"] < 120
    assert wait_for(lambda: bool(_events(system, "crl_expiring")))
    from backend.metrics import BackendMetrics
    from backend.observer import attach

    metrics = BackendMetrics(backend)
    for entry in system.audit():
        metrics.on_audit(entry)
    text = metrics.exposition().decode()
    assert 'sealmq_backend_expiry_warnings_total{what="certificate"} 1.0' in text
    assert 'sealmq_backend_expiry_warnings_total{what="crl"}' in text
    assert attach  # the console attaches the same metrics object as an observer


def test_claim_cli_and_registry(tmp_path: Path) -> None:
    from app.cli import main

    pki = tmp_path / "pki"
    assert main(["pki", "init", "--pki", str(pki)]) == 0
    assert main(["pki", "claim", "issue", "--pki", str(pki), "cam-9", "--uses", "3"]) == 0
    d = claim.claim_dir(pki, "cam-9")
    assert (d / claim.CLAIM_KEY).stat().st_mode & 0o777 == 0o600
    leaf = load_chain((d / claim.CLAIM_CHAIN).read_bytes())[0]
    trust = store.load_trust_store(pki)
    # a claim is no device certificate: every verifier but the enrolment service refuses it
    with pytest.raises(SealmqError) as exc:
        trust.verify([leaf], role=Role.DEVICE, now=datetime.now(UTC))
    assert exc.value.reason is Reason.POLICY_VIOLATION
    assert trust.verify_claim([leaf], now=datetime.now(UTC)).name == "cam-9"
    assert main(["pki", "claim", "list", "--pki", str(pki)]) == 0
    assert main(["pki", "claim", "revoke", "--pki", str(pki), "cam-9"]) == 0
    with pytest.raises(SealmqError) as exc:
        store.load_trust_store(pki).verify_claim([leaf], now=datetime.now(UTC))
    assert exc.value.reason is Reason.REVOKED
    assert main(["pki", "claim", "revoke", "--pki", str(pki), "cam-9"]) == 2
    shutil.rmtree(d)
    # two-level CA: the claim is signed by the issuing CA, its chain carries it, it validates
    pki2 = tmp_path / "pki2"
    assert main(["pki", "init", "--pki", str(pki2), "--two-level"]) == 0
    d2 = claim.issue_claim(pki2, "cam-9")
    chain2 = load_chain((d2 / claim.CLAIM_CHAIN).read_bytes())
    assert len(chain2) == 2
    assert store.load_trust_store(pki2).verify_claim(chain2, now=datetime.now(UTC)).name == "cam-9"


def test_device_enrol_cli(system: System) -> None:
    """``sealmq device enrol`` with the claim where ``pki claim issue`` put it."""
    from app.cli import main

    pki = system.dep.pki
    identity = _strip_identity(system, DEVICE)
    assert main(["pki", "claim", "issue", "--pki", str(pki), DEVICE]) == 0
    system.start_backend()
    args = ["device", "enrol", "--pki", str(pki), "--id", DEVICE, "--state", str(system.dep.device_state(DEVICE)),
            "--port", str(system.port), "--timeout", "20"]
    assert main(args) == 0
    assert (identity / layout.CERT).exists() and (identity / layout.KEY).stat().st_mode & 0o777 == 0o600
    _strip_identity(system, DEVICE)
    assert main(args) == 2  # the claim was good for one enrolment


def test_a_crl_change_keeps_a_valid_claim_session_and_ends_a_revoked_one(system: System) -> None:
    """Re-validation (on every CRL change) checks a claim session as a claim, not as a device."""
    from device.enrol import ClaimEnroller

    _strip_identity(system, DEVICE)
    claim.issue_claim(system.dep.pki, DEVICE)
    backend = system.start_backend()
    enroller = ClaimEnroller(_enrol_config(system, DEVICE))
    enroller._on_handshake = lambda done, now: None  # type: ignore[method-assign]  # hold the session open
    enroller.start()
    try:
        assert wait_for(lambda: DEVICE in backend.endpoint.sessions)
        store.issue_crl(system.dep.pki)  # an unrelated CRL change
        assert wait_for(lambda: bool(_events(system, "crl_reloaded")))
        assert DEVICE in backend.endpoint.sessions
        claim.revoke_claim(system.dep.pki, DEVICE)
        assert wait_for(lambda: DEVICE not in backend.endpoint.sessions)
        lost = [e for e in _events(system, "session_lost") if e["device"] == DEVICE]
        assert lost and lost[-1]["reason"] == Reason.REVOKED.value
    finally:
        enroller.stop()


def test_an_interrupted_identity_change_never_leaves_a_key_without_its_certificate(tmp_path: Path) -> None:
    """Crash points of a renewal's install: before the commit mark the old identity stays, after it the
    new one is completed at the next start; in both cases key and certificate match."""
    from device.enrol import COMMIT_MARK, STAGED, commit_staged
    from pki.store import load_identity

    pki = tmp_path / "pki"
    store.init_ca(pki)
    d = store.enroll(pki, "device", "cam-5")
    old = (d / layout.CERT).read_bytes()
    new_dir = store.enroll(pki, "device", "cam-5b")  # stands in for the renewed key and chain
    for name in (layout.KEY, layout.CHAIN, layout.CERT):
        (d / (name + STAGED)).write_bytes((new_dir / name).read_bytes())
    assert commit_staged(d) is False  # no mark: an incomplete stage is dropped
    assert (d / layout.CERT).read_bytes() == old and not list(d.glob("*" + STAGED))
    load_identity(d)
    for name in (layout.KEY, layout.CHAIN, layout.CERT):
        (d / (name + STAGED)).write_bytes((new_dir / name).read_bytes())
    (d / COMMIT_MARK).write_bytes(b"")
    os.replace(d / (layout.CHAIN + STAGED), d / layout.CHAIN)  # crashed after the first rename
    assert commit_staged(d) is True
    assert load_identity(d).name == "cam-5b"  # consistent: the new key with the new chain
    assert not (d / COMMIT_MARK).exists()


def test_enrolment_with_the_root_key_offline(tmp_path: Path) -> None:
    """Two-level CA with root.key moved away: the enrolment service signs with the issuing CA only,
    enrols, renews (and revokes the superseded certificate) without ever touching the root key."""
    from backend.enrol import EnrolmentService
    from device.enrol import _new_request, install
    from runtime.audit import AuditLog
    from sealmq import enrol as enrol_bodies
    from sealmq.endpoint import Received

    pki = tmp_path / "pki"
    store.init_ca(pki, two_level=True)
    layout.root_key(pki).rename(tmp_path / "root.key.offline")
    claim.issue_claim(pki, "cam-3")
    trust = store.load_trust_store(pki)
    now = time.time()
    claim_chain = load_chain((claim.claim_dir(pki, "cam-3") / claim.CLAIM_CHAIN).read_bytes())
    peer = trust.verify_claim(claim_chain, now=datetime.fromtimestamp(now, UTC))
    audit = AuditLog(tmp_path / "audit.jsonl", component="backend")
    service = EnrolmentService(pki, audit)
    key, request = _new_request("cam-3", os.urandom)
    body = service.handle(Received("cam-3", RecordKind.ENROL_REQUEST, request.encode(), 0, 0), peer, now)
    assert body is not None
    response = enrol_bodies.decode_response(body)
    assert response.ok and len(response.chain) == 2  # leaf + issuing CA
    identity = tmp_path / "cam-3"
    install(identity, "cam-3", key, response, trust_store=trust, now=now)
    leaf = load_chain((identity / layout.CHAIN).read_bytes())[0]
    assert leaf.issuer == load_chain(layout.issuing_cert(pki).read_bytes())[0].subject
    # a renewal at 60% of the lifetime, then the new certificate in use: the old one is revoked
    device_peer = trust.verify([leaf], role=Role.DEVICE, now=datetime.fromtimestamp(now, UTC))
    later = now + 0.6 * (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    _key2, request2 = _new_request("cam-3", os.urandom)
    body2 = service.handle(Received("cam-3", RecordKind.ENROL_REQUEST, request2.encode(), 0, 1), device_peer, later)
    assert body2 is not None and enrol_bodies.decode_response(body2).ok
    new_leaf = load_chain(enrol_bodies.decode_response(body2).chain[0])[0]
    service.on_handshake("cam-3", type(device_peer)(Role.DEVICE, "cam-3", new_leaf, new_leaf.public_key()), later)
    with pytest.raises(SealmqError) as exc:
        store.load_trust_store(pki).verify([leaf], role=Role.DEVICE, now=datetime.fromtimestamp(later, UTC))
    assert exc.value.reason is Reason.REVOKED
    assert not layout.root_key(pki).exists()
    audit.close()


def test_renewal_due_time_is_read_again_only_when_the_certificate_file_changes(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``Renewer.due_at`` is asked at every timer tick: it parses cert.pem once, then again only
    after the file was replaced (a renewal's install, a re-enrolment)."""
    import device.enrol as device_enrol
    from device.enrol import Renewer

    pki = tmp_path / "pki"
    store.init_ca(pki)
    d = store.enroll(pki, "device", "cam-6")
    parsed: list[int] = []
    real = device_enrol.load_chain
    monkeypatch.setattr(device_enrol, "load_chain", lambda data: parsed.append(1) or real(data))
    renewer = Renewer(d, "cam-6", renew_at=0.5)
    first = renewer.due_at()
    leaf = load_chain((d / layout.CERT).read_bytes())[0]
    start, end = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
    assert first == start + (end - start) * 0.5
    assert [renewer.due_at() for _ in range(5)] == [first] * 5 and len(parsed) == 1
    # a new certificate with another lifetime replaces the file (as install() does: a rename)
    other = store.enroll(pki, "device", "cam-6b", days=30)
    tmp = d / (layout.CERT + ".new")
    tmp.write_bytes((other / layout.CERT).read_bytes())
    os.replace(tmp, d / layout.CERT)
    leaf = load_chain((d / layout.CERT).read_bytes())[0]
    start, end = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
    assert renewer.due_at() == start + (end - start) * 0.5 != first
    assert len(parsed) == 2
    (d / layout.CERT).unlink()
    with pytest.raises(SealmqError):  # a missing certificate is an error, never the cached answer
        renewer.due_at()
