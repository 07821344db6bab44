"""The device's side of the protocol: the EDHOC initiator and its session (sans-IO)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sealmq import cbor, topics
from sealmq.edhoc import (
    AuthKind,
    EdhocResult,
    Initiator,
    LocalCredential,
    State,
    X509Authenticator,
    decode_error_message,
    encode_error_message,
    initiator_signs,
    is_error_message,
    suites_for,
)
from sealmq.edhoc.handshake import METHODS
from sealmq.endpoint.events import (
    AuthenticatorFactory,
    HandshakeCompleted,
    HandshakeFailed,
    Output,
    Publish,
    RandomBytes,
    Rejected,
    SessionLost,
    Stage,
    to_datetime,
)
from sealmq.endpoint.framing import TRUE_PREFIX, split_frame
from sealmq.errors import DecodeError, EdhocError, LocalProtocolError, Reason, SealmqError, SessionError
from sealmq.identity import PeerIdentity, Role
from sealmq.session import Session, SessionConfig
from sealmq.topics import Channel, Direction, RecordKind


@dataclass(frozen=True)
class EndpointConfig:
    # Cipher suites in preference order; empty: those of PREFERRED_SUITES the credential fits
    # (6 and 2 for P-256, 0 for Ed25519, -24 for RSA, 2 and -24 for a CCS).
    suites: tuple[int, ...] = ()
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
        # A credential that fits none of the suites, or not the method, can never handshake: say
        # so now, not at every attempt (an Ed25519 device offering only suite 2 used to spin on this).
        if method not in METHODS or credential.kind is not (
            AuthKind.SIGNATURE if initiator_signs(method) else AuthKind.STATIC_DH
        ):
            raise LocalProtocolError(Reason.UNSUPPORTED_METHOD, f"method {method} does not fit the credential")
        if not suites_for(credential, self.suites):
            raise LocalProtocolError(
                Reason.UNSUPPORTED_ALGORITHM,
                f"the credential fits none of the suites {list(self.config.suites)}" if self.config.suites
                else "the credential fits no suite sealmq implements for sessions",
            )
        self.state = DeviceState.IDLE
        self.session: Session | None = None
        self.peer: PeerIdentity | None = None
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
    def suites(self) -> tuple[int, ...]:
        """The suites this device offers, in preference order: as configured, else those its
        credential fits."""
        return self.config.suites or suites_for(self.credential)

    @property
    def established(self) -> bool:
        return self.state is DeviceState.ESTABLISHED and self.session is not None

    # -- handshake ---------------------------------------------------------------------------
    def start_handshake(self, now: float, random_bytes: RandomBytes) -> list[Output]:
        c_i_value = int.from_bytes(random_bytes(1), "big") % 48 - 24  # one-byte id, -24..23
        if self.authenticator is not None:
            authenticator = self.authenticator(now)
        else:
            authenticator = X509Authenticator(self.trust_store, Role.BACKEND, to_datetime(now))
        self._initiator = Initiator(
            self.credential,
            authenticator,
            c_i=c_i_value,
            suites=self.suites,
            method=self.method,
            random_bytes=random_bytes,
        )
        message_1 = self._initiator.create_message_1()
        self._c_i = self._initiator.c_i_item or b""
        self.state = DeviceState.HANDSHAKING
        self._deadline = now + self.config.handshake_timeout
        return [Publish(self._hs_up, TRUE_PREFIX + message_1)]

    def _fail(self, reason: Reason, detail: str, now: float, random_bytes: RandomBytes) -> list[Output]:
        self._initiator = None
        self._failures += 1
        backoff = min(self.config.retry_max, self.config.retry_min * 2 ** min(self._failures - 1, 10))
        # jittered (x0.5 to x1.5): devices that failed together (a backend restart, a storm that
        # timed out) do not all come back in the same instant
        backoff = min(self.config.retry_max, backoff * (0.5 + int.from_bytes(random_bytes(2), "big") / 65536))
        self.state = DeviceState.WAITING if self.session is None else DeviceState.ESTABLISHED
        self._deadline = now + backoff
        return [HandshakeFailed(self.device_id, reason, detail)]

    def _on_handshake(self, payload: bytes, now: float, random_bytes: RandomBytes) -> list[Output]:
        prefix, message = split_frame(payload)
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
                    return [Publish(self._hs_up, TRUE_PREFIX + initiator.process_error(message))]
                initiator.process_message_2(message)
                message_3 = initiator.create_message_3()
                return [Publish(self._hs_up, (initiator.c_r_item or b"") + message_3)]
            if initiator.state is State.COMPLETED:
                if is_error_message(message):
                    initiator.process_error(message)  # always raises: the backend refused us
                initiator.process_message_4(message)
                return self._complete(initiator.result(), now, random_bytes)
        except EdhocError as err:
            out = self._fail(err.reason, err.detail, now, random_bytes)
            c_r = initiator.c_r_item
            if err.reason is not Reason.PEER_ERROR and c_r is not None and not is_error_message(message):
                out.insert(0, Publish(self._hs_up, c_r + encode_error_message(err)))
            return out
        raise EdhocError(Reason.UNEXPECTED_MESSAGE, "no handshake message expected now")

    def _complete(self, result: EdhocResult, now: float, random_bytes: RandomBytes) -> list[Output]:
        identity = result.peer.identity
        if identity.name != self.backend_name:
            return self._fail(Reason.IDENTITY_MISMATCH, "backend certificate names another backend", now,
                              random_bytes)
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
        return [HandshakeCompleted(self.device_id, identity.name, result.suite, identity)]

    # -- messages ----------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, now: float, random_bytes: RandomBytes) -> list[Output]:
        stage = Stage.TOPIC  # until the topic parses
        try:
            parsed = topics.parse(topic)
            stage = Stage.HANDSHAKE if parsed.channel is Channel.HANDSHAKE else Stage.RECORD
            if parsed.device_id != self.device_id or parsed.direction is not Direction.DOWN:
                raise DecodeError(Reason.WRONG_TOPIC, "not one of this device's downlink topics")
            if parsed.channel is Channel.HANDSHAKE:
                return self._on_handshake(payload, now, random_bytes)
            if self.session is None:
                raise SessionError(Reason.UNKNOWN_SESSION, "no session yet")
            before = self.session
            try:
                return list(self.session.open(topic, payload, now, random_bytes, parsed=parsed))
            except SessionError as err:
                if err.reason is Reason.KEY_LIMIT_REACHED and self.session is before:
                    self.session = None
                    return [SessionLost(self.device_id, err.reason), *self.start_handshake(now, random_bytes)]
                raise
        except SealmqError as err:
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
            out.extend(self._fail(Reason.HANDSHAKE_TIMEOUT, "no answer from the backend", now, random_bytes))
            if self.session is None:
                return out
        if self.session is not None:
            try:
                out.extend(self.session.poll(now, random_bytes))
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
