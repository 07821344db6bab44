"""The device's side of enrolment and renewal (docs/pki.md, "Zero-touch enrolment and renewal").

- :func:`enrol` (``sealmq device enrol``): a device that holds only its claim (``claim_key.pem``,
  ``claim_chain.pem`` from ``sealmq pki claim issue``) makes its own key pair, opens a sealed
  session with the claim, sends its CSR in an ENROL_REQUEST, and installs the certificate chain of
  the answer as ``key.pem``/``cert.pem``/``chain.pem`` in its identity directory (atomically, the
  key 0600). Then it runs as any device. The release public key that came with the claim is
  installed beside them.
- :class:`Renewer`: the running agent renews at ``renew_at`` (default two thirds) of its
  certificate's lifetime over its live session, with a new key pair, then re-handshakes with the
  new certificate. A refusal is audited and retried after ``retry_after`` seconds.

Both check the answer before they keep it: the chain validates against the device's trust store
as a device certificate for this id, and the leaf carries the key the device just made.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pki import claim as pki_claim
from pki import issue, keys, layout
from pki.keys import PrivateKey
from pki.store import load_trust_store, read_bytes
from pki.verify import load_chain
from runtime.audit import AuditLog
from runtime.driver import EndpointDriver
from runtime.files import atomic_write, fsync_dir
from runtime.mqtt import MqttSettings
from sealmq import enrol as enrol_bodies
from sealmq.edhoc import X509Credential
from sealmq.endpoint import DeviceEndpoint, HandshakeCompleted, Output, Received
from sealmq.errors import CertificateError, KeyFileError, Reason, SealmqError
from sealmq.identity import Role
from sealmq.topics import RecordKind

if TYPE_CHECKING:
    from device.agent import DeviceAgent

log = logging.getLogger("sealmq.device.enrol")

RENEW_AT = 2 / 3


def _new_request(device_id: str, random_bytes: Any) -> tuple[PrivateKey, enrol_bodies.EnrolRequest]:
    key = keys.generate(keys.KeyType.P256)
    csr = issue.make_csr(key, Role.DEVICE, device_id).public_bytes(Encoding.DER)
    req_id = int.from_bytes(random_bytes(4), "big")
    return key, enrol_bodies.EnrolRequest(req_id, csr)


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def install(identity_dir: Path, device_id: str, key: PrivateKey, response: enrol_bodies.EnrolResponse, *,
            trust_store: Any, now: float) -> list[bytes]:
    """Check an issued chain and write key, certificate and chain; returns the chain (DER)."""
    chain = list(response.chain)
    certs = [load_chain(c)[0] for c in chain]
    if _spki(certs[0].public_key()) != _spki(key.public_key()):
        raise CertificateError(Reason.IDENTITY_MISMATCH, "issued certificate carries another key")
    trust_store.verify(chain, role=Role.DEVICE, now=datetime.fromtimestamp(now, UTC), expected_name=device_id)
    identity_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = [c.public_bytes(Encoding.PEM) for c in certs]
    # Three files must change together: stage them all, mark the stage complete, then rename. A
    # crash before the mark leaves the old identity; after it, commit_staged() finishes the job.
    atomic_write(identity_dir / (layout.KEY + STAGED), keys.to_pem(key), mode=0o600)
    atomic_write(identity_dir / (layout.CHAIN + STAGED), b"".join(pem), mode=0o644)
    atomic_write(identity_dir / (layout.CERT + STAGED), pem[0], mode=0o644)
    atomic_write(identity_dir / COMMIT_MARK, b"", mode=0o600)
    commit_staged(identity_dir)
    return chain


def _reason(text: str) -> Reason:
    try:
        return Reason(text)
    except ValueError:
        return Reason.POLICY_VIOLATION


STAGED = ".new"
COMMIT_MARK = "identity.commit"


def commit_staged(identity_dir: Path) -> bool:
    """Finish (or discard) a staged identity change: called after install and before an agent loads
    its identity, so a crash at any point leaves a key that matches its certificate."""
    staged = [identity_dir / (n + STAGED) for n in (layout.CHAIN, layout.CERT, layout.KEY)]
    mark = identity_dir / COMMIT_MARK
    if not mark.exists():
        for p in staged:
            p.unlink(missing_ok=True)  # an incomplete stage: the old identity stays
        return False
    for p in staged:
        if p.exists():
            os.replace(p, p.with_name(p.name[: -len(STAGED)]))
    fsync_dir(identity_dir)
    mark.unlink()
    fsync_dir(identity_dir)
    return True


# --- zero-touch enrolment ----------------------------------------------------------------------
@dataclass
class EnrolConfig:
    device_id: str
    claim_dir: Path  # claim_key.pem, claim_chain.pem (and release.pub)
    pki_dir: Path  # ca/ca.crt and ca/crl.pem
    identity_dir: Path  # where key.pem, cert.pem, chain.pem go
    state_dir: Path
    mqtt: MqttSettings
    backend_name: str = "backend"
    poll_interval: float = 0.2


class ClaimEnroller(EndpointDriver):
    """A one-shot device endpoint authenticated with the claim: sends the CSR, installs the answer."""

    endpoint: DeviceEndpoint

    def __init__(self, config: EnrolConfig) -> None:
        self.config = config
        claim_key = keys.from_pem(read_bytes(config.claim_dir / pki_claim.CLAIM_KEY, "claim key", KeyFileError))
        chain = load_chain(read_bytes(config.claim_dir / pki_claim.CLAIM_CHAIN, "claim chain", CertificateError))
        self.trust_store = load_trust_store(config.pki_dir)
        endpoint = DeviceEndpoint(
            device_id=config.device_id,
            credential=X509Credential(private_key=claim_key, chain_der=[c.public_bytes(Encoding.DER) for c in chain],
                                      by_reference=False),
            trust_store=self.trust_store, backend_name=config.backend_name,
        )
        config.state_dir.mkdir(parents=True, exist_ok=True)
        audit = AuditLog(config.state_dir / "device_log.jsonl", component=f"device:{config.device_id}", echo=log)
        # one-shot: a clean session, so enrolments leave no persistent session behind on the broker
        # (the embedded broker allows a user only a few)
        mqtt = replace(config.mqtt, clean_session=True)
        super().__init__(endpoint, mqtt, audit, role="device", timer_name=f"enrol-{config.device_id}",
                         default_client_id=f"{config.mqtt.username or config.device_id}:enrol",
                         poll_interval=config.poll_interval, log=log, tick_offline=False)
        self.done = threading.Event()
        self.error: SealmqError | None = None
        self._key: PrivateKey | None = None
        self._request: enrol_bodies.EnrolRequest | None = None

    def _on_handshake(self, done: HandshakeCompleted, now: float) -> None:
        self.audit.event("claim_session", peer=done.peer_name)
        self._key, self._request = _new_request(self.config.device_id, self.random)
        self._dispatch(self.endpoint.seal(RecordKind.ENROL_REQUEST, self._request.encode(), now))

    def _on_protocol_event(self, event: str, out: Output) -> None:
        if event == "handshake_failed":  # the backend refused the claim (used up, revoked, unknown)
            self.error = SealmqError(getattr(out, "reason", Reason.PEER_ERROR), "claim handshake refused")
            self.done.set()

    def _on_record(self, rec: Received, now: float) -> None:
        if rec.kind is not RecordKind.ENROL_RESPONSE or self._request is None or self._key is None:
            self.audit.event("message_rejected", stage="enrol", reason=Reason.UNEXPECTED_MESSAGE, kind=rec.kind.name)
            return
        try:
            response = enrol_bodies.decode_response(rec.plaintext)
            if response.req_id != self._request.req_id:
                raise SealmqError(Reason.UNEXPECTED_MESSAGE, "answer to another request")
            if not response.ok:
                raise SealmqError(_reason(response.reason), "the backend refused the CSR")
            install(self.config.identity_dir, self.config.device_id, self._key, response,
                    trust_store=self.trust_store, now=now)
            release = self.config.claim_dir / pki_claim.RELEASE_PUB
            if release.exists():
                atomic_write(self.config.identity_dir / pki_claim.RELEASE_PUB, release.read_bytes(), mode=0o644)
        except SealmqError as err:
            self.audit.event("enrolment_failed", reason=err.reason, detail=err.detail)
            self.error = err
        else:
            self.audit.event("enrolled", device=self.config.device_id)
        self.done.set()


def enrol(config: EnrolConfig, timeout: float = 30.0) -> Path:
    """Enrol with the claim; returns the identity directory, or raises the refusal's SealmqError."""
    enroller = ClaimEnroller(config)
    enroller.start(wait=timeout)
    try:
        if not enroller.done.wait(timeout):
            raise SealmqError(Reason.HANDSHAKE_TIMEOUT, "no enrolment answer in time")
    finally:
        enroller.stop()
    if enroller.error is not None:
        raise enroller.error
    return config.identity_dir


# --- renewal over the live session -------------------------------------------------------------
class Renewer:
    def __init__(self, identity_dir: Path, device_id: str, *, renew_at: float = RENEW_AT,
                 retry_after: float = 60.0) -> None:
        self.identity_dir = identity_dir
        self.device_id = device_id
        self.renew_at = renew_at
        self.retry_after = retry_after
        self._pending: tuple[PrivateKey, enrol_bodies.EnrolRequest, float] | None = None
        self._not_before_retry = 0.0
        self._cert = identity_dir / layout.CERT
        self._due: tuple[tuple[int, int, int], float] | None = None  # (cert.pem's stat, due_at)

    def due_at(self) -> float:
        """When the current certificate should be renewed (seconds since 1970).

        Asked at every timer tick: the certificate is read and parsed again only when cert.pem
        changed (a renewal or a re-enrolment replaces the file), otherwise one stat() answers.
        """
        path = self._cert
        try:
            st = os.stat(path)
        except OSError:
            st = None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size) if st is not None else None
        if stamp is not None and self._due is not None and self._due[0] == stamp:
            return self._due[1]
        leaf = load_chain(read_bytes(path, "certificate", CertificateError))[0]
        start, end = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
        due = start + (end - start) * self.renew_at
        self._due = (stamp, due) if stamp is not None else None
        return due

    def tick(self, agent: DeviceAgent, now: float) -> None:
        if not agent.endpoint.established or now < self._not_before_retry:
            return
        if self._pending is not None and now - self._pending[2] < self.retry_after:
            return
        try:
            if now < self.due_at():
                return
        except SealmqError:
            return
        key, request = _new_request(self.device_id, agent.random)
        self._pending = (key, request, now)
        agent.audit.event("renewal_requested", device=self.device_id)
        agent._dispatch(agent.endpoint.seal(RecordKind.ENROL_REQUEST, request.encode(), now))

    def on_response(self, agent: DeviceAgent, body: bytes, now: float) -> None:
        try:
            response = enrol_bodies.decode_response(body)
            if self._pending is None or response.req_id != self._pending[1].req_id:
                raise SealmqError(Reason.UNEXPECTED_MESSAGE, "no renewal with that request id")
            key = self._pending[0]
            if not response.ok:
                self._pending = None
                self._not_before_retry = now + self.retry_after
                agent.audit.event("renewal_refused", reason=response.reason)
                return
            chain = install(self.identity_dir, self.device_id, key, response,
                            trust_store=agent.endpoint.trust_store, now=now)
        except SealmqError as err:
            agent.audit.event("message_rejected", stage="renewal", reason=err.reason, detail=err.detail)
            return
        self._pending = None
        agent.endpoint.credential = X509Credential(private_key=key, chain_der=chain,
                                                   by_reference=agent.config.endpoint.by_reference)
        agent.outbox.private_key = key
        agent.audit.event("certificate_renewed", device=self.device_id, due=round(self.due_at()))
        # the new certificate is used from the next handshake on: start it now
        agent._dispatch(agent.endpoint.start_handshake(now, agent.random))

