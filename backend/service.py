"""The backend service: the paho-mqtt adapter around :class:`sealmq.endpoint.BackendEndpoint`.

One MQTT connection serves every device: it subscribes with one wildcard per uplink channel,
answers handshakes, opens sealed records, stores telemetry and command replies in SQLite
exactly once (batched, acknowledged to the broker and to the device only after the commit:
``backend/ingest.py``), sends queued commands until the device replies, rolls keys when due,
and writes the audit log (``server_log.jsonl``). The adapter skeleton (link, lock, clock,
random source, timer, dispatch) is
:class:`runtime.driver.EndpointDriver`'s; this module holds the backend's hooks.
A rejected message (garbage, replay, wrong topic, bad certificate) is audited and dropped;
it never touches another device's session.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from backend.enrol import EnrolmentService, EnrolPolicy, is_claim  # fleet (issue 16)
from backend.ingest import Ingest, IngestSettings
from backend.media import DEFAULT_QUARANTINE_KEEP, DEFAULT_QUARANTINE_TTL, MediaRejected, MediaStore
from backend.media import Received as MediaReceived
from backend.media import Reply as MediaReply
from backend.observer import ServiceObserver, notify  # console (issue 13)
from backend.quotas import DeviceQuotas, QuotaGuard
from backend.session_state import STATE_KEY_FILE, open_session_state
from backend.shared import SharedSessions
from backend.store import open_store
from backend.update import UpdatePusher  # fleet (issue 16)
from pki import ccs as pki_ccs
from pki import layout
from pki.store import CRL_SEEN_FILE, load_identity, load_trust_store
from pki.verify import TrustStore
from runtime import exits
from runtime.audit import AuditLog, AuditThrottle
from runtime.driver import EndpointDriver
from runtime.files import FileWatch, private_dir
from runtime.mqtt import MqttSettings
from sealmq import cbor, topics
from sealmq.bodies import Ack, Command
from sealmq.edhoc import (
    AuthKind,
    CcsAuthenticator,
    KnownChains,
    LocalCredential,
    MixedAuthenticator,
    PeerAuthenticator,
    X509Authenticator,
    X509Credential,
    suites_for,
)
from sealmq.endpoint import (
    BackendConfig,
    BackendEndpoint,
    HandshakeCompleted,
    Output,  # console (issue 13)
    Received,
    SessionLost,
)
from sealmq.errors import ConfigError, Reason, SealmqError
from sealmq.identity import CredentialKind, Role
from sealmq.media_receiver import MediaLimits
from sealmq.topics import Channel, Direction, RecordKind

log = logging.getLogger("sealmq.backend")


@dataclass
class BackendSettings:
    pki_dir: Path
    data_dir: Path
    mqtt: MqttSettings
    name: str = "backend"
    identity_dir: Path | None = None  # default: <pki>/backend/<name>
    endpoint: BackendConfig = field(default_factory=BackendConfig)
    poll_interval: float = 0.25
    media_limits: MediaLimits | None = None
    # Live sessions are re-validated this often (and whenever the CRL changes): a certificate that
    # expires mid-session ends its session, it does not wait for the next handshake.
    revalidate_interval: float = 60.0
    ingest: IngestSettings = field(default_factory=IngestSettings)
    command_ttl: float = 24 * 3600.0  # a command without a reply by then is expired
    command_resend_after: float = 30.0  # a sent command without a reply is sent again (same session)
    durable: bool = True  # fsync each committed batch before acknowledging it
    quotas: DeviceQuotas = field(default_factory=DeviceQuotas)
    quarantine_ttl: float = DEFAULT_QUARANTINE_TTL  # seconds a file that failed verification is kept
    quarantine_keep: int = DEFAULT_QUARANTINE_KEEP  # such files kept per device (the newest)
    audit_throttle: AuditThrottle | None = field(default_factory=AuditThrottle)
    # The database: None is the SQLite file under data_dir (the default); a postgresql:// URL is a
    # database shared by several workers (backend/storage_pg.py, the [scale] extra).
    db: str | None = None
    enrol_policy: EnrolPolicy = field(default_factory=EnrolPolicy)  # fleet (issue 16)
    update_chunk_size: int = 63 * 1024  # fleet (issue 16): update chunks, in flight, re-offer after a stall
    update_window: int = 16
    update_resend_after: float = 10.0
    # Shared sessions (issue 14, backend/shared.py): None keeps them in this process (one worker,
    # the default); a redis:// (or rediss://) URL shares them with the other workers, sealed under
    # the key in state_key (0600, the same file on every worker; made if missing).
    state: str | None = None
    state_key: Path | None = None  # default: <data>/state.key
    state_password_file: Path | None = None  # the state server's password (not in the URL: ps shows it)
    # With several workers, the one that also serves media, queued commands and update pushes (its
    # subscriptions to media are its own, not shared); the others serve handshakes and records.
    primary: bool = True



def _certificate_credentials(
    identity_dir: Path, suites: Sequence[int], passphrase: bytes | None
) -> list[LocalCredential]:
    """The backend's certificates: its main one, then one per extra key type (``extra/<type>/``).

    Each must serve a suite no other serves (the responder picks the credential by the suite the
    device selected); a certificate that serves nothing, or another backend's, is a start error.
    """
    credentials: list[LocalCredential] = []
    served: set[int] = set()
    name = None
    for d in [identity_dir, *layout.extra_dirs(identity_dir)]:
        identity = load_identity(d, passphrase)
        if identity.role is not Role.BACKEND or name not in (None, identity.name):
            raise ConfigError(Reason.CONFIG_INVALID, f"{d} is not a certificate of this backend")
        name = identity.name
        credential = X509Credential(
            private_key=identity.private_key,
            chain_der=[c.public_bytes(Encoding.DER) for c in identity.chain],
            by_reference=False,
        )
        fits = set(suites_for(credential, suites))
        if not fits or fits & served:
            raise ConfigError(Reason.CONFIG_INVALID, f"{d}: its key serves no suite of {list(suites)} "
                                                     "that another certificate does not already serve")
        served |= fits
        credentials.append(credential)
    return credentials


class BackendService(EndpointDriver):
    endpoint: BackendEndpoint

    def __init__(self, settings: BackendSettings, *, passphrase: bytes | None = None) -> None:
        self.settings = settings
        identity_dir = settings.identity_dir or layout.backend_dir(settings.pki_dir, settings.name)
        config = settings.endpoint
        credentials = _certificate_credentials(identity_dir, config.suites, passphrase)
        self._crl = FileWatch(layout.crl(settings.pki_dir), seen=True)
        self._issued = FileWatch(layout.issued_dir(settings.pki_dir), seen=False)
        self._issued_chains = KnownChains()
        self._registry_path = layout.ccs_registry(settings.pki_dir)
        self._registry = FileWatch(self._registry_path, seen=True)
        self.registry = pki_ccs.load_registry(settings.pki_dir) if self._registry_path.exists() else None
        # Constrained devices (EDHOC method 3, CCS credentials by kid) are served too as soon as
        # the backend has a CCS of its own (`sealmq pki ccs issue --pki DIR backend`): looked for
        # at start and at every tick, so issuing one needs no restart.
        self._own_ccs = FileWatch(identity_dir / layout.CCS_CRED, seen=False)
        private_dir(settings.data_dir)  # decrypted payloads, files and the audit trail: owner only
        state = None
        if settings.state is not None:
            state = open_session_state(settings.state, settings.state_key or settings.data_dir / STATE_KEY_FILE,
                                       settings.state_password_file)
            # one initiator per session: the devices start key updates, no worker does on its own
            config = replace(config, session=replace(config.session, auto_key_update=False))
        endpoint = BackendEndpoint(
            credentials=credentials, trust_store=self._load_trust_store(), config=config,
            authenticator=self._authenticator,
        )
        self.shared = None if state is None else SharedSessions(endpoint, state, lock=state.lock)
        self.storage = open_store(settings.db, settings.data_dir, durable=settings.durable)
        self.quotas = QuotaGuard(settings.quotas, self.storage)
        self.media = MediaStore(settings.data_dir, self.storage, limits=settings.media_limits, quota=self.quotas,
                                quarantine_ttl=settings.quarantine_ttl, quarantine_keep=settings.quarantine_keep)
        self._next_expiry = 0.0
        self._next_revalidation = time.time() + settings.revalidate_interval
        # one file per writer: the workers of a share group each keep their own (rotation is per process)
        log_name = ("server_log.jsonl" if settings.mqtt.share_group is None
                    else f"server_log.{settings.mqtt.username or settings.name}.jsonl")
        audit = AuditLog(settings.data_dir / "audit" / log_name, component="backend", echo=log,
                         throttle=settings.audit_throttle)
        self.handlers: dict[RecordKind, Callable[[Received], None]] = {}
        self.observers: list[ServiceObserver] = []  # console (issue 13): backend.observer.attach
        self.enrolment = EnrolmentService(settings.pki_dir, audit, settings.enrol_policy, passphrase)  # issue 16
        self.updates = UpdatePusher(settings.data_dir, audit, chunk_size=settings.update_chunk_size,  # issue 16
                                    window=settings.update_window, resend_after=settings.update_resend_after)
        mqtt = settings.mqtt
        if mqtt.share_group is not None:
            # Media transfers keep per-transfer state (the .part file, its hash, the window) in one
            # process: the primary subscribes to media on its own, the others not at all (docs/scaling.md).
            media = topics.subscription(Channel.MEDIA, Direction.UP)
            if settings.primary:
                mqtt = replace(mqtt, unshared=(*mqtt.unshared, media))
            else:
                endpoint.subscriptions = [f for f in endpoint.subscriptions if f != media]
        super().__init__(
            endpoint, mqtt, audit, role="backend", timer_name="backend-timer",
            default_client_id=f"{settings.mqtt.username or 'backend'}:{settings.name}",
            poll_interval=settings.poll_interval, log=log, manual_ack=True,
        )
        self._load_own_ccs()
        self.ingest = Ingest(self.storage, self.audit, self._lock, self._send_ack, settings.ingest,
                             reject=self._reject)

    # -- lifecycle ---------------------------------------------------------------------------
    def _on_start(self) -> None:
        self.audit.event("started", data_dir=str(self.settings.data_dir))
        self.ingest.start()

    def stop(self) -> None:
        self.ingest.stop()  # commit and acknowledge what is pending while the link is still up
        super().stop()

    def _on_stop(self) -> None:
        self.media.close()
        self.storage.close()

    def run_forever(self, connect_timeout: float | None = None) -> None:
        """Serve until SIGINT/SIGTERM; raise :class:`TransportError` if the broker refuses the
        backend's credentials, or cannot be reached within ``connect_timeout`` (None: retry forever)."""
        done = threading.Event()
        exits.stop_on_signals(done)
        self.start(wait=None)
        try:
            if self.link.wait_connected(connect_timeout, raise_on_timeout=True, stop=done):
                log.info("serving devices; Ctrl-C to stop")
            while not done.wait(0.2):
                if self.link.error is not None:
                    raise self.link.error
        finally:
            self.stop()

    # -- commands ----------------------------------------------------------------------------
    def send_command(self, device_id: str, name: str, args: Any = None) -> int:
        """Queue a command; it is sealed and sent as soon as the device has a session, and again
        under each new session (or after ``command_resend_after``) until the device replies.

        A command the device would refuse (name too long, arguments not plain CBOR data) raises
        :class:`~sealmq.errors.LocalProtocolError` here, before anything is queued."""
        Command(0, name, args).encode()
        return self.storage.queue_command(device_id, name, cbor.dumps(args), self.clock())

    def key_update(self, device_id: str) -> None:
        self._run(lambda now: self.shared.key_update(device_id, now, self.random) if self.shared is not None
                  else self.endpoint.key_update(device_id, now, self.random))

    def seal_to(self, device_id: str, kind: RecordKind, plaintext: bytes) -> None:
        self._run(lambda now: self._seal(device_id, kind, plaintext, now))

    # -- shared sessions (issue 14) ------------------------------------------------------------
    def _handle(self, topic: str, payload: bytes, now: float) -> list[Output]:
        if self.shared is None:
            return self.endpoint.handle(topic, payload, now, self.random)
        return self.shared.handle(topic, payload, now, self.random)

    def _seal(self, device_id: str, kind: RecordKind, body: bytes, now: float) -> list[Output]:
        if self.shared is None:
            return self.endpoint.seal(device_id, kind, body, now)
        return self.shared.seal(device_id, kind, body, now)

    def _on_protocol_event(self, event: str, out: Output) -> None:
        if self.shared is not None and isinstance(out, SessionLost):
            self.shared.session_lost(out.device_id)  # revoked, key limit: ended for every worker

    def _live(self, now: float, devices: set[str] | None = None) -> set[str]:
        """Devices (of ``devices``, or all this worker holds) with a session that is not a claim."""
        if self.shared is not None and devices is not None:
            devices = {d for d in devices if self.shared.has_session(d, now)}
        sessions = self.endpoint.sessions
        return {d for d in (sessions if devices is None else devices)
                if d in sessions and not is_claim(sessions[d].peer)}

    # -- observers: the console's feed and the metrics (issue 13) ----------------------------
    def _after_message(self, topic: str, payload: bytes, outputs: list[Output], now: float) -> None:
        notify(self.observers, "on_message", topic, payload, outputs, now)

    def _on_published(self, topic: str, payload: bytes, now: float) -> None:
        notify(self.observers, "on_publish", topic, payload, now)

    # -- the driver's hooks ------------------------------------------------------------------
    def _before_tick(self) -> None:
        self._reload_crl()
        self._reload_registry()
        self._load_own_ccs()

    def _load_own_ccs(self) -> None:
        """Load (or replace) the backend's own CCS when ``ccs.cbor`` appears or changes, and serve
        method 3 from then on."""
        if not self._own_ccs.changed() or not self._own_ccs.path.exists():
            return
        try:
            credential = pki_ccs.load_credential(self.settings.pki_dir, "backend", self.settings.name)
        except SealmqError as err:
            self.audit.event("ccs_load_failed", reason=err.reason, detail=err.detail)
            return
        with self._lock:
            others = [c for c in self.endpoint.credentials if c.kind is not AuthKind.STATIC_DH]
            self.endpoint.credentials = [*others, credential]
            if 3 not in self.endpoint.config.methods:
                self.endpoint.config = replace(self.endpoint.config, methods=(*self.endpoint.config.methods, 3))
            self.audit.event("ccs_credential_loaded", kid=credential.ccs.kid.hex())

    def _on_tick(self, now: float) -> None:
        if self.settings.primary:  # with several workers, one sends commands and updates
            self._send_pending_commands(now)
            # fleet (issue 16): pending update transfers, certificate and CRL expiry warnings
            self.updates.tick(now, self._live(now, set(self.updates.transfers) if self.shared is not None else None),
                              self._send)
        self.enrolment.warnings(now, lambda: [(d, e.peer) for d, e in self.endpoint.sessions.items()],
                                self.endpoint.trust_store)
        if now >= self._next_revalidation:
            self._next_revalidation = now + self.settings.revalidate_interval
            self._dispatch(self.endpoint.revalidate(self.endpoint.trust_store, now))
        if now >= self._next_expiry:
            self._next_expiry = now + 5.0
            for device_id, tid in self.media.expire(now):
                self.audit.event("transfer_expired", device=device_id, transfer=tid.hex())
            for cmd in self.storage.expire_commands(now - self.settings.command_ttl):
                self.audit.event("command_expired", device=cmd.device_id, command=cmd.name, id=cmd.id)
            self.quotas.prune(now)

    def _known_device_chains(self) -> KnownChains:
        """Certificates this CA issued, so a device may send its certificate by reference (x5t).

        Re-read when ``ca/issued/`` changes (a newly enrolled device). A certificate found here is
        still fully validated (chain, role, validity, CRL) before it is trusted.
        """
        if self._issued.changed():
            issued = self._issued.path
            chains = []
            for path in sorted(issued.glob("*.crt")) if issued.is_dir() else []:
                try:
                    chains.append([x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)])
                except (OSError, ValueError):
                    continue
            self._issued_chains = KnownChains(chains)  # indexed once, not hashed per handshake
        return self._issued_chains

    def _authenticator(self, now: float) -> PeerAuthenticator:
        by_cert = X509Authenticator(self.endpoint.trust_store, Role.DEVICE, datetime.fromtimestamp(now, UTC),
                                 known_chains=self._known_device_chains())
        inner: PeerAuthenticator = by_cert if self.registry is None else MixedAuthenticator(
            ccs=CcsAuthenticator(self.registry, Role.DEVICE, now), x509=by_cert)
        return self.enrolment.authenticator(inner, self.endpoint.trust_store, now)  # claims (issue 16)

    def _reload_registry(self) -> None:
        if not self._registry.changed():
            return
        try:
            registry = pki_ccs.load_registry(self.settings.pki_dir)
        except SealmqError as err:
            self.audit.event("ccs_reload_failed", reason=err.reason, detail=err.detail)
            return
        with self._lock:
            self.registry = registry
            self.audit.event("ccs_registry_reloaded")
            # a revoked or removed CCS ends its live session now, not at the next handshake
            for device_id, est in list(self.endpoint.sessions.items()):
                if est.peer.kind is not CredentialKind.CCS:
                    continue
                entry = registry.by_kid(est.peer.credential_ref)
                if entry is None or entry.revoked:
                    self._dispatch(self.endpoint.close_session(device_id, Reason.REVOKED))

    def _load_trust_store(self) -> TrustStore:
        # the CRL high-water marks live with the data: a restored older crl.pem is refused
        return load_trust_store(self.settings.pki_dir, crl_seen=self.settings.data_dir / CRL_SEEN_FILE)

    def _reload_crl(self) -> None:
        if not self._crl.changed():
            return
        try:
            store = self._load_trust_store()
        except SealmqError as err:
            self.audit.event("crl_reload_failed", reason=err.reason, detail=err.detail)
            return
        with self._lock:
            self.audit.event("crl_reloaded")
            self._dispatch(self.endpoint.revalidate(store, self.clock()))

    def _send_pending_commands(self, now: float) -> None:
        resend_before = now - self.settings.command_resend_after
        # claims only enrol; with shared sessions, any device with queued commands may have one
        if self.shared is not None:
            pending = self.storage.pending_commands(None, resend_before=resend_before)
            live = self._live(now, {c.device_id for c in pending})
            pending = [c for c in pending if c.device_id in live]
        else:
            pending = self.storage.pending_commands(self._live(now), resend_before=resend_before)
        for cmd in pending:
            try:
                body = Command(cmd.id, cmd.name, cbor.loads(cmd.args)).encode()
            except SealmqError as err:
                # queued by hand (`backend command`) and unsendable: fail it once, not every tick
                self.storage.mark_command(cmd.id, "failed", now)
                self.audit.event("command_failed", device=cmd.device_id, id=cmd.id, reason=err.reason)
                continue
            self._dispatch(self._seal(cmd.device_id, RecordKind.COMMAND, body, now))
            self.storage.mark_command(cmd.id, "sent", now)
            self.audit.event("command_sent", device=cmd.device_id, command=cmd.name, id=cmd.id)

    def _on_handshake(self, done: HandshakeCompleted, now: float) -> None:
        peer = done.identity
        if is_claim(peer):  # fleet (issue 16): an enrolment session, not a device yet
            self.audit.event("claim_session", device=done.device_id, credential=peer.credential)
            return
        self.enrolment.on_handshake(done.device_id, peer, now)
        self.updates.on_handshake(done.device_id)
        # the fingerprint names the certificate; a CCS device has none (its kid is in the registry)
        fingerprint = hashlib.sha256(peer.credential_ref).hexdigest() if peer.kind is CredentialKind.X509 else ""
        self.ingest.add_handshake(done.device_id, now, fingerprint)  # committed with the next batch
        self.audit.event("handshake_completed", device=done.device_id, suite=done.suite, cert_sha256=fingerprint)
        # commands sent under the old session go out again; the device learns what is committed
        self.storage.requeue_commands(done.device_id)
        self.ingest.acknowledge(done.device_id, now)

    def _send_ack(self, device_id: str, ack: Ack, now: float) -> None:
        # without a session any more, nothing to do: the next session starts with the same ledger's ACK
        with contextlib.suppress(SealmqError):
            self._dispatch(self._seal(device_id, RecordKind.ACK, ack.encode(), now))

    def _send(self, device_id: str, kind: RecordKind, body: bytes) -> None:
        self._dispatch(self._seal(device_id, kind, body, self.clock()))

    def _on_fleet_record(self, rec: Received, now: float) -> bool:
        """Claim confinement, enrolment and renewal, update status (issue 16); True if handled."""
        peer = self.endpoint.peer(rec.device_id)
        if self.enrolment.confine(rec, peer):
            return True
        if rec.kind is RecordKind.ENROL_REQUEST:
            body = self.enrolment.handle(rec, peer, now)
            if body is not None:
                self._send(rec.device_id, RecordKind.ENROL_RESPONSE, body)
            return True
        if rec.kind is RecordKind.UPDATE_STATUS:
            self.updates.handle(rec.device_id, rec.plaintext, now, self._send)
            return True
        return False

    def _on_record(self, rec: Received, now: float) -> None:
        if not self.quotas.admit_record(rec.device_id, now):
            self.audit.event("quota_exceeded", device=rec.device_id, reason=Reason.RATE_LIMITED, kind=rec.kind.name)
            return
        if self._on_fleet_record(rec, now):
            return
        handler = self.handlers.get(rec.kind)
        if handler is not None:
            handler(rec)
            return
        if rec.kind in (RecordKind.MEDIA_MANIFEST, RecordKind.MEDIA_CHUNK, RecordKind.MEDIA_CONTROL):
            self._on_media(rec, now)
        elif rec.kind in (RecordKind.TELEMETRY, RecordKind.REPLY):
            if rec.kind is RecordKind.TELEMETRY and not self.quotas.fits(rec.device_id, len(rec.plaintext)):
                self.audit.event("quota_exceeded", device=rec.device_id, reason=Reason.QUOTA_EXCEEDED,
                                 kind=rec.kind.name, size=len(rec.plaintext))
                return
            # decoded (only a valid body is stored) and stored with its batch; the broker's
            # acknowledgement waits for the commit
            self.ingest.add(rec, now, self.link.defer_ack())
            if rec.kind is RecordKind.TELEMETRY:
                self.quotas.add(rec.device_id, len(rec.plaintext))  # counted when queued for its batch
        else:
            self._reject(rec, "dispatch", Reason.UNEXPECTED_KIND, rec.kind.name)

    def _reject(self, rec: Received, stage: str, reason: Reason, detail: str = "") -> None:
        """An authenticated record whose body this backend refuses: audited and counted, not stored."""
        self.counters["rejected"] += 1
        self.audit.event("message_rejected", device=rec.device_id, stage=stage, reason=reason, detail=detail,
                         kind=rec.kind.name.lower(), size=len(rec.plaintext))

    def _on_media(self, rec: Received, now: float) -> None:
        public_key = self.endpoint.peer_public_key(rec.device_id)
        if public_key is None:  # pragma: no cover - a record only opens under an established session
            return
        try:
            outputs = self.media.handle(rec.device_id, public_key, rec.kind, rec.plaintext, now)
        except MediaRejected as err:
            self.audit.event("transfer_rejected", device=rec.device_id, reason=err.reason, detail=err.detail)
            self._dispatch(self._seal(rec.device_id, err.reply.kind, err.reply.body, now))
            return
        except SealmqError as err:
            self.audit.event("message_rejected", device=rec.device_id, stage="media", reason=err.reason,
                             detail=err.detail)
            return
        for out in outputs:
            if isinstance(out, MediaReply):
                self._dispatch(self._seal(rec.device_id, out.kind, out.body, now))
            elif isinstance(out, MediaReceived):
                r = out.record
                # file names stay out of logs: the transfer id and hash identify the file
                self.audit.event("transfer_completed", device=rec.device_id, transfer=r.transfer_id, size=r.size,
                                 sha256=r.sha256, content_type=r.content_type,
                                 signature_verified=r.signature_verified)
