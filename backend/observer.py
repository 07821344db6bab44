"""What the backend service tells its observers (the console's live feed, the Prometheus metrics).

The service calls :func:`notify` at two points: after it handled an uplink message (with the protocol
outputs it produced) and when it publishes. Audit entries reach observers through
:attr:`runtime.audit.AuditLog.listeners`. An observer never changes what the service does, and an
observer that raises is logged and skipped: the service keeps running.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

log = logging.getLogger("sealmq.backend.observer")


class ServiceObserver(Protocol):
    def on_message(self, topic: str, payload: bytes, outputs: Sequence[object], now: float) -> None:
        """An uplink message as the broker delivered it, and what the endpoint made of it."""

    def on_publish(self, topic: str, payload: bytes, now: float) -> None:
        """A message the backend published (already sealed)."""

    def on_audit(self, entry: dict[str, Any]) -> None:
        """An audit entry, as written to the audit log."""


def notify(observers: Sequence[ServiceObserver], method: str, *args: Any) -> None:
    for observer in observers:
        try:
            getattr(observer, method)(*args)
        except Exception:
            log.exception("observer %s.%s failed", type(observer).__name__, method)


def attach(service: Any, observer: ServiceObserver) -> None:
    """Register ``observer`` with a running or not yet started :class:`backend.service.BackendService`."""
    service.observers.append(observer)
    service.audit.listeners.append(observer.on_audit)
