"""The sans-IO endpoints driven in memory, with a real PKI: every message a device and the
backend exchange goes through a tiny router that plays the broker (and the attacker)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from pki import store
from sealmq import cbor, record, topics
from sealmq.endpoint import (
    BackendConfig,
    BackendEndpoint,
    DeviceEndpoint,
    EndpointConfig,
    HandshakeCompleted,
    HandshakeFailed,
    KeyUpdateDone,
    Output,
    Publish,
    Received,
    Rejected,
    SessionLost,
)
from sealmq.endpoint.device import DeviceState
from sealmq.errors import Reason
from sealmq.session import SessionConfig
from sealmq.topics import RecordKind
from tests.pki_fixtures import TestPki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("pki"), ["cam-1", "cam-2", "ed-1", "rsa-1"],
                    key_types={"ed-1": "ed25519", "rsa-1": "rsa2048"},
                    extra_backends={"backend-ed": "ed25519", "backend-rsa": "rsa2048"})


class Net:
    """Delivers publishes between one backend and several devices; records everything."""

    def __init__(self, backend: BackendEndpoint, devices: Iterable[DeviceEndpoint]) -> None:
        self.backend = backend
        self.devices = {d.device_id: d for d in devices}
        self.wire: list[Publish] = []
        self.events: list[Output] = []
        # The clock of this run: taken when the network is made, after the PKI fixture issued its
        # certificates (valid from 5 minutes before issuance); a clock taken at import time would
        # predate them in a long test run.
        self.now = time.time()

    def run(self, outputs: list[Output], *, max_steps: int = 100) -> list[Output]:
        queue = list(outputs)
        seen: list[Output] = []
        steps = 0
        while queue and steps < max_steps:
            steps += 1
            out = queue.pop(0)
            if not isinstance(out, Publish):
                seen.append(out)
                continue
            self.wire.append(out)
            parsed = topics.parse(out.topic)
            if parsed.direction is topics.Direction.UP:
                queue.extend(self.backend.handle(out.topic, out.payload, self.now, os.urandom))
            elif parsed.device_id in self.devices:
                queue.extend(self.devices[parsed.device_id].handle(out.topic, out.payload, self.now, os.urandom))
        self.events.extend(seen)
        return seen

    def connect(self, device: DeviceEndpoint) -> list[Output]:
        return self.run(device.start_handshake(self.now, os.urandom))


def make(pki: TestPki, device_ids: list[str], *, suites: tuple[int, ...] = (2,),
         session: SessionConfig | None = None, backend_name: str = "backend",
         ) -> tuple[Net, BackendEndpoint, list[DeviceEndpoint]]:
    names = ["backend", *(n for n in pki.backends if n != "backend")]
    backend = BackendEndpoint(
        credentials=[pki.credential("backend", n) for n in names],
        trust_store=pki.trust_store(),
        config=BackendConfig(session=session or SessionConfig()),
    )
    devices = [
        DeviceEndpoint(device_id=d, credential=pki.credential("device", d), trust_store=pki.trust_store(),
                       backend_name=backend_name,
                       config=EndpointConfig(suites=suites, session=session or SessionConfig()))
        for d in device_ids
    ]
    return Net(backend, devices), backend, devices


def completed(events: list[Output]) -> list[HandshakeCompleted]:
    return [e for e in events if isinstance(e, HandshakeCompleted)]


def rejected(events: list[Output]) -> list[Rejected]:
    return [e for e in events if isinstance(e, Rejected)]


def test_full_session_both_ways(pki: TestPki) -> None:
    net, backend, (dev,) = make(pki, ["cam-1"])
    events = net.connect(dev)
    assert [e.device_id for e in completed(events)] == ["cam-1", "cam-1"]  # both sides
    assert dev.established
    assert "cam-1" in backend.sessions
    assert backend.peer("cam-1").name == "cam-1"
    got = net.run(dev.seal(RecordKind.TELEMETRY, b"hello-marker", net.now))
    assert [(e.kind, e.plaintext) for e in got if isinstance(e, Received)] == [(RecordKind.TELEMETRY, b"hello-marker")]
    got = net.run(backend.seal("cam-1", RecordKind.COMMAND, b"do-it", net.now))
    assert [(e.device_id, e.plaintext) for e in got if isinstance(e, Received)] == [("cam-1", b"do-it")]
    # nothing on the wire carries the plaintexts
    assert all(b"hello-marker" not in p.payload and b"do-it" not in p.payload for p in net.wire)


@pytest.mark.parametrize("device_id", ["ed-1", "rsa-1"])
def test_other_key_types_negotiate_their_suite(pki: TestPki, device_id: str) -> None:
    # Suites 0 and -24 fix the signature algorithm of both sides: the backend serves them with
    # a second and third credential of the matching key type, under their own names.
    suites, name = {"ed-1": ((0,), "backend-ed"), "rsa-1": ((-24,), "backend-rsa")}[device_id]
    net, _backend, (dev,) = make(pki, [device_id], suites=suites, backend_name=name)
    events = net.connect(dev)
    assert {e.suite for e in completed(events)} == {suites[0]}


def test_suite_negotiation_retries(pki: TestPki) -> None:
    # The device prefers suite 3 (not served by this backend), then 2: one error round-trip.
    net, _backend, (dev,) = make(pki, ["cam-1"], suites=(3, 2))
    events = net.connect(dev)
    assert {e.suite for e in completed(events)} == {2}
    assert sum(1 for p in net.wire if p.topic.endswith("/hs/up")) == 3  # message_1 twice, message_3


def test_default_suites_negotiate_suite_6_and_seal_with_a128gcm(pki: TestPki) -> None:
    """A P-256 device and backend left to their defaults agree on suite 6 at once, and its records
    carry A128GCM's 16-byte tag; against a backend that serves only suite 2 (an older one, or one
    configured so) the same device gets suite 2, AES-CCM, after one ERR_CODE 2 round trip."""
    net, backend, (dev,) = make(pki, ["cam-1"], suites=())
    assert dev.suites == (6, 2)
    events = net.connect(dev)
    assert {e.suite for e in completed(events)} == {6}
    assert sum(1 for p in net.wire if p.topic.endswith("/hs/up")) == 2
    assert dev.session is not None and backend.sessions["cam-1"].session is not None
    (pub,) = [o for o in dev.seal(RecordKind.TELEMETRY, b"", net.now) if isinstance(o, Publish)]
    assert len(record.decode(pub.payload).ciphertext) == 16  # an empty plaintext: the tag alone
    old = BackendEndpoint(credentials=[pki.credential("backend", "backend")], trust_store=pki.trust_store(),
                          config=BackendConfig(suites=(2,)))
    dev2 = DeviceEndpoint(device_id="cam-1", credential=pki.credential("device", "cam-1"),
                          trust_store=pki.trust_store())
    net2 = Net(old, [dev2])
    assert {e.suite for e in completed(net2.connect(dev2))} == {2}
    assert sum(1 for p in net2.wire if p.topic.endswith("/hs/up")) == 3
    (pub,) = [o for o in dev2.seal(RecordKind.TELEMETRY, b"", net2.now) if isinstance(o, Publish)]
    assert len(record.decode(pub.payload).ciphertext) == 8


def test_key_update_on_demand_loses_nothing(pki: TestPki) -> None:
    net, _backend, (dev,) = make(pki, ["cam-1"])
    net.connect(dev)
    delivered: list[bytes] = []
    for i in range(5):
        delivered += [e.plaintext for e in net.run(dev.seal(RecordKind.TELEMETRY, b"m%d" % i, net.now))
                      if isinstance(e, Received)]
    events = net.run(dev.key_update(net.now, os.urandom))
    assert any(isinstance(e, KeyUpdateDone) and e.epoch == 1 for e in events)
    for i in range(5, 10):
        delivered += [e.plaintext for e in net.run(dev.seal(RecordKind.TELEMETRY, b"m%d" % i, net.now))
                      if isinstance(e, Received)]
    assert delivered == [b"m%d" % i for i in range(10)]
    assert dev.session is not None
    assert dev.session.epoch == 1


def test_replayed_moved_and_flipped_records_are_rejected(pki: TestPki) -> None:
    net, _backend, (a, b) = make(pki, ["cam-1", "cam-2"])
    net.connect(a)
    net.connect(b)
    (pub,) = [o for o in a.seal(RecordKind.TELEMETRY, b"once", net.now) if isinstance(o, Publish)]
    assert [e.plaintext for e in net.run([pub]) if isinstance(e, Received)] == [b"once"]
    # replay
    assert [r.reason for r in rejected(net.run([pub]))] == [Reason.REPLAY]
    # moved to device B's topic, and to another channel of A
    moved_b = Publish(pub.topic.replace("cam-1", "cam-2"), pub.payload)
    moved_media = Publish(pub.topic.replace("/data/", "/media/"), pub.payload)
    assert rejected(net.run([moved_b]))
    assert rejected(net.run([moved_media]))
    # a flipped bit anywhere
    (pub2,) = [o for o in a.seal(RecordKind.TELEMETRY, b"twice", net.now) if isinstance(o, Publish)]
    for i in range(len(pub2.payload)):
        for bit in (0x01, 0x80):
            bad = bytearray(pub2.payload)
            bad[i] ^= bit
            assert rejected(net.run([Publish(pub2.topic, bytes(bad))])), (i, bit)
    # the legitimate sessions are unharmed
    assert [e.plaintext for e in net.run([pub2]) if isinstance(e, Received)] == [b"twice"]
    got = net.run(b.seal(RecordKind.TELEMETRY, b"b-ok", net.now))
    assert [e.plaintext for e in got if isinstance(e, Received)] == [b"b-ok"]


def test_device_certificate_on_another_devices_topics(pki: TestPki) -> None:
    # cam-2's key and certificate, but speaking on cam-1's topics
    backend = BackendEndpoint(credentials=[pki.credential("backend", "backend")], trust_store=pki.trust_store())
    impostor = DeviceEndpoint(device_id="cam-1", credential=pki.credential("device", "cam-2"),
                              trust_store=pki.trust_store())
    net = Net(backend, [impostor])
    events = net.connect(impostor)
    failed = [e for e in events if isinstance(e, HandshakeFailed)]
    assert Reason.IDENTITY_MISMATCH in {e.reason for e in failed}
    assert "cam-1" not in backend.sessions


def test_device_from_another_ca_and_revoked_device(pki: TestPki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", ["cam-1"])
    net, backend, _ = make(pki, [])
    rogue = DeviceEndpoint(device_id="cam-1", credential=other.credential("device", "cam-1"),
                           trust_store=pki.trust_store())
    net.devices["cam-1"] = rogue
    events = net.connect(rogue)
    assert Reason.UNKNOWN_CA in {e.reason for e in events if isinstance(e, (Rejected, HandshakeFailed))}
    assert "cam-1" not in backend.sessions

    revoked_pki = make_pki(tmp_path / "rev", ["cam-9"])
    from pki import layout

    store.revoke(revoked_pki.path, cert_path=layout.device_dir(revoked_pki.path, "cam-9") / "cert.pem")
    net2, backend2, (dev,) = make(revoked_pki, ["cam-9"])
    events = net2.connect(dev)
    assert Reason.REVOKED in {e.reason for e in events if isinstance(e, (Rejected, HandshakeFailed))}
    assert not backend2.sessions


def test_garbage_on_every_backend_topic_harms_nobody(pki: TestPki) -> None:
    net, backend, (dev,) = make(pki, ["cam-1"])
    net.connect(dev)
    garbage = [b"", b"\x00", b"\xff" * 40, cbor.dumps([1, b"", 0, 0, b"x"]), cbor.dumps(True) + b"\x01",
               os.urandom(200), cbor.dumps(True) + os.urandom(50)]
    for channel in ("hs", "data", "media"):
        for device_id in ("cam-1", "cam-2", "nobody"):
            for g in garbage:
                out = backend.handle(f"sealmq/v1/{device_id}/{channel}/up", g, net.now, os.urandom)
                assert all(isinstance(o, (Rejected, Publish)) for o in out), out
    for bad_topic in ("sealmq/v1/cam-1/data/down", "sealmq/v2/cam-1/data/up", "x", "sealmq/v1/UPPER/data/up"):
        assert rejected(backend.handle(bad_topic, b"\x01", net.now, os.urandom))
    got = net.run(dev.seal(RecordKind.TELEMETRY, b"still-fine", net.now))
    assert [e.plaintext for e in got if isinstance(e, Received)] == [b"still-fine"]


def test_message_1_flood_is_bounded(pki: TestPki) -> None:
    net, backend, (dev,) = make(pki, ["cam-1"])
    net.connect(dev)
    backend.config = BackendConfig(max_half_open=50)
    attacker = DeviceEndpoint(device_id="cam-2", credential=pki.credential("device", "cam-2"),
                              trust_store=pki.trust_store())
    refused = 0
    for i in range(400):
        (m1,) = attacker.start_handshake(net.now, os.urandom)
        assert isinstance(m1, Publish)
        # the flood spreads over many device ids (as if the broker had no ACL)
        out = backend.handle(m1.topic.replace("cam-2", f"flood-{i}"), m1.payload, net.now, os.urandom)
        refused += sum(1 for o in rejected(out) if o.reason is Reason.TOO_MANY_HANDSHAKES)
    assert len(backend.half_open) <= 50
    assert refused == 350
    # per-device rate limit on a single topic as well
    out: list[Output] = []
    for _ in range(20):
        (m1,) = attacker.start_handshake(net.now, os.urandom)
        out += backend.handle(m1.topic, m1.payload, net.now, os.urandom)
    assert sum(1 for o in rejected(out) if o.reason is Reason.TOO_MANY_HANDSHAKES) >= 14
    # the established device is untouched
    got = net.run(dev.seal(RecordKind.TELEMETRY, b"alive", net.now))
    assert [e.plaintext for e in got if isinstance(e, Received)] == [b"alive"]
    # and half-open state expires
    net.now += 60
    backend.poll(net.now, os.urandom)
    assert not backend.half_open


def test_backend_restart_makes_the_device_rehandshake(pki: TestPki) -> None:
    net, _backend, (dev,) = make(pki, ["cam-1"])
    net.connect(dev)
    fresh = BackendEndpoint(credentials=[pki.credential("backend", "backend")], trust_store=pki.trust_store())
    net.backend = fresh
    events = net.run(dev.seal(RecordKind.TELEMETRY, b"lost", net.now))
    assert any(isinstance(e, SessionLost) for e in events)
    assert len(completed(events)) == 2
    assert "cam-1" in fresh.sessions
    got = net.run(dev.seal(RecordKind.TELEMETRY, b"after", net.now))
    assert [e.plaintext for e in got if isinstance(e, Received)] == [b"after"]


def test_device_rejects_a_backend_it_did_not_expect(pki: TestPki, tmp_path: Path) -> None:
    # A device that trusts only another CA refuses our backend.
    other = make_pki(tmp_path / "other2", ["cam-1"])
    backend = BackendEndpoint(credentials=[pki.credential("backend", "backend")], trust_store=pki.trust_store())
    dev = DeviceEndpoint(device_id="cam-1", credential=pki.credential("device", "cam-1"),
                         trust_store=other.trust_store())
    net = Net(backend, [dev])
    events = net.connect(dev)
    assert not dev.established
    assert Reason.UNKNOWN_CA in {e.reason for e in events if isinstance(e, HandshakeFailed)}
    assert "cam-1" not in backend.sessions


@pytest.mark.parametrize(("suite", "longest"), [(2, 7), (6, 6)])
@pytest.mark.parametrize("c_i", [b"", b"\x06" * 6, b"\x07" * 7, b"\x14" * 20])
def test_initiator_connection_ids_of_any_valid_length(pki: TestPki, c_i: bytes, suite: int, longest: int) -> None:
    """RFC 9528 lets C_I be any byte string, the empty one included: the backend frames its answers
    with C_I exactly as message_1 carried it, and refuses a C_I too long to be its OSCORE Sender ID
    (at most 7 bytes with suite 2's AES-CCM-16-64-128, 6 with suite 6's A128GCM: the nonce is 13 or
    12 bytes) with an error the initiator can read."""
    from datetime import UTC, datetime

    from sealmq.edhoc import Initiator, X509Authenticator, decode_error_message, is_error_message
    from sealmq.identity import Role

    _, backend, _ = make(pki, [])
    ini = Initiator(pki.credential("device", "cam-1"),
                    X509Authenticator(pki.trust_store(), Role.BACKEND, datetime.now(UTC)),
                    c_i=c_i or b"\x00", suites=[suite], random_bytes=os.urandom)
    if not c_i:
        ini._c_i = b""  # the public constructor insists on 1..32 bytes; peers may send the empty id
    now = time.time()
    out = backend.handle("sealmq/v1/cam-1/hs/up", b"\xf5" + ini.create_message_1(), now, os.urandom)
    (answer,) = [o for o in out if isinstance(o, Publish)]
    prefix = cbor.loads_seq(answer.payload)[0]
    assert prefix == c_i  # the C_I item, exactly as message_1 carried it
    body = answer.payload[len(cbor.dumps(prefix)):]
    if len(c_i) > longest:
        assert is_error_message(body)
        assert decode_error_message(body).err_info == "unsupported"
        assert [r.reason for r in rejected(out)] == [Reason.UNSUPPORTED]
        return
    ini.process_message_2(body)
    out = backend.handle("sealmq/v1/cam-1/hs/up", (ini.c_r_item or b"") + ini.create_message_3(), now, os.urandom)
    assert completed(out)
    assert "cam-1" in backend.sessions


def test_a_certificate_expiring_mid_session_ends_the_session(pki: TestPki) -> None:
    net, backend, (dev,) = make(pki, ["cam-1"])
    net.connect(dev)
    assert not backend.revalidate(backend.trust_store, net.now)  # valid now: nothing happens
    later = net.now + 400 * 24 * 3600  # past the device certificate's notAfter (365 days)
    lost = backend.revalidate(backend.trust_store, later)
    assert [(e.device_id, e.reason) for e in lost if isinstance(e, SessionLost)] == [("cam-1", Reason.EXPIRED)]
    assert "cam-1" not in backend.sessions


def test_handshake_retries_are_jittered_by_the_random_source(pki: TestPki) -> None:
    """A handshake that times out is retried after retry_min x 2^(failures-1), times 0.5 to 1.5 by
    two bytes of the random source the caller passes in (devices that failed together spread out)."""
    def deadlines(fill: int) -> list[float]:
        _, _, (device,) = make(pki, ["cam-1"])
        def rand(n: int) -> bytes:
            # the jitter draws 2 bytes; the handshake's keys (32) and C_I (1) stay really random
            return bytes([fill]) * n if n == 2 else os.urandom(n)

        now, got = 1000.0, []
        for _ in range(3):
            device.start_handshake(now, rand)  # nobody answers
            now += device.config.handshake_timeout
            events = device.poll(now, rand)
            assert any(isinstance(e, HandshakeFailed) and e.reason is Reason.HANDSHAKE_TIMEOUT for e in events)
            assert device.state is DeviceState.WAITING
            got.append(device._deadline - now)
            assert device.poll(now, rand) == []  # still backing off
        return got

    low, high = deadlines(0x00), deadlines(0xFF)
    assert low == [0.5, 1.0, 2.0]  # x0.5 of 1, 2, 4 s
    assert high == pytest.approx([(0.5 + 65535 / 65536) * b for b in (1, 2, 4)])
