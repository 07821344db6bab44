"""Session state that several backend workers share: the interface, and the in-memory default for one worker.

With N workers behind MQTT 5 shared subscriptions (issue 14, docs/scaling.md), any worker may get any
device's next record, so what a worker used to keep in its own memory moves to a store all of them
reach, with the decisions that must never be made twice made atomically *in* the store:

- :meth:`SessionState.accept` is the replay check-and-mark of one receiving key context: of several
  workers that opened the same sequence number, exactly one is told ``True`` (the others drop their
  copy as a replay). Same semantics as :class:`sealmq.replay.ReplayWindow` (``check`` then ``mark``),
  which the core keeps running locally; this is the shared gate after a successful decryption.
- :meth:`SessionState.reserve_seq` hands out the sender sequence numbers of one sending key context,
  so two workers sealing under the same keys never reuse a nonce.
- :meth:`SessionState.first_time` records a delivery id (device, message id) once, for deduplication.
- :meth:`SessionState.put` / :meth:`SessionState.get` / :meth:`SessionState.delete` keep opaque
  snapshots (an established session with its key-update state, a half-open handshake) by kind and
  device, optionally with a lifetime. A store outside the process seals them (``backend.state_seal``).

:class:`MemorySessionState` keeps all of it in this process (one worker: the default);
:class:`backend.session_state_redis.RedisSessionState` keeps it in Redis or Valkey. Both pass the
same contract tests (``tests/test_session_state.py``).

Status: the interface and both stores are here and tested; the backend service does not use them
yet (it still keeps its sessions in its endpoint); see docs/scaling.md for the remaining wiring.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

from sealmq.errors import ConfigError, LocalProtocolError, Reason, ReplayError, TransportError
from sealmq.limits import REPLAY_WINDOW
from sealmq.replay import ReplayWindow

# What put/get keep, by kind: an established session, a half-open handshake.
KINDS = ("session", "handshake")


@runtime_checkable
class SessionState(Protocol):
    def accept(self, device_id: str, context: str, seq: int) -> bool:
        """Mark ``seq`` received in ``device_id``'s receiving context ``context`` (say a session id and
        epoch); ``False`` if it was already received or is older than the replay window."""
        ...

    def reserve_seq(self, device_id: str, context: str, count: int = 1) -> int:
        """Reserve ``count`` sender sequence numbers of a sending context; returns the first one
        (0 for a new context). Numbers are never handed out twice."""
        ...

    def first_time(self, device_id: str, delivery_id: int, ttl: float) -> bool:
        """``True`` exactly once per (device, delivery id) within ``ttl`` seconds."""
        ...

    def put(self, kind: str, device_id: str, blob: bytes, ttl: float | None = None) -> None: ...
    def get(self, kind: str, device_id: str) -> bytes | None: ...
    def delete(self, kind: str, device_id: str) -> None: ...

    def lock(self, device_id: str, ttl: float = 5.0, wait: float = 5.0) -> AbstractContextManager[None]:
        """Hold ``device_id``'s lock (every worker's) for a step that reads, changes and writes back its
        snapshot; it expires after ``ttl`` seconds if its holder dies. Raises :class:`TransportError`
        if it is not free within ``wait`` seconds."""
        ...

    def forget_device(self, device_id: str) -> None:
        """Drop everything kept for ``device_id`` (its windows, counters, snapshots, delivery ids)."""
        ...

    def close(self) -> None: ...


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise LocalProtocolError(Reason.CONFIG_INVALID, f"state kind must be one of {', '.join(KINDS)}")


class MemorySessionState:
    """All of :class:`SessionState` in this process, thread-safe. For one worker."""

    def __init__(self, window: int = REPLAY_WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], ReplayWindow] = {}
        self._next_seq: dict[tuple[str, str], int] = {}
        self._seen: dict[tuple[str, int], float] = {}  # -> expiry
        self._blobs: dict[tuple[str, str], tuple[bytes, float | None]] = {}
        self._device_locks: dict[str, threading.Lock] = {}

    def accept(self, device_id: str, context: str, seq: int) -> bool:
        with self._lock:
            w = self._windows.setdefault((device_id, context), ReplayWindow(self.window))
            try:
                w.mark(seq)
            except ReplayError:
                return False
            return True

    def reserve_seq(self, device_id: str, context: str, count: int = 1) -> int:
        if count < 1:
            raise LocalProtocolError(Reason.CONFIG_INVALID, "reserve at least one sequence number")
        with self._lock:
            first = self._next_seq.get((device_id, context), 0)
            self._next_seq[(device_id, context)] = first + count
            return first

    def first_time(self, device_id: str, delivery_id: int, ttl: float) -> bool:
        now = self._clock()
        with self._lock:
            expiry = self._seen.get((device_id, delivery_id))
            if expiry is not None and expiry > now:
                return False
            self._seen[(device_id, delivery_id)] = now + ttl
            if len(self._seen) > 4 * 65536:  # bound memory: drop the expired ones now and then
                self._seen = {k: v for k, v in self._seen.items() if v > now}
            return True

    def put(self, kind: str, device_id: str, blob: bytes, ttl: float | None = None) -> None:
        check_kind(kind)
        with self._lock:
            self._blobs[(kind, device_id)] = (bytes(blob), None if ttl is None else self._clock() + ttl)

    def get(self, kind: str, device_id: str) -> bytes | None:
        check_kind(kind)
        with self._lock:
            item = self._blobs.get((kind, device_id))
            if item is None:
                return None
            blob, expiry = item
            if expiry is not None and expiry <= self._clock():
                del self._blobs[(kind, device_id)]
                return None
            return blob

    def delete(self, kind: str, device_id: str) -> None:
        check_kind(kind)
        with self._lock:
            self._blobs.pop((kind, device_id), None)

    @contextmanager
    def lock(self, device_id: str, ttl: float = 5.0, wait: float = 5.0) -> Iterator[None]:
        with self._lock:
            lock = self._device_locks.setdefault(device_id, threading.Lock())
        if not lock.acquire(timeout=wait):
            raise TransportError(Reason.TRANSPORT_FAILED, f"device lock of {device_id} not free within {wait} s")
        try:
            yield
        finally:
            lock.release()

    def forget_device(self, device_id: str) -> None:
        with self._lock:
            self._windows = {k: v for k, v in self._windows.items() if k[0] != device_id}
            self._next_seq = {k: v for k, v in self._next_seq.items() if k[0] != device_id}
            self._seen = {k: v for k, v in self._seen.items() if k[0] != device_id}
            self._blobs = {k: v for k, v in self._blobs.items() if k[1] != device_id}

    def close(self) -> None:
        pass


STATE_KEY_FILE = "state.key"  # under the backend's data directory unless given


def open_session_state(url: str, key_file: Path, password_file: Path | None = None) -> SessionState:
    """The shared session state at ``url``: ``memory`` (this process only, for tests and one worker)
    or ``redis://`` / ``rediss://`` (Redis or Valkey; the ``[scale]`` extra), sealed under the key in
    ``key_file`` (made, 0600, if missing). The server's password, if any, is best kept in
    ``password_file`` (its first line) rather than in the URL, which the process list shows."""
    if url == "memory":
        return MemorySessionState()
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(Reason.CONFIG_INVALID, "--state must be memory, redis://, rediss:// or unix://")
    from backend.session_state_redis import RedisSessionState
    from backend.state_seal import StateSealer, load_or_create_key

    password = None
    if password_file is not None:
        try:
            password = password_file.read_text(encoding="utf-8").splitlines()[0].strip() or None
        except (OSError, UnicodeDecodeError, IndexError):
            raise ConfigError(Reason.CONFIG_INVALID, f"cannot read a password from {password_file}") from None
    return RedisSessionState(url, StateSealer(load_or_create_key(key_file)), password=password)
