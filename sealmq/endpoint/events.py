"""What the sans-IO endpoints return, and the callables they take.

Every ``handle``/``poll``/``seal`` call returns a list of outputs: :class:`Publish` actions for the
adapter to send, and events (:class:`HandshakeCompleted`, :class:`Received`, :class:`Rejected`, ...)
for it to audit and dispatch. The types themselves are :mod:`sealmq.events` (the session returns
the same ones); they are re-exported here for the endpoints' callers.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from sealmq.edhoc import PeerAuthenticator
from sealmq.events import (
    EpochDropped,
    HandshakeCompleted,
    HandshakeFailed,
    KeyUpdateDone,
    Output,
    Publish,
    Received,
    Rejected,
    SessionLost,
    Stage,
)

RandomBytes = Callable[[int], bytes]
# Builds the peer authenticator for one handshake at time ``now`` (the default checks X.509
# chains against the trust store; method-3 devices plug in a CCS/kid authenticator here).
AuthenticatorFactory = Callable[[float], PeerAuthenticator]

__all__ = [
    "AuthenticatorFactory",
    "EpochDropped",
    "HandshakeCompleted",
    "HandshakeFailed",
    "KeyUpdateDone",
    "Output",
    "Publish",
    "RandomBytes",
    "Received",
    "Rejected",
    "SessionLost",
    "Stage",
    "to_datetime",
]


def to_datetime(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC)
