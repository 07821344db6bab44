"""EDHOC method 3 (CCS, static DH) through the sans-IO endpoints, in memory: a method-3 device and
a method-0 (X.509) device served by the same backend at once, with the same sealed records and
key update; identity binding, revocation and refusals with typed reasons."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from pki import ccs as pki_ccs
from sealmq.edhoc import (
    CcsAuthenticator,
    CcsIdentity,
    CcsRegistry,
    LocalCredential,
    MixedAuthenticator,
    PeerAuthenticator,
    X509Authenticator,
)
from sealmq.endpoint import (
    BackendConfig,
    BackendEndpoint,
    DeviceEndpoint,
    HandshakeFailed,
    KeyUpdateDone,
    Received,
)
from sealmq.errors import Reason
from sealmq.identity import CredentialKind, PeerIdentity, Role
from sealmq.topics import RecordKind
from tests.pki_fixtures import TestPki, make_pki
from tests.test_endpoint import Net, completed, rejected

CCS_DEVICES = ["tiny-1", "tiny-2", "tiny-rev"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    p = make_pki(tmp_path_factory.mktemp("pki"), ["cam-1"])
    pki_ccs.issue_ccs(p.path, "backend", "backend")
    for d in CCS_DEVICES:
        pki_ccs.issue_ccs(p.path, "device", d)
    pki_ccs.revoke_ccs(p.path, role="device", name="tiny-rev")
    return p


def backend_for(pki: TestPki, methods: tuple[int, ...] = (0, 3)) -> BackendEndpoint:
    registry = pki_ccs.load_registry(pki.path)
    trust = pki.trust_store()

    def factory(now: float) -> PeerAuthenticator:
        return MixedAuthenticator(
            CcsAuthenticator(registry, Role.DEVICE, now),
            X509Authenticator(trust, Role.DEVICE, datetime.fromtimestamp(now, UTC)),
        )

    creds: list[LocalCredential] = [
        pki.credential("backend", "backend"),
        pki_ccs.load_credential(pki.path, "backend", "backend"),
    ]
    return BackendEndpoint(credentials=creds, trust_store=trust, config=BackendConfig(methods=methods),
                           authenticator=factory)


def ccs_device(pki: TestPki, device_id: str, *, as_id: str | None = None, by_value: bool = False,
               method: int = 3) -> DeviceEndpoint:
    """A method-3 device; ``as_id`` puts ``device_id``'s credential on another device's topics."""
    backend_only = CcsRegistry(e for e in pki_ccs.load_registry(pki.path).entries if e.role == "backend")
    return DeviceEndpoint(
        device_id=as_id or device_id,
        credential=pki_ccs.load_credential(pki.path, "device", device_id, by_value=by_value),
        trust_store=None,
        authenticator=lambda now: CcsAuthenticator(backend_only, Role.BACKEND, now),
        method=method,
    )


def x509_device(pki: TestPki, device_id: str) -> DeviceEndpoint:
    return DeviceEndpoint(device_id=device_id, credential=pki.credential("device", device_id),
                          trust_store=pki.trust_store())


def received(events: list[object]) -> list[tuple[str, bytes]]:
    return [(e.device_id, e.plaintext) for e in events if isinstance(e, Received)]


def test_method_3_and_method_0_devices_on_one_backend(pki: TestPki) -> None:
    backend = backend_for(pki)
    tiny, cam = ccs_device(pki, "tiny-1"), x509_device(pki, "cam-1")
    net = Net(backend, [tiny, cam])
    # interleave the two handshakes: both half-open at the same time
    first = tiny.start_handshake(net.now, os.urandom) + cam.start_handshake(net.now, os.urandom)
    events = net.run(first)
    assert sorted(e.device_id for e in completed(events)) == ["cam-1", "cam-1", "tiny-1", "tiny-1"]
    assert not rejected(events)
    peer = backend.peer("tiny-1")
    assert isinstance(peer, CcsIdentity) and (peer.role, peer.name) == ("device", "tiny-1")
    assert backend.peer("cam-1").name == "cam-1"  # a pki.verify.VerifiedPeer
    assert isinstance(tiny.peer, CcsIdentity) and tiny.peer.name == "backend"

    got = net.run(tiny.seal(RecordKind.TELEMETRY, b"t-from-tiny", net.now)
                  + cam.seal(RecordKind.TELEMETRY, b"t-from-cam", net.now))
    assert received(got) == [("tiny-1", b"t-from-tiny"), ("cam-1", b"t-from-cam")]
    got = net.run(backend.seal("tiny-1", RecordKind.COMMAND, b"cmd-tiny", net.now))
    assert received(got) == [("tiny-1", b"cmd-tiny")]

    # key update on the method-3 session, then records still flow both ways
    events = net.run(tiny.key_update(net.now, os.urandom))
    assert [e.device_id for e in events if isinstance(e, KeyUpdateDone)] == ["tiny-1", "tiny-1"]
    got = net.run(tiny.seal(RecordKind.TELEMETRY, b"after-ku", net.now)
                  + backend.seal("tiny-1", RecordKind.COMMAND, b"after-ku-down", net.now))
    assert received(got) == [("tiny-1", b"after-ku"), ("tiny-1", b"after-ku-down")]
    assert tiny.session is not None and tiny.session.epoch == 1
    assert all(b"t-from-tiny" not in p.payload and b"after-ku" not in p.payload for p in net.wire)


def test_both_kinds_of_peer_are_a_peer_identity(pki: TestPki) -> None:
    """X.509 (pki.verify.VerifiedPeer) and CCS (CcsIdentity) peers give the endpoints the same
    attributes: what lets the core type them as sealmq.identity.PeerIdentity."""
    backend = backend_for(pki)
    tiny, cam = ccs_device(pki, "tiny-1"), x509_device(pki, "cam-1")
    net = Net(backend, [tiny, cam])
    events = net.run(tiny.start_handshake(net.now, os.urandom) + cam.start_handshake(net.now, os.urandom))
    peers = {(e.device_id, e.peer_name): e.identity for e in completed(events)}
    assert set(peers) == {("tiny-1", "backend"), ("tiny-1", "tiny-1"), ("cam-1", "backend"), ("cam-1", "cam-1")}
    for (_, name), peer in peers.items():
        assert isinstance(peer, PeerIdentity)
        assert peer.name == name
        assert peer.role is (Role.BACKEND if name == "backend" else Role.DEVICE)
        assert peer.public_key is not None
    assert type(peers["cam-1", "cam-1"]).__name__ == "VerifiedPeer"
    assert peers["cam-1", "cam-1"].credential.startswith("x509 serial ")
    assert peers["tiny-1", "tiny-1"].credential == f"ccs kid {backend.peer('tiny-1').kid.hex()}"
    # what the adapters need of a peer, without looking for attributes of one kind
    assert peers["cam-1", "cam-1"].kind is CredentialKind.X509
    assert peers["cam-1", "cam-1"].credential_ref == peers["cam-1", "cam-1"].certificate.public_bytes(Encoding.DER)
    assert peers["tiny-1", "tiny-1"].kind is CredentialKind.CCS
    assert peers["tiny-1", "tiny-1"].credential_ref == backend.peer("tiny-1").kid
    assert backend.peer_public_key("tiny-1") == peers["tiny-1", "tiny-1"].public_key


def test_ccs_sent_by_value(pki: TestPki) -> None:
    backend = backend_for(pki)
    dev = ccs_device(pki, "tiny-2", by_value=True)
    net = Net(backend, [dev])
    events = net.connect(dev)
    assert [e.device_id for e in completed(events)] == ["tiny-2", "tiny-2"]
    m3 = net.wire[2].payload  # C_R || message_3: the CCS travels encrypted, never in clear
    assert b"urn:sealmq:device:tiny-2" not in b"".join(p.payload for p in net.wire)
    by_kid = ccs_device(pki, "tiny-2")
    net2 = Net(backend_for(pki), [by_kid])
    assert len(completed(net2.connect(by_kid))) == 2
    assert len(m3) - len(net2.wire[2].payload) > 100  # the whole CCS instead of a 4-byte kid


def test_ccs_of_one_device_on_another_devices_topics(pki: TestPki) -> None:
    backend = backend_for(pki)
    dev = ccs_device(pki, "tiny-1", as_id="tiny-2")
    net = Net(backend, [dev])
    events = net.connect(dev)
    fails = [e for e in events if isinstance(e, HandshakeFailed)]
    assert next((e.device_id, e.reason) for e in fails) == ("tiny-2", Reason.IDENTITY_MISMATCH)
    assert "tiny-2" not in backend.sessions and not completed(events)


def test_revoked_ccs_is_refused(pki: TestPki) -> None:
    backend = backend_for(pki)
    dev = ccs_device(pki, "tiny-rev")
    net = Net(backend, [dev])
    events = net.connect(dev)
    assert (("tiny-rev", Reason.REVOKED) in
            [(e.device_id, e.reason) for e in events if isinstance(e, HandshakeFailed)])
    assert not dev.established and "tiny-rev" not in backend.sessions


def test_backend_without_method_3_refuses_it(pki: TestPki) -> None:
    backend = backend_for(pki, methods=(0,))
    dev = ccs_device(pki, "tiny-1")
    net = Net(backend, [dev])
    events = net.connect(dev)
    assert next(r.reason for r in rejected(events)) is Reason.UNSUPPORTED_METHOD
    assert not completed(events) and not dev.established


def test_unregistered_ccs_is_unknown(pki: TestPki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", [])
    pki_ccs.issue_ccs(other.path, "device", "tiny-1")  # same name, a registry the backend never saw
    backend = backend_for(pki)
    dev = ccs_device(other, "tiny-1")
    dev.authenticator = ccs_device(pki, "tiny-1").authenticator  # it does know the real backend
    net = Net(backend, [dev])
    events = net.connect(dev)
    assert (("tiny-1", Reason.UNKNOWN_CREDENTIAL) in
            [(e.device_id, e.reason) for e in events if isinstance(e, HandshakeFailed)])


def test_method_2_falls_out_ccs_device_certificate_backend(pki: TestPki) -> None:
    """Method 2: the device uses static DH (CCS), the backend signs with its certificate."""
    backend = backend_for(pki, methods=(0, 2, 3))
    trust = pki.trust_store()
    dev = ccs_device(pki, "tiny-1", method=2)
    dev.authenticator = lambda now: X509Authenticator(trust, Role.BACKEND, datetime.fromtimestamp(now, UTC))
    net = Net(backend, [dev])
    events = net.connect(dev)
    assert [e.device_id for e in completed(events)] == ["tiny-1", "tiny-1"]
    assert received(net.run(dev.seal(RecordKind.TELEMETRY, b"m2", net.now))) == [("tiny-1", b"m2")]
