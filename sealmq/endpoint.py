"""Sans-IO endpoints: what a device and the backend do with every MQTT message.

This is the layer the MQTT adapters (``device/agent.py``, ``backend/service.py``) drive. It joins
the EDHOC handshake (:mod:`sealmq.edhoc`), the record session (:mod:`sealmq.session`) and the
topic scheme (:mod:`sealmq.topics`). Input: ``(topic, payload, now, random_bytes)``. Output: a list
of :class:`Publish` actions and events (:class:`HandshakeCompleted`, :class:`Received`,
:class:`Rejected`, ...) that the adapter audits and dispatches. No I/O, no clock, no randomness of
its own.

Handshake framing on the ``hs`` topics (after RFC 9528 Appendix A.2, which does this for CoAP):

* up (device -> backend): ``true || message_1``, ``C_R || message_3``, ``C_R || error``
* down (backend -> device): ``C_I || message_2``, ``C_I || message_4``, ``C_I || error``, and
  ``null || error`` for "no session with that id" (the backend lost its state; the device then
  runs a new handshake). The prefix is one deterministic CBOR item.

A rejected message never changes an established session and never affects another device:
every failure becomes a :class:`Rejected` event with a :class:`~sealmq.errors.Reason`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from pki.verify import Role
from sealmq import cbor, topics
from sealmq.edhoc import (
    EdhocResult,
    Initiator,
    LocalCredential,
    PeerAuthenticator,
    Responder,
    State,
    X509Authenticator,
    decode_error_message,
    encode_error_message,
    is_error_message,
)
from sealmq.errors import (
    DecodeError,
    EdhocError,
    LocalProtocolError,
    Reason,
    SealmqError,
    SessionError,
)
from sealmq.session import Delivered, KeyUpdated, OldEpochDropped, Send, Session, SessionConfig
from sealmq.session import Rejected as BufferedRejected
from sealmq.topics import Channel, Direction, RecordKind

RandomBytes = Callable[[int], bytes]
# Builds the peer authenticator for one handshake at time ``now`` (the default checks X.509
# chains against the trust store; method-3 devices plug in a CCS/kid authenticator here).
AuthenticatorFactory = Callable[[float], PeerAuthenticator]

# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes


@dataclass(frozen=True)
class HandshakeCompleted:
    device_id: str
    peer_name: str
    suite: int
    identity: Any  # pki.verify.VerifiedPeer of the other side


@dataclass(frozen=True)
class HandshakeFailed:
    device_id: str
    reason: Reason
    detail: str


@dataclass(frozen=True)
class Received:
    device_id: str
    kind: RecordKind
    plaintext: bytes
    epoch: int
    seq: int


@dataclass(frozen=True)
class Rejected:
    device_id: str | None
    topic: str
    stage: str  # "handshake" | "record" | "topic"
    reason: Reason
    detail: str
    size: int


@dataclass(frozen=True)
class KeyUpdateDone:
    device_id: str
    epoch: int


@dataclass(frozen=True)
class EpochDropped:
    device_id: str
    epoch: int


@dataclass(frozen=True)
class SessionLost:
    device_id: str
    reason: Reason


Output = (
    Publish | HandshakeCompleted | HandshakeFailed | Received | Rejected | KeyUpdateDone | EpochDropped
    | SessionLost
)

_TRUE = cbor.dumps(True)
_NULL = cbor.dumps(None)


def _split_prefix(payload: bytes) -> tuple[Any, bytes]:
    """Split ``prefix-item || rest``; the prefix is one deterministic CBOR item."""
    if not payload:
        raise DecodeError(Reason.MALFORMED, "empty handshake frame")
    items = cbor.loads_seq(payload)
    prefix = items[0]
    if isinstance(prefix, (list, dict, float)):
        raise DecodeError(Reason.WRONG_TYPE, "handshake frame prefix must be true, null, int or bstr")
    head = cbor.dumps(prefix)
    rest = payload[len(head):]
    if not rest:
        raise DecodeError(Reason.MALFORMED, "handshake frame without an EDHOC message")
    return prefix, rest


def _conn_id_item(conn_id: bytes) -> Any:
    """C_x as it travels in a prefix: the CBOR item whose encoding is ``conn_id`` (RFC 9528 3.3.2)."""
    return cbor.loads(conn_id)


def _session_events(device_id: str, topic: str, events: Sequence[Any]) -> list[Output]:
    out: list[Output] = []
    for ev in events:
        if isinstance(ev, Delivered):
            out.append(Received(device_id, RecordKind(ev.kind), ev.plaintext, ev.epoch, ev.seq))
        elif isinstance(ev, Send):
            out.append(Publish(ev.topic, ev.record))
        elif isinstance(ev, KeyUpdated):
            out.append(KeyUpdateDone(device_id, ev.epoch))
        elif isinstance(ev, OldEpochDropped):
            out.append(EpochDropped(device_id, ev.epoch))
        elif isinstance(ev, BufferedRejected):
            out.append(Rejected(device_id, topic, "record", ev.reason, "buffered record", 0))
    return out


def _c_i_prefix_of(message_1: bytes) -> bytes | None:
    """C_I of a message_1 we refused, as its CBOR item, to address the error; None if unreadable."""
    try:
        items = cbor.loads_seq(message_1, max_items=64)
    except SealmqError:
        return None
    if len(items) < 4 or not isinstance(items[3], (int, bytes)) or isinstance(items[3], bool):
        return None
    return cbor.dumps(items[3])


def _to_datetime(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC)


@dataclass(frozen=True)
class EndpointConfig:
    suites: tuple[int, ...] = (2,)
    handshake_timeout: float = 10.0
    retry_min: float = 1.0
    retry_max: float = 60.0
    by_reference: bool = False  # send our certificate as x5t (peer must know it) instead of x5chain
    session: SessionConfig = field(default_factory=SessionConfig)


class DeviceState(Enum):
    IDLE = "idle"
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    WAITING = "waiting"  # backing off before the next handshake attempt


# ---------------------------------------------------------------------------------------------
# device (EDHOC initiator)
# ---------------------------------------------------------------------------------------------


class DeviceEndpoint:
    """One device's protocol state: at most one handshake in progress and one session."""

    def __init__(
        self,
        *,
        device_id: str,
        credential: LocalCredential,
        trust_store: Any,
        backend_name: str = "backend",
        config: EndpointConfig | None = None,
        authenticator: AuthenticatorFactory | None = None,
        method: int = 0,
    ) -> None:
        self.device_id = topics.check_device_id(device_id)
        self.credential = credential
        self.trust_store = trust_store
        self.authenticator = authenticator
        self.method = method
        self.backend_name = backend_name
        self.config = config or EndpointConfig()
        self.state = DeviceState.IDLE
        self.session: Session | None = None
        self.peer: Any = None
        self._initiator: Initiator | None = None
        self._c_i: bytes = b""
        self._deadline = 0.0
        self._failures = 0
        self._hs_up = topics.topic(device_id, Channel.HANDSHAKE, Direction.UP)
        self.subscriptions = [
            topics.topic(device_id, Channel.HANDSHAKE, Direction.DOWN),
            topics.topic(device_id, Channel.DATA, Direction.DOWN),
            topics.topic(device_id, Channel.MEDIA, Direction.DOWN),
        ]

    @property
    def established(self) -> bool:
        return self.state is DeviceState.ESTABLISHED and self.session is not None

    # -- handshake ---------------------------------------------------------------------------
    def start_handshake(self, now: float, random_bytes: RandomBytes) -> list[Output]:
        c_i_value = int.from_bytes(random_bytes(1), "big") % 48 - 24  # one-byte id, -24..23
        if self.authenticator is not None:
            authenticator = self.authenticator(now)
        else:
            authenticator = X509Authenticator(self.trust_store, Role.BACKEND, _to_datetime(now))
        self._initiator = Initiator(
            self.credential,
            authenticator,
            c_i=c_i_value,
            suites=self.config.suites,
            method=self.method,
            random_bytes=random_bytes,
        )
        message_1 = self._initiator.create_message_1()
        self._c_i = self._initiator.c_i_item or b""
        self.state = DeviceState.HANDSHAKING
        self._deadline = now + self.config.handshake_timeout
        return [Publish(self._hs_up, _TRUE + message_1)]

    def _fail(self, reason: Reason, detail: str, now: float) -> list[Output]:
        self._initiator = None
        self._failures += 1
        backoff = min(self.config.retry_max, self.config.retry_min * 2 ** min(self._failures - 1, 10))
        self.state = DeviceState.WAITING if self.session is None else DeviceState.ESTABLISHED
        self._deadline = now + backoff
        return [HandshakeFailed(self.device_id, reason, detail)]

    def _on_handshake(self, payload: bytes, now: float, random_bytes: RandomBytes) -> list[Output]:
        prefix, message = _split_prefix(payload)
        if prefix is None:
            # The backend has no session under our id (it restarted): re-handshake, rate-limited.
            decode_error_message(message)  # must at least be a well-formed EDHOC error
            if self.state is DeviceState.HANDSHAKING:
                return []
            self.session = None
            return [SessionLost(self.device_id, Reason.UNKNOWN_SESSION), *self.start_handshake(now, random_bytes)]
        if self._initiator is None or self.state is not DeviceState.HANDSHAKING:
            raise EdhocError(Reason.UNEXPECTED_MESSAGE, "no handshake in progress")
        if cbor.dumps(prefix) != self._c_i:
            raise EdhocError(Reason.UNEXPECTED_MESSAGE, "handshake frame for another connection id")
        initiator = self._initiator
        try:
            if initiator.state is State.WAIT_M2:
                if is_error_message(message):
                    # cipher-suite negotiation (ERR_CODE 2): a new message_1 with a common suite
                    return [Publish(self._hs_up, _TRUE + initiator.process_error(message))]
                initiator.process_message_2(message)
                message_3 = initiator.create_message_3()
                return [Publish(self._hs_up, (initiator.c_r_item or b"") + message_3)]
            if initiator.state is State.COMPLETED:
                if is_error_message(message):
                    initiator.process_error(message)  # always raises: the backend refused us
                initiator.process_message_4(message)
                return self._complete(initiator.result(), now, random_bytes)
        except EdhocError as err:
            out = self._fail(err.reason, err.detail, now)
            c_r = initiator.c_r_item
            if err.reason is not Reason.PEER_ERROR and c_r is not None and not is_error_message(message):
                out.insert(0, Publish(self._hs_up, c_r + encode_error_message(err)))
            return out
        raise EdhocError(Reason.UNEXPECTED_MESSAGE, "no handshake message expected now")

    def _complete(self, result: EdhocResult, now: float, random_bytes: RandomBytes) -> list[Output]:
        identity = result.peer.identity
        name = getattr(identity, "name", None)
        if name != self.backend_name:
            return self._fail(Reason.IDENTITY_MISMATCH, "backend certificate names another backend", now)
        self.session = Session.from_edhoc(
            prk_out=result.prk_out,
            c_i=result.c_i,
            c_r=result.c_r,
            is_initiator=True,
            device_id=self.device_id,
            now=now,
            hash_name=result.hash_name,
            app_aead=result.app_aead,
            config=self.config.session,
            random_bytes=random_bytes,
        )
        self.peer = identity
        self._initiator = None
        self._failures = 0
        self.state = DeviceState.ESTABLISHED
        return [HandshakeCompleted(self.device_id, str(name), result.suite, identity)]

    # -- messages ----------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, now: float, random_bytes: RandomBytes) -> list[Output]:
        try:
            parsed = topics.parse(topic)
            if parsed.device_id != self.device_id or parsed.direction is not Direction.DOWN:
                raise DecodeError(Reason.WRONG_TOPIC, "not one of this device's downlink topics")
            if parsed.channel is Channel.HANDSHAKE:
                return self._on_handshake(payload, now, random_bytes)
            if self.session is None:
                raise SessionError(Reason.UNKNOWN_SESSION, "no session yet")
            before = self.session
            try:
                return _session_events(self.device_id, topic, self.session.open(topic, payload, now, random_bytes))
            except SessionError as err:
                if err.reason is Reason.KEY_LIMIT_REACHED and self.session is before:
                    self.session = None
                    return [SessionLost(self.device_id, err.reason), *self.start_handshake(now, random_bytes)]
                raise
        except SealmqError as err:
            stage = "handshake" if "/hs/" in topic else "record"
            return [Rejected(self.device_id, topic, stage, err.reason, err.detail, len(payload))]

    def seal(self, kind: RecordKind, plaintext: bytes, now: float) -> list[Output]:
        if self.session is None:
            raise SessionError(Reason.UNKNOWN_SESSION, "no session established")
        topic, record = self.session.seal(kind, plaintext, now)
        return [Publish(topic, record)]

    def poll(self, now: float, random_bytes: RandomBytes) -> list[Output]:
        out: list[Output] = []
        if self.state is DeviceState.IDLE or (self.state is DeviceState.WAITING and now >= self._deadline):
            return self.start_handshake(now, random_bytes)
        if self.state is DeviceState.HANDSHAKING and now >= self._deadline:
            out.extend(self._fail(Reason.HANDSHAKE_TIMEOUT, "no answer from the backend", now))
            if self.session is None:
                return out
        if self.session is not None:
            try:
                out.extend(_session_events(self.device_id, "", self.session.poll(now, random_bytes)))
            except SessionError as err:
                self.session = None
                out.append(SessionLost(self.device_id, err.reason))
                out.extend(self.start_handshake(now, random_bytes))
        return out

    def key_update(self, now: float, random_bytes: RandomBytes) -> list[Output]:
        """Start a key update now (on demand)."""
        if self.session is None:
            raise LocalProtocolError(Reason.UNKNOWN_SESSION, "no session")
        topic, record = self.session.start_key_update(random_bytes(16), now)
        return [Publish(topic, record)]



# ---------------------------------------------------------------------------------------------
# backend (EDHOC responder), many devices
# ---------------------------------------------------------------------------------------------


@dataclass
class _HalfOpen:
    responder: Responder
    created: float
    c_r: bytes


@dataclass
class _Established:
    session: Session
    peer: Any  # what authenticated the device: pki.verify.VerifiedPeer, or a CCS identity
    since: float
    public_key: Any = None  # the device's authentication key (signature key, or static DH key for CCS)


@dataclass(frozen=True)
class BackendConfig:
    suites: tuple[int, ...] = (2, 0, -24)
    methods: tuple[int, ...] = (0,)
    max_half_open: int = 1024  # handshakes in progress, all devices together
    half_open_ttl: float = 15.0
    message_1_per_device: int = 6  # message_1 admitted per device per window...
    message_1_window: float = 60.0  # ...of this many seconds
    notice_interval: float = 5.0  # min seconds between "no session" notices to one device
    session: SessionConfig = field(default_factory=SessionConfig)


class BackendEndpoint:
    """The backend's protocol state for every device: bounded half-open handshakes, sessions."""

    def __init__(
        self,
        *,
        credentials: LocalCredential | Sequence[LocalCredential],
        trust_store: Any,
        config: BackendConfig | None = None,
        authenticator: AuthenticatorFactory | None = None,
    ) -> None:
        self.credentials = credentials
        self.authenticator = authenticator
        self.trust_store = trust_store
        self.config = config or BackendConfig()
        self.half_open: dict[str, _HalfOpen] = {}
        self.sessions: dict[str, _Established] = {}
        self._m1_times: dict[str, list[float]] = {}
        self._last_notice: dict[str, float] = {}
        self.subscriptions = [
            topics.subscription(Channel.HANDSHAKE, Direction.UP),
            topics.subscription(Channel.DATA, Direction.UP),
            topics.subscription(Channel.MEDIA, Direction.UP),
        ]

    def peer(self, device_id: str) -> Any:
        est = self.sessions.get(device_id)
        return est.peer if est is not None else None

    def peer_public_key(self, device_id: str) -> Any:
        """The key the device authenticated with: what its media signatures are checked against."""
        est = self.sessions.get(device_id)
        return est.public_key if est is not None else None

    def handle(self, topic: str, payload: bytes, now: float, random_bytes: RandomBytes) -> list[Output]:
        device_id: str | None = None
        try:
            parsed = topics.parse(topic)
            device_id = parsed.device_id
            if parsed.direction is not Direction.UP:
                raise DecodeError(Reason.WRONG_TOPIC, "the backend only accepts uplink topics")
            if parsed.channel is Channel.HANDSHAKE:
                return self._on_handshake(device_id, topic, payload, now, random_bytes)
            return self._on_record(device_id, topic, payload, now, random_bytes)
        except SealmqError as err:
            stage = "topic" if device_id is None else ("handshake" if "/hs/" in topic else "record")
            return [Rejected(device_id, topic, stage, err.reason, err.detail, len(payload))]

    # -- handshake ---------------------------------------------------------------------------
    def _admit_message_1(self, device_id: str, now: float) -> None:
        self._expire(now)
        window = [t for t in self._m1_times.get(device_id, []) if now - t < self.config.message_1_window]
        if len(window) >= self.config.message_1_per_device:
            self._m1_times[device_id] = window
            raise EdhocError(Reason.TOO_MANY_HANDSHAKES, "message_1 rate limit for this device")
        if device_id not in self.half_open and len(self.half_open) >= self.config.max_half_open:
            raise EdhocError(Reason.TOO_MANY_HANDSHAKES, "too many handshakes in progress")
        window.append(now)
        self._m1_times[device_id] = window

    def _on_handshake(
        self, device_id: str, topic: str, payload: bytes, now: float, random_bytes: RandomBytes
    ) -> list[Output]:
        prefix, message = _split_prefix(payload)
        down = topics.topic(device_id, Channel.HANDSHAKE, Direction.DOWN)
        if prefix is True:
            self._admit_message_1(device_id, now)
            c_r_value = self._pick_c_r(random_bytes)
            if self.authenticator is not None:
                authenticator = self.authenticator(now)
            else:
                authenticator = X509Authenticator(self.trust_store, Role.DEVICE, _to_datetime(now))
            responder = Responder(
                self.credentials,
                authenticator,
                c_r=c_r_value,
                suites=self.config.suites,
                methods=self.config.methods,
                random_bytes=random_bytes,
            )
            try:
                responder.process_message_1(message)
            except EdhocError as err:
                out: list[Output] = [Rejected(device_id, topic, "handshake", err.reason, err.detail, len(payload))]
                prefix_c_i = _c_i_prefix_of(message)
                if prefix_c_i is not None:
                    out.append(Publish(down, prefix_c_i + encode_error_message(err)))
                return out
            c_i = responder.c_i_item or b""
            if responder.c_r == responder.c_i:  # RFC 9528 3.3: C_R must differ from C_I
                c_r_value = c_r_value + 1 if c_r_value < 23 else -24
            message_2 = responder.create_message_2(c_r=c_r_value)
            # a newer message_1 from this device replaces its older half-open handshake
            self.half_open[device_id] = _HalfOpen(responder, now, cbor.dumps(c_r_value))
            return [Publish(down, c_i + message_2)]
        half = self.half_open.get(device_id)
        if half is None or cbor.dumps(prefix) != half.c_r:
            raise EdhocError(Reason.UNEXPECTED_MESSAGE, "no handshake in progress with that C_R")
        responder = half.responder
        c_i = responder.c_i_item or b""
        try:
            if is_error_message(message):
                del self.half_open[device_id]
                try:
                    responder.process_error(message)
                except EdhocError as err:
                    return [HandshakeFailed(device_id, err.reason, err.detail)]
            responder.process_message_3(message)
            result = responder.result()
            identity = result.peer.identity
            if getattr(identity, "name", None) != device_id:
                raise EdhocError(Reason.IDENTITY_MISMATCH, "certificate names another device than the topic")
        except EdhocError as err:
            del self.half_open[device_id]
            return [
                Publish(down, c_i + encode_error_message(err)),
                HandshakeFailed(device_id, err.reason, err.detail),
            ]
        message_4 = responder.create_message_4()
        del self.half_open[device_id]
        session = Session.from_edhoc(
            prk_out=result.prk_out,
            c_i=result.c_i,
            c_r=result.c_r,
            is_initiator=False,
            device_id=device_id,
            now=now,
            hash_name=result.hash_name,
            app_aead=result.app_aead,
            config=self.config.session,
            random_bytes=random_bytes,
        )
        # replaces any older session of this device
        self.sessions[device_id] = _Established(session, identity, now, result.peer.public_key)
        return [Publish(down, c_i + message_4), HandshakeCompleted(device_id, device_id, result.suite, identity)]

    def _pick_c_r(self, random_bytes: RandomBytes) -> int:
        return int.from_bytes(random_bytes(1), "big") % 48 - 24

    # -- records -----------------------------------------------------------------------------
    def _on_record(
        self, device_id: str, topic: str, payload: bytes, now: float, random_bytes: RandomBytes
    ) -> list[Output]:
        est = self.sessions.get(device_id)
        if est is None:
            out: list[Output] = [Rejected(device_id, topic, "record", Reason.UNKNOWN_SESSION, "", len(payload))]
            last = self._last_notice.get(device_id, -1e18)
            if now - last >= self.config.notice_interval:
                self._last_notice[device_id] = now
                err = EdhocError(Reason.UNKNOWN_SESSION, "no session", err_code=1)
                out.append(Publish(topics.topic(device_id, Channel.HANDSHAKE, Direction.DOWN),
                                   _NULL + encode_error_message(err)))
            return out
        try:
            events = est.session.open(topic, payload, now, random_bytes)
        except SessionError as err:
            if err.reason is Reason.KEY_LIMIT_REACHED:
                del self.sessions[device_id]
                return [SessionLost(device_id, err.reason)]
            raise
        return _session_events(device_id, topic, events)

    def seal(self, device_id: str, kind: RecordKind, plaintext: bytes, now: float) -> list[Output]:
        est = self.sessions.get(device_id)
        if est is None:
            raise SessionError(Reason.UNKNOWN_SESSION, f"no session with {device_id}")
        topic, record = est.session.seal(kind, plaintext, now)
        return [Publish(topic, record)]

    def key_update(self, device_id: str, now: float, random_bytes: RandomBytes) -> list[Output]:
        est = self.sessions.get(device_id)
        if est is None:
            raise LocalProtocolError(Reason.UNKNOWN_SESSION, f"no session with {device_id}")
        topic, record = est.session.start_key_update(random_bytes(16), now)
        return [Publish(topic, record)]

    def revalidate(self, trust_store: Any, now: float) -> list[Output]:
        """Re-check every established session's device certificate (e.g. after a CRL update).

        A session whose certificate no longer validates (revoked, expired) is closed at once:
        revocation does not wait for the device's next handshake.
        """
        self.trust_store = trust_store
        out: list[Output] = []
        for device_id, est in list(self.sessions.items()):
            cert = getattr(est.peer, "certificate", None)
            if cert is None:
                continue  # not an X.509 peer (e.g. a CCS credential): checked at its next handshake
            try:
                trust_store.verify([cert], role=Role.DEVICE, now=_to_datetime(now), expected_name=device_id)
            except SealmqError as err:
                del self.sessions[device_id]
                out.append(SessionLost(device_id, err.reason))
        return out

    def close_session(self, device_id: str, reason: Reason) -> list[Output]:
        """Drop a device's session now (e.g. its credential was revoked)."""
        if self.sessions.pop(device_id, None) is None:
            return []
        return [SessionLost(device_id, reason)]

    def _expire(self, now: float) -> None:
        for device_id in [d for d, h in self.half_open.items() if now - h.created > self.config.half_open_ttl]:
            del self.half_open[device_id]

    def poll(self, now: float, random_bytes: RandomBytes) -> list[Output]:
        self._expire(now)
        out: list[Output] = []
        for device_id, est in list(self.sessions.items()):
            try:
                out.extend(_session_events(device_id, "", est.session.poll(now, random_bytes)))
            except SessionError as err:
                del self.sessions[device_id]
                out.append(SessionLost(device_id, err.reason))
        return out

