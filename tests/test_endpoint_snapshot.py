"""Backend state moved between endpoints (workers): ``BackendEndpoint.export_half_open`` /
``import_half_open`` and ``export_session`` / ``import_session`` (docs/protocol.md section 12).

With a real PKI (X.509 P-256, Ed25519, RSA devices, by value and by reference, and CCS devices of
method 3): a handshake whose message_1 endpoint A answered is completed by endpoint B, and a
session A established continues on B (B opens the device's next record, seals a command the device
opens, runs a key update). Two endpoints that complete or continue the same state end in the very
same snapshot. Time and randomness are injected (a clock fixed from the PKI, a counter-based random
source), so every run is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

from backend.enrol import ClaimAwareAuthenticator, is_claim
from pki import ccs as pki_ccs
from pki import claim, layout, store
from pki.verify import load_chain
from sealmq import cbor, topics
from sealmq.edhoc import (
    AuthenticatedPeer,
    CcsAuthenticator,
    CcsRegistry,
    IdCred,
    LocalCredential,
    MixedAuthenticator,
    PeerAuthenticator,
    X509Authenticator,
    X509Credential,
)
from sealmq.endpoint import (
    BackendConfig,
    BackendEndpoint,
    DeviceEndpoint,
    HandshakeCompleted,
    KeyUpdateDone,
    Output,
    Publish,
    Received,
)
from sealmq.errors import DecodeError, EdhocError, Reason, SealmqError
from sealmq.identity import Role
from sealmq.topics import RecordKind
from tests.edhoc_helpers import counter_random
from tests.pki_fixtures import TestPki, make_pki

X509_DEVICES = ["cam-1", "cam-2", "cam-rev", "ed-1", "rsa-1"]
CCS_DEVICES = ["tiny-1", "tiny-2"]
# (device id, how it authenticates)
DEVICES = [("cam-1", "x5chain"), ("cam-2", "x5t"), ("ed-1", "x5chain"), ("rsa-1", "x5chain"),
           ("tiny-1", "kid"), ("tiny-2", "kccs")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    p = make_pki(tmp_path_factory.mktemp("pki"), X509_DEVICES, key_types={"ed-1": "ed25519", "rsa-1": "rsa2048"},
                 extra_backends={"backend-ed": "ed25519", "backend-rsa": "rsa2048", "backend-2": "p256"})
    pki_ccs.issue_ccs(p.path, "backend", "backend")
    for d in CCS_DEVICES:
        pki_ccs.issue_ccs(p.path, "device", d)
    return p


@pytest.fixture(scope="module")
def now(pki: TestPki) -> float:
    """A fixed clock: an hour after the device certificates became valid."""
    return pki.identity("device", "cam-1").chain[0].not_valid_before_utc.timestamp() + 3600


def backend(pki: TestPki, *, names: tuple[str, ...] = ("backend", "backend-ed", "backend-rsa"),
            config: BackendConfig | None = None,
            wrap: Callable[[PeerAuthenticator, float], PeerAuthenticator] | None = None) -> BackendEndpoint:
    """One worker: its own trust store, CCS registry and authenticator, the deployment's credentials."""
    trust = pki.trust_store()
    registry = pki_ccs.load_registry(pki.path)
    known = [pki.credential("device", "cam-2").chain_der]

    def factory(now: float) -> PeerAuthenticator:
        auth = MixedAuthenticator(CcsAuthenticator(registry, Role.DEVICE, now),
                                  X509Authenticator(trust, Role.DEVICE, datetime.fromtimestamp(now, UTC),
                                                    known_chains=known))
        return wrap(auth, now) if wrap is not None else auth

    creds: list[LocalCredential] = [pki.credential("backend", n) for n in names]
    creds.append(pki_ccs.load_credential(pki.path, "backend", "backend"))
    return BackendEndpoint(credentials=creds, trust_store=trust, authenticator=factory,
                           config=config or BackendConfig(methods=(0, 3)))


def device(pki: TestPki, device_id: str, how: str) -> DeviceEndpoint:
    if how in ("kid", "kccs"):
        backend_only = CcsRegistry(e for e in pki_ccs.load_registry(pki.path).entries if e.role == "backend")
        return DeviceEndpoint(
            device_id=device_id, trust_store=None, method=3,
            credential=pki_ccs.load_credential(pki.path, "device", device_id, by_value=how == "kccs"),
            authenticator=lambda now: CcsAuthenticator(backend_only, Role.BACKEND, now))
    # suites 0 and -24 are signed by the backend's Ed25519 and RSA certificates, under their own names
    name = {"ed-1": "backend-ed", "rsa-1": "backend-rsa"}.get(device_id, "backend")
    return DeviceEndpoint(device_id=device_id, trust_store=pki.trust_store(), backend_name=name,
                          credential=pki.credential("device", device_id, by_reference=how == "x5t"))


@dataclass
class Run:
    """Routes publishes between one device and whichever backend ``up`` names, and records them."""

    dev: DeviceEndpoint
    up: BackendEndpoint
    now: float
    rnd: Callable[[int], bytes]

    def __post_init__(self) -> None:
        self.frames: list[Publish] = []
        self.after_up: Callable[[], None] = lambda: None

    def run(self, outputs: list[Output]) -> list[Output]:
        queue, seen = list(outputs), []
        while queue:
            out = queue.pop(0)
            if not isinstance(out, Publish):
                seen.append(out)
                continue
            self.frames.append(out)
            if topics.parse(out.topic).direction is topics.Direction.UP:
                queue.extend(self.up.handle(out.topic, out.payload, self.now, self.rnd))
                self.after_up()
            else:
                queue.extend(self.dev.handle(out.topic, out.payload, self.now, self.rnd))
        return seen


def received(events: list[Output]) -> list[tuple[str, RecordKind, bytes]]:
    return [(e.device_id, e.kind, e.plaintext) for e in events if isinstance(e, Received)]


def spki(key: Any) -> bytes:
    return bytes(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


# --- a handshake finished by another endpoint ---------------------------------------------------

def handshake_across(pki: TestPki, now: float, device_id: str, how: str, seed: int = 1,
                     ) -> tuple[DeviceEndpoint, BackendEndpoint, BackendEndpoint, Run, list[Output]]:
    a, b = backend(pki), backend(pki)
    dev = device(pki, device_id, how)
    run = Run(dev, a, now, counter_random(seed))

    def move_after_message_2() -> None:
        if run.up is a and device_id in a.half_open:
            blob = a.export_half_open(device_id)
            assert blob is not None
            b.import_half_open(device_id, blob, now)
            run.up = b

    run.after_up = move_after_message_2
    events = run.run(dev.start_handshake(now, run.rnd))
    return dev, a, b, run, events


@pytest.mark.parametrize(("device_id", "how"), DEVICES)
def test_message_3_completes_on_another_endpoint(pki: TestPki, now: float, device_id: str, how: str) -> None:
    dev, a, b, run, events = handshake_across(pki, now, device_id, how)
    assert [type(e) for e in events if isinstance(e, HandshakeCompleted)] == [HandshakeCompleted] * 2
    assert dev.established and device_id in b.sessions and device_id not in b.half_open
    assert device_id not in a.sessions
    # A, still holding the half-open handshake, would have finished it into the very same session
    message_3 = [f for f in run.frames if f.topic.endswith("/hs/up")][-1]
    a.handle(message_3.topic, message_3.payload, now, run.rnd)
    assert a.export_session(device_id) == b.export_session(device_id)
    # the session works through B, both ways
    assert received(run.run(dev.seal(RecordKind.TELEMETRY, b"t-1", now))) == \
        [(device_id, RecordKind.TELEMETRY, b"t-1")]
    assert received(run.run(b.seal(device_id, RecordKind.COMMAND, b"c-1", now))) == \
        [(device_id, RecordKind.COMMAND, b"c-1")]


def test_the_half_open_snapshot_names_the_handshake(pki: TestPki, now: float) -> None:
    a = backend(pki)
    dev = device(pki, "tiny-1", "kid")
    run = Run(dev, a, now, counter_random(3))
    run.run(dev.start_handshake(now, run.rnd))  # A answers message_1; message_3 goes to A too
    assert a.export_half_open("tiny-1") is None  # done: nothing half-open
    rnd = counter_random(4)
    (m1,) = dev.start_handshake(now, rnd)
    assert isinstance(m1, Publish)
    (_m2,) = a.handle(m1.topic, m1.payload, now, rnd)
    blob = a.export_half_open("tiny-1")
    assert blob is not None
    version, device_id, created, responder = cbor.loads(blob)
    assert (version, device_id, created) == (1, "tiny-1", now)
    assert cbor.loads(responder)[1] == 3  # method 3
    b = backend(pki)
    b.import_half_open("tiny-1", blob, now)
    assert b.export_half_open("tiny-1") == blob
    half_a, half_b = a.half_open["tiny-1"], b.half_open["tiny-1"]
    assert (half_b.c_r, half_b.c_i_prefix, half_b.created) == (half_a.c_r, half_a.c_i_prefix, half_a.created)
    # a message_3 that is not one fails the responder: nothing left to export (nor to finish)
    up = "sealmq/v1/tiny-1/hs/up"
    assert a.handle(up, half_a.c_r + cbor.dumps(5), now, rnd)
    assert a.export_half_open("tiny-1") is None


# --- a session continued by another endpoint -------------------------------------------------------

@pytest.mark.parametrize(("device_id", "how"), DEVICES)
def test_a_session_continues_on_another_endpoint(pki: TestPki, now: float, device_id: str, how: str) -> None:
    a = backend(pki)
    dev = device(pki, device_id, how)
    run = Run(dev, a, now, counter_random(7))
    run.run(dev.start_handshake(now, run.rnd))
    for i in range(3):
        run.run(dev.seal(RecordKind.TELEMETRY, b"before-%d" % i, now))
    assert any(isinstance(e, KeyUpdateDone) for e in run.run(dev.key_update(now, run.rnd)))
    run.run(dev.seal(RecordKind.TELEMETRY, b"epoch-1", now))
    blob = a.export_session(device_id)
    assert blob is not None
    b = backend(pki)
    b.import_session(device_id, blob, now)
    assert b.export_session(device_id) == blob
    # the same peer: identity type, name, credential and the key media signatures are checked with
    peer_a, peer_b = a.peer(device_id), b.peer(device_id)
    assert peer_a is not None and peer_b is not None
    assert type(peer_b) is type(peer_a)
    assert (peer_b.name, peer_b.kind, peer_b.credential_ref) == (peer_a.name, peer_a.kind, peer_a.credential_ref)
    assert spki(b.peer_public_key(device_id)) == spki(a.peer_public_key(device_id))
    if how not in ("kid", "kccs"):
        assert spki(b.peer_public_key(device_id)) == spki(pki.identity("device", device_id).private_key.public_key())
    # B opens the device's next record exactly as A would
    (rec,) = dev.seal(RecordKind.TELEMETRY, b"after-move", now)
    assert isinstance(rec, Publish)
    out_a, out_b = (x.handle(rec.topic, rec.payload, now, run.rnd) for x in (a, b))
    assert out_a == out_b and received(out_b) == [(device_id, RecordKind.TELEMETRY, b"after-move")]
    # B seals a command the device opens, and runs a key update with it
    run.up = b
    assert received(run.run(b.seal(device_id, RecordKind.COMMAND, b"from-b", now))) == \
        [(device_id, RecordKind.COMMAND, b"from-b")]
    run.now = later = now + 700  # past the grace windows of epoch 0 on both sides
    run.run([*b.poll(later, run.rnd), *dev.poll(later, run.rnd)])
    assert any(isinstance(e, KeyUpdateDone) for e in run.run(b.key_update(device_id, later, run.rnd)))
    assert received(run.run(dev.seal(RecordKind.TELEMETRY, b"epoch-2", later))) == \
        [(device_id, RecordKind.TELEMETRY, b"epoch-2")]


# --- refusals --------------------------------------------------------------------------------------

def half_open_blob(pki: TestPki, now: float, device_id: str = "cam-1", how: str = "x5chain") -> bytes:
    a = backend(pki)
    dev = device(pki, device_id, how)
    rnd = counter_random(11)
    (m1,) = dev.start_handshake(now, rnd)
    assert isinstance(m1, Publish)
    a.handle(m1.topic, m1.payload, now, rnd)
    blob = a.export_half_open(device_id)
    assert blob is not None
    return blob


def session_blob(pki: TestPki, now: float, device_id: str = "cam-1", how: str = "x5chain") -> bytes:
    a = backend(pki)
    dev = device(pki, device_id, how)
    run = Run(dev, a, now, counter_random(12))
    run.run(dev.start_handshake(now, run.rnd))
    blob = a.export_session(device_id)
    assert blob is not None
    return blob


def test_import_half_open_refusals(pki: TestPki, now: float) -> None:
    blob = half_open_blob(pki, now)
    b = backend(pki)
    with pytest.raises(DecodeError) as exc:
        b.import_half_open("cam-2", blob, now)  # another device's handshake
    assert exc.value.reason is Reason.IDENTITY_MISMATCH
    with pytest.raises(EdhocError) as exc:
        b.import_half_open("cam-1", blob, now + b.config.half_open_ttl + 1)
    assert exc.value.reason is Reason.HANDSHAKE_TIMEOUT
    # a worker without the certificate message_2 was signed with (another P-256 one)
    with pytest.raises(DecodeError) as exc:
        backend(pki, names=("backend-2",)).import_half_open("cam-1", blob, now)
    assert exc.value.reason is Reason.UNKNOWN_CREDENTIAL
    # ... or without method 3 for a CCS device's handshake
    with pytest.raises(DecodeError) as exc:
        backend(pki, config=BackendConfig()).import_half_open("tiny-1", half_open_blob(pki, now, "tiny-1", "kid"), now)
    assert exc.value.reason is Reason.UNSUPPORTED_METHOD
    # the half-open bound holds for imported handshakes too
    small = backend(pki, config=BackendConfig(methods=(0, 3), max_half_open=1))
    small.import_half_open("cam-1", blob, now)
    small.import_half_open("cam-1", blob, now)  # replacing the device's own one is fine
    with pytest.raises(EdhocError) as exc:
        small.import_half_open("ed-1", half_open_blob(pki, now, "ed-1"), now)
    assert exc.value.reason is Reason.TOO_MANY_HANDSHAKES
    assert not b.half_open and list(small.half_open) == ["cam-1"]


def test_import_session_refusals(pki: TestPki, now: float) -> None:
    blob = session_blob(pki, now)
    b = backend(pki)
    with pytest.raises(DecodeError) as exc:
        b.import_session("cam-2", blob, now)
    assert exc.value.reason is Reason.IDENTITY_MISMATCH
    # the certificate expired since the handshake: refused as a handshake would be
    with pytest.raises(EdhocError) as exc:
        b.import_session("cam-1", blob, now + 400 * 24 * 3600)
    assert exc.value.reason is Reason.EXPIRED
    # the device's side of the session is not the backend's
    items = cbor.loads(blob)
    dev = device(pki, "cam-1", "x5chain")
    run = Run(dev, backend(pki), now, counter_random(13))
    run.run(dev.start_handshake(now, run.rnd))
    assert dev.session is not None
    items[4] = dev.session.to_bytes()
    with pytest.raises(DecodeError) as exc:
        b.import_session("cam-1", cbor.dumps(items), now)
    assert exc.value.reason is Reason.IDENTITY_MISMATCH
    # ID_CRED_I now resolves to another key (a re-registered credential, say): refused

    class OtherKey:
        def __init__(self, inner: PeerAuthenticator, now: float) -> None:
            self.inner = inner

        def authenticate(self, id_cred: IdCred) -> AuthenticatedPeer:
            peer = self.inner.authenticate(id_cred)
            other = pki.identity("device", "cam-2").private_key.public_key()
            return AuthenticatedPeer(peer.cred, other, peer.identity)

    with pytest.raises(EdhocError) as exc:
        backend(pki, wrap=OtherKey).import_session("cam-1", blob, now)
    assert exc.value.reason is Reason.UNKNOWN_CREDENTIAL
    for bad in (b"", b"\x80", cbor.dumps([2, "cam-1"]), blob[:-1], blob + b"\x00"):
        with pytest.raises(DecodeError):
            b.import_session("cam-1", bad, now)
    assert not b.sessions


def test_a_revoked_device_session_is_not_imported(pki: TestPki, now: float) -> None:
    blob = session_blob(pki, now, "cam-rev")
    store.revoke(pki.path, cert_path=layout.device_dir(pki.path, "cam-rev") / "cert.pem")
    b = backend(pki)  # a worker that loaded the new CRL
    with pytest.raises(EdhocError) as exc:
        b.import_session("cam-rev", blob, now)
    assert exc.value.reason is Reason.REVOKED
    assert not b.sessions


def test_a_claim_session_stays_a_claim_on_another_endpoint(pki: TestPki, now: float) -> None:
    """Enrolment sessions are confined by the identity's type (``backend.enrol.is_claim``): the
    import gives the same type as the handshake, and a claim used up since is refused."""
    folder = claim.issue_claim(pki.path, "fresh-1", now=datetime.fromtimestamp(now - 600, UTC))
    key = load_pem_private_key((folder / claim.CLAIM_KEY).read_bytes(), None)
    certs = load_chain((folder / claim.CLAIM_CHAIN).read_bytes())
    dev = DeviceEndpoint(device_id="fresh-1", trust_store=pki.trust_store(),
                         credential=X509Credential(key, [c.public_bytes(Encoding.DER) for c in certs]))

    def claims(inner: PeerAuthenticator, when: float) -> PeerAuthenticator:
        return ClaimAwareAuthenticator(inner, pki.trust_store(), pki.path, when)

    a = backend(pki, wrap=claims)
    run = Run(dev, a, now, counter_random(21))
    run.run(dev.start_handshake(now, run.rnd))
    assert is_claim(a.peer("fresh-1"))
    blob = a.export_session("fresh-1")
    assert blob is not None
    b = backend(pki, wrap=claims)
    b.import_session("fresh-1", blob, now)
    assert is_claim(b.peer("fresh-1"))
    assert not is_claim(backend(pki).peer("fresh-1"))  # (the check can fail: no session, no claim)
    claim.consume(pki.path, certs[0].serial_number, "fresh-1", 1, datetime.fromtimestamp(now, UTC))
    with pytest.raises(EdhocError) as exc:
        backend(pki, wrap=claims).import_session("fresh-1", blob, now)
    assert exc.value.reason is Reason.CLAIM_EXHAUSTED


# --- mutations: sealmq errors only, and a refused import changes nothing ---------------------------

@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")  # mutated serials
@pytest.mark.parametrize("how", ["x5chain", "x5t", "kid"])
def test_every_single_byte_change_of_the_endpoint_snapshots(pki: TestPki, now: float, how: str) -> None:
    device_id = {"x5chain": "cam-1", "x5t": "cam-2", "kid": "tiny-1"}[how]
    b = backend(pki)
    for blob, load in ((half_open_blob(pki, now, device_id, how), b.import_half_open),
                       (session_blob(pki, now, device_id, how), b.import_session)):
        for pos in range(len(blob)):
            for edited in (blob[:pos] + bytes([blob[pos] ^ 0x01]) + blob[pos + 1:],
                           blob[:pos] + bytes([blob[pos] ^ 0x80]) + blob[pos + 1:], blob[:pos]):
                before = (dict(b.half_open), dict(b.sessions))
                try:
                    load(device_id, edited, now)
                except SealmqError:
                    assert (b.half_open, b.sessions) == before
