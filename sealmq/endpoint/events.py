"""What the sans-IO endpoints return, and the callables they take.

Every ``handle``/``poll``/``seal`` call returns a list of outputs: :class:`Publish` actions for the
adapter to send, and events (:class:`HandshakeCompleted`, :class:`Received`, :class:`Rejected`, ...)
for it to audit and dispatch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sealmq.edhoc import PeerAuthenticator
from sealmq.errors import Reason
from sealmq.identity import PeerIdentity
from sealmq.session import Delivered, KeyUpdated, OldEpochDropped, Send
from sealmq.session import Rejected as BufferedRejected
from sealmq.topics import RecordKind

RandomBytes = Callable[[int], bytes]
# Builds the peer authenticator for one handshake at time ``now`` (the default checks X.509
# chains against the trust store; method-3 devices plug in a CCS/kid authenticator here).
AuthenticatorFactory = Callable[[float], PeerAuthenticator]




@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes


@dataclass(frozen=True)
class HandshakeCompleted:
    device_id: str
    peer_name: str
    suite: int
    identity: PeerIdentity  # who the other side authenticated as (certificate or CCS)


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


def session_events(device_id: str, topic: str, events: Sequence[Any]) -> list[Output]:
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


def to_datetime(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC)
