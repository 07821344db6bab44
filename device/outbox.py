"""The device's durable message outbox: telemetry and command replies survive until the backend
says it committed them.

Every message gets a device-assigned message id (increasing, persisted, never reused) and is
written to an SQLite database in the device's state directory, in a committed (by default fsynced)
transaction, before it is sealed. It leaves the outbox only when a sealed ACK from the backend
covers its id (the backend sends one after it committed the message). Whatever is unacknowledged is
sealed again under the current keys and re-sent after a new session, after ``resend_after`` seconds
without an acknowledgement, and after a device restart (the database is the state).

Sending respects an in-flight window: id X goes out only while X < lowest unacknowledged id +
``window`` (``window`` <= :data:`sealmq.bodies.MESSAGE_WINDOW`, which the backend's dedup memory
relies on). The outbox is bounded by count, bytes and age; :meth:`MessageOutbox.add` and
:meth:`MessageOutbox.expire` return what they dropped so that the agent audits it.

Commands are deduplicated here too: :meth:`MessageOutbox.add_reply` records the command id as
executed in the same transaction as its reply, so a command the backend sends again (after a new
session) is not run twice; the reply itself stays in the outbox until acknowledged.

First message id of a new outbox: the current time in milliseconds, shifted left by 16 bits, so a
device whose state was wiped starts above the ids it used before (the backend would otherwise take
them for repeats), as long as its clock is not behind; an ACK that covers ids the device never
assigned also moves the counter past them (:meth:`MessageOutbox.ack`).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime.files import private_database
from sealmq.bodies import MAX_MSG_ID, MESSAGE_WINDOW, Ack
from sealmq.topics import RecordKind

DB_FILE = "messages.sqlite3"
EXECUTED_KEPT = 1024  # command ids remembered as executed (the backend re-sends only recent ones)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    msg_id INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    created REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS executed (command_id INTEGER PRIMARY KEY, msg_id INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class OutboxLimits:
    max_messages: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    max_age: float = 7 * 24 * 3600.0  # seconds a message may wait for its acknowledgement
    window: int = MESSAGE_WINDOW  # messages in flight (at most MESSAGE_WINDOW)
    resend_after: float = 5.0  # seconds without acknowledgement before a message is sent again
    durable: bool = True  # fsync every commit (synchronous=FULL); False: survives a crash, not power loss


@dataclass(frozen=True)
class Dropped:
    """Messages the outbox gave up on (bounds), for the audit log: no payload, only ids."""

    reason: str  # "max_messages", "max_bytes" or "max_age"
    count: int
    first_id: int
    last_id: int


@dataclass(frozen=True)
class Pending:
    msg_id: int
    kind: RecordKind
    body: bytes


class MessageOutbox:
    """The persistent outbox of one device (thread-safe; the agent calls it under its own lock)."""

    def __init__(self, state_dir: Path, limits: OutboxLimits | None = None, *, now: float) -> None:
        self.limits = limits or OutboxLimits()
        if not 1 <= self.limits.window <= MESSAGE_WINDOW:
            raise ValueError(f"outbox window must be 1..{MESSAGE_WINDOW}")
        self.path = state_dir / DB_FILE
        private_database(self.path)  # telemetry not yet sent, in plaintext: 0600, -wal/-shm included
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if self.limits.durable else 'NORMAL'}")
        self._db.executescript(SCHEMA)
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('next_id', ?)", (int(now * 1000) << 16,))
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM outbox").fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])
        self._sent: dict[int, tuple[int, float]] = {}  # msg_id -> (session token, when), in memory only
        # due() reads only what is new while nothing can be due again: ids above the highest sent
        # in this session, until the first re-send time (then it reads the whole window once)
        self._scan_session: int | None = None
        self._high_sent = 0
        self._rescan_at = 0.0
        self._incremental = True  # False: every due() reads the whole window (tests compare the two)
        self.acked = 0  # acknowledged since start (for counters)

    def _tx(self) -> _Tx:
        return _Tx(self._db, self._lock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- adding -------------------------------------------------------------------------------
    def add(self, kind: RecordKind, build: Callable[[int], bytes], now: float) -> tuple[int, list[Dropped]]:
        """Assign the next message id, build the body with it, and commit it; returns the id and
        what the bounds dropped to make room."""
        ids, dropped = self.add_many(kind, [build], now)
        return ids[0], dropped

    def add_many(self, kind: RecordKind, builds: Sequence[Callable[[int], bytes]],
                 now: float) -> tuple[list[int], list[Dropped]]:
        """:meth:`add` for several messages in one transaction (one fsync for all of them)."""
        with self._tx() as db:
            first = self._next_id(db, len(builds))
            rows = [(first + i, int(kind), now, build(first + i)) for i, build in enumerate(builds)]
            db.executemany("INSERT INTO outbox(msg_id, kind, created, body) VALUES (?, ?, ?, ?)", rows)
            self._count += len(rows)
            self._bytes += sum(len(r[3]) for r in rows)
            dropped = self._enforce_size(db)
        return [r[0] for r in rows], dropped

    def add_reply(self, command_id: int, build: Callable[[int], bytes], now: float) -> tuple[int, list[Dropped]]:
        """Like :meth:`add` for a command's reply, and remember ``command_id`` as executed."""
        with self._tx() as db:
            msg_id, dropped = self.add(RecordKind.REPLY, build, now)
            db.execute("INSERT OR REPLACE INTO executed(command_id, msg_id) VALUES (?, ?)", (command_id, msg_id))
            db.execute("DELETE FROM executed WHERE command_id NOT IN "
                       "(SELECT command_id FROM executed ORDER BY command_id DESC LIMIT ?)", (EXECUTED_KEPT,))
        return msg_id, dropped

    def executed(self, command_id: int) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM executed WHERE command_id=?", (command_id,)).fetchone() is not None

    def _next_id(self, db: sqlite3.Connection, count: int = 1) -> int:
        """Reserve ``count`` consecutive ids (in the caller's transaction); returns the first."""
        msg_id = int(db.execute("SELECT value FROM meta WHERE key='next_id'").fetchone()[0])
        if msg_id + count - 1 > MAX_MSG_ID:
            raise OverflowError("message ids exhausted")
        db.execute("UPDATE meta SET value=? WHERE key='next_id'", (msg_id + count,))
        return msg_id

    def _drop_oldest(self, db: sqlite3.Connection, where: str, params: tuple[object, ...],
                     reason: str) -> Dropped | None:
        rows = db.execute(f"SELECT msg_id, LENGTH(body) FROM outbox WHERE {where} ORDER BY msg_id",  # noqa: S608
                          params).fetchall()
        if not rows:
            return None
        ids = [int(r[0]) for r in rows]
        db.executemany("DELETE FROM outbox WHERE msg_id=?", [(i,) for i in ids])
        self._count -= len(ids)
        self._bytes -= sum(int(r[1]) for r in rows)
        for i in ids:
            self._sent.pop(i, None)
        return Dropped(reason, len(ids), ids[0], ids[-1])

    def _enforce_size(self, db: sqlite3.Connection) -> list[Dropped]:
        dropped = []
        excess = self._count - self.limits.max_messages
        if excess > 0:
            first = db.execute("SELECT msg_id FROM outbox ORDER BY msg_id LIMIT 1 OFFSET ?", (excess,)).fetchone()
            d = self._drop_oldest(db, "msg_id < ?", (int(first[0]),), "max_messages")
            if d:
                dropped.append(d)
        if self._bytes > self.limits.max_bytes:
            # the oldest messages whose removal brings the total under the bound
            cut, total = 0, self._bytes
            for msg_id, size in db.execute("SELECT msg_id, LENGTH(body) FROM outbox ORDER BY msg_id"):
                if total <= self.limits.max_bytes:
                    break
                total -= int(size)
                cut = int(msg_id)
            d = self._drop_oldest(db, "msg_id <= ?", (cut,), "max_bytes")
            if d:
                dropped.append(d)
        return dropped

    def expire(self, now: float) -> list[Dropped]:
        """Drop messages older than ``max_age``."""
        with self._lock:
            if self._count == 0:  # nothing to drop: no write transaction (every 10 s per device)
                return []
        with self._tx() as db:
            d = self._drop_oldest(db, "created < ?", (now - self.limits.max_age,), "max_age")
        return [d] if d else []

    # -- sending and acknowledgements ---------------------------------------------------------
    def due(self, session: int, now: float) -> list[Pending]:
        """Messages to seal and send now under session ``session`` (any token that changes with the
        session): inside the window, not yet sent in this session or not acknowledged for
        ``resend_after`` seconds. They are marked sent."""
        with self._lock:
            if self._count == 0:  # asked at every timer tick: an idle device runs no query
                return []
            if self._incremental and session == self._scan_session and now < self._rescan_at:
                # nothing sent in this session can be due again yet: only ids above the highest
                # sent, inside the window (ids only grow, so every lower one was sent already)
                low = self._db.execute("SELECT MIN(msg_id) FROM outbox").fetchone()[0]
                if low is None:
                    return []
                rows = self._db.execute("SELECT msg_id, kind, body FROM outbox WHERE msg_id > ? AND msg_id < ?"
                                        " ORDER BY msg_id LIMIT ?",
                                        (self._high_sent, int(low) + self.limits.window, self.limits.window)).fetchall()
                out = [Pending(int(msg_id), RecordKind(kind), bytes(body)) for msg_id, kind, body in rows]
                for p in out:
                    self._sent[p.msg_id] = (session, now)
                if out:
                    self._high_sent = out[-1].msg_id
                return out
            rows = self._db.execute("SELECT msg_id, kind, body FROM outbox ORDER BY msg_id LIMIT ?",
                                    (self.limits.window,)).fetchall()
            if session != self._scan_session:
                self._high_sent = 0
            self._scan_session, self._rescan_at = session, now + self.limits.resend_after
            if not rows:
                return []
            limit = int(rows[0][0]) + self.limits.window  # X < lowest unacknowledged + window
            out = []
            for msg_id, kind, body in rows:
                if msg_id >= limit:
                    break
                sent = self._sent.get(msg_id)
                if sent is not None and sent[0] == session and now - sent[1] < self.limits.resend_after:
                    self._rescan_at = min(self._rescan_at, sent[1] + self.limits.resend_after)
                    self._high_sent = max(self._high_sent, int(msg_id))
                    continue
                self._sent[msg_id] = (session, now)
                self._high_sent = max(self._high_sent, int(msg_id))
                out.append(Pending(int(msg_id), RecordKind(kind), bytes(body)))
            return out

    def rewind(self) -> None:
        """Forget what was sent: after a reconnect or a new session, everything unacknowledged
        goes out again (sealed anew)."""
        with self._lock:
            self._sent.clear()
            self._scan_session, self._high_sent = None, 0

    def ack(self, ack: Ack) -> int:
        """Drop what ``ack`` covers; returns how many messages left the outbox."""
        with self._lock:
            # Not fsynced: a removal lost in a crash only means the message is sent again (and the
            # backend drops the repeat); the next fsynced commit makes it durable anyway.
            self._db.execute("PRAGMA synchronous=OFF")
            try:
                return self._ack(ack)
            finally:
                self._db.execute(f"PRAGMA synchronous={'FULL' if self.limits.durable else 'NORMAL'}")

    def _ack(self, ack: Ack) -> int:
        with self._tx() as db:
            before = self._count
            ranges = [(0, ack.cumulative), *ack.ranges]
            for first, last in ranges:
                rows = db.execute("SELECT msg_id, LENGTH(body) FROM outbox WHERE msg_id BETWEEN ? AND ?",
                                  (first, last)).fetchall()
                if rows:
                    db.execute("DELETE FROM outbox WHERE msg_id BETWEEN ? AND ?", (first, last))
                    self._count -= len(rows)
                    self._bytes -= sum(int(r[1]) for r in rows)
                    for r in rows:
                        self._sent.pop(int(r[0]), None)
            # an ack above every id we assigned: our state was wiped and the ids restarted low
            highest = max([ack.cumulative, *(last for _, last in ack.ranges)])
            next_id = int(db.execute("SELECT value FROM meta WHERE key='next_id'").fetchone()[0])
            if highest >= next_id:
                db.execute("UPDATE meta SET value=? WHERE key='next_id'", (highest + 1,))
        removed = before - self._count
        self.acked += removed
        return removed

    # -- inspection ---------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return self._count

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def next_id(self) -> int:
        """The id the next message will get."""
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE key='next_id'").fetchone()[0])

    def ids(self) -> list[int]:
        with self._lock:
            return [int(r[0]) for r in self._db.execute("SELECT msg_id FROM outbox ORDER BY msg_id")]


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) under the outbox lock; nests."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self._db, self._lock = db, lock
        self._outer = False

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        self._outer = not self._db.in_transaction
        if self._outer:
            self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if self._outer:
                self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
        finally:
            self._lock.release()
