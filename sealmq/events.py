"""What the protocol core tells its caller: one set of event and action types, shared by the
record session (:mod:`sealmq.session`) and the endpoints (:mod:`sealmq.endpoint`).

A :class:`Publish` is an action (send these bytes on that topic); everything else is an event for
the adapter to audit and dispatch. None of them carries a payload into ``repr``: events end up in
logs, plaintexts must not.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sealmq.errors import Reason
from sealmq.identity import PeerIdentity
from sealmq.topics import RecordKind

# _PER_RECORD: Publish and Received are made once per record, so they write their fields
# straight into the instance dict: a frozen dataclass's generated __init__ goes through
# object.__setattr__ per field, which costs 1.1 us for Received against 0.5 us this way (issue 11).
# They stay frozen (assignment raises FrozenInstanceError), with the generated eq, hash and
# fields; tests/test_events.py holds them to that.


class Stage(StrEnum):
    """Where a message was refused (written to the audit log as its value)."""

    TOPIC = "topic"  # the topic is outside the scheme: not even a device id
    HANDSHAKE = "handshake"
    RECORD = "record"


@dataclass(frozen=True, init=False)
class Publish:
    """Send ``payload`` on ``topic``."""

    topic: str
    payload: bytes

    def __init__(self, topic: str, payload: bytes) -> None:
        # One per sealed record: see _PER_RECORD.
        fields = self.__dict__
        fields["topic"] = topic
        fields["payload"] = payload

    def __repr__(self) -> str:
        return f"Publish(topic={self.topic!r}, len={len(self.payload)})"


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


@dataclass(frozen=True, init=False)
class Received:
    """An authentic, fresh application record."""

    device_id: str
    kind: RecordKind
    plaintext: bytes
    epoch: int
    seq: int

    def __init__(self, device_id: str, kind: RecordKind, plaintext: bytes, epoch: int, seq: int) -> None:
        # One per opened record: see _PER_RECORD.
        fields = self.__dict__
        fields["device_id"] = device_id
        fields["kind"] = kind
        fields["plaintext"] = plaintext
        fields["epoch"] = epoch
        fields["seq"] = seq

    def __repr__(self) -> str:  # payloads never go to logs
        return (f"Received(device_id={self.device_id!r}, kind={self.kind.name}, len={len(self.plaintext)}, "
                f"epoch={self.epoch}, seq={self.seq})")


@dataclass(frozen=True)
class Rejected:
    """A refused message; ``device_id`` is None when the topic names no device."""

    device_id: str | None
    topic: str
    stage: Stage
    reason: Reason
    detail: str
    size: int


@dataclass(frozen=True)
class KeyUpdateDone:
    """This side now sends under ``epoch``."""

    device_id: str
    epoch: int


@dataclass(frozen=True)
class EpochDropped:
    """The keys of ``epoch`` are gone; records under it are refused from now on."""

    device_id: str
    epoch: int


@dataclass(frozen=True)
class SessionLost:
    device_id: str
    reason: Reason


# What Session.open/poll return.
SessionEvent = Received | Publish | KeyUpdateDone | EpochDropped | Rejected
# What the endpoints return.
Output = (
    Publish | HandshakeCompleted | HandshakeFailed | Received | Rejected | KeyUpdateDone | EpochDropped
    | SessionLost
)
