"""Session state shared by several backend workers in Redis or Valkey (:class:`backend.session_state.SessionState`).

Every decision that two workers must never both make is one server-side step:

- the replay check-and-mark is one Lua script (:data:`ACCEPT_LUA`) over a sliding window kept as the
  highest sequence number (a hash field) and a bitmap of ``window`` bits indexed by ``seq mod window``;
  Redis runs a script atomically, so of two workers racing on one sequence number exactly one is
  told "accepted". The script keeps :class:`sealmq.replay.ReplayWindow`'s semantics (tested against it);
- sender sequence numbers are reserved with ``INCRBY``;
- a delivery id is recorded once with ``SET NX EX``.

Snapshots (sessions with their keys, half-open handshakes) are stored only sealed under the workers'
state key (:mod:`backend.state_seal`), bound to the key name they are stored under.

Key names are ``<prefix>{<device>}:...``: the braces are a Redis Cluster hash tag, so everything of one
device lives in one slot and a script touching a device's keys stays legal on a cluster. Needs redis-py
(``pip install 'sealmq[scale]'``). The URL (``redis://`` or ``rediss://``) is never logged.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from backend.session_state import check_kind
from backend.state_seal import StateSealer
from sealmq.errors import LocalProtocolError, Reason, TransportError
from sealmq.limits import REPLAY_WINDOW

# KEYS[1]: hash with field h = highest accepted seq; KEYS[2]: bitmap, bit (seq mod size) = seq seen.
# ARGV: seq, window size, lifetime of the keys in seconds (0: none).
# Returns 1 accepted, 0 duplicate, -1 older than the window, -2 negative.
ACCEPT_LUA = """
local seq = tonumber(ARGV[1])
local size = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
if seq < 0 then return -2 end
local h = redis.call('HGET', KEYS[1], 'h')
local hi = -1
if h then hi = tonumber(h) end
local result
if seq > hi then
  if hi < 0 or seq - hi >= size then
    redis.call('DEL', KEYS[2])
  else
    for s = hi + 1, seq - 1 do redis.call('SETBIT', KEYS[2], s % size, 0) end
  end
  redis.call('SETBIT', KEYS[2], seq % size, 1)
  redis.call('HSET', KEYS[1], 'h', ARGV[1])
  result = 1
elseif hi - seq >= size then
  return -1
elseif redis.call('GETBIT', KEYS[2], seq % size) == 1 then
  return 0
else
  redis.call('SETBIT', KEYS[2], seq % size, 1)
  result = 1
end
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return result
"""

# Lua numbers are doubles: sequence numbers (5-byte partial IVs, < 2**40) are exact; refuse more.
_MAX_SEQ = 2**52


# Release a device lock only if it is still ours (it may have expired and been taken by another worker).
UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class RedisSessionState:
    """One worker's connection to the shared session state."""

    def __init__(self, url: str, sealer: StateSealer, *, window: int = REPLAY_WINDOW, prefix: str = "sealmq:",
                 context_ttl: int = 7 * 24 * 3600, password: str | None = None) -> None:
        self.window = window
        self.prefix = prefix
        self.context_ttl = context_ttl  # windows and counters of a key context nobody used for this long go
        self._sealer = sealer
        extra = {} if password is None else {"password": password}  # else: the URL's, if it has one
        self._r: redis.Redis = redis.Redis.from_url(url, decode_responses=False, **extra)
        self._accept: Any = self._r.register_script(ACCEPT_LUA)
        self._unlock: Any = self._r.register_script(UNLOCK_LUA)
        self._r.ping()

    def __repr__(self) -> str:
        return f"RedisSessionState(prefix={self.prefix!r})"  # never the URL: it may hold a password

    def _key(self, device_id: str, *parts: str) -> str:
        return ":".join((f"{self.prefix}{{{device_id}}}", *parts))

    def accept(self, device_id: str, context: str, seq: int) -> bool:
        if seq >= _MAX_SEQ:
            raise LocalProtocolError(Reason.CONFIG_INVALID, "sequence number too large for the shared window")
        keys = [self._key(device_id, "win", context), self._key(device_id, "bits", context)]
        return int(self._accept(keys=keys, args=[seq, self.window, self.context_ttl])) == 1

    def reserve_seq(self, device_id: str, context: str, count: int = 1) -> int:
        if count < 1:
            raise LocalProtocolError(Reason.CONFIG_INVALID, "reserve at least one sequence number")
        key = self._key(device_id, "seq", context)
        with self._r.pipeline(transaction=True) as p:
            p.incrby(key, count)
            p.expire(key, self.context_ttl)
            end = int(p.execute()[0])
        return end - count

    def first_time(self, device_id: str, delivery_id: int, ttl: float) -> bool:
        key = self._key(device_id, "seen", str(delivery_id))
        return bool(self._r.set(key, b"1", nx=True, px=max(1, int(ttl * 1000))))

    def put(self, kind: str, device_id: str, blob: bytes, ttl: float | None = None) -> None:
        check_kind(kind)
        key = self._key(device_id, kind)
        sealed = self._sealer.seal(key, blob)
        self._r.set(key, sealed, px=None if ttl is None else max(1, int(ttl * 1000)))

    def get(self, kind: str, device_id: str) -> bytes | None:
        check_kind(kind)
        key = self._key(device_id, kind)
        sealed: Any = self._r.get(key)  # bytes: the client does not decode responses
        return None if sealed is None else self._sealer.open(key, bytes(sealed))

    def delete(self, kind: str, device_id: str) -> None:
        check_kind(kind)
        self._r.delete(self._key(device_id, kind))

    @contextmanager
    def lock(self, device_id: str, ttl: float = 5.0, wait: float = 5.0) -> Iterator[None]:
        key = self._key(device_id, "lock")
        token = secrets.token_bytes(16)
        deadline = time.monotonic() + wait
        delay = 0.001
        while not self._r.set(key, token, nx=True, px=max(1, int(ttl * 1000))):
            if time.monotonic() >= deadline:
                raise TransportError(Reason.TRANSPORT_FAILED, f"device lock of {device_id} not free within {wait} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        try:
            yield
        finally:
            self._unlock(keys=[key], args=[token])

    def forget_device(self, device_id: str) -> None:
        # SCAN, not KEYS: never blocks the server; the hash tag makes the pattern exact for one device
        pattern = _glob_escape(f"{self.prefix}{{{device_id}}}:") + "*"
        keys = list(self._r.scan_iter(match=pattern, count=500))
        if keys:
            self._r.delete(*keys)

    def close(self) -> None:
        self._r.close()
