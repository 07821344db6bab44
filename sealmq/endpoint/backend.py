"""The backend's side of the protocol: the EDHOC responder for every device, with bounded
half-open state, and one session per device (sans-IO)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_public_key

from sealmq import cbor, record, topics
from sealmq.edhoc import (
    PREFERRED_SUITES,
    IdCred,
    LocalCredential,
    PeerAuthenticator,
    Responder,
    State,
    X509Authenticator,
    encode_error_message,
    is_error_message,
    responder_suites,
)
from sealmq.edhoc.handshake import authenticate
from sealmq.edhoc.wire import decode_id_cred, encode_identifier
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
from sealmq.endpoint.framing import NULL_PREFIX, c_i_prefix_of, split_frame
from sealmq.errors import DecodeError, EdhocError, LocalProtocolError, Reason, SealmqError, SessionError
from sealmq.identity import CredentialKind, PeerIdentity, Role
from sealmq.oscore import AEAD_FAILURES, aead_algorithm
from sealmq.session import Session, SessionConfig
from sealmq.topics import Channel, Direction, ParsedTopic, RecordKind

# Read on every message: an enum member through its class costs 80 ns (EnumType.__getattr__ makes
# every class attribute lookup take the slow path), a module global 10.
_UP, _HANDSHAKE = Direction.UP, Channel.HANDSHAKE
# Uplink record topics the compiled path knows (BackendEndpoint._record_topics): at most this many,
# forgotten all at once when full (each is learnt again by its next record, through the Python path)
MAX_RECORD_TOPICS = 65_536


@dataclass
class _HalfOpen:
    responder: Responder
    created: float
    c_r: bytes  # our C_R as its CBOR item: the prefix message_3 must carry
    c_i_prefix: bytes  # the device's C_I as its CBOR item: the prefix of what we send back


@dataclass
class _Established:
    session: Session
    peer: PeerIdentity  # who the device authenticated as (certificate or CCS)
    since: float
    public_key: Any = None  # the key the handshake authenticated (signature key, or static DH key for CCS)
    id_cred: IdCred | None = None  # ID_CRED_I as the device sent it in message_3
    cred: bytes = b""  # CRED_I, the credential the handshake authenticated (a CBOR item)


SNAPSHOT_VERSION = 1  # first element of the endpoint's snapshots (docs/protocol.md section 12)
_CREDENTIAL_KINDS = {k.value: k for k in CredentialKind}


def _spki(key: Any) -> bytes:
    """DER SubjectPublicKeyInfo of a peer key (P-256, Ed25519, RSA, X25519: every type EDHOC uses)."""
    try:
        der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (AttributeError, TypeError, ValueError):
        raise LocalProtocolError(Reason.UNSUPPORTED, "the peer key has no SubjectPublicKeyInfo form") from None
    return bytes(der)


def _max_id_length(responder: Responder) -> int:
    """The longest OSCORE ID the application AEAD of the responder's selected suite allows."""
    return aead_algorithm(responder.suite.app_aead).max_id_length


def _snapshot_items(blob: bytes, device_id: str, length: int, what: str) -> list[Any]:
    items = cbor.as_list(cbor.loads(blob), what)
    if not items or type(items[0]) is not int or items[0] != SNAPSHOT_VERSION:
        raise DecodeError(Reason.UNSUPPORTED, f"not a version 1 {what}")
    if len(items) != length:
        raise DecodeError(Reason.WRONG_TYPE, f"{what} must have {length} elements")
    if cbor.as_text(items[1], "device id", max_len=63) != device_id:
        raise DecodeError(Reason.IDENTITY_MISMATCH, f"{what} of another device")
    return items


@dataclass(frozen=True)
class BackendConfig:
    suites: tuple[int, ...] = PREFERRED_SUITES  # served: those some credential fits (Responder)
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
        # one per signature key type (and a CCS for method 3): the responder picks by suite
        self.credentials: list[LocalCredential] = (
            list(credentials) if isinstance(credentials, Sequence) else [credentials]
        )
        self.authenticator = authenticator
        self.trust_store = trust_store
        self.config = config or BackendConfig()
        self.half_open: dict[str, _HalfOpen] = {}
        self.sessions: dict[str, _Established] = {}
        # per device id seen, pruned by poll() once they no longer matter (see _prune)
        self._m1_times: dict[str, list[float]] = {}
        self._last_notice: dict[str, float] = {}
        self._next_prune = float("-inf")
        # Each uplink record topic of a device that held a session when a record came on it, to
        # that device's id: what topics.parse says of it, for the compiled path in handle.
        self._record_topics: dict[str, str] = {}
        self.subscriptions = [
            topics.subscription(Channel.HANDSHAKE, Direction.UP),
            topics.subscription(Channel.DATA, Direction.UP),
            topics.subscription(Channel.MEDIA, Direction.UP),
        ]

    def served_suites(self) -> dict[int, list[int]]:
        """The suites this backend serves, by method: those of ``config.suites`` some credential
        fits (a P-256 certificate alone serves only suite 2 for method 0)."""
        return {m: responder_suites(self.credentials, self.config.suites, m) for m in sorted(self.config.methods)}

    def peer(self, device_id: str) -> PeerIdentity | None:
        est = self.sessions.get(device_id)
        return est.peer if est is not None else None

    def peer_public_key(self, device_id: str) -> Any:
        """The key the device authenticated with: what its media signatures are checked against."""
        est = self.sessions.get(device_id)
        return est.public_key if est is not None else None

    def handle(self, topic: str, payload: bytes, now: float, random_bytes: RandomBytes) -> list[Output]:
        c = record.speedups
        if c is not None:
            # The usual record, compiled from topic to event (sealmq/_speedups.c, open_known): a
            # known record topic, its device's session ready (Session._hot), a new highest
            # sequence number. The same result as the path below, which takes everything else;
            # a record that fails its tag goes there too, to be counted and rejected in one place.
            try:
                got = c.open_known(payload, topic, self._record_topics, self.sessions)
            except AEAD_FAILURES:
                got = None
            if got is not None:
                return got
        parsed: ParsedTopic | None = None
        try:
            parsed = topics.parse(topic)
            if parsed.direction is not _UP:
                raise DecodeError(Reason.WRONG_TOPIC, "the backend only accepts uplink topics")
            if parsed.channel is _HANDSHAKE:
                return self._on_handshake(parsed.device_id, topic, payload, now, random_bytes)
            return self._on_record(parsed, topic, payload, now, random_bytes)
        except SealmqError as err:
            if parsed is None:
                return [Rejected(None, topic, Stage.TOPIC, err.reason, err.detail, len(payload))]
            stage = Stage.HANDSHAKE if parsed.channel is Channel.HANDSHAKE else Stage.RECORD
            return [Rejected(parsed.device_id, topic, stage, err.reason, err.detail, len(payload))]

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
        prefix, message = split_frame(payload)
        if prefix is True:
            return self._on_message_1(device_id, topic, message, size=len(payload), now=now,
                                      random_bytes=random_bytes)
        return self._on_message_3(device_id, prefix, message, now=now, random_bytes=random_bytes)

    def _on_message_1(
        self, device_id: str, topic: str, message: bytes, *, size: int, now: float, random_bytes: RandomBytes
    ) -> list[Output]:
        """``true || message_1``: a new handshake (replacing any half-open one of this device)."""
        down = topics.topic(device_id, Channel.HANDSHAKE, Direction.DOWN)
        self._admit_message_1(device_id, now)
        c_r_value = self._pick_c_r(random_bytes)
        responder = Responder(
            self.credentials,
            self._authenticator(now),
            c_r=c_r_value,
            suites=self.config.suites,
            methods=self.config.methods,
            random_bytes=random_bytes,
        )
        try:
            responder.process_message_1(message)
            # C_I becomes our OSCORE Sender ID (RFC 9528 A.1): it must fit the AEAD's nonce
            if len(responder.c_i or b"") > _max_id_length(responder):
                raise EdhocError(Reason.UNSUPPORTED, "C_I is too long to be an OSCORE Sender ID")
        except EdhocError as err:
            out: list[Output] = [Rejected(device_id, topic, Stage.HANDSHAKE, err.reason, err.detail, size)]
            prefix_c_i = c_i_prefix_of(message)
            if prefix_c_i is not None:
                out.append(Publish(down, prefix_c_i + encode_error_message(err)))
            return out
        # the frame prefix is C_I exactly as message_1 carried it (an empty byte string too)
        c_i = c_i_prefix_of(message) or b""
        if responder.c_r == responder.c_i:  # RFC 9528 3.3: C_R must differ from C_I
            c_r_value = c_r_value + 1 if c_r_value < 23 else -24
        message_2 = responder.create_message_2(c_r=c_r_value)
        # a newer message_1 from this device replaces its older half-open handshake
        self.half_open[device_id] = _HalfOpen(responder, now, cbor.dumps(c_r_value), c_i)
        return [Publish(down, c_i + message_2)]

    def _on_message_3(
        self, device_id: str, prefix: Any, message: bytes, *, now: float, random_bytes: RandomBytes
    ) -> list[Output]:
        """``C_R || message_3`` (or ``C_R || error``): completes a half-open handshake."""
        down = topics.topic(device_id, Channel.HANDSHAKE, Direction.DOWN)
        half = self.half_open.get(device_id)
        if half is None or cbor.dumps(prefix) != half.c_r:
            raise EdhocError(Reason.UNEXPECTED_MESSAGE, "no handshake in progress with that C_R")
        responder = half.responder
        c_i = half.c_i_prefix
        try:
            if is_error_message(message):
                del self.half_open[device_id]
                try:
                    responder.process_error(message)
                except EdhocError as err:
                    return [HandshakeFailed(device_id, err.reason, err.detail)]
            info = responder.process_message_3(message)
            result = responder.result()
            identity = result.peer.identity
            if identity.name != device_id:
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
        self.sessions[device_id] = _Established(session, identity, now, result.peer.public_key, info.id_cred_i,
                                                result.peer.cred)
        return [Publish(down, c_i + message_4), HandshakeCompleted(device_id, device_id, result.suite, identity)]

    def _authenticator(self, now: float) -> PeerAuthenticator:
        """What authenticates devices at ``now``: the configured factory's, else X.509 by the trust store."""
        if self.authenticator is not None:
            return self.authenticator(now)
        return X509Authenticator(self.trust_store, Role.DEVICE, to_datetime(now))

    # -- snapshots: state another worker continues (docs/protocol.md section 12) -------------
    def export_half_open(self, device_id: str) -> bytes | None:
        """The device's handshake between message_2 and message_3 (``half-open-snapshot``), or None.

        Holds handshake secrets (PRK_3e2m; for methods 2 and 3 the ephemeral key Y): store it only
        sealed (``backend.state_seal``), for at most ``config.half_open_ttl``.
        """
        half = self.half_open.get(device_id)
        if half is None or half.responder.state is not State.WAIT_M3:  # (a garbage message_3 failed it)
            return None
        return cbor.dumps([SNAPSHOT_VERSION, device_id, float(half.created), half.responder.to_bytes()])

    def import_half_open(self, device_id: str, blob: bytes, now: float) -> None:
        """Continue a handshake whose message_1 another endpoint (worker) answered: the device's
        message_3 may then arrive here. Uses this endpoint's credentials (one must be the one
        message_2 used) and authenticator (built at ``now``, so message_3's credential is checked
        at ``now``). Replaces the device's own half-open handshake, if any.

        Raises ``DecodeError`` for a blob that is not a valid snapshot of this device's handshake
        (or names a method, suite or credential this endpoint does not serve), ``EdhocError``
        (``handshake_timeout``) for one older than ``config.half_open_ttl``, and
        (``too_many_handshakes``) when the half-open bound is reached.
        """
        try:
            items = _snapshot_items(blob, device_id, 4, "handshake snapshot")
            created = cbor.as_float(items[2], "created")
            responder = Responder.from_bytes(
                cbor.as_bytes(items[3], "responder"), self.credentials, self._authenticator(now),
                suites=self.config.suites, methods=self.config.methods)
        except DecodeError:
            raise
        except SealmqError as exc:
            raise DecodeError(exc.reason, f"handshake snapshot: {exc.detail}") from None
        c_i, c_r = responder.c_i or b"", responder.c_r or b""
        if len(c_i) > _max_id_length(responder):  # as _on_message_1 refuses it
            raise DecodeError(Reason.UNSUPPORTED, "C_I is too long to be an OSCORE Sender ID")
        self._expire(now)
        if now - created > self.config.half_open_ttl:
            raise EdhocError(Reason.HANDSHAKE_TIMEOUT, "half-open handshake past its lifetime")
        if device_id not in self.half_open and len(self.half_open) >= self.config.max_half_open:
            raise EdhocError(Reason.TOO_MANY_HANDSHAKES, "too many handshakes in progress")
        self.half_open[device_id] = _HalfOpen(responder, created, cbor.dumps(encode_identifier(c_r)),
                                              cbor.dumps(encode_identifier(c_i)))

    def export_session(self, device_id: str) -> bytes | None:
        """The device's established session (``session-export``), or None: the session snapshot
        (:meth:`sealmq.session.Session.to_bytes`), when it began, and the peer the handshake
        authenticated: credential kind, name, ID_CRED_I, CRED_I and its public key (DER
        SubjectPublicKeyInfo). Holds the session keys: store it only sealed (``backend.state_seal``).
        """
        est = self.sessions.get(device_id)
        if est is None:
            return None
        if est.id_cred is None:
            raise LocalProtocolError(Reason.UNSUPPORTED, "session without its handshake's ID_CRED_I")
        peer = [est.peer.kind.value, est.peer.name, est.id_cred.compact(), est.cred, _spki(est.public_key)]
        return cbor.dumps([SNAPSHOT_VERSION, device_id, float(est.since), peer, est.session.to_bytes()])

    def import_session(self, device_id: str, blob: bytes, now: float) -> None:
        """Continue a device's session another endpoint (worker) established; replaces this
        endpoint's session of the device, if any.

        The peer is authenticated again, by this endpoint's authenticator at ``now``, from the
        ID_CRED_I it sent (as :meth:`revalidate` does, and with the same result types: a claim stays
        a claim, a CCS a CCS): a credential revoked or expired since is refused like in a handshake
        (``EdhocError`` with the PKI's reason), and one that no longer resolves to the same CRED_I,
        name and key is refused (``unknown_credential`` / ``identity_mismatch``). A blob that is not
        a valid snapshot of this device's backend session raises ``DecodeError``.
        """
        try:
            items = _snapshot_items(blob, device_id, 5, "session export")
            since = cbor.as_float(items[2], "since")
            kind, name, id_cred_item, cred, spki = cbor.as_list(items[3], "peer", length=5)
            kind = _CREDENTIAL_KINDS.get(cbor.as_text(kind, "credential kind", max_len=8))
            if kind is None:
                raise DecodeError(Reason.UNSUPPORTED, "unknown credential kind")
            if cbor.as_text(name, "peer name", max_len=63) != device_id:
                raise DecodeError(Reason.IDENTITY_MISMATCH, "the peer is another device")
            id_cred = decode_id_cred(id_cred_item)
            cred = cbor.as_bytes(cred, "CRED_I")
            spki = cbor.as_bytes(spki, "public key")
            try:
                load_der_public_key(spki)
            except (ValueError, TypeError, UnsupportedAlgorithm):
                raise DecodeError(Reason.MALFORMED, "public key is not a DER SubjectPublicKeyInfo") from None
            session = Session.from_bytes(cbor.as_bytes(items[4], "session"), config=self.config.session)
            if session.device_id != device_id or session.is_initiator:
                raise DecodeError(Reason.IDENTITY_MISMATCH, "not the backend's session with this device")
        except DecodeError:
            raise
        except SealmqError as exc:
            raise DecodeError(exc.reason, f"session export: {exc.detail}") from None
        peer = authenticate(self._authenticator(now), id_cred)
        identity = peer.identity
        if identity.name != device_id:
            raise EdhocError(Reason.IDENTITY_MISMATCH, "certificate names another device than the topic")
        if (identity.kind is not kind or not hmac.compare_digest(peer.cred, cred)
                or not hmac.compare_digest(_spki(peer.public_key), spki)):
            raise EdhocError(Reason.UNKNOWN_CREDENTIAL, "ID_CRED_I no longer names the authenticated credential")
        self.sessions[device_id] = _Established(session, identity, since, peer.public_key, id_cred, peer.cred)

    def _pick_c_r(self, random_bytes: RandomBytes) -> int:
        return int.from_bytes(random_bytes(1), "big") % 48 - 24

    # -- records -----------------------------------------------------------------------------
    def _on_record(
        self, parsed: ParsedTopic, topic: str, payload: bytes, now: float, random_bytes: RandomBytes
    ) -> list[Output]:
        device_id = parsed.device_id
        est = self.sessions.get(device_id)
        if est is None:
            out: list[Output] = [Rejected(device_id, topic, Stage.RECORD, Reason.UNKNOWN_SESSION, "", len(payload))]
            last = self._last_notice.get(device_id, -1e18)
            if now - last >= self.config.notice_interval:
                self._last_notice[device_id] = now
                err = EdhocError(Reason.UNKNOWN_SESSION, "no session", err_code=1)
                out.append(Publish(topics.topic(device_id, Channel.HANDSHAKE, Direction.DOWN),
                                   NULL_PREFIX + encode_error_message(err)))
            return out
        if topic not in self._record_topics:
            if len(self._record_topics) >= MAX_RECORD_TOPICS:
                self._record_topics.clear()
            self._record_topics[topic] = device_id
        try:
            return list(est.session.open(topic, payload, now, random_bytes, parsed=parsed))
        except SessionError as err:
            if err.reason is Reason.KEY_LIMIT_REACHED:
                del self.sessions[device_id]
                return [SessionLost(device_id, err.reason)]
            raise

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
            if est.peer.kind is not CredentialKind.X509:
                continue  # a CCS is checked against the registry (the adapter's reload), not a CA
            try:
                if getattr(est.peer, "claim", False):  # an enrolment session (issue 16): still a valid claim?
                    trust_store.verify_claim([est.peer.credential_ref], now=to_datetime(now), expected_name=device_id)
                else:
                    trust_store.verify([est.peer.credential_ref], role=Role.DEVICE, now=to_datetime(now),
                                       expected_name=device_id)
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

    def _prune(self, now: float) -> None:
        """Forget rate-limit and notice times that no longer limit anything.

        Every device id that ever sent a message_1 or a record without a session leaves an entry;
        without pruning, ids the broker lets through (any number of them over time) would grow these
        maps for the life of the process. Runs at most once per the shorter of the two windows.
        """
        if now < self._next_prune:
            return
        self._next_prune = now + min(self.config.message_1_window, self.config.notice_interval)
        window = self.config.message_1_window
        for device_id in [d for d, times in self._m1_times.items() if not times or now - times[-1] >= window]:
            del self._m1_times[device_id]
        interval = self.config.notice_interval
        for device_id in [d for d, last in self._last_notice.items() if now - last >= interval]:
            del self._last_notice[device_id]

    def poll(self, now: float, random_bytes: RandomBytes) -> list[Output]:
        self._expire(now)
        self._prune(now)
        out: list[Output] = []
        for device_id, est in list(self.sessions.items()):
            try:
                out.extend(est.session.poll(now, random_bytes))
            except SessionError as err:
                del self.sessions[device_id]
                out.append(SessionLost(device_id, err.reason))
        return out
