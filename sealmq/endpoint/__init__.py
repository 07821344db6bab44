"""Sans-IO endpoints: what a device and the backend do with every MQTT message.

This is the layer the MQTT adapters (``device/agent.py``, ``backend/service.py``) drive. It joins
the EDHOC handshake (:mod:`sealmq.edhoc`), the record session (:mod:`sealmq.session`) and the
topic scheme (:mod:`sealmq.topics`). Input: ``(topic, payload, now, random_bytes)``. Output: a list
of :class:`Publish` actions and events (:class:`HandshakeCompleted`, :class:`Received`,
:class:`Rejected`, ...) that the adapter audits and dispatches. No I/O, no clock, no randomness of
its own.

Modules: :mod:`~sealmq.endpoint.device` (the EDHOC initiator side), :mod:`~sealmq.endpoint.backend`
(the responder side, many devices), :mod:`~sealmq.endpoint.framing` (how handshake messages travel
on the ``hs`` topics) and :mod:`~sealmq.endpoint.events` (what the endpoints return).

A rejected message never changes an established session and never affects another device:
every failure becomes a :class:`Rejected` event with a :class:`~sealmq.errors.Reason`.
"""

from sealmq.endpoint.backend import BackendConfig, BackendEndpoint
from sealmq.endpoint.device import DeviceEndpoint, DeviceState, EndpointConfig
from sealmq.endpoint.events import (
    AuthenticatorFactory,
    EpochDropped,
    HandshakeCompleted,
    HandshakeFailed,
    KeyUpdateDone,
    Output,
    Publish,
    RandomBytes,
    Received,
    Rejected,
    SessionLost,
    Stage,
)

__all__ = [
    "AuthenticatorFactory",
    "BackendConfig",
    "BackendEndpoint",
    "DeviceEndpoint",
    "DeviceState",
    "EndpointConfig",
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
]
