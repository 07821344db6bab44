"""One device<->backend session after EDHOC: sealing, opening, replay protection and key update.

A :class:`Session` is a sans-IO state machine (h11/aioquic style): the caller passes bytes, topics,
the current time and a source of random bytes in, and gets topics, bytes and events out.

Key epochs. Epoch 0's OSCORE contexts come from ``PRK_out`` (RFC 9528 A.1). A key update (KUDOS-like,
RFC 9528 Appendix H) runs as two KEY_UPDATE records on the data channel, A = requester, B = peer::

    A -> B  under epoch n:  [1, n+1, nonce_A]            (request)
    B -> A  under epoch n:  [2, n+1, nonce_A, nonce_B]   (answer)

Both derive ``PRK_out' = EDHOC_KeyUpdate(PRK_out, nonce_A || nonce_B)`` and epoch n+1 from it. B
switches its sending to n+1 when it answers, A when it gets the answer. ``PRK_out`` of epoch n is
overwritten as soon as n+1's is derived (forward secrecy). Each side still accepts records under
epoch n for a grace window after it knows the peer switched (A: on the answer; B: on the first
record under n+1), then drops the old keys (:class:`OldEpochDropped`). Records under n+1 that overtake
the answer (another topic; MQTT orders only per topic) are buffered, bounded, and opened once the
keys exist. If both sides ask at once, the initiator's (device's) request wins: the device ignores
the backend's request, the backend drops its own and answers the device's.

Rejection leaves state unchanged. :meth:`Session.open` first classifies a record without touching
anything (topic, decode, kid, epoch, replay window), then decrypts, then validates a control
payload, and only then marks the sequence number and applies effects. The only state a rejected
record changes is the failed-decryption counter of the context it failed against.

Time-driven work (dropping old epochs, re-sending an unanswered request, starting a due key
update) happens only in :meth:`Session.poll`; call it when :meth:`Session.next_timer` says.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sealmq import cbor, kdf, limits, oscore, record, topics
from sealmq.errors import (
    ConfigError,
    DecryptError,
    LocalProtocolError,
    Reason,
    RecordError,
    SealmqError,
    SessionError,
)
from sealmq.oscore import SecurityContext
from sealmq.record import Record
from sealmq.replay import ReplayWindow
from sealmq.topics import Channel, Direction, RecordKind

# Which way each kind may travel; anything else is refused on both seal and open.
KIND_DIRECTIONS: dict[RecordKind, frozenset[Direction]] = {
    RecordKind.TELEMETRY: frozenset({Direction.UP}),
    RecordKind.COMMAND: frozenset({Direction.DOWN}),
    RecordKind.REPLY: frozenset({Direction.UP}),
    RecordKind.KEY_UPDATE: frozenset({Direction.UP, Direction.DOWN}),
    RecordKind.MEDIA_MANIFEST: frozenset({Direction.UP}),
    RecordKind.MEDIA_CHUNK: frozenset({Direction.UP}),
    RecordKind.MEDIA_ACK: frozenset({Direction.DOWN}),
    RecordKind.MEDIA_CONTROL: frozenset({Direction.UP, Direction.DOWN}),
}

RandomBytes = Callable[[int], bytes]

KU_REQUEST = 1
KU_ANSWER = 2


@dataclass(frozen=True)
class SessionConfig:
    """Session limits and timers. Defaults and their sources: see :mod:`sealmq.limits`."""

    replay_window: int = limits.REPLAY_WINDOW
    key_update_after_records: int = limits.KEY_UPDATE_AFTER_RECORDS
    key_update_after_seconds: float = limits.KEY_UPDATE_AFTER_SECONDS
    max_records_per_key: int = limits.LIMIT_Q
    max_failed_decryptions: int = limits.LIMIT_V
    grace_seconds: float = limits.GRACE_SECONDS
    grace_records: int | None = None  # also drop the old epoch after this many new-epoch records
    old_epoch_max_seconds: float = 600.0  # B's cap when the peer stays silent after the answer
    key_update_retry_seconds: float = 10.0
    auto_key_update: bool = True
    max_buffered: int = limits.MAX_BUFFERED_RECORDS
    key_update_nonce_length: int = limits.KEY_UPDATE_NONCE_LENGTH

    def __post_init__(self) -> None:
        checks = [
            (self.replay_window >= 1, "replay_window >= 1"),
            (1 <= self.key_update_after_records <= self.max_records_per_key,
             "1 <= key_update_after_records <= max_records_per_key"),
            (1 <= self.max_records_per_key <= limits.MAX_PIV + 1, "1 <= max_records_per_key <= 2**40"),
            (self.max_failed_decryptions >= 1, "max_failed_decryptions >= 1"),
            (self.key_update_after_seconds > 0, "key_update_after_seconds > 0"),
            (self.grace_seconds >= 0, "grace_seconds >= 0"),
            (self.grace_records is None or self.grace_records >= 1, "grace_records >= 1"),
            (self.old_epoch_max_seconds >= self.grace_seconds, "old_epoch_max_seconds >= grace_seconds"),
            (self.key_update_retry_seconds > 0, "key_update_retry_seconds > 0"),
            (self.max_buffered >= 0, "max_buffered >= 0"),
            (limits.MIN_KEY_UPDATE_NONCE <= self.key_update_nonce_length <= limits.MAX_KEY_UPDATE_NONCE,
             "8 <= key_update_nonce_length <= 32"),
        ]
        for ok, what in checks:
            if not ok:
                raise ConfigError(Reason.CONFIG_INVALID, f"SessionConfig: {what}")


# --- events -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Delivered:
    """An authentic, fresh application record."""

    kind: RecordKind
    plaintext: bytes
    epoch: int
    seq: int

    def __repr__(self) -> str:  # payloads never go to logs
        return (f"Delivered(kind={self.kind.name}, len={len(self.plaintext)}, epoch={self.epoch}, "
                f"seq={self.seq})")


@dataclass(frozen=True)
class Send:
    """A control record the caller must publish on ``topic``."""

    topic: str
    record: bytes


@dataclass(frozen=True)
class KeyUpdated:
    """This side now sends under ``epoch``."""

    epoch: int


@dataclass(frozen=True)
class OldEpochDropped:
    """The keys of ``epoch`` are gone; records under it are rejected from now on."""

    epoch: int


@dataclass(frozen=True)
class Rejected:
    """A buffered record that failed once its keys existed (for the audit log)."""

    reason: Reason


SessionEvent = Delivered | Send | KeyUpdated | OldEpochDropped | Rejected


# --- internal state ----------------------------------------------------------------------------

class _Epoch:
    __slots__ = ("created", "ctx", "drop_at", "failed", "new_records", "next_seq", "number",
                 "peer_switched", "window")

    def __init__(self, number: int, ctx: SecurityContext, window_size: int, now: float) -> None:
        self.number = number
        self.ctx = ctx
        self.window = ReplayWindow(window_size)
        self.next_seq = 0
        self.failed = 0
        self.created = now
        # Set when this epoch is retired (a newer one exists): when its keys must be gone.
        self.drop_at: float | None = None
        self.peer_switched = False  # (retired epochs) has the peer been seen on the newer epoch?
        self.new_records = 0  # (retired epochs) records accepted under the newer epoch since then

    def state(self) -> tuple[Any, ...]:
        return (self.number, _digest(self.ctx.sender_key + self.ctx.recipient_key + self.ctx.common_iv),
                self.window.state(), self.next_seq, self.created, self.drop_at, self.peer_switched,
                self.new_records)


def _digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()[:16]


@dataclass(frozen=True)
class _Pending:
    target: int
    nonce: bytes
    sent_at: float


@dataclass(frozen=True)
class _Answered:
    target: int
    nonce_a: bytes
    nonce_b: bytes


@dataclass(frozen=True)
class _Plan:
    """What an accepted KEY_UPDATE record will do, decided before any state changes."""

    action: str  # "answer" | "reanswer" | "switch" | "ignore"
    target: int = 0
    nonce_a: bytes = b""
    nonce_b: bytes = b""


def _parse_control(plaintext: bytes, nonce_max: int) -> tuple[int, int, bytes, bytes]:
    items = cbor.as_list(cbor.loads(plaintext), "key update")
    if not items:
        raise RecordError(Reason.MALFORMED, "empty key update")
    msg_type = cbor.as_uint(items[0], "key update type", max_value=255)
    expected = {KU_REQUEST: 3, KU_ANSWER: 4}.get(msg_type)
    if expected is None or len(items) != expected:
        raise RecordError(Reason.MALFORMED, "unknown key update message")
    target = cbor.as_uint(items[1], "epoch", max_value=limits.MAX_EPOCH)
    nonces = [cbor.as_bytes(n, "nonce", max_len=nonce_max) for n in items[2:]]
    if any(len(n) < limits.MIN_KEY_UPDATE_NONCE for n in nonces):
        raise RecordError(Reason.MALFORMED, "key update nonce too short")
    return msg_type, target, nonces[0], nonces[1] if len(nonces) > 1 else b""


class Session:
    """The sealed channel between one device and the backend. See the module docstring."""

    def __init__(self, *, prk_out: bytes, c_i: bytes, c_r: bytes, is_initiator: bool, device_id: str,
                 now: float, random_bytes: RandomBytes | None = None, hash_name: str = kdf.HASH_SHA256,
                 app_aead: int = 10, config: SessionConfig | None = None) -> None:
        self.config = config if config is not None else SessionConfig()
        self.device_id = topics.check_device_id(device_id)
        self.is_initiator = is_initiator
        self._send_dir = Direction.UP if is_initiator else Direction.DOWN
        self._recv_dir = Direction.DOWN if is_initiator else Direction.UP
        self._c_i, self._c_r = bytes(c_i), bytes(c_r)
        self._hash = hash_name
        self._app_aead = app_aead
        self._random_bytes = random_bytes
        self._prk_out = bytearray(prk_out)
        ctx = self._derive_ctx()
        self.sender_id = ctx.sender_id
        self.recipient_id = ctx.recipient_id
        self._epochs: dict[int, _Epoch] = {0: _Epoch(0, ctx, self.config.replay_window, now)}
        self._current = 0
        self._pending: _Pending | None = None
        self._answered: _Answered | None = None
        self._last_switch: tuple[int, bytes] | None = None  # (epoch, nonce_A) of our last completed request
        self._buffer: list[tuple[str, Record]] = []
        self._closed = False

    @classmethod
    def from_edhoc(cls, *, prk_out: bytes, c_i: bytes, c_r: bytes, is_initiator: bool, device_id: str,
                   now: float, random_bytes: RandomBytes | None = None,
                   hash_name: str = kdf.HASH_SHA256, app_aead: int = 10,
                   config: SessionConfig | None = None) -> Session:
        """Session of one side after EDHOC. ``c_i``/``c_r`` are raw connection identifiers.

        ``random_bytes(n)`` must return ``n`` fresh random bytes (e.g. ``os.urandom``): the session
        needs them to answer a peer's key update and to start one from :meth:`poll`. Give it here
        or per call to :meth:`open`/:meth:`poll`; without any, a key update request is refused.
        The initiator is the device.
        """
        return cls(prk_out=prk_out, c_i=c_i, c_r=c_r, is_initiator=is_initiator, device_id=device_id,
                   now=now, random_bytes=random_bytes, hash_name=hash_name, app_aead=app_aead,
                   config=config)

    def __repr__(self) -> str:
        role = "device" if self.is_initiator else "backend"
        return f"Session({role}, device_id={self.device_id!r}, epoch={self._current})"

    # --- public properties --------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch this side sends under."""
        return self._current

    @property
    def epochs(self) -> tuple[int, ...]:
        """Epochs whose keys are held (current and, during a grace window, the previous one)."""
        return tuple(sorted(self._epochs))

    @property
    def closed(self) -> bool:
        """True once a key-usage limit was reached: the caller must run a new handshake."""
        return self._closed

    @property
    def key_update_pending(self) -> bool:
        return self._pending is not None

    def topic_for(self, kind: RecordKind) -> str:
        """The topic this side publishes records of ``kind`` on."""
        return topics.kind_topic(self.device_id, kind, self._send_dir)

    def subscriptions(self) -> list[str]:
        """The concrete topics this side receives records on."""
        return [topics.topic(self.device_id, ch, self._recv_dir) for ch in (Channel.DATA, Channel.MEDIA)]

    # --- sending --------------------------------------------------------------------------------

    def seal(self, kind: RecordKind, plaintext: bytes, now: float) -> tuple[str, bytes]:
        """Seal an application record under the current epoch; return ``(topic, record)``."""
        self._check_open()
        try:
            kind = RecordKind(kind)
        except ValueError:
            raise LocalProtocolError(Reason.UNSUPPORTED, "unknown record kind") from None
        if kind is RecordKind.KEY_UPDATE:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, "KEY_UPDATE records are session control")
        if self._send_dir not in KIND_DIRECTIONS[kind]:
            raise LocalProtocolError(Reason.WRONG_TOPIC, f"{kind.name} does not travel {self._send_dir}")
        if len(plaintext) > limits.MAX_PLAINTEXT:
            raise LocalProtocolError(Reason.TOO_LARGE, f"plaintext longer than {limits.MAX_PLAINTEXT}")
        return self._seal_under(self._epochs[self._current], kind, bytes(plaintext))

    def _check_can_send(self, ep: _Epoch) -> None:
        if ep.next_seq > limits.MAX_PIV:
            raise SessionError(Reason.SEQUENCE_EXHAUSTED, "sender sequence numbers exhausted")
        if ep.next_seq >= self.config.max_records_per_key:
            raise SessionError(Reason.KEY_LIMIT_REACHED, "sender key reached its usage limit")

    def _seal_under(self, ep: _Epoch, kind: RecordKind, plaintext: bytes) -> tuple[str, bytes]:
        self._check_can_send(ep)
        topic = self.topic_for(kind)
        data = record.seal(ep.ctx, kind=kind, epoch=ep.number, piv=ep.next_seq, topic=topic,
                           plaintext=plaintext)
        ep.next_seq += 1
        return topic, data

    # --- key update: starting and timers --------------------------------------------------------

    def key_update_due(self, now: float) -> bool:
        """True when the current keys have been used long enough and an update can start."""
        if self._closed or self._pending is not None or len(self._epochs) > 1:
            return False
        ep = self._epochs[self._current]
        return (ep.next_seq >= self.config.key_update_after_records
                or now - ep.created >= self.config.key_update_after_seconds)

    def start_key_update(self, nonce: bytes, now: float) -> tuple[str, bytes]:
        """Send a key update request; ``nonce`` must be fresh random bytes (8..32)."""
        self._check_open()
        nonce = bytes(nonce)
        if not limits.MIN_KEY_UPDATE_NONCE <= len(nonce) <= limits.MAX_KEY_UPDATE_NONCE:
            raise LocalProtocolError(Reason.WRONG_TYPE, "key update nonce must be 8..32 bytes")
        if self._pending is not None:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, "a key update is already in progress")
        if len(self._epochs) > 1:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, "previous epoch still in its grace window")
        target = self._current + 1
        if target > limits.MAX_EPOCH:
            raise SessionError(Reason.SEQUENCE_EXHAUSTED, "key epochs exhausted")
        out = self._send_control([KU_REQUEST, target, nonce], self._epochs[self._current])
        self._pending = _Pending(target, nonce, now)
        return out

    def _send_control(self, message: list[Any], ep: _Epoch) -> tuple[str, bytes]:
        return self._seal_under(ep, RecordKind.KEY_UPDATE, cbor.dumps(message))

    def next_timer(self) -> float | None:
        """When :meth:`poll` next has work (None: nothing scheduled)."""
        if self._closed:
            return None
        times = [ep.drop_at for ep in self._epochs.values() if ep.drop_at is not None]
        if self._pending is not None:
            times.append(self._pending.sent_at + self.config.key_update_retry_seconds)
        elif self.config.auto_key_update and len(self._epochs) == 1:
            times.append(self._epochs[self._current].created + self.config.key_update_after_seconds)
        return min(times) if times else None

    def poll(self, now: float, random_bytes: RandomBytes | None = None) -> list[SessionEvent]:
        """Run timers: drop old epochs, re-send an unanswered request, start a due key update.

        A due key update starts only if ``config.auto_key_update`` and a random source is known.
        """
        rng = random_bytes if random_bytes is not None else self._random_bytes
        if self._closed:
            return []
        events: list[SessionEvent] = []
        for number in sorted(self._epochs):
            ep = self._epochs[number]
            if ep.drop_at is not None and now >= ep.drop_at:
                events.append(self._drop(number))
        if self._pending is not None:
            if now - self._pending.sent_at >= self.config.key_update_retry_seconds:
                p = self._pending
                topic, data = self._send_control([KU_REQUEST, p.target, p.nonce], self._epochs[self._current])
                self._pending = _Pending(p.target, p.nonce, now)
                events.append(Send(topic, data))
        elif self.config.auto_key_update and rng is not None and self.key_update_due(now):
            topic, data = self.start_key_update(rng(self.config.key_update_nonce_length), now)
            events.append(Send(topic, data))
        return events

    def _drop(self, number: int) -> OldEpochDropped:
        del self._epochs[number]
        if self._answered is not None and self._answered.target == number + 1:
            self._answered = None  # cannot re-answer without the old sender keys
        return OldEpochDropped(number)

    # --- receiving --------------------------------------------------------------------------------

    def open(self, topic: str, data: bytes, now: float,
             random_bytes: RandomBytes | None = None) -> list[SessionEvent]:
        """Open a record received on ``topic``. Raises a :class:`SealmqError` subclass on rejection.

        Returns ``[]`` for a record under the epoch of our pending key update (buffered until the
        answer brings its keys). ``random_bytes`` overrides the session's random source.
        """
        self._check_open()
        rec, ep = self._classify(topic, data, now)
        if ep is None:
            self._buffer.append((topic, rec))
            return []
        return self._accept(topic, rec, ep, now, random_bytes or self._random_bytes)

    def _check_open(self) -> None:
        if self._closed:
            raise SessionError(Reason.KEY_LIMIT_REACHED, "session closed: run a new handshake")

    def _classify(self, topic: str, data: bytes, now: float) -> tuple[Record, _Epoch | None]:
        """Every check that needs no key; changes nothing. ``None`` epoch means: buffer it."""
        try:
            parsed = topics.parse(topic)
        except SealmqError:
            raise RecordError(Reason.WRONG_TOPIC, "topic outside the scheme") from None
        if (parsed.device_id != self.device_id or parsed.direction is not self._recv_dir
                or parsed.channel is Channel.HANDSHAKE):
            raise RecordError(Reason.WRONG_TOPIC, "record on a topic this session does not receive")
        rec = record.decode(data)
        return rec, self._check_record(topic, parsed.channel, rec, now)

    def _check_record(self, topic: str, channel: Channel, rec: Record, now: float) -> _Epoch | None:
        if topics.KIND_CHANNEL[rec.kind] is not channel or self._recv_dir not in KIND_DIRECTIONS[rec.kind]:
            raise RecordError(Reason.WRONG_TOPIC, f"{rec.kind.name} not expected on this topic")
        if not hmac.compare_digest(rec.kid, self.recipient_id):
            raise RecordError(Reason.UNKNOWN_SESSION, "kid is not this session's peer")
        ep = self._epochs.get(rec.epoch)
        if ep is None:
            if self._pending is not None and rec.epoch == self._pending.target:
                if len(self._buffer) >= self.config.max_buffered:
                    raise RecordError(Reason.TOO_LARGE, "too many records waiting for new keys")
                return None
            raise RecordError(Reason.UNKNOWN_EPOCH, "no keys for this epoch")
        if ep.drop_at is not None and now >= ep.drop_at:
            raise RecordError(Reason.UNKNOWN_EPOCH, "epoch past its grace window")
        ep.window.check(rec.piv)
        return ep

    def _accept(self, topic: str, rec: Record, ep: _Epoch, now: float,
                rng: RandomBytes | None) -> list[SessionEvent]:
        try:
            plaintext = record.open_(ep.ctx, rec, topic)
        except DecryptError:
            ep.failed += 1
            if ep.failed >= self.config.max_failed_decryptions:
                self._closed = True
                raise SessionError(Reason.KEY_LIMIT_REACHED, "too many failed decryptions") from None
            raise
        plan = self._plan_control(plaintext, ep, rng) if rec.kind is RecordKind.KEY_UPDATE else None
        # From here on the record is accepted: nothing below raises.
        ep.window.mark(rec.piv)
        events: list[SessionEvent] = []
        if ep.number == self._current:
            events.extend(self._note_new_epoch_record(now))
        if plan is None:
            events.append(Delivered(rec.kind, plaintext, ep.number, rec.piv))
        else:
            events.extend(self._apply(plan, ep, now, rng))
        return events

    def _note_new_epoch_record(self, now: float) -> list[SessionEvent]:
        """The peer uses the current epoch: start (or advance) the previous epoch's grace window."""
        old = self._epochs.get(self._current - 1)
        if old is None:
            return []
        if not old.peer_switched:
            old.peer_switched = True
            old.drop_at = min(old.drop_at if old.drop_at is not None else now + self.config.grace_seconds,
                              now + self.config.grace_seconds)
        old.new_records += 1
        if self.config.grace_records is not None and old.new_records >= self.config.grace_records:
            return [self._drop(old.number)]
        return []

    # --- key update: receiving --------------------------------------------------------------------

    def _plan_control(self, plaintext: bytes, ep: _Epoch, rng: RandomBytes | None) -> _Plan:
        """Decide what a KEY_UPDATE record does; raise (changing nothing) if it must be refused."""
        msg_type, target, nonce_a, nonce_b = _parse_control(plaintext, limits.MAX_KEY_UPDATE_NONCE)
        if msg_type == KU_REQUEST:
            if ep.number == self._current and target == self._current + 1:
                if self._pending is not None and self.is_initiator:
                    return _Plan("ignore")  # simultaneous: the device's own request wins
                if target > limits.MAX_EPOCH:
                    raise RecordError(Reason.UNKNOWN_EPOCH, "key epochs exhausted")
                self._check_can_send(ep)
                if rng is None:
                    raise LocalProtocolError(Reason.CONFIG_INVALID, "no random source to answer a key update")
                fresh = bytes(rng(self.config.key_update_nonce_length))
                if len(fresh) != self.config.key_update_nonce_length:
                    raise LocalProtocolError(Reason.CONFIG_INVALID, "random_bytes returned a wrong length")
                return _Plan("answer", target, nonce_a, fresh)
            ans = self._answered
            if (ans is not None and ans.target == target == ep.number + 1
                    and hmac.compare_digest(ans.nonce_a, nonce_a)):
                self._check_can_send(ep)
                return _Plan("reanswer", target, ans.nonce_a, ans.nonce_b)
            raise RecordError(Reason.UNEXPECTED_MESSAGE, "key update request for an unexpected epoch")
        p = self._pending
        if (p is not None and ep.number == self._current and target == p.target
                and hmac.compare_digest(p.nonce, nonce_a)):
            return _Plan("switch", target, nonce_a, nonce_b)
        last = self._last_switch
        if last is not None and last[0] == target and hmac.compare_digest(last[1], nonce_a):
            return _Plan("ignore")  # a repeated answer to a request we already completed
        raise RecordError(Reason.UNEXPECTED_MESSAGE, "key update answer without a matching request")

    def _apply(self, plan: _Plan, ep: _Epoch, now: float, rng: RandomBytes | None) -> list[SessionEvent]:
        events: list[SessionEvent] = []
        if plan.action == "ignore":
            return events
        if plan.action == "reanswer":
            topic, data = self._send_control([KU_ANSWER, plan.target, plan.nonce_a, plan.nonce_b], ep)
            return [Send(topic, data)]
        if plan.action == "answer":
            topic, data = self._send_control([KU_ANSWER, plan.target, plan.nonce_a, plan.nonce_b], ep)
            events.append(Send(topic, data))
            self._answered = _Answered(plan.target, plan.nonce_a, plan.nonce_b)
            # We switch now but learn that the peer did only from its first record under the new
            # epoch; until then the old keys stay, capped by old_epoch_max_seconds.
            events.extend(self._switch(plan, now, rng, old_drop_at=now + self.config.old_epoch_max_seconds,
                                       peer_switched=False))
        else:  # "switch": the peer switched when it answered
            self._last_switch = (plan.target, plan.nonce_a)
            events.extend(self._switch(plan, now, rng, old_drop_at=now + self.config.grace_seconds,
                                       peer_switched=True))
        return events

    def _switch(self, plan: _Plan, now: float, rng: RandomBytes | None, *, old_drop_at: float,
                peer_switched: bool) -> list[SessionEvent]:
        events: list[SessionEvent] = []
        new_prk = kdf.key_update(bytes(self._prk_out), plan.nonce_a + plan.nonce_b, self._hash)
        # Forward secrecy: the previous PRK_out is overwritten in place, not left for the GC.
        self._prk_out[:] = bytes(len(self._prk_out))
        self._prk_out = bytearray(new_prk)
        for number in sorted(self._epochs):
            if number != self._current:
                events.append(self._drop(number))  # at most two epochs are ever held
        old = self._epochs[self._current]
        old.drop_at = old_drop_at
        old.peer_switched = peer_switched
        self._epochs[plan.target] = _Epoch(plan.target, self._derive_ctx(), self.config.replay_window, now)
        self._current = plan.target
        self._pending = None
        events.append(KeyUpdated(plan.target))
        events.extend(self._drain_buffer(now, rng))
        return events

    def _drain_buffer(self, now: float, rng: RandomBytes | None) -> list[SessionEvent]:
        events: list[SessionEvent] = []
        waiting, self._buffer = self._buffer, []
        for topic, rec in waiting:
            try:
                channel = topics.parse(topic).channel
                ep = self._check_record(topic, channel, rec, now)
                if ep is None:  # cannot happen once keys exist, but never loop
                    raise RecordError(Reason.UNKNOWN_EPOCH, "no keys for this epoch")
                events.extend(self._accept(topic, rec, ep, now, rng))
            except SessionError:
                raise
            except SealmqError as exc:
                events.append(Rejected(exc.reason))
        return events

    def _derive_ctx(self) -> SecurityContext:
        return oscore.from_edhoc(bytes(self._prk_out), self._c_i, self._c_r, self.is_initiator,
                                 hash_name=self._hash, app_aead=self._app_aead)

    # --- for tests and diagnostics -------------------------------------------------------------------

    def _state(self, *, include_failed: bool = False) -> tuple[Any, ...]:
        """Everything that defines this session's behaviour, as a comparable value (keys hashed)."""
        epochs = tuple(ep.state() + ((ep.failed,) if include_failed else ())
                       for _, ep in sorted(self._epochs.items()))
        return (self._current, epochs, self._pending, self._answered, self._last_switch,
                tuple((t, r.encode()) for t, r in self._buffer), _digest(self._prk_out), self._closed)
