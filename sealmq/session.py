"""One device<->backend session after EDHOC: sealing, opening, replay protection and key update.

A :class:`Session` is a sans-IO state machine (h11/aioquic style): the caller passes bytes, topics,
the current time and a source of random bytes in, and gets topics, bytes and events out.

Events are the :mod:`sealmq.events` types the endpoints pass on (:class:`~sealmq.events.Received`,
:class:`~sealmq.events.Publish` for a control record to send, ...).

Key epochs. Epoch 0's OSCORE contexts come from ``PRK_out`` (RFC 9528 A.1). A key update (KUDOS-like,
RFC 9528 Appendix H) runs as two KEY_UPDATE records on the data channel, A = requester, B = peer
(:mod:`sealmq.keyupdate` holds the messages, the request/answer state and the decisions; the
session holds the epochs and applies them)::

    A -> B  under epoch n:  [1, n+1, nonce_A]            (request)
    B -> A  under epoch n:  [2, n+1, nonce_A, nonce_B]   (answer)

Both derive ``PRK_out' = EDHOC_KeyUpdate(PRK_out, nonce_A || nonce_B)`` and epoch n+1 from it. B
switches its sending to n+1 when it answers, A when it gets the answer. ``PRK_out`` of epoch n is
overwritten as soon as n+1's is derived (forward secrecy). Each side still accepts records under
epoch n for a grace window after it knows the peer switched (A: on the answer; B: on the first
record under n+1), then drops the old keys (:class:`~sealmq.events.EpochDropped`). Records under n+1 that overtake
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
    DecodeError,
    DecryptError,
    LocalProtocolError,
    Reason,
    RecordError,
    SealmqError,
    SessionError,
)
from sealmq.events import EpochDropped, KeyUpdateDone, Publish, Received, Rejected, SessionEvent, Stage
from sealmq.keyupdate import Action, KeyUpdate, Plan, next_prk_out
from sealmq.oscore import SecurityContext
from sealmq.record import Record
from sealmq.replay import ReplayWindow
from sealmq.topics import Channel, Direction, ParsedTopic, RecordKind

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
    RecordKind.ACK: frozenset({Direction.DOWN}),
    RecordKind.ENROL_REQUEST: frozenset({Direction.UP}),
    RecordKind.ENROL_RESPONSE: frozenset({Direction.DOWN}),
    RecordKind.UPDATE_OFFER: frozenset({Direction.DOWN}),
    RecordKind.UPDATE_CHUNK: frozenset({Direction.DOWN}),
    RecordKind.UPDATE_STATUS: frozenset({Direction.UP}),
}

RandomBytes = Callable[[int], bytes]

SNAPSHOT_VERSION = 1  # first element of Session.to_bytes(); docs/protocol.md section 12


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


# Events: Session.open/poll return sealmq.events types (Received, Publish, KeyUpdateDone,
# EpochDropped, Rejected), the same the endpoints pass on.


# --- internal state ----------------------------------------------------------------------------

class _Epoch:
    __slots__ = ("codec", "created", "ctx", "drop_at", "failed", "new_records", "next_seq", "number",
                 "peer_switched", "window")

    def __init__(self, number: int, ctx: SecurityContext, window_size: int, now: float) -> None:
        self.number = number
        self.ctx = ctx
        self.codec = record.EpochCodec(ctx, number)
        self.window = ReplayWindow(window_size)
        self.next_seq = 0
        self.failed = 0
        self.created = now
        # Set when this epoch is retired (a newer one exists): when its keys must be gone.
        self.drop_at: float | None = None
        self.peer_switched = False  # (retired epochs) has the peer been seen on the newer epoch?
        self.new_records = 0  # (retired epochs) records accepted under the newer epoch since then

    def to_cbor(self) -> list[Any]:
        """``held-epoch`` of docs/protocol.md section 12: the keys themselves, since a retired
        epoch's cannot be derived again (its PRK_out was overwritten)."""
        highest, bits = self.window.state()
        return [self.number, self.ctx.sender_key, self.ctx.recipient_key, self.ctx.common_iv,
                float(self.created), self.next_seq, self.failed,
                None if self.drop_at is None else float(self.drop_at), self.peer_switched, self.new_records,
                [highest, bits.to_bytes((bits.bit_length() + 7) // 8, "big")]]

    def state(self) -> tuple[Any, ...]:
        return (self.number, _digest(self.ctx.sender_key + self.ctx.recipient_key + self.ctx.common_iv),
                self.window.state(), self.next_seq, self.created, self.drop_at, self.peer_switched,
                self.new_records)


def _epoch_from_cbor(item: Any, session: Session, alg: oscore.AeadAlgorithm, current: int) -> _Epoch:
    """One ``held-epoch`` (docs/protocol.md section 12). The current epoch keeps the context
    ``session`` derived from PRK_out, whose keys the snapshot's must equal."""
    fields = cbor.as_list(item, "held epoch", length=11)
    number = cbor.as_uint(fields[0], "epoch", max_value=limits.MAX_EPOCH)
    sender_key, recipient_key, common_iv = (cbor.as_bytes(fields[i], "epoch key material", max_len=64)
                                            for i in (1, 2, 3))
    if len(sender_key) != alg.key_length or len(recipient_key) != alg.key_length \
            or len(common_iv) != alg.nonce_length:
        raise DecodeError(Reason.WRONG_TYPE, "epoch key or IV of the wrong length")
    if number == current:
        ctx = session._epochs[0].ctx
        if not (hmac.compare_digest(sender_key, ctx.sender_key)
                and hmac.compare_digest(recipient_key, ctx.recipient_key)
                and hmac.compare_digest(common_iv, ctx.common_iv)):
            raise DecodeError(Reason.MALFORMED, "the current epoch's keys are not those of PRK_out")
    else:
        ctx = SecurityContext(alg=alg, sender_id=session.sender_id, recipient_id=session.recipient_id,
                              id_context=None, sender_key=sender_key, recipient_key=recipient_key,
                              common_iv=common_iv)
    config = session.config
    ep = _Epoch(number, ctx, config.replay_window, cbor.as_float(fields[4], "created"))
    ep.next_seq = cbor.as_uint(fields[5], "next sequence number", max_value=limits.MAX_PIV + 1)
    ep.failed = cbor.as_uint(fields[6], "failed decryptions", max_value=config.max_failed_decryptions)
    ep.drop_at = None if fields[7] is None else cbor.as_float(fields[7], "drop_at")
    ep.peer_switched = cbor.as_bool(fields[8], "peer_switched")
    ep.new_records = cbor.as_uint(fields[9], "new-epoch records")
    highest, bits = cbor.as_list(fields[10], "replay window", length=2)
    raw = cbor.as_bytes(bits, "replay window bits", max_len=(config.replay_window + 7) // 8)
    if raw[:1] == b"\x00":
        raise DecodeError(Reason.NOT_DETERMINISTIC, "replay window bits with a leading zero byte")
    ep.window = ReplayWindow.restore(config.replay_window, cbor.as_int(highest, "replay window highest"),
                                     int.from_bytes(raw, "big"))
    return ep


_Route = tuple[RecordKind, record.AadPieces, tuple[bytes, ...], bytes]


def _digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()[:16]


class _Hot:
    """What :meth:`Session._open_hot` needs of the one held epoch: the epoch, the record header
    bytes that do not change (the kid's byte string; the epoch's one-byte head is its number), and
    ``routes``: for each (topic, kind) pair the hot path has accepted, the kind and its AAD pieces.
    Only pairs that pass the session's topic and kind checks get in (at most the kinds of its two
    receive topics), so the table stays small whatever arrives."""

    __slots__ = ("cstate", "epoch", "header_len", "kid_part", "ready", "routes")

    def __init__(self, ep: _Epoch, device_id: str) -> None:
        kid = ep.ctx.recipient_id
        self.epoch = ep
        # record = [kind, kid, epoch, piv, ciphertext]: 0x85, the kind's one head byte, kid, epoch
        self.kid_part = cbor.bstr_head(len(kid)) + kid
        self.header_len = 2 + len(self.kid_part) + 1
        # (topic, kind byte) -> (kind, its AAD pieces, their prefixes, their suffix): the last two
        # for the compiled path, which reads tuples, not attributes
        self.routes: dict[tuple[str, int], _Route] = {}
        # what the compiled hot path (record.speedups.open_hot) needs, in one tuple
        self.cstate = (self.kid_part, ep.number, self.routes, *ep.codec.compiled_open_state())
        # and what the backend endpoint's compiled path (record.speedups.open_known) needs besides:
        # the window, the event class and the event's device id and epoch
        self.ready = (self.cstate, ep.window, Received, device_id, ep.number)


class Session:
    """The sealed channel between one device and the backend. See the module docstring.

    Records go through :class:`sealmq.record.EpochCodec` (the fast path). ``_fast = False`` makes
    a session use the reference functions of :mod:`sealmq.record` instead: tests run both side by
    side and require identical bytes, events, rejections and state.
    """

    __slots__ = ("_app_aead", "_buffer", "_c_i", "_c_r", "_closed", "_current", "_epochs", "_fast", "_hash",
                 "_hot", "_ku", "_prk_out", "_random_bytes", "_recv_dir", "_recv_kinds", "_recv_topics",
                 "_seal_limit", "_send_dir", "_send_topics", "config", "device_id", "is_initiator",
                 "recipient_id", "sender_id")

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
        self._ku = KeyUpdate(is_initiator=is_initiator, nonce_length=self.config.key_update_nonce_length)
        self._buffer: list[tuple[str, record.RecordFields, bytes]] = []
        self._closed = False
        self._fast = True
        # What the hot paths look up instead of validating again: the topic of each kind this side
        # may seal, the channel of each kind it may receive, and its two receive topics.
        self._send_topics: dict[int, str] = {
            kind: topics.kind_topic(self.device_id, kind, self._send_dir)
            for kind, dirs in KIND_DIRECTIONS.items()
            if self._send_dir in dirs and kind is not RecordKind.KEY_UPDATE}
        self._recv_kinds: dict[int, Channel] = {
            kind: topics.KIND_CHANNEL[kind] for kind, dirs in KIND_DIRECTIONS.items() if self._recv_dir in dirs}
        self._recv_topics: dict[str, Channel] = {
            topics.topic(self.device_id, ch, self._recv_dir): ch for ch in (Channel.DATA, Channel.MEDIA)}
        self._seal_limit = min(self.config.max_records_per_key, limits.MAX_PIV + 1)
        # What the receive hot path (_open_hot) needs of the current epoch: built on first use while
        # it is the only epoch held; _switch, where a running session gets a new epoch, resets it,
        # and so does closing. The backend endpoint's compiled path (record.speedups.open_known)
        # reads it too, without calling open: None there means open would not take its compiled
        # branch (before the epoch's first record, a second epoch held, closed), and it declines.
        self._hot: _Hot | None = None

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
    def next_send_seq(self) -> int:
        """The sequence number the next record sealed under the current epoch gets."""
        return self._epochs[self._current].next_seq

    def advance_send_seq(self, seq: int) -> None:
        """Seal the next record under the current epoch with ``seq`` (skipping the numbers before it).

        For several writers of one session (backend workers sharing it, ``backend/shared.py``): each
        takes its numbers from a shared counter, so none is used twice. Only forward: a number at or
        below one already used would reuse a nonce, and is refused with :class:`LocalProtocolError`.
        """
        ep = self._epochs[self._current]
        if type(seq) is not int or seq < ep.next_seq:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, "a sender sequence number only moves forward")
        if seq > limits.MAX_PIV:
            raise SessionError(Reason.SEQUENCE_EXHAUSTED, "sender sequence numbers exhausted")
        ep.next_seq = seq

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
        return self._ku.pending is not None

    def topic_for(self, kind: RecordKind) -> str:
        """The topic this side publishes records of ``kind`` on."""
        return topics.kind_topic(self.device_id, kind, self._send_dir)

    def subscriptions(self) -> list[str]:
        """The concrete topics this side receives records on."""
        return [topics.topic(self.device_id, ch, self._recv_dir) for ch in (Channel.DATA, Channel.MEDIA)]

    # --- sending --------------------------------------------------------------------------------

    def seal(self, kind: RecordKind, plaintext: bytes, now: float) -> tuple[str, bytes]:
        """Seal an application record under the current epoch; return ``(topic, record)``."""
        topic = self._send_topics.get(kind)
        if topic is None or self._closed or not self._fast:
            return self._seal_checked(kind, plaintext)
        # the common case: a kind this side may send, an open session (same checks, same order)
        if type(plaintext) is not bytes:
            plaintext = bytes(plaintext)
        if len(plaintext) > limits.MAX_PLAINTEXT:
            raise LocalProtocolError(Reason.TOO_LARGE, f"plaintext longer than {limits.MAX_PLAINTEXT}")
        ep = self._epochs[self._current]
        seq = ep.next_seq
        if seq >= self._seal_limit:
            self._check_can_send(ep)
        data = ep.codec.seal(kind, topic, seq, plaintext)
        ep.next_seq = seq + 1
        return topic, data

    def _seal_checked(self, kind: RecordKind, plaintext: bytes) -> tuple[str, bytes]:
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
        if self._fast:
            data = ep.codec.seal(kind, topic, ep.next_seq, plaintext)
        else:
            data = record.seal(ep.ctx, kind=kind, epoch=ep.number, piv=ep.next_seq, topic=topic,
                               plaintext=plaintext)
        ep.next_seq += 1
        return topic, data

    # --- key update: starting and timers --------------------------------------------------------

    def key_update_due(self, now: float) -> bool:
        """True when the current keys have been used long enough and an update can start."""
        if self._closed or self._ku.pending is not None or len(self._epochs) > 1:
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
        if self._ku.pending is not None:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, "a key update is already in progress")
        if len(self._epochs) > 1:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, "previous epoch still in its grace window")
        target = self._current + 1
        if target > limits.MAX_EPOCH:
            raise SessionError(Reason.SEQUENCE_EXHAUSTED, "key epochs exhausted")
        ep = self._epochs[self._current]
        self._check_can_send(ep)
        return self._send_control(self._ku.start(target, nonce, now), ep)

    def _send_control(self, body: bytes, ep: _Epoch) -> tuple[str, bytes]:
        return self._seal_under(ep, RecordKind.KEY_UPDATE, body)

    def next_timer(self) -> float | None:
        """When :meth:`poll` next has work (None: nothing scheduled)."""
        if self._closed:
            return None
        times = [ep.drop_at for ep in self._epochs.values() if ep.drop_at is not None]
        if self._ku.pending is not None:
            times.append(self._ku.pending.sent_at + self.config.key_update_retry_seconds)
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
        if self._ku.pending is not None:
            if now - self._ku.pending.sent_at >= self.config.key_update_retry_seconds:
                ep = self._epochs[self._current]
                self._check_can_send(ep)
                topic, data = self._send_control(self._ku.resend(now), ep)
                events.append(Publish(topic, data))
        elif self.config.auto_key_update and rng is not None and self.key_update_due(now):
            topic, data = self.start_key_update(rng(self.config.key_update_nonce_length), now)
            events.append(Publish(topic, data))
        return events

    def _drop(self, number: int) -> EpochDropped:
        del self._epochs[number]
        self._ku.epoch_dropped(number)
        return EpochDropped(self.device_id, number)

    # --- receiving --------------------------------------------------------------------------------

    def open(self, topic: str, data: bytes, now: float, random_bytes: RandomBytes | None = None, *,
             parsed: ParsedTopic | None = None) -> list[SessionEvent]:
        """Open a record received on ``topic``. Raises a :class:`SealmqError` subclass on rejection.

        Returns ``[]`` for a record under the epoch of our pending key update (buffered until the
        answer brings its keys). ``random_bytes`` overrides the session's random source. A caller
        that already parsed ``topic`` passes ``parsed`` (``topics.parse(topic)``) to spare a parse.
        """
        if self._fast and len(self._epochs) == 1 and not self._closed and type(data) is bytes:
            hot = self._hot
            if hot is None and self._current < 24:
                hot = self._hot = _Hot(self._epochs[self._current], self.device_id)
            if hot is not None:
                c = record.speedups
                if c is not None:  # the same, compiled, for a new highest sequence number (tests/test_speedups.py)
                    held = hot.epoch
                    try:
                        opened = c.open_hot(data, topic, hot.cstate, held.window)  # marks the window
                    except oscore.AEAD_FAILURES:
                        self._decrypt_failed(held)
                        raise DecryptError() from None
                    if opened is not None:
                        return [Received(self.device_id, opened[0], opened[2], held.number, opened[1])]
                got = self._open_hot(hot, topic, data)
                if got is not None:
                    return got
        self._check_open()
        channel = self._recv_topics.get(topic) if self._fast else None
        fields = record.decode_fast(data) if channel is not None else None
        if channel is None or fields is None:
            fields, ep = self._classify(topic, data, now, parsed)
        else:
            ep = self._check_record(channel, fields, now)
        if ep is None:
            self._buffer.append((topic, fields, bytes(data)))
            return []
        return self._accept(topic, fields, ep, now, random_bytes or self._random_bytes)

    def _check_open(self) -> None:
        if self._closed:
            raise SessionError(Reason.KEY_LIMIT_REACHED, "session closed: run a new handshake")

    def _classify(self, topic: str, data: bytes, now: float,
                  parsed: ParsedTopic | None) -> tuple[record.RecordFields, _Epoch | None]:
        """Every check that needs no key; changes nothing. ``None`` epoch means: buffer it."""
        if parsed is None:
            try:
                parsed = topics.parse(topic)
            except SealmqError:
                raise RecordError(Reason.WRONG_TOPIC, "topic outside the scheme") from None
        if (parsed.device_id != self.device_id or parsed.direction is not self._recv_dir
                or parsed.channel is Channel.HANDSHAKE):
            raise RecordError(Reason.WRONG_TOPIC, "record on a topic this session does not receive")
        rec = record.decode(data)
        fields = (int(rec.kind), rec.kid, rec.epoch, rec.piv, rec.ciphertext)
        return fields, self._check_record(parsed.channel, fields, now)

    def _check_record(self, channel: Channel, fields: record.RecordFields, now: float) -> _Epoch | None:
        kind, kid, epoch, piv, _ = fields
        if self._recv_kinds.get(kind) is not channel:
            raise RecordError(Reason.WRONG_TOPIC, f"{record.KINDS[kind].name} not expected on this topic")
        if not hmac.compare_digest(kid, self.recipient_id):
            raise RecordError(Reason.UNKNOWN_SESSION, "kid is not this session's peer")
        ep = self._epochs.get(epoch)
        if ep is None:
            if self._ku.pending is not None and epoch == self._ku.pending.target:
                if len(self._buffer) >= self.config.max_buffered:
                    raise RecordError(Reason.TOO_LARGE, "too many records waiting for new keys")
                return None
            raise RecordError(Reason.UNKNOWN_EPOCH, "no keys for this epoch")
        if ep.drop_at is not None and now >= ep.drop_at:
            raise RecordError(Reason.UNKNOWN_EPOCH, "epoch past its grace window")
        ep.window.check(piv)
        return ep

    def _accept(self, topic: str, fields: record.RecordFields, ep: _Epoch, now: float,
                rng: RandomBytes | None) -> list[SessionEvent]:
        kind_value, kid, epoch, piv, ciphertext = fields
        kind = record.KINDS[kind_value]
        try:
            if self._fast:
                plaintext = ep.codec.open(kind, topic, piv, ciphertext)
            else:
                plaintext = record.open_(ep.ctx, Record(kind, kid, epoch, piv, ciphertext), topic)
        except DecryptError:
            self._decrypt_failed(ep)
            raise
        plan = None
        if kind is RecordKind.KEY_UPDATE:
            plan = self._ku.plan(plaintext, record_epoch=ep.number, current=self._current,
                                 check_can_send=lambda: self._check_can_send(ep), rng=rng)
        # From here on the record is accepted: nothing below raises.
        ep.window.mark(piv)
        if plan is None and len(self._epochs) == 1:
            return [Received(self.device_id, kind, plaintext, ep.number, piv)]  # the common case
        events: list[SessionEvent] = []
        if ep.number == self._current:
            events.extend(self._note_new_epoch_record(now))
        if plan is None:
            events.append(Received(self.device_id, kind, plaintext, ep.number, piv))
        else:
            events.extend(self._apply(plan, ep, now, rng))
        return events

    def _decrypt_failed(self, ep: _Epoch) -> None:
        """Count a record that did not decrypt; too many close the session (raises then)."""
        ep.failed += 1
        if ep.failed >= self.config.max_failed_decryptions:
            self._closed = True
            self._hot = None
            raise SessionError(Reason.KEY_LIMIT_REACHED, "too many failed decryptions") from None

    def _open_hot(self, hot: _Hot, topic: str, data: bytes) -> list[SessionEvent] | None:
        """The usual record, opened in one step: one held epoch (the current one, below 24), on a
        topic this side receives, of a kind that topic carries other than KEY_UPDATE, from the
        peer's kid, with shortest heads (:func:`sealmq.record.read_tail`). Anything else returns None
        before any state changed, and the general path decides. Same events, rejections and state
        as that path (the fast-vs-reference session property tests in tests/test_record_fast.py).
        """
        n = hot.header_len
        ep = hot.epoch
        if len(data) < n or data[0] != 0x85 or data[n - 1] != ep.number or data[2:n - 1] != hot.kid_part:
            return None
        route = hot.routes.get((topic, data[1])) or self._hot_route(hot, topic, data[1])
        tail = record.read_tail(data, n) if route is not None else None
        if route is None or tail is None:
            return None
        piv, i = tail  # (a bounded ciphertext: the record is within limits.MAX_RECORD_SIZE)
        window = ep.window
        window.check(piv)
        kind, pieces, _, _ = route
        try:
            plaintext = ep.codec.open_under(pieces, piv, data[i:])
        except DecryptError:
            self._decrypt_failed(ep)
            raise
        window.mark(piv)
        return [Received(self.device_id, kind, plaintext, ep.number, piv)]

    def _hot_route(self, hot: _Hot, topic: str, kind_value: int) -> _Route | None:
        """The hot path's entry for records of ``kind_value`` on ``topic``, if this session receives
        that kind there (KEY_UPDATE never: it is session control); None otherwise (not kept)."""
        channel = self._recv_kinds.get(kind_value)
        if channel is None or kind_value == RecordKind.KEY_UPDATE or self._recv_topics.get(topic) is not channel:
            return None
        kind = record.KINDS[kind_value]
        pieces = hot.epoch.codec.recv_pieces(kind, topic)
        route = hot.routes[(topic, kind_value)] = (kind, pieces, pieces.prefixes, pieces.suffix)
        return route

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

    # --- key update: applying a plan (deciding is sealmq.keyupdate's) ------------------------------

    def _apply(self, plan: Plan, ep: _Epoch, now: float, rng: RandomBytes | None) -> list[SessionEvent]:
        if plan.action is Action.IGNORE:
            return []
        if plan.action is Action.REANSWER:
            return [Publish(*self._send_control(self._ku.answer_of(plan), ep))]
        if plan.action is Action.ANSWER:
            events: list[SessionEvent] = [Publish(*self._send_control(self._ku.answer_of(plan), ep))]
            # We switch now but learn that the peer did only from its first record under the new
            # epoch; until then the old keys stay, capped by old_epoch_max_seconds.
            events.extend(self._switch(plan, now, rng, old_drop_at=now + self.config.old_epoch_max_seconds,
                                       peer_switched=False))
            return events
        # SWITCH: the peer switched when it answered
        return self._switch(plan, now, rng, old_drop_at=now + self.config.grace_seconds, peer_switched=True)

    def _switch(self, plan: Plan, now: float, rng: RandomBytes | None, *, old_drop_at: float,
                peer_switched: bool) -> list[SessionEvent]:
        events: list[SessionEvent] = []
        new_prk = next_prk_out(bytes(self._prk_out), plan, self._hash)
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
        self._hot = None
        self._ku.switched(plan)
        events.append(KeyUpdateDone(self.device_id, plan.target))
        events.extend(self._drain_buffer(now, rng))
        return events

    def _drain_buffer(self, now: float, rng: RandomBytes | None) -> list[SessionEvent]:
        events: list[SessionEvent] = []
        waiting, self._buffer = self._buffer, []
        for topic, fields, data in waiting:
            try:
                channel = topics.parse(topic).channel
                ep = self._check_record(channel, fields, now)
                if ep is None:  # cannot happen once keys exist, but never loop
                    raise RecordError(Reason.UNKNOWN_EPOCH, "no keys for this epoch")
                events.extend(self._accept(topic, fields, ep, now, rng))
            except SessionError:
                raise
            except SealmqError as exc:
                events.append(Rejected(self.device_id, topic, Stage.RECORD, exc.reason, "buffered record",
                                       len(data)))
        return events

    def _derive_ctx(self) -> SecurityContext:
        return oscore.from_edhoc(bytes(self._prk_out), self._c_i, self._c_r, self.is_initiator,
                                 hash_name=self._hash, app_aead=self._app_aead)

    # --- snapshot (shared state between backend workers; docs/protocol.md section 12) --------------

    def to_bytes(self) -> bytes:
        """Everything that defines this session's behaviour, as deterministic CBOR (``session-snapshot``).

        Holds PRK_out and every held epoch's keys: store it only sealed (``backend.state_seal``).
        Not included: the :class:`SessionConfig` and the random source, which the restoring side
        passes to :meth:`from_bytes` (they are its configuration, not the session's state).
        """
        return cbor.dumps([
            SNAPSHOT_VERSION, self.device_id, self.is_initiator, self._c_i, self._c_r, self._hash,
            self._app_aead, bytes(self._prk_out), self._current,
            [ep.to_cbor() for _, ep in sorted(self._epochs.items())],
            self._ku.to_cbor(), [[topic, data] for topic, _, data in self._buffer], self._closed])

    @classmethod
    def from_bytes(cls, data: bytes, *, config: SessionConfig | None = None,
                   random_bytes: RandomBytes | None = None) -> Session:
        """The session :meth:`to_bytes` made, continuing exactly where it was.

        Every field is checked, and so is every relation between them that a running session keeps
        (the current epoch's keys are those of PRK_out, a key update in flight matches the held
        epochs, a buffered record is one this session would have buffered...): anything else raises
        :class:`~sealmq.errors.DecodeError` with a reason, never another exception.
        """
        try:
            return cls._restore(data, config if config is not None else SessionConfig(), random_bytes)
        except DecodeError:
            raise
        except SealmqError as exc:  # e.g. a SessionError from building a context: still a bad snapshot
            raise DecodeError(exc.reason, f"session snapshot: {exc.detail}") from None

    @classmethod
    def _restore(cls, data: bytes, config: SessionConfig, rng: RandomBytes | None) -> Session:
        items = cbor.as_list(cbor.loads(data), "session snapshot")
        if not items or type(items[0]) is not int or items[0] != SNAPSHOT_VERSION:
            raise DecodeError(Reason.UNSUPPORTED, "not a version 1 session snapshot")
        if len(items) != 13:
            raise DecodeError(Reason.WRONG_TYPE, "session snapshot must have 13 elements")
        (_, device_id, is_initiator, c_i, c_r, hash_name, app_aead, prk_out, current, epoch_items,
         ku_item, buffer_items, closed) = items
        is_initiator = cbor.as_bool(is_initiator, "is_initiator")
        c_i = cbor.as_bytes(c_i, "C_I", max_len=limits.MAX_KID_LENGTH)
        c_r = cbor.as_bytes(c_r, "C_R", max_len=limits.MAX_KID_LENGTH)
        hash_name = cbor.as_text(hash_name, "hash", max_len=16)
        if hash_name not in (kdf.HASH_SHA256, kdf.HASH_SHA384):
            raise DecodeError(Reason.UNSUPPORTED_ALGORITHM, "unknown hash")
        app_aead = cbor.as_int(app_aead, "application AEAD")
        alg = oscore.aead_algorithm(app_aead)
        prk_out = cbor.as_bytes(prk_out, "PRK_out", max_len=kdf.hash_len(hash_name))
        if len(prk_out) != kdf.hash_len(hash_name):
            raise DecodeError(Reason.WRONG_TYPE, "PRK_out length is not the hash length")
        current = cbor.as_uint(current, "current epoch", max_value=limits.MAX_EPOCH)
        epoch_items = cbor.as_list(epoch_items, "epochs")
        if not 1 <= len(epoch_items) <= 2:
            raise DecodeError(Reason.WRONG_TYPE, "a session holds one or two epochs")
        closed = cbor.as_bool(closed, "closed")
        # The session as the handshake would make it: checks the device id, C_I/C_R and the AEAD,
        # and derives the current epoch's context from PRK_out (epoch 0's slot, renumbered below).
        session = cls(prk_out=prk_out, c_i=c_i, c_r=c_r, is_initiator=is_initiator,
                      device_id=cbor.as_text(device_id, "device id", max_len=63), now=0.0,
                      random_bytes=rng, hash_name=hash_name, app_aead=app_aead, config=config)
        epochs = [_epoch_from_cbor(item, session, alg, current) for item in epoch_items]
        if epochs[-1].number != current:
            raise DecodeError(Reason.MALFORMED, "the newest held epoch must be the current one")
        if len(epochs) == 2 and epochs[0].number + 1 != current:
            raise DecodeError(Reason.MALFORMED, "the older held epoch must be the previous one")
        now_ep = epochs[-1]
        if now_ep.drop_at is not None or now_ep.peer_switched or now_ep.new_records:
            raise DecodeError(Reason.MALFORMED, "the current epoch cannot be retired")
        for ep in epochs[:-1]:
            if ep.drop_at is None:
                raise DecodeError(Reason.MALFORMED, "a previous epoch must have its drop time")
            if not ep.peer_switched and ep.new_records:
                raise DecodeError(Reason.MALFORMED, "new-epoch records counted before the peer switched")
            if config.grace_records is not None and ep.new_records >= config.grace_records:
                raise DecodeError(Reason.MALFORMED, "a previous epoch past its grace_records")
        ku = KeyUpdate.from_cbor(ku_item, is_initiator=is_initiator, nonce_length=config.key_update_nonce_length)
        if ku.pending is not None and (len(epochs) != 1 or ku.pending.target != current + 1):
            raise DecodeError(Reason.MALFORMED, "a pending key update must target the next epoch")
        if ku.answered is not None and (len(epochs) != 2 or ku.answered.target != current):
            raise DecodeError(Reason.MALFORMED, "an answered key update must be the current epoch's")
        if ku.last_switch is not None and ku.last_switch[0] > current:
            raise DecodeError(Reason.MALFORMED, "a completed key update cannot be in the future")
        session._epochs = {ep.number: ep for ep in epochs}
        session._current = current
        session._ku = ku
        session._buffer = [session._buffered_from_cbor(item) for item in
                           cbor.as_list(buffer_items, "buffered records")]
        if len(session._buffer) > config.max_buffered:
            raise DecodeError(Reason.TOO_LARGE, "more buffered records than max_buffered")
        session._closed = closed
        return session

    def _buffered_from_cbor(self, item: Any) -> tuple[str, record.RecordFields, bytes]:
        """A buffered record: on a topic we receive on, of a kind that channel carries, from our
        peer, under the epoch of our pending key update (what :meth:`_check_record` buffers)."""
        topic, data = cbor.as_list(item, "buffered record", length=2)
        channel = self._recv_topics.get(cbor.as_text(topic, "topic", max_len=128))
        if channel is None:
            raise DecodeError(Reason.WRONG_TOPIC, "buffered record on a topic this session does not receive")
        rec = record.decode(cbor.as_bytes(data, "buffered record"))
        pending = self._ku.pending
        if (self._recv_kinds.get(int(rec.kind)) is not channel or not hmac.compare_digest(rec.kid, self.recipient_id)
                or pending is None or rec.epoch != pending.target):
            raise DecodeError(Reason.MALFORMED, "not a record this session would have buffered")
        return topic, (int(rec.kind), rec.kid, rec.epoch, rec.piv, rec.ciphertext), data

    # --- for tests and diagnostics -------------------------------------------------------------------

    def _state(self, *, include_failed: bool = False) -> tuple[Any, ...]:
        """Everything that defines this session's behaviour, as a comparable value (keys hashed)."""
        epochs = tuple(ep.state() + ((ep.failed,) if include_failed else ())
                       for _, ep in sorted(self._epochs.items()))
        return (self._current, epochs, *self._ku.state(),
                tuple((t, data) for t, _, data in self._buffer), _digest(self._prk_out), self._closed)
