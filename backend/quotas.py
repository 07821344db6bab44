"""Per-device quotas of the backend: records per second and bytes stored.

One authenticated device must not be able to take the backend from the others: a device past
its record rate has its records dropped (audited, throttled, and the device's retransmissions
make up for it once it slows down), and a device whose stored telemetry and media would pass
its byte quota is refused (audited; a media transfer gets a rejected ack with
``quota_exceeded``). Stored bytes are read from the database once per device, then counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.store import BackendStore
from runtime.ratelimit import TokenBuckets


@dataclass(frozen=True)
class DeviceQuotas:
    """Bounds per device; see docs/operations.md. ``None`` switches a bound off."""

    records_per_second: float | None = 1000.0  # sealed records of any kind (telemetry, media, replies)...
    records_burst: int = 2000  # ...after a burst of this many
    stored_bytes: int | None = 2 << 30  # telemetry payloads plus verified media files, 2 GiB
    max_devices_tracked: int = 65536  # rate buckets kept; beyond, new devices share one


class QuotaGuard:
    """Applies :class:`DeviceQuotas`; the backend service asks it before storing anything."""

    def __init__(self, quotas: DeviceQuotas, storage: BackendStore) -> None:
        self.quotas = quotas
        self.storage = storage
        self._rates: TokenBuckets[str] | None = None
        if quotas.records_per_second is not None:
            self._rates = TokenBuckets(quotas.records_per_second, quotas.records_burst,
                                       max_keys=quotas.max_devices_tracked)
        self._stored: dict[str, int] = {}

    def admit_record(self, device_id: str, now: float) -> bool:
        """One more record from ``device_id`` now: within its rate?"""
        return self._rates is None or self._rates.take(device_id, now)

    def stored(self, device_id: str) -> int:
        used = self._stored.get(device_id)
        if used is None:
            used = self._stored[device_id] = self.storage.stored_bytes(device_id)
        return used

    def fits(self, device_id: str, nbytes: int) -> bool:
        """Would storing ``nbytes`` more keep ``device_id`` within its quota?"""
        limit = self.quotas.stored_bytes
        return limit is None or self.stored(device_id) + nbytes <= limit

    def add(self, device_id: str, nbytes: int) -> None:
        """``nbytes`` were stored for ``device_id`` (and are in the database already)."""
        if device_id in self._stored:  # else the first stored() reads them from the database
            self._stored[device_id] += nbytes

    def prune(self, now: float) -> None:
        if self._rates is not None:
            self._rates.prune(now)
