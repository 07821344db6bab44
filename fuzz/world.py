"""The stateful parts the harnesses need, built once per process and shared by the targets.

Everything is real: a PKI made with ``pki.store`` in a temporary directory (CA, backend, two devices,
a CCS credential), EDHOC handshakes run to the state each harness needs, established sessions and a
device/backend endpoint pair that completed a real handshake. Time and randomness are injected as
the core expects: ``NOW`` is fixed when the world is built and ``random_bytes`` is a counter-based
deterministic source, so a process replays the same handshakes.

The record session uses RFC 9529 trace 1's ``PRK_out`` with its connection ids (C_I = 0x2d,
C_R = 0x18) and device ``dev-1``: the records of ``tests/vectors/sealmq_records.json`` are valid
records of that session, so the committed corpus holds records that really open.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from pki import ccs as pki_ccs
from pki import store
from pki.store import load_identity, load_trust_store
from pki.verify import TrustStore
from sealmq import cbor, kdf, topics
from sealmq.edhoc import (
    CcsAuthenticator,
    Initiator,
    MixedAuthenticator,
    Responder,
    X509Authenticator,
    X509Credential,
    generate_ephemeral,
    get_suite,
)
from sealmq.endpoint import BackendEndpoint, DeviceEndpoint, Output, Publish
from sealmq.identity import Role
from sealmq.media import Manifest, sign_manifest
from sealmq.session import Session

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO / "tests" / "vectors"
DEVICE = "fuzz-dev"
OTHER_DEVICE = "fuzz-dev2"
BACKEND = "backend"
SUITE = 2


def counter_random(seed: int) -> Callable[[int], bytes]:
    """Deterministic 'randomness' (SHA-256 of a counter): the same world in every process."""
    state = {"n": seed}

    def random_bytes(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(state["n"].to_bytes(8, "big")).digest()
        return out[:n]

    return random_bytes


def clone(obj: Any) -> Any:
    """A copy of a state machine whose mutable attributes are its own (keys and credentials shared).

    Cheaper than replaying the handshake (ECDH and signatures) for every input.
    """
    c = copy.copy(obj)
    for name, value in vars(c).items():
        if isinstance(value, (dict, list, set, bytearray)):
            setattr(c, name, copy.copy(value))
    return c


def vector(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


# --- the PKI -------------------------------------------------------------------------------------
@dataclass
class Pki:
    path: Path
    now: float
    trust_store: TrustStore
    device_cred: X509Credential
    device_cred_ref: X509Credential  # by reference (x5t)
    other_cred: X509Credential
    backend_cred: X509Credential
    device_key: Any
    device_chain: list[bytes]
    backend_chain: list[bytes]
    ccs_registry: Any
    ccs: bytes
    ccs_kid: bytes

    @property
    def when(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)

    def x509_authenticator(self, role: Role) -> X509Authenticator:
        return X509Authenticator(self.trust_store, role, self.when, known_chains=[self.device_chain,
                                                                                   self.backend_chain])

    def mixed_authenticator(self, role: Role) -> MixedAuthenticator:
        return MixedAuthenticator(CcsAuthenticator(self.ccs_registry, role, self.now), self.x509_authenticator(role))


def _credential(path: Path, role: str, name: str, *, by_reference: bool = False) -> X509Credential:
    from pki import layout

    ident = load_identity(layout.identity_dir(path, role, name))
    return X509Credential(private_key=ident.private_key, chain_der=[c.public_bytes(Encoding.DER) for c in ident.chain],
                          by_reference=by_reference)


@functools.cache
def pki() -> Pki:
    path = Path(tempfile.mkdtemp(prefix="sealmq-fuzz-pki-"))
    store.init_ca(path, two_level=True)
    store.enroll(path, "backend", BACKEND)
    store.enroll(path, "device", DEVICE)
    store.enroll(path, "device", OTHER_DEVICE, key_type="ed25519")
    issued = pki_ccs.issue_ccs(path, "device", "ccs-dev")
    # Certificates are valid from 5 minutes before issuance: "now" is just after it.
    now = time.time()
    device = _credential(path, "device", DEVICE)
    return Pki(
        path=path,
        now=now,
        trust_store=load_trust_store(path),
        device_cred=device,
        device_cred_ref=_credential(path, "device", DEVICE, by_reference=True),
        other_cred=_credential(path, "device", OTHER_DEVICE),
        backend_cred=_credential(path, "backend", BACKEND),
        device_key=device.private_key,
        device_chain=list(device.chain_der),
        backend_chain=list(_credential(path, "backend", BACKEND).chain_der),
        ccs_registry=pki_ccs.load_registry(path),
        ccs=issued.ccs,
        ccs_kid=issued.kid,
    )


def cleanup() -> None:
    """Remove the temporary directories of this process's world."""
    if pki.cache_info().currsize:
        shutil.rmtree(pki().path, ignore_errors=True)
    if media_dir.cache_info().currsize:
        shutil.rmtree(media_dir(), ignore_errors=True)


# --- EDHOC: one handshake, and its parties frozen in every state a message is received in ---------
@dataclass
class Edhoc:
    messages: dict[str, bytes]
    plaintexts: dict[str, bytes]
    initiator_wait_m2: Initiator  # clone before use
    initiator_completed: Initiator  # after message_3: waits for message_4 or an error
    responder_wait_m3: Responder  # after message_2: waits for message_3 or an error
    g_y: bytes
    keystream_prk: bytes  # PRK_2e
    th_2: bytes
    k_3: bytes
    iv_3: bytes
    th_3: bytes
    k_4: bytes
    iv_4: bytes
    th_4: bytes

    def keystream_2(self, length: int) -> bytes:
        return kdf.edhoc_kdf(self.keystream_prk, 0, self.th_2, length)

    def message_2_for(self, plaintext_2: bytes) -> bytes:
        """message_2 carrying ``plaintext_2`` exactly as the responder would have encrypted it."""
        ks = self.keystream_2(len(plaintext_2))
        return cbor.dumps(self.g_y + bytes(a ^ b for a, b in zip(plaintext_2, ks, strict=True)))

    def message_3_for(self, plaintext_3: bytes) -> bytes:
        aad = cbor.dumps(["Encrypt0", b"", self.th_3])
        return cbor.dumps(get_suite(SUITE).encrypt(self.k_3, self.iv_3, plaintext_3, aad))

    def message_4_for(self, plaintext_4: bytes) -> bytes:
        aad = cbor.dumps(["Encrypt0", b"", self.th_4])
        return cbor.dumps(get_suite(SUITE).encrypt(self.k_4, self.iv_4, plaintext_4, aad))


def _parties(p: Pki, *, debug: bool) -> tuple[Initiator, Responder]:
    x = generate_ephemeral(SUITE, counter_random(1))
    y = generate_ephemeral(SUITE, counter_random(2))
    ini = Initiator(p.device_cred, p.mixed_authenticator(Role.BACKEND), c_i=b"\x0e", suites=[SUITE],
                    ephemeral_key=x, debug=debug)
    res = Responder(p.backend_cred, p.mixed_authenticator(Role.DEVICE), c_r=b"\x27", suites=[SUITE],
                    methods=(0, 1, 2, 3), ephemeral_key=y, debug=debug)
    return ini, res


@functools.cache
def edhoc() -> Edhoc:
    p = pki()
    ini, res = _parties(p, debug=True)
    m1 = ini.create_message_1()
    res.process_message_1(m1)
    m2 = res.create_message_2()
    ini.process_message_2(m2)
    m3 = ini.create_message_3()
    res.process_message_3(m3)
    m4 = res.create_message_4()
    ini.process_message_4(m4)
    t_i, t_r = ini.transcript, res.transcript
    # The same handshake again (fixed ephemeral keys, deterministic ECDSA: the same bytes), with
    # each party stopped in the state where it receives a message.
    ini2, res2 = _parties(p, debug=False)
    if ini2.create_message_1() != m1:
        raise AssertionError("the handshake is not reproducible")
    res2.process_message_1(m1)
    res2.create_message_2()
    wait_m2 = clone(ini2)
    ini2.process_message_2(m2)
    ini2.create_message_3()
    g_y = cbor.loads(m2)[: get_suite(SUITE).point_length]
    return Edhoc(
        messages={"message_1": m1, "message_2": m2, "message_3": m3, "message_4": m4},
        plaintexts={"PLAINTEXT_2": t_r["PLAINTEXT_2"], "PLAINTEXT_3": t_i["PLAINTEXT_3"]},
        initiator_wait_m2=wait_m2,
        initiator_completed=ini2,
        responder_wait_m3=res2,
        g_y=g_y,
        keystream_prk=t_i["PRK_2e"],
        th_2=t_i["TH_2"],
        k_3=t_i["K_3"],
        iv_3=t_i["IV_3"],
        th_3=t_i["TH_3"],
        k_4=t_r["K_4"],
        iv_4=t_r["IV_4"],
        th_4=t_r["TH_4"],
    )


# --- the record session of RFC 9529 trace 1 ------------------------------------------------------
SESSION_DEVICE = "dev-1"


def session_pair() -> tuple[Session, Session]:
    """(device, backend) sessions of trace 1's PRK_out; fresh objects on every call."""
    t1 = vector("rfc9529_trace1.json")["values"]
    prk_out = bytes.fromhex(t1["PRK_out"])
    c_i, c_r = bytes.fromhex(t1["C_I"]), bytes.fromhex(t1["C_R"])
    rnd = counter_random(7)
    common: dict[str, Any] = {"prk_out": prk_out, "c_i": c_i, "c_r": c_r, "device_id": SESSION_DEVICE, "now": 1_000.0,
              "random_bytes": rnd}
    return Session(is_initiator=True, **common), Session(is_initiator=False, **common)


# --- the endpoints: a backend and a device that completed a real handshake --------------------------
@dataclass
class Endpoints:
    backend: BackendEndpoint
    device: DeviceEndpoint
    now: float
    random_bytes: Callable[[int], bytes]
    handshakes: int = 0
    wire: list[Publish] = field(default_factory=list)

    def route(self, outputs: list[Output], *, max_steps: int = 50) -> list[Output]:
        """Deliver publishes between the two (a loss-free broker); return the events seen."""
        queue = list(outputs)
        seen: list[Output] = []
        for _ in range(max_steps):
            if not queue:
                break
            out = queue.pop(0)
            if not isinstance(out, Publish):
                seen.append(out)
                continue
            self.wire.append(out)
            del self.wire[:-32]
            parsed = topics.parse(out.topic)
            if parsed.direction is topics.Direction.UP:
                queue.extend(self.backend.handle(out.topic, out.payload, self.now, self.random_bytes))
            elif parsed.device_id == self.device.device_id:
                queue.extend(self.device.handle(out.topic, out.payload, self.now, self.random_bytes))
        return seen

    def handshake(self) -> list[Output]:
        """Run a real handshake (a fresh one replaces any old session on both sides); the events."""
        self.handshakes += 1
        return self.route(self.device.start_handshake(self.now, self.random_bytes))

    @property
    def established(self) -> bool:
        return self.device.established and DEVICE in self.backend.sessions


def endpoints() -> Endpoints:
    """A fresh pair (each target that fuzzes an endpoint makes its own)."""
    p = pki()
    backend = BackendEndpoint(credentials=[p.backend_cred], trust_store=p.trust_store)
    device = DeviceEndpoint(device_id=DEVICE, credential=p.device_cred, trust_store=p.trust_store,
                            backend_name=BACKEND)
    ep = Endpoints(backend, device, p.now, counter_random(11))
    ep.handshake()
    if not ep.established:
        raise AssertionError("the first handshake failed")
    return ep


# --- media ----------------------------------------------------------------------------------------
MEDIA_FILE = bytes(range(256)) * 12  # 3072 bytes: three chunks of 1 KiB
MEDIA_CHUNK = 1024


@functools.cache
def media_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="sealmq-fuzz-media-"))


@functools.cache
def media_manifest() -> tuple[Manifest, bytes]:
    m = Manifest.create(device_id=DEVICE, name="fuzz.bin", content_type="application/octet-stream",
                        size=len(MEDIA_FILE), sha256=hashlib.sha256(MEDIA_FILE).digest(), created=1_764_000_000,
                        chunk_size=MEDIA_CHUNK)
    return m, sign_manifest(pki().device_key, m)


def fresh_dir(prefix: str) -> Path:
    d = media_dir() / f"{prefix}-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir(parents=True)
    return d
