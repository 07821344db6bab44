"""The device agent: the paho-mqtt adapter around :class:`sealmq.endpoint.DeviceEndpoint`.

The I/O the core refuses to do (the MQTT connection, the clock and the random source, the timer
that drives handshakes, retries and key updates) is :class:`runtime.driver.EndpointDriver`'s; the
agent adds the device's hooks: its audit log (``device_log.jsonl``), the telemetry queue, the
command handlers, the durable message outbox (``device/outbox.py``: telemetry and replies stay
there, and are re-sent, until the backend acknowledges them) and the media outbox. Everything it publishes
after the handshake is a sealed record; it never sends plaintext and never accepts a command
that did not open under the session it authenticated with the backend.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from device.enrol import RENEW_AT, Renewer, commit_staged  # fleet (issue 16)
from device.media import Outbox, OutgoingTransfer, ProgressHook
from device.outbox import Dropped, MessageOutbox, OutboxLimits
from device.update import Installer, UpdateReceiver, record_only  # fleet (issue 16)
from pki import ccs as pki_ccs
from pki import keys
from pki import layout as pki_layout
from pki.release import load_public  # fleet (issue 16)
from pki.store import CRL_SEEN_FILE, load_identity, load_trust_store, read_bytes
from pki.verify import TrustStore
from runtime.audit import AuditLog
from runtime.driver import EndpointDriver, SharedTimer
from runtime.files import FileWatch, private_dir
from runtime.mqtt import MqttSettings
from runtime.netloop import NetworkLoop
from sealmq.bodies import MAX_TELEMETRY_BATCH, Reply, Telemetry, decode_ack, decode_command, encode_telemetry_batch
from sealmq.edhoc import CcsAuthenticator, LocalCredential, PeerAuthenticator, X509Credential
from sealmq.endpoint import (
    DeviceEndpoint,
    EndpointConfig,
    HandshakeCompleted,
    Output,
    Received,
)
from sealmq.errors import DecodeError, KeyFileError, Reason, SealmqError
from sealmq.identity import Role
from sealmq.media import DEFAULT_CHUNK_SIZE
from sealmq.media_sender import DEFAULT_WINDOW
from sealmq.topics import RecordKind

log = logging.getLogger("sealmq.device")

CommandHandler = Callable[[Any], Any]

# A telemetry batch's readings together stay under this many bytes (a batch record stays well
# below the largest media chunk, which every broker the product runs with accepts).
TELEMETRY_BATCH_BYTES = 32 * 1024


@dataclass
class DeviceConfig:
    device_id: str
    identity_dir: Path
    pki_dir: Path  # where ca/ca.crt and ca/crl.pem are
    state_dir: Path
    mqtt: MqttSettings
    backend_name: str = "backend"
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    # The timer: handshake timeouts and retries, key updates by time, outbox and media re-sends, CRL
    # and certificate checks, all timed in seconds. Sending, acknowledgements and the handshake on
    # connect do not wait for it. At 0.2 s, 1,000 idle simulated devices kept most of a core busy.
    poll_interval: float = 1.0
    max_pending: int = 1000  # telemetry sealed only once a session exists; queued until then
    chunk_size: int = DEFAULT_CHUNK_SIZE  # media chunk size (sealed record < broker's max message size)
    media_window: int = DEFAULT_WINDOW  # media chunks in flight per transfer
    media_resend_after: float = 5.0
    method: int = 0  # 0: X.509 + signatures (default); 3: static DH with a CCS (constrained devices)
    outbox: OutboxLimits = field(default_factory=OutboxLimits)  # telemetry and replies until acknowledged
    # Readings sealed together in one TELEMETRY record when several are due at once (a burst, a
    # backlog after a reconnect): one record, one MQTT message and one broker acknowledgement
    # for up to this many. 1: one record per reading. At most bodies.MAX_TELEMETRY_BATCH.
    telemetry_batch: int = MAX_TELEMETRY_BATCH
    # fleet (issue 16): renewal point, device class and release key for signed updates, installer hook
    renew_at: float | None = RENEW_AT  # fraction of the certificate's lifetime; None: never renew
    device_class: str | None = None
    release_key: Path | None = None  # default: release.pub in the identity directory, if there
    installer: Installer = record_only


def _telemetry(now: float, values: dict[str, Any], msg_id: int) -> bytes:
    return Telemetry.at(now, values, msg_id).encode()


def _credentials(
    config: DeviceConfig, passphrase: bytes | None
) -> tuple[LocalCredential, Callable[[float], PeerAuthenticator] | None, Any, Any]:
    """(EDHOC credential, backend authenticator factory, trust store, media signing key)."""
    if config.method == 3:
        # A constrained device: its CCS and static DH key; the backend is known by its registered
        # CCS (kid), no certificate chain anywhere. Media are signed with the same key.
        credential = pki_ccs.load_credential(config.pki_dir, "device", config.device_id, passphrase=passphrase)
        key_pem = read_bytes(config.identity_dir / pki_layout.CCS_KEY, "CCS key", KeyFileError)
        registry = pki_ccs.load_registry(config.pki_dir)

        def authenticator(now: float) -> PeerAuthenticator:
            return CcsAuthenticator(registry, Role.BACKEND, now)

        return credential, authenticator, None, keys.from_pem(key_pem, passphrase)
    identity = load_identity(config.identity_dir, passphrase)
    if identity.name != config.device_id:
        raise SealmqError(Reason.IDENTITY_MISMATCH, f"identity in {config.identity_dir} is {identity.name}")
    credential_x509 = X509Credential(
        private_key=identity.private_key,
        chain_der=[c.public_bytes(Encoding.DER) for c in identity.chain],
        by_reference=config.endpoint.by_reference,
    )
    return credential_x509, None, _load_trust_store(config), identity.private_key


def _load_trust_store(config: DeviceConfig) -> TrustStore:
    # the CRL high-water marks live in the device's state: a restored older crl.pem is refused
    return load_trust_store(config.pki_dir, crl_seen=config.state_dir / CRL_SEEN_FILE)


def load_release_key(config: DeviceConfig) -> Any:
    """The release public key signed updates must carry (None: the device accepts no update)."""
    path = config.release_key or config.identity_dir / "release.pub"
    if config.release_key is None and not path.exists():
        return None
    return load_public(path)


class DeviceAgent(EndpointDriver):
    endpoint: DeviceEndpoint

    def __init__(self, config: DeviceConfig, *, passphrase: bytes | None = None,
                 network: NetworkLoop | None = None, timer: SharedTimer | None = None) -> None:
        """``network`` and ``timer``: a network thread and a timer thread shared with other agents
        of this process (the simulator's); None: this agent's own (paho's loop thread, a timer)."""
        self.config = config
        if config.method == 0:
            commit_staged(config.identity_dir)  # fleet (issue 16): finish a renewal a crash interrupted
        credential, authenticator, trust_store, signing_key = _credentials(config, passphrase)
        endpoint = DeviceEndpoint(
            device_id=config.device_id,
            credential=credential,
            trust_store=trust_store,
            backend_name=config.backend_name,
            config=config.endpoint,
            authenticator=authenticator,
            method=config.method,
        )
        private_dir(config.state_dir)  # the audit log, the media outbox, CRL high-water marks
        audit = AuditLog(config.state_dir / "device_log.jsonl", component=f"device:{config.device_id}", echo=log)
        super().__init__(
            endpoint, config.mqtt, audit, role="device", timer_name=f"device-{config.device_id}",
            default_client_id=f"{config.mqtt.username or config.device_id}:agent",
            poll_interval=config.poll_interval, log=log, tick_offline=False, network=network,
            timer=timer,
        )
        self._pending: deque[tuple[RecordKind, bytes]] = deque(maxlen=config.max_pending)
        self.established = threading.Event()
        self.commands: dict[str, CommandHandler] = {
            "ping": lambda args: "pong",
            "status": lambda args: {"device": config.device_id, "epoch": self.epoch},
        }
        # an X.509 device re-reads its CRL when it changes (a CRL lives 30 days, a device longer)
        self._crl = FileWatch(pki_layout.crl(config.pki_dir), seen=True) if trust_store is not None else None
        self.on_record: Callable[[Received], None] | None = None  # records the agent does not handle
        self.on_progress: ProgressHook | None = None
        self.outbox = Outbox(config.state_dir / "outbox", config.device_id, signing_key,
                             chunk_size=config.chunk_size, window=config.media_window,
                             resend_after=config.media_resend_after, on_progress=self._progress)
        self.messages = MessageOutbox(config.state_dir, config.outbox, now=time.time())
        self._session_token = 0  # changes with every session: the outbox re-sends under new keys
        self._next_outbox_expiry = 0.0
        # fleet (issue 16): certificate renewal and signed updates
        self.renewer = (Renewer(config.identity_dir, config.device_id, renew_at=config.renew_at)
                        if config.method == 0 and config.renew_at is not None else None)
        if self.renewer is not None:
            # parse the certificate's validity now, at start, not at the first tick after connecting
            with contextlib.suppress(SealmqError):
                self.renewer.due_at()
        self.updates = UpdateReceiver(config.state_dir, config.device_id, self.audit,
                                      release_key=load_release_key(config), device_class=config.device_class,
                                      installer=config.installer)

    # -- lifecycle ---------------------------------------------------------------------------
    def _on_connected(self) -> None:
        # what was in flight may have died with the broker: the outbox sends it again
        self.messages.rewind()
        # start the handshake now rather than at the next timer tick (up to poll_interval later)
        self._run(lambda now: self.endpoint.poll(now, self.random))

    def wait_established(self, timeout: float) -> bool:
        return self.established.wait(timeout)

    @property
    def epoch(self) -> int:
        session = self.endpoint.session
        return int(getattr(session, "epoch", 0)) if session is not None else -1

    # -- sending -----------------------------------------------------------------------------
    def send(self, kind: RecordKind, plaintext: bytes) -> None:
        with self._lock:
            if not self.endpoint.established:
                self._pending.append((kind, plaintext))
                return
            self._dispatch(self.endpoint.seal(kind, plaintext, self.clock()))

    def send_telemetry(self, values: dict[str, Any]) -> int:
        """Commit a telemetry message to the outbox, then seal and send it (now, or once a session
        exists and the window allows); returns its message id. It is re-sent until acknowledged."""
        now = self.clock()
        # committed (fsynced) outside the agent's lock, so acknowledgements keep flowing meanwhile
        msg_id, dropped = self.messages.add(RecordKind.TELEMETRY, functools.partial(_telemetry, now, values), now)
        self._sent_to_outbox(dropped)
        return msg_id

    def send_telemetry_many(self, readings: list[dict[str, Any]]) -> list[int]:
        """:meth:`send_telemetry` for several readings, committed to the outbox in one transaction."""
        now = self.clock()
        builds = [functools.partial(_telemetry, now, values) for values in readings]
        ids, dropped = self.messages.add_many(RecordKind.TELEMETRY, builds, now)
        self._sent_to_outbox(dropped)
        return ids

    def _sent_to_outbox(self, dropped: list[Dropped]) -> None:
        with self._lock:
            self._audit_dropped(dropped)
            if self.endpoint.established:
                self._pump_messages(self.clock())

    def unacknowledged(self) -> int:
        """Messages in the outbox (sent or not) that the backend has not acknowledged yet."""
        return len(self.messages)

    def wait_acknowledged(self, timeout: float) -> bool:
        """Wait until the backend has acknowledged every message in the outbox."""
        deadline = time.monotonic() + timeout
        while len(self.messages) and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self.messages) == 0

    def _pump_messages(self, now: float) -> None:
        due = self.messages.due(self._session_token, now)
        limit = max(1, min(self.config.telemetry_batch, MAX_TELEMETRY_BATCH))
        i = 0
        while i < len(due):
            # consecutive telemetry (ids increasing: due() is in id order) goes out as one batch
            j, size = i + 1, len(due[i].body)
            if due[i].kind is RecordKind.TELEMETRY:
                while (j < len(due) and j - i < limit and due[j].kind is RecordKind.TELEMETRY
                       and size + len(due[j].body) <= TELEMETRY_BATCH_BYTES):
                    size += len(due[j].body)
                    j += 1
            if j - i == 1:
                self._dispatch(self.endpoint.seal(due[i].kind, due[i].body, now))
            else:
                body = encode_telemetry_batch([p.body for p in due[i:j]])
                self._dispatch(self.endpoint.seal(RecordKind.TELEMETRY, body, now))
            i = j

    def _audit_dropped(self, dropped: list[Dropped]) -> None:
        for d in dropped:
            self.audit.event("outbox_dropped", reason=d.reason, count=d.count, first_id=d.first_id,
                             last_id=d.last_id)

    def send_file(self, path: Path, content_type: str | None = None) -> OutgoingTransfer:
        """Queue a file: signed manifest + sealed chunks, resumable (state persists in the outbox)."""
        with self._lock:
            transfer = self.outbox.add(path, content_type)
            self.audit.event("transfer_queued", transfer=transfer.transfer_id.hex(), size=transfer.manifest.size)
            if self.endpoint.established:
                self._pump_media(self.clock())
            return transfer

    def pending_transfers(self) -> int:
        with self._lock:
            return len(self.outbox.transfers)

    def wait_transfers(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pending_transfers() == 0:
                return True
            time.sleep(0.05)
        return self.pending_transfers() == 0

    def _progress(self, progress: Any) -> None:
        if progress.state in ("done", "rejected", "aborted"):
            event = "transfer_completed" if progress.state == "done" else "transfer_" + progress.state
            self.audit.event(event, transfer=progress.transfer_id.hex(), size=progress.total_bytes,
                             reason=progress.reason)
        if self.on_progress is not None:
            self.on_progress(progress)

    def _pump_media(self, now: float) -> None:
        for kind, body in self.outbox.stream(now):  # each chunk sealed and sent as it is read
            self._dispatch(self.endpoint.seal(kind, body, now))

    def key_update(self) -> None:
        self._run(lambda now: self.endpoint.key_update(now, self.random))

    # -- the driver's hooks ------------------------------------------------------------------
    def _before_tick(self) -> None:
        self.reload_crl()

    def reload_crl(self) -> bool:
        """Load ``ca/crl.pem`` again if it changed; True when the new trust store is in use.

        A CRL that fails to load (unparsable, or older than one already accepted) is audited and
        the current trust store stays: it is as good as it was.
        """
        if self._crl is None or not self._crl.changed():
            return False
        try:
            store = _load_trust_store(self.config)
        except SealmqError as err:
            self.audit.event("crl_reload_failed", reason=err.reason, detail=err.detail)
            return False
        with self._lock:
            self.endpoint.trust_store = store
        self.audit.event("crl_reloaded")
        return True

    def _on_tick(self, now: float) -> None:
        if now >= self._next_outbox_expiry:
            self._next_outbox_expiry = now + 10.0
            self._audit_dropped(self.messages.expire(now))
        if self.endpoint.established:
            self._pump_messages(now)
            self._pump_media(now)
            if self.renewer is not None:
                self.renewer.tick(self, now)  # fleet (issue 16)
            for kind, body in self.updates.tick(now):  # fleet (issue 16): a stalled update asks again
                self.send(kind, body)

    def _on_handshake(self, done: HandshakeCompleted, now: float) -> None:
        self.audit.event("handshake_completed", peer=done.peer_name, suite=done.suite)
        self.established.set()
        self._session_token += 1
        self._flush_pending()
        self._pump_messages(now)
        self._pump_media(now)  # an interrupted transfer resumes now, not at the next tick

    def _on_stop(self) -> None:
        self.messages.close()

    def _on_protocol_event(self, event: str, out: Output) -> None:
        if event == "session_lost":
            self.established.clear()

    def _flush_pending(self) -> None:
        now = self.clock()
        while self._pending and self.endpoint.established:
            kind, plaintext = self._pending.popleft()
            self._dispatch(self.endpoint.seal(kind, plaintext, now))

    def _on_record(self, rec: Received, now: float) -> None:
        if rec.kind is RecordKind.COMMAND:
            self._run_command(rec)
        elif rec.kind is RecordKind.ACK:
            try:
                ack = decode_ack(rec.plaintext)
            except DecodeError as err:
                self.audit.event("message_rejected", stage="ack", reason=err.reason, detail=err.detail)
                return
            if self.messages.ack(ack):
                self._pump_messages(now)  # the ack opened the window
        elif rec.kind in (RecordKind.MEDIA_ACK, RecordKind.MEDIA_CONTROL):
            now = self.clock()
            try:
                self.outbox.handle(rec.kind, rec.plaintext, now)
            except SealmqError as err:
                self.audit.event("message_rejected", stage="media", reason=err.reason, detail=err.detail)
                return
            self._pump_media(now)  # the ack opened the window: send the next chunks now
        elif rec.kind is RecordKind.ENROL_RESPONSE and self.renewer is not None:
            self.renewer.on_response(self, rec.plaintext, now)  # fleet (issue 16)
        elif rec.kind in (RecordKind.UPDATE_OFFER, RecordKind.UPDATE_CHUNK):
            for kind, body in self.updates.handle(rec.kind, rec.plaintext, now):  # fleet (issue 16)
                self.send(kind, body)  # queued during a re-handshake: the old session is about to go
        elif self.on_record is not None:
            self.on_record(rec)

    def _run_command(self, rec: Received) -> None:
        try:
            command = decode_command(rec.plaintext)
        except DecodeError as err:
            self.audit.event("command_rejected", reason=err.reason, detail=err.detail)
            return
        if self.messages.executed(command.id):
            # sent again under a new session: its reply is in the outbox, or already acknowledged
            self.audit.event("command_repeated", command=command.name, id=command.id)
            return
        handler = self.commands.get(command.name)
        ok: bool
        value: Any
        if handler is None:
            ok, value = False, f"unknown command {command.name}"
        else:
            try:
                ok, value = True, handler(command.args)
            except Exception as exc:  # a handler bug must not kill the agent
                ok, value = False, type(exc).__name__
        try:
            Reply(command.id, ok, value, 1).encode()
        except SealmqError:  # the handler's result is not plain CBOR data: say so, do not crash
            ok, value = False, "unencodable result"
        now = self.clock()
        _, dropped = self.messages.add_reply(command.id, lambda mid: Reply(command.id, ok, value, mid).encode(), now)
        self._audit_dropped(dropped)
        self.audit.event("command_executed", command=command.name, id=command.id, ok=ok)
        self._pump_messages(now)
