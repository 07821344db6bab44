"""One harness per entry point that takes bytes from outside.

A :class:`Target` builds its harness once per process (``make()``); the harness is a callable that
takes one input. It raises a project error for a rejected input (fine), returns for an accepted one,
and raises anything else for a bug (see :mod:`fuzz.oracle`). Stateful harnesses (sessions, endpoints,
the media store) also check, every ``CHECK_EVERY`` inputs and after state-changing ones, that the
legitimate peer still gets a fresh record through: rejected garbage must not have harmed them.

Where a message is authenticated-encrypted (EDHOC PLAINTEXT_2/3/4), a second target encrypts the
fuzzer's bytes with the handshake's real keys, so the decoder behind the AEAD is fuzzed too.
Inputs that choose something (a topic, a role, a loader) use their first byte for it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from broker import passwd
from broker.cli import load_run_config
from broker.embedded import EmbeddedBrokerConfig
from broker.framing import BrokerStats, FramedReader, FramingLimits, parse_connect
from broker.policy import BrokerPolicy
from fuzz import world
from fuzz.oracle import PROJECT_ERRORS, InvariantViolated
from pki import ccs as pki_ccs
from pki import issue, store
from pki.verify import TrustStore, load_certificate, load_certificates_pem, load_chain, load_crls_pem
from sealmq import bodies, cbor, enrol, oscore, record, topics, update
from sealmq.edhoc import (
    CcsEntry,
    Responder,
    decode_ccs,
    decode_error_message,
    is_error_message,
)
from sealmq.edhoc.ccs import ccs_from_item
from sealmq.edhoc.wire import decode_id_cred
from sealmq.endpoint import HandshakeCompleted, HandshakeFailed, Output, Publish, Received, Rejected, SessionLost
from sealmq.endpoint.framing import c_i_prefix_of, split_frame
from sealmq.errors import Reason, SealmqError
from sealmq.identity import Role
from sealmq.media import (
    decode_ack,
    decode_chunk,
    decode_control,
    parse_signed_manifest,
    verify_manifest,
)
from sealmq.media_receiver import MediaLimits, MediaReceiver, accept_manifest
from sealmq.session import Session
from sealmq.topics import Channel, Direction, RecordKind

Harness = Callable[[bytes], object]
CHECK_EVERY = 64


@dataclass(frozen=True)
class Target:
    name: str
    about: str
    make: Callable[[], Harness]
    seeds: Callable[[], list[bytes]] = list  # real messages made by this process's world


def _first(data: bytes) -> tuple[int, bytes]:
    return (data[0], data[1:]) if data else (0, b"")


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise InvariantViolated(what)


# --- strict CBOR, records, handshake framing --------------------------------------------------------
def make_cbor() -> Harness:
    def one(data: bytes) -> None:
        try:
            item = cbor.loads(data)
        except SealmqError:
            pass
        else:  # deterministic: the one encoding of the item is the input
            _check(cbor.dumps(item) == data, "cbor.loads accepted a non-canonical encoding")
        items = cbor.loads_seq(data)
        _check(cbor.dumps_seq(*items) == data, "cbor.loads_seq accepted a non-canonical encoding")

    return one


def make_record() -> Harness:
    def one(data: bytes) -> None:
        # Sessions decode with the hand-written fast parser first: it must never accept what the
        # reference decoder refuses, nor read other fields.
        fast = record.decode_fast(data)
        try:
            rec = record.decode(data)
        except SealmqError:
            _check(fast is None, "record.decode_fast accepted what record.decode refuses")
            raise
        _check(fast is None or fast == (int(rec.kind), rec.kid, rec.epoch, rec.piv, rec.ciphertext),
               "record.decode_fast disagrees with record.decode")
        _check(rec.encode() == data and record.decode(rec.encode()) == rec, "record does not round-trip")

    return one


def make_hs_framing() -> Harness:
    def one(data: bytes) -> None:
        c_i_prefix_of(data)
        prefix, rest = split_frame(data)
        _check(cbor.dumps(prefix) + rest == data, "handshake frame does not split back into its bytes")

    return one


# --- the record session (replay window, epochs, key update) -----------------------------------------
class SessionHarness:
    """Bytes on any topic to the backend's (or device's) session of trace 1; byte 0: bit 7 = the
    rest is a KEY_UPDATE plaintext sealed with the peer's real keys, bit 6 = the device receives,
    bits 0-2 = the topic."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.count = 0
        t1 = world.vector("rfc9529_trace1.json")["values"]
        keys = (bytes.fromhex(t1["PRK_out"]), bytes.fromhex(t1["C_I"]), bytes.fromhex(t1["C_R"]))
        self.peer_ctx = {side: oscore.from_edhoc(*keys, side) for side in (True, False)}
        self._reset()

    def _reset(self) -> None:
        self.device, self.backend = world.session_pair()
        self.forged_piv = 1 << 20

    def _topics(self, receiver_up: bool) -> list[str]:
        d = world.SESSION_DEVICE
        own = Direction.UP if receiver_up else Direction.DOWN
        other = Direction.DOWN if receiver_up else Direction.UP
        return [topics.topic(d, Channel.DATA, own), topics.topic(d, Channel.MEDIA, own),
                topics.topic(d, Channel.DATA, other), topics.topic(d, Channel.HANDSHAKE, own),
                topics.topic("dev-2", Channel.DATA, own), "sealmq/v1/dev-1/data", "",
                topics.topic(d, Channel.DATA, own)]

    def __call__(self, data: bytes) -> None:
        sel, body = _first(data)
        self.count += 1
        self.now += 0.01
        device_receives = bool(sel & 0x40)
        receiver, peer = (self.device, self.backend) if device_receives else (self.backend, self.device)
        topic = self._topics(not device_receives)[sel & 0x07]
        try:
            if sel & 0x80:
                # a control payload under the peer's real keys (decrypts; the plaintext is fuzzed)
                ctx = self.peer_ctx[peer.is_initiator]
                self.forged_piv += 1
                body = record.seal(ctx, kind=RecordKind.KEY_UPDATE, epoch=0, piv=self.forged_piv,
                                   topic=peer.topic_for(RecordKind.KEY_UPDATE), plaintext=body[:2048])
                topic = peer.topic_for(RecordKind.KEY_UPDATE)
            events = receiver.open(topic, body, self.now)
        except PROJECT_ERRORS:
            if receiver.closed:  # by design: too many failed decryptions end the session
                self._reset()
            elif self.count % CHECK_EVERY == 0:
                self._live()
            raise
        # Accepted: it was a record of the real peer (a corpus record, or sealed above); the peer
        # here did not send it, so start again from a synchronised pair.
        del events
        self._reset()

    def _live(self) -> None:
        for sender, receiver, kind in ((self.device, self.backend, RecordKind.TELEMETRY),
                                       (self.backend, self.device, RecordKind.COMMAND)):
            topic, rec = sender.seal(kind, b"liveness", self.now)
            events = receiver.open(topic, rec, self.now)
            _check(any(isinstance(e, Received) and e.plaintext == b"liveness" for e in events),
                   "a legitimate record no longer opens after rejected garbage")


def session_seeds() -> list[bytes]:
    device, backend = world.session_pair()
    out = []
    for kind, sender, sel in ((RecordKind.TELEMETRY, device, 0), (RecordKind.MEDIA_CHUNK, device, 1),
                              (RecordKind.COMMAND, backend, 0x40)):
        _, rec = sender.seal(kind, b'{"t":21}', 1_000.0)
        out.append(bytes([sel]) + rec)
    out.append(bytes([0x80]) + cbor.dumps([1, 1, bytes(8)]))
    out.append(bytes([0x80]) + cbor.dumps([2, 1, bytes(8), bytes(range(8))]))
    return out


# --- application bodies (the plaintexts of TELEMETRY, COMMAND, REPLY and ACK records) ----------------
def make_bodies() -> Harness:
    """Byte 0 % 4: a telemetry (one reading or a batch), command, reply or ack body; what decodes
    must re-encode to the same bytes."""

    def one(data: bytes) -> None:
        sel, body = _first(data)
        decoders = (bodies.decode_telemetry_body, bodies.decode_command, bodies.decode_reply, bodies.decode_ack)
        decoded = decoders[sel % 4](body)
        _check(decoded.encode() == body, "a body decodes but does not re-encode to its bytes")

    return one


def bodies_seeds() -> list[bytes]:
    return [b"\x00" + bodies.Telemetry.at(1_764_000_000.25, {"temp": 21.5, "ok": True, "n": [1, 2]}, 5).encode(),
            b"\x00" + bodies.TelemetryBatch.of([bodies.Telemetry.at(1_764_000_000.5 + i, {"n": i}, 9 + i)
                                                 for i in range(3)]).encode(),
            b"\x01" + bodies.Command(7, "status", {"verbose": True}).encode(),
            b"\x02" + bodies.Reply.success(7, {"uptime": 12}, 6).encode(),
            b"\x02" + bodies.Reply.failure(8, "unknown command x", 2**40).encode(),
            b"\x03" + bodies.Ack.of(9, [11, 12, 20]).encode()]


# --- fleet (issue 16): enrolment and update bodies, update manifests and packages ---------------------
_FLEET_DECODERS: tuple[Callable[[bytes], Any], ...] = (
    enrol.decode_request, enrol.decode_response, update.decode_offer, update.decode_chunk, update.decode_status,
    update.decode_manifest, update.parse_signed_manifest, update.decode_package,
)


def make_fleet() -> Harness:
    """Byte 0 % 8 picks the decoder; the record bodies that decode must re-encode to the same bytes."""

    def one(data: bytes) -> None:
        sel, body = _first(data)
        decoded = _FLEET_DECODERS[sel % len(_FLEET_DECODERS)](body)
        if sel % len(_FLEET_DECODERS) < 5:
            _check(decoded.encode() == body, "a fleet body decodes but does not re-encode to its bytes")

    return one


def fleet_seeds() -> list[bytes]:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.derive_private_key(7, ec.SECP256R1())
    manifest = update.UpdateManifest(3, "firmware", hashlib.sha256(b"fw").digest(), 2, devices=("cam-1",))
    signed = update.sign_manifest(key, manifest)
    tid = update.transfer_id(signed)
    return [b"\x00" + enrol.EnrolRequest(9, b"0" * 40).encode(),
            b"\x01" + enrol.EnrolResponse.issued(9, [b"c" * 30]).encode(),
            b"\x01" + enrol.EnrolResponse.refused(9, "claim_exhausted").encode(),
            b"\x02" + update.Offer(tid, signed, 4096).encode(),
            b"\x03" + update.UpdateChunk(tid, 0, b"fw").encode(),
            b"\x04" + update.Status(tid, update.UpdateState.NEED, 1, "").encode(),
            b"\x05" + manifest.to_cbor(),
            b"\x06" + signed,
            b"\x07" + update.encode_package(signed, b"fw")]


# --- EDHOC, each message at the role that receives it ------------------------------------------------
def make_message_1() -> Harness:
    p = world.pki()
    y = world.edhoc()  # the same ephemeral keys as the handshake the corpus came from

    def one(data: bytes) -> None:
        res = Responder([p.backend_cred], p.mixed_authenticator(Role.DEVICE), c_r=b"\x27", suites=(2, 0, -24),
                        methods=(0, 1, 2, 3), random_bytes=world.counter_random(3))
        res.process_message_1(data)
        res.create_message_2()

    del y
    return one


def make_message_2(*, plaintext: bool) -> Harness:
    e = world.edhoc()

    def one(data: bytes) -> None:
        ini = world.clone(e.initiator_wait_m2)
        ini.process_message_2(e.message_2_for(data) if plaintext else data)
        ini.create_message_3()

    return one


def make_message_3(*, plaintext: bool) -> Harness:
    e = world.edhoc()

    def one(data: bytes) -> None:
        res = world.clone(e.responder_wait_m3)
        res.process_message_3(e.message_3_for(data) if plaintext else data)
        res.create_message_4()

    return one


def make_message_4() -> Harness:
    """Byte 0 even: the rest is message_4 as received; odd: it is PLAINTEXT_4, encrypted under K_4."""
    e = world.edhoc()

    def one(data: bytes) -> None:
        sel, body = _first(data)
        ini = world.clone(e.initiator_completed)
        ini.process_message_4(e.message_4_for(body) if sel & 1 else body)

    return one


def make_error() -> Harness:
    """An EDHOC error message to: byte 0 % 3 = the initiator waiting for message_2 / message_4, the
    responder waiting for message_3."""
    e = world.edhoc()

    def one(data: bytes) -> None:
        sel, body = _first(data)
        is_error_message(body)
        which = sel % 3
        if which == 0:
            ini = world.clone(e.initiator_wait_m2)
            ini.process_error(body, ephemeral_key=None)
        elif which == 1:
            world.clone(e.initiator_completed).process_error(body)
        else:
            world.clone(e.responder_wait_m3).process_error(body)
        decode_error_message(body)

    return one


def edhoc_seeds(name: str) -> list[bytes]:
    e = world.edhoc()
    m = e.messages
    return {
        "edhoc_message_1": [m["message_1"]],
        "edhoc_message_2": [m["message_2"]],
        "edhoc_plaintext_2": [e.plaintexts["PLAINTEXT_2"]],
        "edhoc_message_3": [m["message_3"]],
        "edhoc_plaintext_3": [e.plaintexts["PLAINTEXT_3"]],
        "edhoc_message_4": [b"\x00" + m["message_4"], b"\x01", b"\x01" + cbor.dumps_seq(1, b"\x01")],
        "edhoc_error": [b"\x00" + cbor.dumps_seq(2, [0, 2]), b"\x01" + cbor.dumps_seq(1, "mac_failed"),
                        b"\x02" + cbor.dumps_seq(3, True)],
    }[name]


# --- credentials: ID_CRED_x (x5chain, x5t, kid, kccs) and CCS -----------------------------------------
def make_id_cred() -> Harness:
    p = world.pki()
    device_auth, backend_auth = p.mixed_authenticator(Role.DEVICE), p.mixed_authenticator(Role.BACKEND)

    def one(data: bytes) -> None:
        id_cred = decode_id_cred(cbor.loads(data))
        id_cred.compact()
        for auth in (device_auth, backend_auth):
            with contextlib.suppress(SealmqError):
                auth.authenticate(id_cred)

    return one


def id_cred_seeds() -> list[bytes]:
    p = world.pki()
    return [cbor.dumps(p.device_cred.id_cred.params), cbor.dumps(p.device_cred_ref.id_cred.params),
            cbor.dumps(p.ccs_kid), cbor.dumps({14: cbor.loads(p.ccs)}), cbor.dumps(p.backend_cred.id_cred.params)]


def make_ccs() -> Harness:
    def one(data: bytes) -> None:
        with contextlib.suppress(SealmqError):
            ccs_from_item(cbor.loads(data))
        with contextlib.suppress(SealmqError):
            CcsEntry.from_bytes(data)
        decode_ccs(data)

    return one


# --- the PKI: certificates and chains, CSRs and the CA's policy, CRLs -------------------------------
def make_pki_cert() -> Harness:
    """Byte 0: bit 0 = role, bit 1 = the rest is one certificate (else a chain file / PEM bundle)."""
    p = world.pki()

    def one(data: bytes) -> None:
        sel, body = _first(data)
        role = Role.DEVICE if sel & 1 else Role.BACKEND
        chain = [load_certificate(body)] if sel & 2 else load_chain(body)
        if sel & 4:
            load_certificates_pem(body)
        p.trust_store.verify(chain, role=role, now=p.when)

    return one


def pki_cert_seeds() -> list[bytes]:
    p = world.pki()
    from pki import layout

    pem = layout.identity_dir(p.path, "device", world.DEVICE) / "chain.pem"
    return [b"\x01" + pem.read_bytes(), b"\x03" + p.device_chain[0], b"\x02" + p.backend_chain[0],
            b"\x04" + (layout.identity_dir(p.path, "backend", world.BACKEND) / "chain.pem").read_bytes()]


def make_pki_csr() -> Harness:
    """Byte 0: bit 0 = role, bit 1 = expect the name fuzz-dev; then a PEM or DER CSR."""
    p = world.pki()
    ca = store.load_ca(p.path)

    def one(data: bytes) -> None:
        sel, body = _first(data)
        role = Role.DEVICE if sel & 1 else Role.BACKEND
        checked = issue.check_csr(issue.load_csr(body), role, world.DEVICE if sel & 2 else None)
        issue.issue_leaf(checked, ca.issuer, ca.issuer_key, p.when, random_bytes=world.counter_random(9))

    return one


def pki_csr_seeds() -> list[bytes]:
    p = world.pki()
    csr = issue.make_csr(p.device_key, Role.DEVICE, world.DEVICE)
    return [b"\x03" + csr.public_bytes(Encoding.PEM), b"\x01" + csr.public_bytes(Encoding.DER)]


def make_pki_crl() -> Harness:
    p = world.pki()
    anchors = list(p.trust_store.anchors)
    intermediates = [load_certificate(c) for c in p.device_chain[1:]]

    def one(data: bytes) -> None:
        crls = load_crls_pem(data)
        TrustStore(anchors, intermediates, crls).verify(p.device_chain, role=Role.DEVICE, now=p.when)

    return one


def pki_crl_seeds() -> list[bytes]:
    from pki import layout

    return [layout.crl(world.pki().path).read_bytes()]


# --- configuration files: CCS registry, CA index, broker users, broker TOML -------------------------
def make_config() -> Harness:
    """Byte 0 % 4: the CCS registry, the CA index, the broker's user file, the broker's TOML config."""
    from pki import layout

    base = world.fresh_dir("config")
    registry, index = layout.ccs_registry(base), layout.index(base)
    registry.parent.mkdir(parents=True)
    index.parent.mkdir(parents=True)
    users, toml = base / "users", base / "broker.toml"

    def one(data: bytes) -> None:
        sel, body = _first(data)
        which = sel % 4
        if which == 0:
            registry.write_bytes(body)
            pki_ccs.load_registry(base)
        elif which == 1:
            index.write_bytes(body)
            store.read_index(base)
        elif which == 2:
            users.write_bytes(body)
            passwd.load_users(users)
        else:
            toml.write_bytes(body)
            args = argparse.Namespace(config=toml, host=None, port=None, passwd=None, max_message_size=None,
                                      max_connections=None)
            config = EmbeddedBrokerConfig(**load_run_config(args))
            config.validate()
            config.amqtt_config()

    return one


def config_seeds() -> list[bytes]:
    from pki import layout

    p = world.pki()
    users = passwd.format_users({"dev-1": passwd.User("dev-1", passwd.AccountRole.DEVICE,
                                                      passwd.hash_password("pw", iterations=passwd.MIN_ITERATIONS))})
    return [b"\x00" + layout.ccs_registry(p.path).read_bytes(), b"\x01" + layout.index(p.path).read_bytes(),
            b"\x02" + users.encode(),
            b'\x03passwd = "users"\nhost = "127.0.0.1"\nport = 1883\nmax_message_size = 1048576\n'
            b"max_connections = 100\nconnect_timeout = 5.0\n"]


# --- media: manifest (COSE_Sign1), chunk, ack and control, the receiver, the store, the outbox -------
def make_media_manifest() -> Harness:
    p = world.pki()
    public = p.device_key.public_key()
    limits = MediaLimits()

    def one(data: bytes) -> None:
        with contextlib.suppress(SealmqError):
            parse_signed_manifest(data)
        verify_manifest(data, public)
        accept_manifest(data, device_id=world.DEVICE, public_key=public, limits=limits)

    return one


def make_media_chunk() -> Harness:
    manifest, signed = world.media_manifest()

    def one(data: bytes) -> None:
        chunk = decode_chunk(data)
        receiver = MediaReceiver(manifest, signed, limits=MediaLimits(ack_every=1), now=0.0)
        if receiver.check_chunk(chunk, 1.0).value == "new":
            receiver.commit(chunk.index, 1.0)
            receiver.ack().encode()

    return one


def media_chunk_seeds() -> list[bytes]:
    from sealmq.media import encode_chunk

    m, _ = world.media_manifest()
    return [encode_chunk(m.transfer_id, i, world.MEDIA_FILE[i * 1024:(i + 1) * 1024]) for i in range(3)]


class OutboxHarness:
    """An ack or a control message (byte 0 even / odd) to the device's media outbox."""

    def __init__(self) -> None:
        from device.media import Outbox

        self.dir = world.fresh_dir("outbox")
        self.file = self.dir / "fuzz.bin"
        self.file.write_bytes(world.MEDIA_FILE)
        self.outbox = Outbox(self.dir / "state", world.DEVICE, world.pki().device_key, chunk_size=world.MEDIA_CHUNK)
        self.now = 0.0

    def __call__(self, data: bytes) -> None:
        sel, body = _first(data)
        self.now += 0.01
        if not self.outbox.transfers:
            self.outbox.add(self.file, created=1_764_000_000)
            self.outbox.poll(self.now)
        with contextlib.suppress(SealmqError):
            decode_ack(body)
        with contextlib.suppress(SealmqError):
            decode_control(body)
        kind = RecordKind.MEDIA_CONTROL if sel & 1 else RecordKind.MEDIA_ACK
        self.outbox.handle(kind, body, self.now)
        self.outbox.poll(self.now)


def media_ack_seeds() -> list[bytes]:
    from sealmq.media import Ack, AckStatus, Control, ControlOp

    tid = world.media_manifest()[0].transfer_id
    return [b"\x00" + Ack(tid, AckStatus.IN_PROGRESS, 1, b"\x80").encode(),
            b"\x00" + Ack(tid, AckStatus.COMPLETE, 0, b"").encode(),
            b"\x01" + Control(ControlOp.STATUS, tid).encode()]


class MediaStoreHarness:
    """One opened media record to the backend's store: byte 0 % 4 = manifest, chunk, control or another
    kind; with bit 2 set on a manifest, the rest is the manifest *payload* and the harness signs it with
    the device's real key (an authenticated device sending odd manifests). The store holds the corpus
    transfer open; it is made afresh every 4096 inputs."""

    KINDS = (RecordKind.MEDIA_MANIFEST, RecordKind.MEDIA_CHUNK, RecordKind.MEDIA_CONTROL, RecordKind.TELEMETRY)

    def __init__(self) -> None:
        self.key = world.pki().device_key
        self.public = self.key.public_key()
        self.count = 0
        self.now = 0.0
        self.dir: Path | None = None
        self.storage: Any = None
        self._fresh()

    def _fresh(self) -> None:
        from backend.media import MediaStore
        from backend.storage import Storage

        if self.dir is not None:
            self.storage.close()
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = world.fresh_dir("store")
        self.storage = Storage(self.dir / "db.sqlite3")
        self.store = MediaStore(self.dir / "data", self.storage, durable=False)
        self.store.handle(world.DEVICE, self.public, RecordKind.MEDIA_MANIFEST, world.media_manifest()[1], self.now)

    def __call__(self, data: bytes) -> None:
        sel, body = _first(data)
        self.count += 1
        self.now += 0.01
        if self.count % 4096 == 0:
            self._fresh()
        kind = self.KINDS[sel % 4]
        if kind is RecordKind.MEDIA_MANIFEST and sel & 4:
            body = sign_payload(self.key, body)
        out = self.store.handle(world.DEVICE, self.public, kind, body, self.now)
        for o in out:
            getattr(o, "body", b"")


def sign_payload(key: Any, payload: bytes) -> bytes:
    """COSE_Sign1 (ES256, as sealmq.media signs manifests) over any payload."""
    protected = cbor.dumps({1: -7})
    tbs = cbor.dumps(["Signature1", protected, b"", payload])
    r, s = decode_dss_signature(key.sign(tbs, ec.ECDSA(hashes.SHA256(), deterministic_signing=True)))
    return cbor.dumps([protected, {}, payload, r.to_bytes(32, "big") + s.to_bytes(32, "big")])


def media_store_seeds() -> list[bytes]:
    _, signed = world.media_manifest()
    from sealmq.media import Control, ControlOp

    tid = world.media_manifest()[0].transfer_id
    payload = world.media_manifest()[0].to_cbor()
    return [b"\x00" + signed, b"\x04" + payload, *(b"\x01" + c for c in media_chunk_seeds()),
            b"\x02" + Control(ControlOp.STATUS, tid).encode(), b"\x02" + Control(ControlOp.ABORT, tid).encode()]


# --- the broker's CONNECT gate and framing ------------------------------------------------------------
class _Writer:
    """Stands in for the socket's writer: the reader only writes CONNACK/PUBACK and closes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: bytes) -> None:
        self.data += b

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        return None


class BrokerHarness:
    """Byte 0 even: the rest is a CONNECT body for the parser and the gate; odd: a byte stream from a
    client to the framing reader (CONNECT first, then any packets) with the real gate behind it."""

    def __init__(self) -> None:
        logging.getLogger("sealmq.broker").setLevel(logging.CRITICAL)
        # a cheap hash: the gate's PBKDF2 would dominate every input
        salt = b"fuzz-salt"
        digest = hashlib.pbkdf2_hmac("sha512", b"pw", salt, 1)
        pw_hash = f"{passwd.HASH_PREFIX}1${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
        user = passwd.User("dev-1", passwd.AccountRole.DEVICE, pw_hash)
        self.loop = asyncio.new_event_loop()
        self.policy = self.loop.run_until_complete(self._policy({"dev-1": user}))
        self.limits = FramingLimits(max_message_size=4096, max_packet_size=4096, connect_timeout=5.0)

    @staticmethod
    async def _policy(users: dict[str, Any]) -> BrokerPolicy:
        return BrokerPolicy(users)

    def __call__(self, data: bytes) -> None:
        sel, body = _first(data)
        if sel & 1:
            self.loop.run_until_complete(self._stream(body))
        else:
            info = parse_connect(body)
            self.loop.run_until_complete(self.policy.gate(info))

    async def _stream(self, body: bytes) -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(body)
        reader.feed_eof()
        framed = FramedReader(reader, cast(Any, _Writer()), self.limits, self.policy.gate, BrokerStats(), peer="fuzz")
        for _ in range(64):
            if not await framed.read(1):
                break
            await framed.read(-1)


def broker_seeds() -> list[bytes]:
    def field(b: bytes) -> bytes:
        return len(b).to_bytes(2, "big") + b

    body = (field(b"MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big") + field(b"dev-1") + field(b"dev-1")
            + field(b"pw"))
    connect = bytes([0x10, len(body)]) + body
    topic = b"sealmq/v1/dev-1/data/up"
    pub = bytes([0x32, 2 + len(topic) + 2 + 5]) + field(topic) + b"\x00\x01" + b"hello"
    return [b"\x00" + body, b"\x01" + connect + pub + b"\xc0\x00" + b"\xe0\x00"]


# --- the endpoints: any topic, any bytes, then the legitimate session must still work ---------------
class EndpointHarness:
    """Byte 0 picks the topic (one the endpoint subscribes to, another device's, or, for the last
    choice, a topic string taken from the input up to a NUL); the rest is the payload."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.ep = world.endpoints()
        self.count = 0
        self.lost = False
        self.resync = False
        dev, other = world.DEVICE, world.OTHER_DEVICE
        own = Direction.UP if role == "backend" else Direction.DOWN
        self.topics = [topics.topic(dev, ch, own) for ch in Channel] + [
            topics.topic(other, ch, own) for ch in Channel] + [
            topics.topic(dev, Channel.DATA, Direction.UP if own is Direction.DOWN else Direction.DOWN)]

    def __call__(self, data: bytes) -> None:
        sel, body = _first(data)
        self.count += 1
        ep = self.ep
        ep.now += 0.01
        choice = sel % (len(self.topics) + 1)
        if choice < len(self.topics):
            topic = self.topics[choice]
        else:
            raw, _, body = body.partition(b"\x00")
            topic = raw.decode("utf-8", "replace")
        target = ep.backend if self.role == "backend" else ep.device
        outputs = target.handle(topic, body, ep.now, ep.random_bytes)
        self._check_outputs(outputs)
        if self.resync:
            self.ep = world.endpoints()
            self.resync = self.lost = False
        elif self.count % CHECK_EVERY == 0:
            self._live()

    def _check_outputs(self, outputs: list[Output]) -> None:
        for o in outputs:
            if isinstance(o, Publish):
                _check(isinstance(o.payload, bytes) and topics.parse(o.topic) is not None, "bad publish")
            elif isinstance(o, HandshakeCompleted):
                _check(False, f"{self.role}: a handshake completed from fuzzed input alone: {o}")
            elif isinstance(o, SessionLost):
                self.lost = True  # by design (a "no session" notice, the failed-decryption limit)
            elif not isinstance(o, (Rejected, HandshakeFailed)):
                # accepted: a replayed record of the real peer (the corpus holds some); the peer here did
                # not send it, so the two are out of step: start again from a fresh pair
                self.resync = True

    def _live(self) -> None:
        ep = self.ep
        if self.lost or not ep.established:
            # the protocol itself ended the session (by design): a new handshake must work, unless
            # the fuzzer used up this device's message_1 budget (then start from a fresh pair)
            events = ep.handshake()
            if not ep.established and any(isinstance(e, Rejected) and e.reason is Reason.TOO_MANY_HANDSHAKES
                                          for e in events):
                self.ep = ep = world.endpoints()
            _check(ep.established, f"{self.role}: a legitimate handshake fails after rejected garbage: {events}")
            self.lost = False
        for outputs, kind in ((ep.device.seal(RecordKind.TELEMETRY, b"liveness", ep.now), RecordKind.TELEMETRY),
                              (ep.backend.seal(world.DEVICE, RecordKind.COMMAND, b"liveness", ep.now),
                               RecordKind.COMMAND)):
            got = ep.route(outputs)
            _check(any(isinstance(e, Received) and e.kind is kind and e.plaintext == b"liveness" for e in got),
                   f"{self.role}: a legitimate {kind.name} record no longer opens after rejected garbage: {got}")


def endpoint_seeds(role: str) -> list[bytes]:
    ep = world.endpoints()
    out: list[bytes] = []
    own = "/up" if role == "backend" else "/down"
    for pub in ep.wire:
        if pub.topic.endswith(own):
            parsed = topics.parse(pub.topic)
            index = list(Channel).index(parsed.channel)
            out.append(bytes([index]) + pub.payload)
    sender = (ep.device.seal(RecordKind.TELEMETRY, b"seed", ep.now) if role == "backend"
              else ep.backend.seal(world.DEVICE, RecordKind.COMMAND, b"seed", ep.now))
    for o in sender:
        if isinstance(o, Publish):
            out.append(bytes([list(Channel).index(topics.parse(o.topic).channel)]) + o.payload)
    out.append(bytes([255]) + b"sealmq/v1/fuzz-dev/data/up\x00" + b"\x85")
    return out


# --- state snapshots (issue 14): what a worker loads from the shared state store -------------------------
class SnapshotHarness:
    """Byte 0 % 3: a session snapshot (``Session.from_bytes``), a half-open handshake
    (``BackendEndpoint.import_half_open``) or an established session (``import_session``) of the
    fuzz device. What loads must snapshot to the same bytes; a refused blob leaves the backend's
    session of the device as it was, and that session must still work."""

    def __init__(self) -> None:
        self.ep = world.endpoints()
        self.count = 0

    def __call__(self, data: bytes) -> None:
        sel, body = _first(data)
        self.count += 1
        ep = self.ep
        which = sel % 3
        if which == 0:
            try:
                restored = Session.from_bytes(body)
            except SealmqError:
                return
            _check(restored.to_bytes() == body, "Session.from_bytes accepted bytes it does not write")
            return
        before = ep.backend.export_session(world.DEVICE)
        try:
            if which == 1:
                ep.backend.import_half_open(world.DEVICE, body, ep.now)
            else:
                ep.backend.import_session(world.DEVICE, body, ep.now)
        except SealmqError:
            _check(ep.backend.export_session(world.DEVICE) == before, "a refused snapshot changed the session")
            if self.count % CHECK_EVERY == 0:
                got = ep.route(ep.device.seal(RecordKind.TELEMETRY, b"liveness", ep.now))
                _check(any(isinstance(e, Received) and e.plaintext == b"liveness" for e in got),
                       "the session no longer opens records after a refused snapshot")
            return
        if which == 2:
            _check(ep.backend.export_session(world.DEVICE) == body, "import_session accepted bytes it does not write")
        self.ep = world.endpoints()  # an accepted snapshot replaced the pair's state: start again


def snapshot_seeds() -> list[bytes]:
    ep = world.endpoints()
    out = [bytes([0]) + world.session_pair()[1].to_bytes()]
    session = ep.backend.export_session(world.DEVICE)
    if session is not None:
        out.append(bytes([2]) + session)
    ep.route(ep.device.seal(RecordKind.TELEMETRY, b"seed", ep.now))
    for o in ep.device.start_handshake(ep.now, ep.random_bytes):  # message_1 only: the backend half-opens
        if isinstance(o, Publish):
            ep.backend.handle(o.topic, o.payload, ep.now, ep.random_bytes)
    half = ep.backend.export_half_open(world.DEVICE)
    if half is not None:
        out.append(bytes([1]) + half)
    return out


# --- the registry ------------------------------------------------------------------------------------
TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("cbor", "strict CBOR: sealmq.cbor.loads and loads_seq (and that they accept canonical bytes only)",
           make_cbor),
    Target("record", "sealed record header: sealmq.record.decode", make_record),
    Target("session", "Session.open with any bytes on any topic (replay window, epochs, key update control)",
           SessionHarness, session_seeds),
    Target("hs_framing", "handshake framing: sealmq.endpoint.framing.split_frame and c_i_prefix_of",
           make_hs_framing),
    Target("bodies", "application bodies: decode_telemetry, decode_command, decode_reply (strict, round trip)",
           make_bodies, bodies_seeds),
    Target("fleet", "enrolment and update bodies, update manifests and packages (sealmq.enrol, sealmq.update)",
           make_fleet, fleet_seeds),
    Target("edhoc_message_1", "message_1 at the responder (then message_2 is made)", make_message_1,
           lambda: edhoc_seeds("edhoc_message_1")),
    Target("edhoc_message_2", "message_2 at the initiator", lambda: make_message_2(plaintext=False),
           lambda: edhoc_seeds("edhoc_message_2")),
    Target("edhoc_plaintext_2", "PLAINTEXT_2 at the initiator (encrypted with the real keystream): "
           "C_R, ID_CRED_R, certificate chain, signature, EAD", lambda: make_message_2(plaintext=True),
           lambda: edhoc_seeds("edhoc_plaintext_2")),
    Target("edhoc_message_3", "message_3 at the responder", lambda: make_message_3(plaintext=False),
           lambda: edhoc_seeds("edhoc_message_3")),
    Target("edhoc_plaintext_3", "PLAINTEXT_3 at the responder (encrypted under the real K_3)",
           lambda: make_message_3(plaintext=True), lambda: edhoc_seeds("edhoc_plaintext_3")),
    Target("edhoc_message_4", "message_4 (or PLAINTEXT_4 under the real K_4) at the initiator", make_message_4,
           lambda: edhoc_seeds("edhoc_message_4")),
    Target("edhoc_error", "EDHOC error messages at the initiator (waiting for message_2 or _4) and responder",
           make_error, lambda: edhoc_seeds("edhoc_error")),
    Target("id_cred", "ID_CRED_x (x5chain, x5t, kid, kccs) decoded and resolved by the X.509 and CCS "
           "authenticators", make_id_cred, id_cred_seeds),
    Target("ccs", "CCS credentials: decode_ccs, CcsEntry.from_bytes, kccs items", make_ccs,
           lambda: [world.pki().ccs]),
    Target("pki_cert", "certificates and chains (PEM/DER) and path validation (pki.verify)", make_pki_cert,
           pki_cert_seeds),
    Target("pki_csr", "CSRs: pki.issue.load_csr, the CA's policy check_csr, then issue_leaf", make_pki_csr,
           pki_csr_seeds),
    Target("pki_crl", "CRLs: load_crls_pem and revocation checking in the trust store", make_pki_crl,
           pki_crl_seeds),
    Target("config", "config loaders: CCS registry, CA index, broker user file, broker TOML", make_config,
           config_seeds),
    Target("media_manifest", "signed manifest (COSE_Sign1): parse, verify, accept", make_media_manifest,
           lambda: [world.media_manifest()[1]]),
    Target("media_chunk", "media chunk: decode_chunk and the receiver's checks", make_media_chunk,
           media_chunk_seeds),
    Target("media_ack", "media ack and control at the device's outbox", OutboxHarness, media_ack_seeds),
    Target("media_store", "the backend's media store entry (MediaStore.handle)", MediaStoreHarness,
           media_store_seeds),
    Target("broker_connect", "the broker's CONNECT parser and gate, and its packet framing", BrokerHarness,
           broker_seeds),
    Target("backend_endpoint", "BackendEndpoint.handle: any topic, any bytes; the device's session must live",
           lambda: EndpointHarness("backend"), lambda: endpoint_seeds("backend")),
    Target("device_endpoint", "DeviceEndpoint.handle: any topic, any bytes; the session must live",
           lambda: EndpointHarness("device"), lambda: endpoint_seeds("device")),
    Target("state_snapshot", "state snapshots a worker loads (issue 14): Session.from_bytes, "
           "BackendEndpoint.import_half_open and import_session", SnapshotHarness, snapshot_seeds),
]}


def target_dir(name: str) -> Path:
    return Path(__file__).resolve().parent / "corpus" / name
