"""The backend's batched, exactly-once ingest of telemetry and command replies.

Opened records are not stored one by one: :class:`Ingest` collects them and commits a batch (at
``max_batch`` readings and replies; a TELEMETRY record may carry up to 64 readings, each stored
and acknowledged by its own message id, ``max_delay`` seconds after the first one, or when no record came for
``idle`` seconds) in one transaction of the store (:meth:`backend.store.BackendStore.commit_batch`),
which checks every message id against the device's :class:`sealmq.delivery.Ledger` as committed by
every worker sharing the database (read under a lock in that transaction, never a copy kept here),
writes only the new ones and merges them into the ledger. Only after the commit:

1. the QoS 1 PUBLISHes that carried the batch are acknowledged to the broker (paho's manual
   acknowledgement), so a crash between receipt and commit loses nothing: the broker delivers them
   again, and the ledger (or, within a session, the replay window) drops what was already stored;
2. each device gets one sealed ACK record with its merged ledger (what is committed, by this
   worker or another), so its outbox drops those messages; until then it re-sends them, and the
   ledger makes the repeats harmless.

A message id already in the ledger is a repeat: not stored again, but acknowledged again (the
device's ACK may have been lost, or another worker stored it). Everything here runs under the
service's lock except the commit itself, so records keep being opened while a batch is written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from backend.storage import CommitResult, NewHandshake, NewMessage, NewReply, decode_ledger
from backend.store import BackendStore
from runtime.audit import AuditLog
from sealmq.bodies import Ack, decode_reply, telemetry_readings
from sealmq.endpoint import Received
from sealmq.errors import DecodeError, Reason
from sealmq.topics import RecordKind

log = logging.getLogger("sealmq.backend.ingest")

AckBroker = Callable[[], None]  # acknowledges one QoS 1 PUBLISH to the broker


@dataclass(frozen=True)
class IngestSettings:
    max_batch: int = 256  # readings and replies per transaction
    max_delay: float = 0.005  # seconds a record may wait for its batch to fill
    # ... but a batch is committed as soon as no record arrived for this long: the broker holds
    # back what it may not deliver before the batch's acknowledgements (its in-flight limit)
    idle: float = 0.0005


@dataclass
class _Item:
    rec: Received
    now: float
    msg_id: int
    command_id: int | None  # a reply's command
    ok: bool
    body: bytes  # what is stored: the reply, or this one reading of a (possibly batched) TELEMETRY record


@dataclass
class IngestCounters:
    stored: int = 0  # telemetry messages committed
    replies: int = 0  # replies committed (their commands are replied)
    duplicates: int = 0  # repeats dropped (already committed)
    batches: int = 0
    acks: int = 0  # sealed ACK records sent


@dataclass
class _Prepared:
    """A batch ready to commit."""

    broker_acks: list[AckBroker]
    records: int
    now: float
    messages: list[NewMessage] = field(default_factory=list)
    replies: list[NewReply] = field(default_factory=list)
    handshakes: list[NewHandshake] = field(default_factory=list)
    items: dict[tuple[str, int], _Item] = field(default_factory=dict)  # (device, message id): the first item


@dataclass
class _Batch:
    items: list[_Item] = field(default_factory=list)
    broker_acks: list[AckBroker] = field(default_factory=list)
    handshakes: list[NewHandshake] = field(default_factory=list)


class Ingest:
    """Collects opened TELEMETRY and REPLY records and commits them in batches (see the module)."""

    def __init__(
        self,
        storage: BackendStore,
        audit: AuditLog,
        lock: threading.RLock,
        send_ack: Callable[[str, Ack, float], None],
        settings: IngestSettings | None = None,
        *,
        reject: Callable[[Received, str, Reason, str], None] | None = None,
    ) -> None:
        self.storage = storage
        self.audit = audit
        self.settings = settings or IngestSettings()
        self._lock = lock
        self._send_ack = send_ack
        self._reject = reject or self._audit_reject
        self._batch = _Batch()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters = IngestCounters()
        self._last_add = 0.0
        self._full = False
        self._flushing = threading.Lock()  # one flush at a time

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="backend-ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Commit what is pending, then stop the flusher."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        self.flush()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.is_set():
                return
            started = time.monotonic()
            while not self._full and not self._stop.wait(self.settings.idle):  # let the batch fill
                now = time.monotonic()
                if now - self._last_add >= self.settings.idle or now - started >= self.settings.max_delay:
                    break
            self._wake.clear()
            try:
                self.flush()
            except Exception:
                log.exception("ingest flush failed")

    def _audit_reject(self, rec: Received, stage: str, reason: Reason, detail: str) -> None:
        self.audit.event("message_rejected", device=rec.device_id, stage=stage, reason=reason, detail=detail)

    # -- records ------------------------------------------------------------------------------
    def add(self, rec: Received, now: float, broker_ack: AckBroker | None) -> None:
        """Queue an opened TELEMETRY or REPLY record; ``broker_ack`` runs once it is committed.
        A body that does not decode is refused (audited) and acknowledged at once."""
        try:
            if rec.kind is RecordKind.TELEMETRY:
                # one reading, or a batch of them: each is stored (and acknowledged) by its own id
                items = [_Item(rec, now, t.msg_id, None, True, body) for t, body in telemetry_readings(rec.plaintext)]
            else:
                reply = decode_reply(rec.plaintext)
                items = [_Item(rec, now, reply.msg_id, reply.id, reply.ok, rec.plaintext)]
        except DecodeError as err:
            self._reject(rec, rec.kind.name.lower(), err.reason, err.detail)
            if broker_ack is not None:
                broker_ack()
            return
        self._last_add = time.monotonic()
        self._batch.items.extend(items)
        if broker_ack is not None:
            self._batch.broker_acks.append(broker_ack)
        self._full = len(self._batch.items) >= self.settings.max_batch
        self._wake.set()

    def add_handshake(self, device_id: str, now: float, cert_sha256: str) -> None:
        """Record a completed handshake in the devices table with the next batch (its first
        statement), not in a transaction (and an fsync) of its own on the network thread: in a
        reconnect storm those serialised every handshake behind the disk. It is committed within
        ``max_delay`` and never after a message of the session it started (queued before them)."""
        self._batch.handshakes.append(NewHandshake(device_id, now, cert_sha256))
        self._last_add = time.monotonic()
        self._wake.set()

    def flush(self) -> None:
        """Commit the pending batch, then acknowledge it to the broker and to the devices.

        One flush at a time. The batch is taken under the service's lock, committed without it
        (records keep arriving and being opened meanwhile, into the next batch; the store decides
        what is new), and acknowledged under it again.
        """
        with self._flushing:
            with self._lock:
                prepared = self._prepare()
            if prepared is None:
                return
            try:
                result = self.storage.commit_batch(prepared.messages, prepared.replies, prepared.handshakes)
            except Exception:
                with self._lock:
                    # nothing is acknowledged and no id was recorded: the devices send the batch
                    # again (no ACK), the broker after the next reconnect; the handshake rows go
                    # with the next batch
                    self._batch.handshakes[:0] = prepared.handshakes
                    self.audit.event("ingest_failed", records=prepared.records, handshakes=len(prepared.handshakes))
                raise
            with self._lock:
                self._finish(prepared, result)

    def _prepare(self) -> _Prepared | None:
        batch, self._batch = self._batch, _Batch()
        self._full = False
        if not batch.items and not batch.handshakes:
            for ack in batch.broker_acks:
                ack()
            return None
        out = _Prepared(batch.broker_acks, len(batch.items),
                        now=max([item.now for item in batch.items] + [h.at for h in batch.handshakes]),
                        handshakes=batch.handshakes)
        for item in batch.items:
            rec = item.rec
            out.items.setdefault((rec.device_id, item.msg_id), item)
            if item.command_id is None:
                out.messages.append(NewMessage(rec.device_id, item.now, "telemetry", rec.epoch, rec.seq,
                                               item.body, item.msg_id))
            else:
                out.replies.append(NewReply(rec.device_id, item.command_id, item.now, item.body, item.msg_id))
        return out

    def _finish(self, done: _Prepared, result: CommitResult) -> None:
        for ack in done.broker_acks:
            ack()
        for reply in result.replied:
            ok = done.items[(reply.device_id, reply.msg_id)].ok
            self.audit.event("command_replied", device=reply.device_id, id=reply.command_id, ok=ok)
        for reply in result.unknown:
            self._reject(done.items[(reply.device_id, reply.msg_id)].rec, "reply", Reason.UNKNOWN_COMMAND, "")
        self.counters.batches += 1
        self.counters.stored += len(result.stored)
        self.counters.replies += len(result.replied)
        self.counters.duplicates += len(result.duplicates)
        for device_id, ledger in result.ledgers.items():
            self._send_ack(device_id, ledger.ack(), done.now)
            self.counters.acks += 1

    def acknowledge(self, device_id: str, now: float) -> None:
        """Send ``device_id`` the ids committed so far (when its session starts): the ledger in the
        store, which every worker's commits have merged into; never what a batch being committed
        holds. A device with nothing committed yet gets none: it would say nothing (a storm of new
        devices would seal, send and process one empty ACK each)."""
        stored = self.storage.ledger(device_id)
        if stored is None:
            return
        self._send_ack(device_id, decode_ledger(stored).ack(), now)
        self.counters.acks += 1
