"""docs/protocol.md (and docs/media.md) against real messages: every payload the real code puts on
the wire, and every plaintext it seals, must match the CDDL rule the docs give for it.

Two runs produce the messages. In memory, the sans-IO endpoints (as in tests/test_endpoint.py)
run X.509 and CCS handshakes, suite negotiation, a refused message_3, a tampered message_4, a
"no session" notice, key updates both ways and media transfers (Outbox and MediaStore, with a lost
ack and a rejected manifest). End to end, the real device agent and backend service over the
embedded broker exchange telemetry, commands, replies, key updates and a file. Spies on
the record sealing (``record.seal``, ``record.EpochCodec.seal``), the records' AEAD
(``SecurityContext.encrypt``/``decrypt``) and EDHOC's debug transcript expose the plaintexts, AADs and
PLAINTEXT_2/3 of the same runs. Mutated messages must be refused (so these tests can fail), and
whatever the code's own decoders accept, the docs must accept too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.media import MediaRejected, MediaStore, Reply
from backend.storage import Storage
from device.media import Outbox
from pki import ccs as pki_ccs
from sealmq import bodies, cbor, oscore, record, topics
from sealmq.edhoc import Responder, X509Authenticator
from sealmq.endpoint import (
    BackendEndpoint,
    DeviceEndpoint,
    EndpointConfig,
    HandshakeCompleted,
    HandshakeFailed,
    Output,
    Publish,
    Received,
)
from sealmq.endpoint import backend as backend_endpoint
from sealmq.endpoint import device as device_endpoint
from sealmq.errors import BodyError, Reason, SealmqError
from sealmq.identity import Role
from sealmq.keyupdate import parse as parse_key_update
from sealmq.media import (
    AckStatus,
    Control,
    ControlOp,
    decode_ack,
    decode_chunk,
    decode_control,
    decode_manifest,
    parse_signed_manifest,
)
from sealmq.session import Session
from sealmq.topics import Channel, Direction, RecordKind
from tests.cddl import CddlError, Schema, cddl_from_markdown
from tests.pki_fixtures import TestPki, make_pki
from tests.test_cddl_validator import mutated
from tests.test_endpoint import Net, make
from tests.test_method3_endpoint import backend_for, ccs_device

DOCS = Path(__file__).resolve().parents[1] / "docs"

BODY_RULE = {
    RecordKind.TELEMETRY: "telemetry-body",
    RecordKind.COMMAND: "command",
    RecordKind.REPLY: "reply",
    RecordKind.KEY_UPDATE: "key-update",
    RecordKind.MEDIA_MANIFEST: "media-manifest-message",
    RecordKind.MEDIA_CHUNK: "media-chunk",
    RecordKind.MEDIA_ACK: "media-ack",
    RecordKind.MEDIA_CONTROL: "media-control",
    RecordKind.ACK: "ack",
    RecordKind.ENROL_REQUEST: "enrol-request",
    RecordKind.ENROL_RESPONSE: "enrol-response",
    RecordKind.UPDATE_OFFER: "update-offer",
    RecordKind.UPDATE_CHUNK: "update-chunk",
    RecordKind.UPDATE_STATUS: "update-status",
}
# enrolment and updates (issue 16) have their own end-to-end capture: tests/test_fleet_cddl.py
FLEET_KINDS = {RecordKind.ENROL_REQUEST, RecordKind.ENROL_RESPONSE, RecordKind.UPDATE_OFFER,
               RecordKind.UPDATE_CHUNK, RecordKind.UPDATE_STATUS}
HS_UP = ["[ true, message_1 ]", "[ c-x, message_3 ]", "[ c-x, error ]"]
HS_DOWN = ["[ c-x, message_2 ]", "[ c-x, error ]", "[ null, error ]"]


@pytest.fixture(scope="module")
def schema() -> Schema:
    """protocol.md's CDDL blocks, then media.md's (protocol.md refers to them)."""
    text = cddl_from_markdown((DOCS / "protocol.md").read_text())
    return Schema(text + "\n" + cddl_from_markdown((DOCS / "media.md").read_text()))


# --- capturing what the real code produces ---------------------------------------------------

@dataclass
class Capture:
    wire: list[tuple[str, bytes]] = field(default_factory=list)  # (topic, payload) as published
    sealed: list[tuple[RecordKind, bytes]] = field(default_factory=list)  # (kind, plaintext) as sealed
    aads: list[bytes] = field(default_factory=list)  # the AEAD's associated data of every record
    handshakes: list[Any] = field(default_factory=list)  # Initiator/Responder objects, debug=True
    plaintext_4: list[bytes] = field(default_factory=list)
    snapshots: dict[bytes, str] = field(default_factory=dict)  # state snapshots (section 12) -> their rule

    def snapshot(self, backend: BackendEndpoint) -> None:
        """Every state the backend holds now, as the snapshots another worker would continue."""
        for device_id in backend.half_open:
            blob = backend.export_half_open(device_id)
            assert blob is not None
            self.snapshots[blob] = "half-open-snapshot"
        for device_id in backend.sessions:
            blob = backend.export_session(device_id)
            assert blob is not None
            self.snapshots[blob] = "session-export"


@contextlib.contextmanager
def spying() -> Iterator[Capture]:
    """While active, every record sealed, AAD built and EDHOC object made in this process is kept."""
    cap = Capture()
    real_seal, real_codec_seal = record.seal, record.EpochCodec.seal
    real_cipher = oscore.AeadAlgorithm.cipher
    real_initiator, real_responder = device_endpoint.Initiator, backend_endpoint.Responder

    def seal(ctx: Any, *, kind: RecordKind, epoch: int, piv: int, topic: str, plaintext: bytes) -> bytes:
        cap.sealed.append((RecordKind(kind), bytes(plaintext)))
        return real_seal(ctx, kind=kind, epoch=epoch, piv=piv, topic=topic, plaintext=plaintext)

    # Sessions seal through the fast path (record.EpochCodec); both paths hand the record's AAD
    # to the security context's AEAD object (the fast path calls it directly), which is where the
    # AADs are taken: every OSCORE context made while spying gets a recording AEAD.
    def codec_seal(self: Any, kind: RecordKind, topic: str, piv: int, plaintext: bytes) -> bytes:
        cap.sealed.append((RecordKind(kind), bytes(plaintext)))
        return real_codec_seal(self, kind, topic, piv, plaintext)

    class RecordingAead:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
            cap.aads.append(aad)
            return bytes(self.inner.encrypt(nonce, plaintext, aad))

        def encrypt_into(self, nonce: bytes, plaintext: bytes, aad: bytes, buf: Any) -> int:
            # the compiled seal's path for large plaintexts (media chunks): the ciphertext is
            # written straight into the record
            cap.aads.append(aad)
            return int(self.inner.encrypt_into(nonce, plaintext, aad, buf))

        def decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
            cap.aads.append(aad)
            return bytes(self.inner.decrypt(nonce, ciphertext, aad))

    def cipher(self: Any, key: bytes) -> Any:
        return RecordingAead(real_cipher(self, key))

    def debug(cls: Callable[..., Any]) -> Callable[..., Any]:
        def make_one(*args: Any, **kwargs: Any) -> Any:
            obj = cls(*args, debug=True, **kwargs)
            cap.handshakes.append(obj)
            return obj
        return make_one

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(record, "seal", seal)
        mp.setattr(record.EpochCodec, "seal", codec_seal)
        mp.setattr(oscore.AeadAlgorithm, "cipher", cipher)
        mp.setattr(device_endpoint, "Initiator", debug(real_initiator))
        mp.setattr(backend_endpoint, "Responder", debug(real_responder))
        yield cap


def deliver(net: Net, cap: Capture, outputs: list[Output],
            tamper: Callable[[Publish], Publish] | None = None) -> list[Output]:
    """Route publishes between the endpoints like Net.run, recording each one as published."""
    queue, seen = list(outputs), []
    cap.snapshot(net.backend)
    while queue:
        out = queue.pop(0)
        if not isinstance(out, Publish):
            seen.append(out)
            continue
        if tamper is not None:
            out = tamper(out)
        cap.wire.append((out.topic, out.payload))
        parsed = topics.parse(out.topic)
        if parsed.direction is Direction.UP:
            queue.extend(net.backend.handle(out.topic, out.payload, net.now, os.urandom))
            cap.snapshot(net.backend)
        elif parsed.device_id in net.devices:
            queue.extend(net.devices[parsed.device_id].handle(out.topic, out.payload, net.now, os.urandom))
    return seen


def media_session(net: Net, cap: Capture, dev: DeviceEndpoint, outbox: Outbox, store: MediaStore,
                  *, drop_acks: int = 0) -> list[AckStatus]:
    """Run the outbox's transfers through the sealed endpoints until done; returns ack outcomes."""
    backend = net.backend
    device_id = dev.device_id
    dropped, outcomes = 0, list[AckStatus]()
    for _ in range(200):
        if not outbox.transfers:
            return outcomes
        ups = outbox.poll(net.now)
        if not ups:
            deadline = outbox.next_deadline()
            assert deadline is not None
            net.now = max(net.now, deadline)
            continue
        for kind, body in ups:
            for ev in deliver(net, cap, dev.seal(kind, body, net.now)):
                if not isinstance(ev, Received):
                    continue
                try:
                    replies = [o for o in store.handle(device_id, backend.peer(device_id).public_key, ev.kind,
                                                       ev.plaintext, net.now) if isinstance(o, Reply)]
                except MediaRejected as err:
                    replies = [err.reply]
                for reply in replies:
                    outcomes.append(decode_ack(reply.body).status)
                    pubs = backend.seal(device_id, reply.kind, reply.body, net.now)
                    if dropped < drop_acks:
                        dropped += 1
                        cap.wire.extend((p.topic, p.payload) for p in pubs if isinstance(p, Publish))
                        continue
                    for got in deliver(net, cap, pubs):
                        if isinstance(got, Received):
                            outbox.handle(got.kind, got.plaintext, net.now)
    raise AssertionError("media transfer did not finish")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    p = make_pki(tmp_path_factory.mktemp("pki"), ["cam-1", "cam-2"])
    pki_ccs.issue_ccs(p.path, "backend", "backend")
    for d in ("tiny-1", "tiny-2"):
        pki_ccs.issue_ccs(p.path, "device", d)
    return p


@pytest.fixture(scope="module")
def memory_run(pki: TestPki, tmp_path_factory: pytest.TempPathFactory) -> Capture:
    """One in-memory run that makes every kind of handshake frame, record and media message."""
    with spying() as cap:
        _memory_session(cap, pki, tmp_path_factory.mktemp("media"))
    return cap


def _memory_session(cap: Capture, pki: TestPki, tmp: Path) -> None:
    # X.509 device offering suite 3 first (which the backend does not serve): an ERR_CODE 2 round
    # trip, then suite 2 (AES-CCM records); cam-2 below negotiates the default, suite 6 (A128GCM)
    net, backend, (cam1, cam2) = make(pki, ["cam-1", "cam-2"])
    cam1.config = EndpointConfig(suites=(3, 2))
    cam2.config = EndpointConfig(suites=(6, 2))
    events = deliver(net, cap, cam1.start_handshake(net.now, os.urandom))
    assert sum(isinstance(e, HandshakeCompleted) for e in events) == 2
    # key updates started by either side
    assert any(e for e in deliver(net, cap, cam1.key_update(net.now, os.urandom)))
    net.now += 700  # past both grace windows, so that the next update may start
    deliver(net, cap, [*cam1.poll(net.now, os.urandom), *backend.poll(net.now, os.urandom)])
    assert any(e for e in deliver(net, cap, backend.key_update("cam-1", net.now, os.urandom)))
    # a forged record (its tag changed): refused, and counted as a failed decryption of that epoch
    status_body = Control(ControlOp.STATUS, bytes(16)).encode()
    def flip_tag(pub: Publish) -> Publish:
        return Publish(pub.topic, pub.payload[:-1] + bytes([pub.payload[-1] ^ 1]))
    deliver(net, cap, cam1.seal(RecordKind.MEDIA_CONTROL, status_body, net.now), tamper=flip_tag)
    # media: a lost ack (so the device resends and asks for status), then complete
    src = tmp / "photo.png"
    src.write_bytes(os.urandom(2500))
    store = MediaStore(tmp / "backend", Storage(tmp / "backend.db"), durable=False)
    outbox = Outbox(tmp / "outbox", "cam-1", pki.identity("device", "cam-1").private_key, chunk_size=1024)
    outbox.add(src)
    outcomes = media_session(net, cap, cam1, outbox, store, drop_acks=1)
    assert outcomes[-1] is AckStatus.COMPLETE
    # a manifest signed with a key that is not the device's: a rejected ack
    bad_outbox = Outbox(tmp / "outbox-bad", "cam-1", ec.generate_private_key(ec.SECP256R1()), chunk_size=1024)
    (tmp / "other.png").write_bytes(os.urandom(100))
    bad_outbox.add(tmp / "other.png")
    assert media_session(net, cap, cam1, bad_outbox, store)[-1] is AckStatus.REJECTED
    # cam-2: message_4 tampered on the way: the device answers C_R || error
    def flip_message_4(pub: Publish) -> Publish:
        if pub.topic.endswith("cam-2/hs/down") and cam2.state.value == "handshaking" and len(pub.payload) < 20:
            items = cbor.loads_seq(pub.payload)
            assert len(items) == 2 and len(items[1]) == 16  # C_I, CIPHERTEXT_4 = suite 6's GCM tag alone
            cap.plaintext_4.append(b"")  # so PLAINTEXT_4 is empty: sealmq sends no EAD_4
            return Publish(pub.topic, pub.payload[:-1] + bytes([pub.payload[-1] ^ 1]))
        return pub
    events = deliver(net, cap, cam2.start_handshake(net.now, os.urandom), tamper=flip_message_4)
    assert [type(e) for e in events if isinstance(e, (HandshakeCompleted, HandshakeFailed))] == \
        [HandshakeCompleted, HandshakeFailed]
    # cam-2's certificate on cam-1's topics: message_3 refused with C_I || error(1, identity_mismatch)
    impostor = DeviceEndpoint(device_id="cam-1", credential=pki.credential("device", "cam-2"),
                              trust_store=pki.trust_store())
    net2 = Net(net.backend, [impostor])
    deliver(net2, cap, impostor.start_handshake(net.now, os.urandom))
    # a record for a backend that has no session: null || error
    fresh = BackendEndpoint(credentials=[pki.credential("backend", "backend")], trust_store=pki.trust_store())
    status = Control(ControlOp.STATUS, bytes(16)).encode()
    (pub,) = [o for o in cam1.seal(RecordKind.MEDIA_CONTROL, status, net.now) if isinstance(o, Publish)]
    for o in fresh.handle(pub.topic, pub.payload, net.now, os.urandom):
        if isinstance(o, Publish):
            cap.wire.append((o.topic, o.payload))
    # cam-2 by reference (x5t), to a backend configured with cam-2's chain
    chain = list(pki.credential("device", "cam-2").chain_der)
    by_ref = DeviceEndpoint(device_id="cam-2", credential=pki.credential("device", "cam-2", by_reference=True),
                            trust_store=pki.trust_store())
    knows = BackendEndpoint(
        credentials=[pki.credential("backend", "backend")], trust_store=pki.trust_store(),
        authenticator=lambda now: X509Authenticator(pki.trust_store(), Role.DEVICE, datetime.fromtimestamp(now, UTC),
                                                    known_chains=[chain]))
    ref_net = Net(knows, [by_ref])
    events = deliver(ref_net, cap, by_ref.start_handshake(ref_net.now, os.urandom))
    assert sum(isinstance(e, HandshakeCompleted) for e in events) == 2
    # CCS devices (method 3): kid sent compact, and the CCS by value (kccs)
    for by_value in (False, True):
        name = "tiny-2" if by_value else "tiny-1"
        tiny = ccs_device(pki, name, by_value=by_value)
        ccs_net = Net(backend_for(pki), [tiny])
        events = deliver(ccs_net, cap, tiny.start_handshake(ccs_net.now, os.urandom))
        assert sum(isinstance(e, HandshakeCompleted) for e in events) == 2


# --- the checks -------------------------------------------------------------------------------

def check_publish(schema: Schema, topic: str, payload: bytes) -> None:
    parsed = topics.parse(topic)
    if parsed.channel is Channel.HANDSHAKE:
        schema.validate_seq(payload, "hs-up-frame" if parsed.direction is Direction.UP else "hs-down-frame")
    else:
        schema.validate_cbor(payload, "record")


def check_body(schema: Schema, kind: RecordKind, plaintext: bytes) -> None:
    schema.validate_cbor(plaintext, BODY_RULE[kind])
    if kind is RecordKind.MEDIA_MANIFEST:
        # media.md writes ".cbor" as comments: check the embedded items against their rules here
        signed = parse_signed_manifest(plaintext)
        schema.validate_cbor(signed.protected, "protected-header")
        schema.validate_cbor(signed.payload, "manifest")


def edhoc_plaintexts(cap: Capture) -> list[tuple[str, bytes]]:
    out = []
    for hs in cap.handshakes:
        for name in ("PLAINTEXT_2", "PLAINTEXT_3"):
            if name in hs.transcript:
                out.append((name.lower(), hs.transcript[name]))
    return out


def test_every_published_payload_matches_the_docs(schema: Schema, memory_run: Capture) -> None:
    assert len(memory_run.wire) > 30
    for topic, payload in memory_run.wire:
        check_publish(schema, topic, payload)
    # every alternative of the handshake frames occurred
    up = [cbor.loads_seq(p) for t, p in memory_run.wire if t.endswith("/hs/up")]
    down = [cbor.loads_seq(p) for t, p in memory_run.wire if t.endswith("/hs/down")]
    for alternatives, frames in ((HS_UP, up), (HS_DOWN, down)):
        for alt in alternatives:
            assert any(schema.matches(f, alt) for f in frames), alt
    # an ERR_CODE 2 (negotiation) and an ERR_CODE 1 went down; message_1 offered two suites
    assert any(f[1:2] == [2] and schema.matches(f, "[ c-x, error ]") for f in down)
    assert any(f[1:2] == [1] and schema.matches(f, "[ c-x, error ]") for f in down)
    assert any(f[0] is True and isinstance(f[2], list) for f in up)


def test_every_sealed_body_matches_the_docs(schema: Schema, memory_run: Capture) -> None:
    kinds = {kind for kind, _ in memory_run.sealed}
    assert {RecordKind.KEY_UPDATE, RecordKind.MEDIA_MANIFEST, RecordKind.MEDIA_CHUNK, RecordKind.MEDIA_ACK,
            RecordKind.MEDIA_CONTROL} <= kinds
    for kind, plaintext in memory_run.sealed:
        check_body(schema, kind, plaintext)
    acks = [cbor.loads(p)[1] for k, p in memory_run.sealed if k is RecordKind.MEDIA_ACK]
    assert {0, 1, 2} <= set(acks)  # in progress, complete, rejected
    updates = [cbor.loads(p)[0] for k, p in memory_run.sealed if k is RecordKind.KEY_UPDATE]
    assert {1, 2} <= set(updates)  # request and answer


def test_record_aads_match_the_docs(schema: Schema, memory_run: Capture) -> None:
    assert len(memory_run.aads) >= len(memory_run.sealed)
    for aad in memory_run.aads:
        schema.validate_cbor(aad, "record-enc-structure")
        external = cbor.loads(aad)[2]
        schema.validate_cbor(cbor.loads(external)[4], "record-binding")


def test_edhoc_plaintexts_and_credentials_match_the_docs(schema: Schema, memory_run: Capture,
                                                         pki: TestPki) -> None:
    plaintexts = edhoc_plaintexts(memory_run)
    assert {n for n, _ in plaintexts} == {"plaintext_2", "plaintext_3"}
    id_creds = []
    for rule, pt in plaintexts:
        items = schema.validate_seq(pt, f"[ {rule} ]")
        id_creds.append(items[1] if rule == "plaintext_2" else items[0])
    assert any(isinstance(i, dict) and 33 in i for i in id_creds)  # x5chain
    assert any(isinstance(i, dict) and 14 in i for i in id_creds)  # kccs
    assert any(isinstance(i, dict) and 34 in i for i in id_creds)  # x5t
    assert any(isinstance(i, (int, bytes)) for i in id_creds)  # compact kid
    for i in id_creds:
        if isinstance(i, dict) and 14 in i:
            schema.validate(i[14], "ccs")
    for role, name in (("backend", "backend"), ("device", "tiny-1")):
        schema.validate_cbor(pki_ccs.load_credential(pki.path, role, name).cred, "ccs")
    assert memory_run.plaintext_4
    for pt in memory_run.plaintext_4:
        schema.validate([] if not pt else cbor.loads_seq(pt), "[ plaintext_4 ]")


def check_snapshot(schema: Schema, blob: bytes, rule: str) -> list[Any]:
    """A snapshot against its rule; returns it decoded, with its nested snapshot decoded in place."""
    value = schema.validate_cbor(blob, rule)
    inner_rule = "responder-snapshot" if rule == "half-open-snapshot" else "session-snapshot"
    schema.validate_cbor(value[-1], inner_rule)  # (also done by .cbor: this names the failing rule)
    return [*value[:-1], cbor.loads(value[-1])]


def test_state_snapshots_match_the_docs(schema: Schema, memory_run: Capture) -> None:
    """Section 12: the snapshots of every state the backend held during the run (never on the wire)."""
    half_open = [check_snapshot(schema, b, r) for b, r in memory_run.snapshots.items() if r == "half-open-snapshot"]
    sessions = [check_snapshot(schema, b, r) for b, r in memory_run.snapshots.items() if r == "session-export"]
    assert len(half_open) >= 5 and len(sessions) >= 10
    # the run reached every alternative: methods 0 and 3 (with Y), both credential kinds, every
    # ID_CRED_I form, one and two held epochs, each key-update state, a failed decryption
    assert {r[3][1] for r in half_open} == {0, 3}
    assert {len(r[3][7]) for r in half_open} == {0, 32}
    assert {s[3][0] for s in sessions} == {"x509", "ccs"}
    id_creds = [s[3][2] for s in sessions]
    assert any(isinstance(i, (int, bytes)) for i in id_creds)  # kid, compact
    assert {14, 33, 34} <= {k for i in id_creds if isinstance(i, dict) for k in i}
    snaps = [s[4] for s in sessions]
    assert {len(s[9]) for s in snaps} == {1, 2}
    for i in range(3):
        assert any(s[10][i] is not None for s in snaps), ["pending", "answered", "last-switch"][i]
    assert any(e[6] for s in snaps for e in s[9])


# --- end to end: the real device agent and backend service over the embedded broker ------------

def test_agent_and_service_messages_match_the_docs(schema: Schema, tmp_path: Path) -> None:
    """Telemetry, commands and replies are made by device/agent.py and backend/service.py only."""
    from tests.e2e import Recorder, System, wait_for

    with spying() as cap:
        system = System(tmp_path, ["cam-1"], broker="amqtt")
        try:
            recorder = Recorder(system)
            backend = system.start_backend()
            agent = system.agent("cam-1")
            agent.send_telemetry({"temp": 21.5, "n": 1, "ok": True, "tags": ["a", "b"], "raw": b"\x00"})
            agent.send_telemetry({})
            ids = [backend.send_command("cam-1", "ping"), backend.send_command("cam-1", "status", {"why": 1}),
                   backend.send_command("cam-1", "no-such-command", [1, 2])]
            assert wait_for(lambda: all((c := backend.storage.command(i)) is not None
                                        and c.status in ("replied", "failed") for i in ids))
            agent.key_update()
            assert wait_for(lambda: agent.epoch == 1)
            src = tmp_path / "clip.bin"
            src.write_bytes(os.urandom(40_000))
            agent.send_file(src)
            assert agent.wait_transfers(20)
            agent.send_telemetry({"after": "update"})
            assert wait_for(lambda: len(backend.storage.messages("cam-1")) == 3)
            wait_for(lambda: False, timeout=0.3)  # let the recorder see the last publishes
            relayed = recorder.snapshot()
            recorder.stop()
        finally:
            system.close()
    channels = {topics.parse(t).channel for t, _ in relayed}
    assert channels == {Channel.HANDSHAKE, Channel.DATA, Channel.MEDIA}
    for topic, payload in relayed:
        check_publish(schema, topic, payload)
    kinds = [kind for kind, _ in cap.sealed]
    for kind in RecordKind:
        if kind in FLEET_KINDS:
            continue
        assert kind in kinds or kind is RecordKind.MEDIA_CONTROL, kind  # no status request without loss
    for kind, plaintext in cap.sealed:
        check_body(schema, kind, plaintext)
        for bad in _invalid_variants(cbor.loads(plaintext)):
            assert not schema.matches(bad, BODY_RULE[kind]), (kind, bad)
    replies = [cbor.loads(p) for k, p in cap.sealed if k is RecordKind.REPLY]
    assert {r[1] for r in replies} == {True, False}  # both reply alternatives
    # sealmq.bodies decodes what the apps send, and encodes it back to the very same bytes
    codec = {RecordKind.TELEMETRY: bodies.decode_telemetry_body, RecordKind.COMMAND: bodies.decode_command,
             RecordKind.REPLY: bodies.decode_reply, RecordKind.ACK: bodies.decode_ack}
    app_bodies = [(k, p) for k, p in cap.sealed if k in codec]
    assert {k for k, _ in app_bodies} == set(codec)
    for kind, plaintext in app_bodies:
        assert codec[kind](plaintext).encode() == plaintext, kind
    for aad in cap.aads:
        schema.validate_cbor(aad, "record-enc-structure")
    for rule, pt in edhoc_plaintexts(cap):
        schema.validate_seq(pt, f"[ {rule} ]")


# --- mutations must be refused (the tests above can fail) -------------------------------------

def _invalid_variants(value: Any) -> list[Any]:
    """Changes that no rule of the docs allows for our messages: a missing last item, a float in
    first position, an extra item; for maps, each key missing and an unknown key added."""
    if isinstance(value, list):
        return [value[:-1], [0.5, *value[1:]], [*value, b"extra"]]
    if isinstance(value, dict):
        return [*({k: v for k, v in value.items() if k != key} for key in value), {**value, 99: 0}]
    return []


def test_mutated_messages_are_refused(schema: Schema, memory_run: Capture) -> None:
    checked = 0
    for topic, payload in memory_run.wire:
        parsed = topics.parse(topic)
        if parsed.channel is Channel.HANDSHAKE:
            rule = "hs-up-frame" if parsed.direction is Direction.UP else "hs-down-frame"
            value = cbor.loads_seq(payload)
        else:
            rule, value = "record", cbor.loads(payload)
        for bad in _invalid_variants(value):
            with pytest.raises(CddlError):
                schema.validate(bad, rule)
            checked += 1
    for kind, plaintext in memory_run.sealed:
        value = cbor.loads(plaintext)
        for bad in _invalid_variants(value):
            with pytest.raises(CddlError):
                schema.validate(bad, BODY_RULE[kind])
            checked += 1
    for rule, pt in edhoc_plaintexts(memory_run):
        for bad in _invalid_variants(cbor.loads_seq(pt)):
            with pytest.raises(CddlError):
                schema.validate(bad, f"[ {rule} ]")
            checked += 1
    for blob, rule in list(memory_run.snapshots.items())[:40]:
        value = cbor.loads(blob)
        inner = cbor.loads(value[-1])
        inner_rule = "responder-snapshot" if rule == "half-open-snapshot" else "session-snapshot"
        for bad, bad_rule in [*((v, rule) for v in _invalid_variants(value)),
                              *((v, inner_rule) for v in _invalid_variants(inner))]:
            with pytest.raises(CddlError):
                schema.validate(bad, bad_rule)
            checked += 1
    assert checked > 150
    # and a few targeted ones: wrong types and values in otherwise real messages
    m1 = next(cbor.loads_seq(p) for t, p in memory_run.wire if t.endswith("/hs/up") and p[:1] == b"\xf5")
    for i, bad_item in ((1, 4), (2, [2]), (3, "x"), (4, 24)):  # METHOD, SUITES_I, G_X, C_I
        with pytest.raises(CddlError) as exc:
            schema.validate([*m1[:i], bad_item, *m1[i + 1:]], "hs-up-frame")
        assert exc.value.path.startswith(f"$[{i}]")
    rec = next(cbor.loads(p) for t, p in memory_run.wire if "/data/" in t)
    for i, bad_item in ((0, 10), (1, bytes(9)), (2, -1), (3, 2**40), (4, bytes(7))):
        assert not schema.matches([*rec[:i], bad_item, *rec[i + 1:]], "record")


# Each narrowing of a rule (one alternative or range less) must make some real message fail:
# evidence that the checks above look at what they claim to, and that the run exercises it.
NARROWED = {
    "record-kind": "record-kind = 1..4",
    "id-cred": "id-cred = kid-compact / { 33 => x5chain } / { 34 => x5t }",
    "x5t": "x5t = [ -16, bstr .size 32 ]",
    "hs-down-frame": "hs-down-frame = [ c-x, message_2 ] / [ c-x, message_4 ] / [ c-x, error ]",
    "hs-up-frame": "hs-up-frame = [ true, message_1 ] / [ c-x, message_3 ]",
    "media-ack": "media-ack = [transfer-id, status: 0 / 1, base: uint, received: bstr]",
    "media-control": "media-control = [op: 2, transfer-id]",
    "key-update": "key-update = [ type: 1, epoch: 1..4294967295, nonce_a: ku-nonce ]",
    "record-binding": "record-binding = [ epoch-number, record-kind, "
                      'tstr .regexp "sealmq/v1/[a-z0-9][a-z0-9._-]{0,62}/data/(up|down)" ]',
    "suites": "suites = suite",
    # state snapshots (section 12)
    "ku-state": "ku-state = [ pending: null, answered: null, last-switch: null ]",
    "retired-epoch": "retired-epoch = [ epoch-keys, epoch-counters, drop-at: float, peer-switched: true, "
                     "new-records: uint, window: replay-window ]",  # B, after answering, before the peer switched
    "epoch-counters": "epoch-counters = ( created: float, next-seq: 0..1099511627776, failed: 0 )",
    "responder-snapshot": "responder-snapshot = [ version: 1, method: 0..3, suite: suite, c-i: bstr .size (0..32), "
                          "c-r: bstr .size (1..32), th-3: bstr .size 32, prk-3e2m: bstr .size 32, y: bstr .size 0, "
                          "id-cred-r: id-cred, ead-1: [ * ead ] ]",
    "cred-item": "cred-item = bstr",
    "manifest": "manifest = { 1 => transfer-id, 2 => device-id, 3 => tstr, 4 => tstr, 5 => uint, 6 => bstr, "
                "7 => uint, 8 => 2048..64512, 9 => uint }",  # the test's chunks are 1024 bytes
}


def _all_checks(schema: Schema, cap: Capture) -> None:
    for topic, payload in cap.wire:
        check_publish(schema, topic, payload)
    for kind, plaintext in cap.sealed:
        check_body(schema, kind, plaintext)
    for aad in cap.aads:
        schema.validate_cbor(aad, "record-enc-structure")
        schema.validate_cbor(cbor.loads(cbor.loads(aad)[2])[4], "record-binding")
    for rule, pt in edhoc_plaintexts(cap):
        schema.validate_seq(pt, f"[ {rule} ]")
    for blob, rule in cap.snapshots.items():
        check_snapshot(schema, blob, rule)


@pytest.mark.parametrize("rule", sorted(NARROWED))
def test_a_narrowed_rule_is_caught(schema: Schema, memory_run: Capture, rule: str) -> None:
    text = cddl_from_markdown((DOCS / "protocol.md").read_text()) + "\n" + cddl_from_markdown(
        (DOCS / "media.md").read_text())
    _all_checks(schema, memory_run)
    with pytest.raises(CddlError):
        _all_checks(Schema(text, replace=NARROWED[rule]), memory_run)


# --- the application bodies' codec (sealmq.bodies) against the docs -----------------------------

APP_BODIES: list[tuple[str, Any]] = [
    ("telemetry", bodies.Telemetry.at(1700000000.123, {"temp": 21.5, "tags": ["a"], "raw": b"\x00"}, 1)),
    ("telemetry", bodies.Telemetry(0, {}, bodies.MAX_MSG_ID)),
    ("telemetry-body", bodies.Telemetry(0, {}, bodies.MAX_MSG_ID)),
    ("telemetry-body", bodies.TelemetryBatch.of([bodies.Telemetry(1.5, {"n": i}, 7 + i) for i in range(2)])),
    ("telemetry-batch", bodies.TelemetryBatch.of([bodies.Telemetry(2, {"n": i}, 1 + i) for i in range(2)])),
    ("command", bodies.Command(1, "ping")),
    ("command", bodies.Command(bodies.MAX_COMMAND_ID, "x" * 64, {"why": [1, -2.5, None]})),
    ("reply", bodies.Reply.success(2, {"device": "cam-1", "epoch": 3}, 2)),
    ("reply", bodies.Reply.unknown_command(bodies.MAX_COMMAND_ID, "y" * 64, 3)),
    ("reply", bodies.Reply.failure(3, "e" * bodies.MAX_REPLY_ERROR, bodies.MAX_MSG_ID)),
    ("ack", bodies.Ack(0)),
    ("ack", bodies.Ack.of(bodies.MAX_MSG_ID - 3, [bodies.MAX_MSG_ID - 1, bodies.MAX_MSG_ID])),
    ("ack", bodies.Ack.of(5, [7, 8, 10])),
]


@pytest.mark.parametrize(("rule", "body"), APP_BODIES, ids=lambda v: str(v)[:24])
def test_codec_bodies_match_the_docs(schema: Schema, rule: str, body: Any) -> None:
    schema.validate_cbor(body.encode(), rule)
    for bad in _invalid_variants(cbor.loads(body.encode())):
        assert not schema.matches(bad, rule), (rule, bad)


def test_docs_bound_command_ids_as_the_codec_does(schema: Schema) -> None:
    assert schema.matches([bodies.MAX_COMMAND_ID, "ping", None], "command")
    assert not schema.matches([bodies.MAX_COMMAND_ID + 1, "ping", None], "command")
    assert not schema.matches([bodies.MAX_COMMAND_ID + 1, True, None, 1], "reply")
    assert not schema.matches([1, True, None, 0], "reply")  # message ids start at 1
    assert not schema.matches({"m": bodies.MAX_MSG_ID + 1, "t": 0, "v": {}}, "telemetry")
    assert not schema.matches([0, [[1, 2, 3]]], "ack")
    assert not schema.matches([1, "x" * 65, None], "command")
    readings = [bodies.Telemetry(2, {}, 1 + i) for i in range(bodies.MAX_TELEMETRY_BATCH + 1)]
    most = bodies.MAX_TELEMETRY_BATCH
    for n, valid in ((1, False), (2, True), (most, True), (most + 1, False)):
        value = [cbor.loads(r.encode()) for r in readings[:n]]
        assert schema.matches(value, "telemetry-body") is valid, n
        assert isinstance(_decode_or_none(_batch_only, cbor.dumps(value)), bodies.TelemetryBatch) is valid, n


def _decode_or_none(decode: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return decode(data)
    except SealmqError:
        return None


# --- what the code's decoders accept, the docs accept ----------------------------------------

def _batch_only(data: bytes) -> bodies.TelemetryBatch:
    body = bodies.decode_telemetry_body(data)
    if not isinstance(body, bodies.TelemetryBatch):
        raise BodyError(Reason.BAD_BODY, "one reading, not a batch")
    return body


def _decoders() -> dict[str, Callable[[bytes], Any]]:
    return {
        "record": record.decode,
        "media-chunk": decode_chunk,
        "media-ack": decode_ack,
        "media-control": decode_control,
        "manifest": decode_manifest,
        "key-update": lambda b: parse_key_update(b, 32),
        "telemetry": bodies.decode_telemetry,
        "telemetry-body": bodies.decode_telemetry_body,
        "telemetry-batch": _batch_only,
        "command": bodies.decode_command,
        "reply": bodies.decode_reply,
        "ack": bodies.decode_ack,
        "session-snapshot": Session.from_bytes,  # the memory run's SessionConfig: the default
    }


@pytest.fixture(scope="module")
def accept_message_1(pki: TestPki) -> Callable[[bytes], Any]:
    """What the backend accepts as message_1: decoding alone would let METHOD -1 through, the
    responder refuses it (so the docs' 0..3 holds)."""
    trust = pki.trust_store()
    creds = [pki.credential("backend", "backend"), pki_ccs.load_credential(pki.path, "backend", "backend")]

    def accept(raw: bytes) -> Any:
        responder = Responder(creds, X509Authenticator(trust, Role.DEVICE, datetime.now(UTC)), c_r=5,
                              suites=(2, 0, -24), methods=(0, 3))
        return responder.process_message_1(raw)
    return accept


@pytest.fixture(scope="module")
def accept_responder_snapshot(pki: TestPki) -> Callable[[bytes], Any]:
    """What a backend of the memory run accepts as a handshake snapshot (its credentials, methods 0 and 3)."""
    trust = pki.trust_store()
    creds = [pki.credential("backend", "backend"), pki_ccs.load_credential(pki.path, "backend", "backend")]

    def accept(raw: bytes) -> Any:
        return Responder.from_bytes(raw, creds, X509Authenticator(trust, Role.DEVICE, datetime.now(UTC)),
                                    suites=(2, 0, -24), methods=(0, 3))
    return accept


@pytest.fixture(scope="module")
def decoder_samples(memory_run: Capture) -> list[tuple[str, Any]]:
    rule_of_kind = {RecordKind.MEDIA_CHUNK: "media-chunk", RecordKind.MEDIA_ACK: "media-ack",
                    RecordKind.MEDIA_CONTROL: "media-control", RecordKind.KEY_UPDATE: "key-update"}
    out: list[tuple[str, Any]] = [("record", cbor.loads(p)) for t, p in memory_run.wire if "/hs/" not in t][:20]
    out += [(rule_of_kind[k], cbor.loads(p)) for k, p in memory_run.sealed if k in rule_of_kind][:20]
    out += [("manifest", cbor.loads(parse_signed_manifest(p).payload))
            for k, p in memory_run.sealed if k is RecordKind.MEDIA_MANIFEST]
    m1 = [cbor.loads_seq(p)[1:] for t, p in memory_run.wire if t.endswith("/hs/up") and p[:1] == b"\xf5"]
    out += [("[ message_1 ]", m) for m in m1]
    out += [(rule, cbor.loads(body.encode())) for rule, body in APP_BODIES]
    for blob, rule in memory_run.snapshots.items():
        inner = cbor.loads(cbor.loads(blob)[-1])
        out.append(("responder-snapshot" if rule == "half-open-snapshot" else "session-snapshot", inner))
    return out


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_docs_accept_whatever_the_decoders_accept(schema: Schema, decoder_samples: list[tuple[str, Any]],
                                                  accept_message_1: Callable[[bytes], Any],
                                                  accept_responder_snapshot: Callable[[bytes], Any],
                                                  data: st.DataObject) -> None:
    rule, seed = data.draw(st.sampled_from(decoder_samples))
    value = data.draw(mutated(seed))
    if rule == "[ message_1 ]":
        raw = cbor.dumps_seq(*value) if isinstance(value, list) and value else b""
        decode: Callable[[bytes], Any] = accept_message_1
    elif rule == "responder-snapshot":
        raw, decode = cbor.dumps(value), accept_responder_snapshot
    else:
        raw, decode = cbor.dumps(value), _decoders()[rule]
    try:
        decode(raw)
    except SealmqError:
        return  # refused by the code: the docs may or may not be as strict
    schema.validate(value, rule)
