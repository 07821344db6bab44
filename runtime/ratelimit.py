"""Token buckets keyed by whatever must not be able to starve the others (a device, a device and
a rejection reason): the audit log's throttle and the backend's per-device record rate use them.

Time is passed in (seconds, any monotonic-enough clock), so tests drive it. The number of keys is
bounded: past ``max_keys`` every new key shares one overflow bucket, so a flood of fresh keys
cannot grow memory, and keys whose bucket is full again are forgotten by :meth:`prune`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

OVERFLOW = ("*overflow*",)  # the key every new key shares once max_keys are tracked


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets(Generic[K]):
    """``rate`` tokens per second per key, at most ``burst`` saved up; one token per event."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 4096) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate > 0, burst >= 1 and max_keys >= 1 are required")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[K | tuple[str], _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, key: K, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                bucket = self._buckets.get(OVERFLOW)
                if bucket is None:
                    bucket = self._buckets[OVERFLOW] = _Bucket(self.burst, now)
            else:
                bucket = self._buckets[key] = _Bucket(self.burst, now)
        if now > bucket.updated:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        return bucket

    def take(self, key: K, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens of ``key``'s bucket if it holds them; False (nothing spent) if not."""
        bucket = self._bucket(key, now)
        if bucket.tokens < cost:
            return False
        bucket.tokens -= cost
        return True

    def prune(self, now: float) -> None:
        """Forget the keys whose bucket has refilled: they would start full anyway."""
        refill = self.burst / self.rate
        for key in [k for k, b in self._buckets.items() if now - b.updated >= refill]:
            del self._buckets[key]
