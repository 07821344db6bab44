"""Sessions shared by several backend workers (issue 14): the glue between one worker's
:class:`~sealmq.endpoint.BackendEndpoint` and the shared :class:`~backend.session_state.SessionState`.

With N workers behind an MQTT 5 shared subscription, any worker may get any device's next message.
Each worker keeps the sessions it has used in its endpoint, as a cache; the truth is in the state
store (docs/scaling.md):

- ``"session"`` / device: the established session as the core snapshots it
  (:meth:`BackendEndpoint.export_session`), wrapped as ``[session id, snapshot]`` and sealed by the
  store. The session id is 16 random bytes made when the handshake completed: the name of the
  session's replay gates and sender counters (a device's next session may reuse C_I/C_R).
- ``"handshake"`` / device: a half-open handshake after message_2, so message_3 may reach another
  worker; it lives as long as the endpoint's ``half_open_ttl``.

Per message, :meth:`SharedSessions.handle` runs the endpoint step with three additions:

1. **Refresh on miss.** A record this worker cannot place (no session, another kid, an epoch it does
   not hold) or that fails to open under its cached keys loads the device's snapshot and, if that is
   newer than the cache, runs the step again. A message_3 always loads the half-open handshake.
2. **The shared replay gate.** A record opened by the core passes :meth:`SessionState.accept` for
   ``<session id>:<epoch>`` before anything acts on it: of two workers that opened the same
   sequence number (a redelivery, a replay), exactly one goes on; the other's copy becomes a
   ``replay`` rejection. Telemetry and replies skip the gate (:data:`LEDGER_KINDS`): their exactly-once
   is the delivery ledger's, checked and updated under a row lock in the commit transaction
   (``backend/ingest.py``), which also covers a worker killed between opening a record and
   committing it. Gating them would turn the broker's (or the outbox's) redelivery of a record the dead
   worker had opened but not committed into a loss; letting a repeat through costs one ledger
   lookup and a repeated ACK, as a repeat already does within one worker.
3. **Sender numbers from the store.** Everything this backend seals (ACKs, commands, media acks,
   key-update answers) first reserves its sequence number with :meth:`SessionState.reserve_seq`,
   so two workers sealing under one key never reuse a nonce.

Key updates are the one place where two workers could decide differently: a KEY_UPDATE record is
handled under the device's lock in the store, on a freshly loaded snapshot, and the result written
back before the lock is released; a repeated request reaching another worker then finds the answer
already given and repeats it (the core's REANSWER). The backend starts no key update of its own in
this mode (``auto_key_update`` off): devices start them (by count and time), which keeps a single
initiator per session.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from backend.session_state import SessionState
from sealmq import cbor, record, topics
from sealmq.endpoint import (
    BackendEndpoint,
    HandshakeCompleted,
    KeyUpdateDone,
    Output,
    Publish,
    RandomBytes,
    Received,
    Rejected,
    SessionLost,
    Stage,
)
from sealmq.endpoint.framing import split_frame
from sealmq.errors import DecodeError, Reason, SealmqError
from sealmq.topics import Channel, RecordKind

log = logging.getLogger("sealmq.backend.shared")

SESSION_ID_SIZE = 16
# A record refused for one of these may open under a newer snapshot another worker wrote. A
# "replay" too: a new session may get the old one's one-byte connection id (1 in 48), and then its
# first records carry the kid, epoch and numbers a stale cached copy has seen already. The reload
# reads the store only; a record the current session has seen is refused again after it.
_MISS = frozenset({Reason.UNKNOWN_SESSION, Reason.UNKNOWN_EPOCH, Reason.DECRYPT_FAILED, Reason.REPLAY})
# Kinds whose exactly-once is the delivery ledger's (message ids), not the replay gate's.
LEDGER_KINDS = frozenset({RecordKind.TELEMETRY, RecordKind.REPLY})


@dataclass
class _Cached:
    session_id: bytes
    blob: bytes  # the snapshot this cache was loaded from or last wrote (to tell a newer one)


class SharedSessions:
    """One worker's view of the sessions all workers share. Call under the service's lock."""

    def __init__(self, endpoint: BackendEndpoint, state: SessionState, *,
                 lock: Callable[[str], AbstractContextManager[object]] | None = None) -> None:
        self.endpoint = endpoint
        self.state = state
        self._lock = lock or (lambda _device: nullcontext())
        self._cache: dict[str, _Cached] = {}
        self.counters = {"refreshes": 0, "gate_replays": 0, "snapshots_written": 0, "handshakes_imported": 0}

    # -- the store --------------------------------------------------------------------------
    def _load(self, device_id: str, now: float) -> bool:
        """Load the device's session from the store if it differs from the cached one; True if it did."""
        blob = self.state.get("session", device_id)
        cached = self._cache.get(device_id)
        if blob is None:
            if cached is not None:  # ended elsewhere (revoked, key limit): end it here too
                del self._cache[device_id]
                self.endpoint.sessions.pop(device_id, None)
                return True
            return False
        if cached is not None and hmac.compare_digest(cached.blob, blob):
            return False
        try:
            items = cbor.as_list(cbor.loads(blob), "shared session")
            if len(items) != 2:
                raise DecodeError(Reason.MALFORMED, "shared session must be [id, snapshot]")
            session_id = cbor.as_bytes(items[0], "session id")
            snapshot = cbor.as_bytes(items[1], "session snapshot")
            self.endpoint.import_session(device_id, snapshot, now)
        except SealmqError as err:
            log.warning("shared session of %s unusable (%s); ignored", device_id, err.reason)
            return False
        self._cache[device_id] = _Cached(session_id, blob)
        self.counters["refreshes"] += 1
        return True

    def _save(self, device_id: str, session_id: bytes | None = None) -> None:
        snapshot = self.endpoint.export_session(device_id)
        if snapshot is None:
            self._forget(device_id)
            return
        if session_id is None:
            cached = self._cache.get(device_id)
            if cached is None:
                return  # not a session this layer knows: nothing to write
            session_id = cached.session_id
        blob = cbor.dumps([session_id, snapshot])
        self.state.put("session", device_id, blob)
        self._cache[device_id] = _Cached(session_id, blob)
        self.counters["snapshots_written"] += 1

    def _forget(self, device_id: str) -> None:
        self._cache.pop(device_id, None)
        self.state.delete("session", device_id)

    # -- one incoming message ------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, now: float, random_bytes: RandomBytes) -> list[Output]:
        try:
            parsed = topics.parse(topic)
        except SealmqError:
            return self.endpoint.handle(topic, payload, now, random_bytes)  # the endpoint rejects it
        device_id = parsed.device_id
        if parsed.channel is Channel.HANDSHAKE:
            return self._handshake(device_id, topic, payload, now, random_bytes)
        fields = record.decode_fast(payload)
        if fields is not None and fields[0] == RecordKind.KEY_UPDATE:
            with self._lock(device_id):
                self._load(device_id, now)
                self._reserve(device_id)  # the answer, if any, is sealed inside the step
                outputs = self.endpoint.handle(topic, payload, now, random_bytes)
                outputs = self._gate(outputs)
                self._after(device_id, outputs)
                return outputs
        if not self._placeable(device_id, fields):
            self._load(device_id, now)
        outputs = self.endpoint.handle(topic, payload, now, random_bytes)
        if any(isinstance(o, Rejected) and o.reason in _MISS for o in outputs) and self._load(device_id, now):
            outputs = self.endpoint.handle(topic, payload, now, random_bytes)
        outputs = self._gate(outputs)
        self._after(device_id, outputs)
        return outputs

    def _placeable(self, device_id: str, fields: record.RecordFields | None) -> bool:
        est = self.endpoint.sessions.get(device_id)
        if est is None or device_id not in self._cache:
            return False
        if fields is None:
            return True  # unusual shape: the core decides
        _, kid, epoch, _, _ = fields
        return kid == est.session.recipient_id and epoch in est.session.epochs

    def _handshake(self, device_id: str, topic: str, payload: bytes, now: float,
                   random_bytes: RandomBytes) -> list[Output]:
        try:
            prefix, _ = split_frame(payload)
        except SealmqError:
            prefix = True  # garbage: the endpoint rejects it, nothing to load
        if prefix is not True:  # message_3 (or an error) for a half-open handshake: maybe another worker's
            blob = self.state.get("handshake", device_id)
            if blob is not None:
                try:
                    self.endpoint.import_half_open(device_id, blob, now)
                    self.counters["handshakes_imported"] += 1
                except SealmqError as err:
                    log.warning("shared handshake of %s unusable (%s); ignored", device_id, err.reason)
        outputs = self.endpoint.handle(topic, payload, now, random_bytes)
        if prefix is True:
            half = self.endpoint.export_half_open(device_id)
            if half is not None and any(isinstance(o, Publish) for o in outputs):
                self.state.put("handshake", device_id, half, ttl=self.endpoint.config.half_open_ttl)
        else:
            self.state.delete("handshake", device_id)
        self._after(device_id, outputs)
        return outputs

    def _gate(self, outputs: list[Output]) -> list[Output]:
        """Pass each opened record through the shared replay gate; a repeat becomes a rejection."""
        if not any(isinstance(o, Received) and o.kind not in LEDGER_KINDS for o in outputs):
            return outputs
        gated: list[Output] = []
        for out in outputs:
            if isinstance(out, Received) and out.kind not in LEDGER_KINDS:
                cached = self._cache.get(out.device_id)
                if cached is None:  # pragma: no cover - a record only opens under a cached session
                    continue
                context = f"{cached.session_id.hex()}:{out.epoch}"
                if not self.state.accept(out.device_id, context, out.seq):
                    self.counters["gate_replays"] += 1
                    topic = topics.kind_topic(out.device_id, out.kind, topics.Direction.UP)
                    gated.append(Rejected(out.device_id, topic, Stage.RECORD, Reason.REPLAY,
                                          "already accepted by another worker", len(out.plaintext)))
                    continue
            gated.append(out)
        return gated

    def _after(self, device_id: str, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, HandshakeCompleted):
                self._save(out.device_id, secrets.token_bytes(SESSION_ID_SIZE))
            elif isinstance(out, KeyUpdateDone):
                self._save(out.device_id)
            elif isinstance(out, SessionLost):
                self._forget(out.device_id)

    # -- sealing -----------------------------------------------------------------------------------
    def _reserve(self, device_id: str) -> None:
        """Move the session's next sender number to one no other worker was or will be given."""
        est = self.endpoint.sessions.get(device_id)
        cached = self._cache.get(device_id)
        if est is None or cached is None:
            return
        session = est.session
        context = f"{cached.session_id.hex()}:{session.epoch}"
        seq = self.state.reserve_seq(device_id, context)
        local = session.next_send_seq
        if seq < local:  # the store lost its counter (flushed): never step back under a key
            seq = self.state.reserve_seq(device_id, context, local - seq + 1) + (local - seq)
        session.advance_send_seq(seq)

    def seal(self, device_id: str, kind: RecordKind, plaintext: bytes, now: float) -> list[Output]:
        """Seal under the device's current session (loaded: another worker may have replaced it)."""
        self._load(device_id, now)
        self._reserve(device_id)
        return self.endpoint.seal(device_id, kind, plaintext, now)

    def key_update(self, device_id: str, now: float, random_bytes: RandomBytes) -> list[Output]:
        """Start a key update (the operator's ``key_update``); its pending state is shared at once."""
        with self._lock(device_id):
            self._load(device_id, now)
            self._reserve(device_id)
            outputs = self.endpoint.key_update(device_id, now, random_bytes)
            self._save(device_id)
            return outputs

    def has_session(self, device_id: str, now: float) -> bool:
        """Whether the device has a session (in the store: loaded if this worker has not got it)."""
        self._load(device_id, now)
        return device_id in self.endpoint.sessions and device_id in self._cache

    def session_lost(self, device_id: str) -> None:
        """The endpoint closed a session outside :meth:`handle` (revocation, poll): end it for all."""
        self._forget(device_id)
