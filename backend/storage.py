"""The backend's embedded SQLite database: devices, received records, commands, received media,
and each device's delivery ledger (which message ids are committed, :class:`sealmq.delivery.Ledger`).

This class owns the database: nothing else opens the file (``DB_FILE`` under the data directory).

Decrypted payloads go here (and to handlers), never to logs. The database is opened in WAL
mode so that ``sealmq backend ...`` tools can read while the service writes; the service is
the writer. Data survives restarts: the file is the state. Received messages are written
in batches (:meth:`Storage.commit_batch`): in one transaction, the ledgers of the devices the batch
touches are read, the batch's message ids are checked against them and merged in, only the new
messages are written, and the merged ledgers are written back; so a message is stored exactly once
across repeats, restarts and writers (``BEGIN IMMEDIATE`` serialises writers, also two processes
on one file). A unique index on ``messages(device_id, msg_id)`` backs this up (see
:meth:`Storage._migrate` for a database made before it, which may hold repeats).

Commands move through states (:data:`COMMAND_STATES`): ``queued`` (waiting for the device to have
a session) -> ``sent`` (sealed under a session; back to ``queued`` when the device opens a new one,
the device runs a command id once) -> ``replied`` (the device's sealed reply, its acknowledgement,
is committed), or ``expired`` after the service's ``command_ttl`` without a reply, or ``failed`` when
it cannot be sent at all (a body the device would refuse). Read them with
:meth:`Storage.commands` (``device_id``, ``state``, ``command_id``).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.files import private_database
from sealmq.delivery import Ledger

log = logging.getLogger("sealmq.backend.storage")

# The columns of a stored message after its id, in ``messages`` and ``messages_repeated`` alike
# (the migration copies rows from one to the other).
_MESSAGE_COLUMN_DEFS = """    device_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    kind TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL,
    msg_id INTEGER                              -- the device's message id (sealmq.bodies)"""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    last_handshake REAL,
    handshakes INTEGER NOT NULL DEFAULT 0,
    cert_sha256 TEXT
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
{_MESSAGE_COLUMN_DEFS}
);
CREATE TABLE IF NOT EXISTS ledgers (
    device_id TEXT PRIMARY KEY,
    ledger BLOB NOT NULL                        -- sealmq.delivery.Ledger.encode()
);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    name TEXT NOT NULL,
    args BLOB NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued',    -- queued | sent | replied | expired
    sent_at REAL,
    replied_at REAL,
    reply BLOB
);
CREATE INDEX IF NOT EXISTS commands_pending ON commands(status, device_id);

CREATE TABLE IF NOT EXISTS media (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    stored_path TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    signature_verified INTEGER NOT NULL,
    created INTEGER NOT NULL,
    received_at REAL NOT NULL,
    transfer_id TEXT NOT NULL,
    UNIQUE (device, transfer_id)
);
"""

# The backstop of exactly-once storage: one row per device and message id (NULL ids, rows stored
# before message ids existed, do not collide). Created by Storage._migrate, not by SCHEMA: an older
# database may hold repeats, which must be set aside first. It also serves every per-device query,
# so it replaces the older index messages_device(device_id, received_at), which nothing filtered or
# sorted by time with: one index to maintain per row, as before.
MESSAGE_ID_INDEX = "messages_msg_id"
OLD_DEVICE_INDEX = "messages_device"
# Where the migration sets those repeats aside (every row of a device and message id but the first).
REPEATED_TABLE = "messages_repeated"
_REPEATED_SCHEMA = f"""CREATE TABLE IF NOT EXISTS {REPEATED_TABLE} (
    id INTEGER PRIMARY KEY,                     -- its id in messages
{_MESSAGE_COLUMN_DEFS}
)"""
# The ids of those repeats (both engines have window functions; one sort, no quadratic scan).
REPEATS_QUERY = ("SELECT id FROM (SELECT id, row_number() OVER (PARTITION BY device_id, msg_id ORDER BY id) AS n"
                 " FROM messages WHERE msg_id IS NOT NULL) AS numbered WHERE n > 1")

# The database's file name inside the backend's data directory (``--data``).
DB_FILE = "backend.sqlite3"

COMMAND_STATES = ("queued", "sent", "replied", "expired", "failed")


def db_path(data_dir: Path) -> Path:
    """Where the backend keeps its database under ``data_dir``."""
    return data_dir / DB_FILE


@dataclass(frozen=True)
class StoredMessage:
    id: int
    device_id: str
    received_at: float
    kind: str
    epoch: int
    seq: int
    size: int
    payload: bytes
    msg_id: int | None = None  # the device's message id (None: stored before message ids existed)


@dataclass(frozen=True)
class MediaRecord:
    device_id: str
    name: str  # as the device named it (untrusted text: display escaped)
    stored_path: str  # relative to data_dir
    content_type: str
    size: int
    sha256: str  # hex
    signature_verified: bool
    created: int
    received_at: float
    transfer_id: str  # hex


@dataclass(frozen=True)
class Command:
    id: int
    device_id: str
    name: str
    args: bytes
    status: str  # one of COMMAND_STATES
    reply: bytes | None
    created_at: float = 0.0
    sent_at: float | None = None
    replied_at: float | None = None


_COMMAND_COLUMNS = "id, device_id, name, args, status, reply, created_at, sent_at, replied_at"


def _command(r: tuple[Any, ...]) -> Command:
    return Command(int(r[0]), str(r[1]), str(r[2]), bytes(r[3]), str(r[4]),
                   bytes(r[5]) if r[5] is not None else None, float(r[6]),
                   None if r[7] is None else float(r[7]), None if r[8] is None else float(r[8]))


@dataclass(frozen=True)
class NewHandshake:
    """A completed handshake to record in the devices table (a batch item of :meth:`Storage.commit_batch`)."""

    device_id: str
    at: float
    cert_sha256: str


_UPSERT_DEVICE = ("INSERT INTO devices(device_id, first_seen, last_seen, last_handshake, handshakes, cert_sha256)"
                  " VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT(device_id) DO UPDATE SET last_seen=excluded.last_seen,"
                  " last_handshake=excluded.last_handshake, handshakes=handshakes+1,"
                  " cert_sha256=excluded.cert_sha256")


@dataclass(frozen=True)
class NewMessage:
    """A telemetry message to store (a batch item of :meth:`Storage.commit_batch`)."""

    device_id: str
    received_at: float
    kind: str
    epoch: int
    seq: int
    payload: bytes
    msg_id: int | None


@dataclass(frozen=True)
class NewReply:
    """A command reply to store: command ``command_id`` (of ``device_id``) becomes ``replied``.
    ``msg_id`` is the reply's message id, recorded in the device's ledger like a message's."""

    device_id: str
    command_id: int
    received_at: float
    payload: bytes
    msg_id: int


@dataclass(frozen=True)
class CommitResult:
    """What :meth:`Storage.commit_batch` did, decided under the devices' ledgers as committed by
    every writer (worker) so far. Every item given is in exactly one of the four lists."""

    stored: list[NewMessage]  # written
    replied: list[NewReply]  # written: their commands are now ``replied``
    unknown: list[NewReply]  # replies to no command of their device: id recorded, nothing written
    duplicates: list[NewMessage | NewReply]  # committed before (by any writer), or a replied command's
    ledgers: dict[str, Ledger]  # every touched device's ledger after the commit (what to acknowledge)


def ledger_devices(messages: Sequence[NewMessage], replies: Sequence[NewReply]) -> list[str]:
    """The devices whose ledgers a batch touches, sorted: the order in which writers lock them."""
    return sorted({m.device_id for m in messages if m.msg_id is not None} | {r.device_id for r in replies})


def record_ids(ledgers: dict[str, Ledger], messages: Sequence[NewMessage], replies: Sequence[NewReply],
               ) -> tuple[list[NewMessage], list[NewReply], list[NewMessage | NewReply]]:
    """Record the batch's message ids in ``ledgers`` (the devices' ledgers as read, locked, in the
    commit's transaction): the messages and replies whose id is new, and the repeats (including a
    repeat within the batch). A message without an id (``None``) is always new."""
    new: list[NewMessage] = []
    duplicates: list[NewMessage | NewReply] = []
    for m in messages:
        (new if m.msg_id is None or ledgers[m.device_id].add(m.msg_id) else duplicates).append(m)
    new_replies: list[NewReply] = []
    for r in replies:
        if ledgers[r.device_id].add(r.msg_id):
            new_replies.append(r)
        else:
            duplicates.append(r)
    return new, new_replies, duplicates


def decode_ledger(data: bytes | None) -> Ledger:
    """A stored ledger (``None``: the device has none yet, so nothing is committed)."""
    return Ledger() if data is None else Ledger.decode(data)


WAL_SWITCH_TIMEOUT = 10.0  # seconds, as the connection's busy timeout


def _wal(db: sqlite3.Connection, timeout: float = WAL_SWITCH_TIMEOUT) -> None:
    """``PRAGMA journal_mode=WAL``, waiting for another process that switches the same new file at
    the same moment (workers started together on one data folder): SQLite refuses the second
    switch with "database is locked" at once, without waiting for its busy timeout (measured: 26 of
    200 opens of fresh files by two processes at once). Retried with a short backoff, bounded."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(2 * delay, 0.05)


class Storage:
    def __init__(self, path: Path, *, durable: bool = True) -> None:
        private_database(path)  # decrypted payloads: 0600, -wal/-shm included
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        _wal(self._db)
        # FULL: a committed batch is on disk before its messages are acknowledged to anyone
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.executescript(SCHEMA)
        self.set_aside = self._migrate()

    def _migrate(self) -> int:
        """Bring a database made by an older version up to this schema; returns the number of
        repeated rows set aside (see below), 0 on every start but the one that adds the index.

        The unique index on ``messages(device_id, msg_id)`` cannot be created while two rows share
        a device and message id, which a database written before it may hold (two workers racing,
        before ledgers were locked). Refusing to start would leave the operator with a backend that
        does not run; deleting rows would destroy data nobody looked at. So the repeats (every row
        of a device and message id but the first, which the device's ACK covered) move, in the
        same transaction as the index's creation, to the table ``messages_repeated`` (same columns,
        same ids), a warning says how many, and the backend starts. docs/operations.md says how to
        look at them and drop the table.
        """
        with self._tx() as db:
            columns = {r[1] for r in db.execute("PRAGMA table_info(messages)")}
            if "msg_id" not in columns:
                db.execute("ALTER TABLE messages ADD COLUMN msg_id INTEGER")
            db.execute("UPDATE commands SET status='queued' WHERE status='pending'")
            if db.execute("SELECT 1 FROM sqlite_master WHERE type='index' AND name=?",
                          (MESSAGE_ID_INDEX,)).fetchone() is not None:
                return 0
            repeats = [int(r[0]) for r in db.execute(REPEATS_QUERY)]
            if repeats:
                db.execute(_REPEATED_SCHEMA)
                db.execute(f"INSERT INTO {REPEATED_TABLE} SELECT id, device_id, received_at, kind, epoch, seq,"  # noqa: S608
                           f" size, payload, msg_id FROM messages WHERE id IN ({REPEATS_QUERY})")
                db.execute(f"DELETE FROM messages WHERE id IN (SELECT id FROM {REPEATED_TABLE})")  # noqa: S608
                log.warning("%d repeated messages (same device and message id as an earlier row) moved to table %s",
                            len(repeats), REPEATED_TABLE)
            db.execute(f"CREATE UNIQUE INDEX {MESSAGE_ID_INDEX} ON messages(device_id, msg_id)")
            db.execute(f"DROP INDEX IF EXISTS {OLD_DEVICE_INDEX}")
            return len(repeats)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- devices -----------------------------------------------------------------------------
    def record_handshake(self, device_id: str, now: float, cert_sha256: str) -> None:
        with self._tx() as db:
            db.execute(_UPSERT_DEVICE, (device_id, now, now, now, cert_sha256))

    def devices(self) -> list[tuple[str, float, float, int]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT device_id, first_seen, last_seen, handshakes FROM devices ORDER BY device_id"
            ).fetchall()
        return [(str(r[0]), float(r[1]), float(r[2]), int(r[3])) for r in rows]

    # -- messages ----------------------------------------------------------------------------
    def store_message(self, device_id: str, now: float, kind: str, epoch: int, seq: int, payload: bytes) -> int:  # noqa: PLR0917
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO messages(device_id, received_at, kind, epoch, seq, size, payload)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (device_id, now, kind, epoch, seq, len(payload), payload),
            )
            db.execute("UPDATE devices SET last_seen=? WHERE device_id=?", (now, device_id))
            return int(cur.lastrowid or 0)

    def commit_batch(self, messages: Sequence[NewMessage], replies: Sequence[NewReply],
                     handshakes: Sequence[NewHandshake] = ()) -> CommitResult:
        """Store what is new in a batch and merge its message ids into the devices' ledgers, in one
        ``BEGIN IMMEDIATE`` transaction: it holds the database's write lock from its first read, so
        the ledgers read are the latest (whoever wrote them, this or another connection or process)
        and no other writer can pass the same check before this one commits. The batch's handshakes
        are recorded first (as :meth:`record_handshake`, in their order)."""
        devices = ledger_devices(messages, replies)
        with self._tx() as db:
            db.executemany(_UPSERT_DEVICE, [(h.device_id, h.at, h.at, h.at, h.cert_sha256) for h in handshakes])
            marks = ", ".join("?" * len(devices))
            found = dict(db.execute(f"SELECT device_id, ledger FROM ledgers WHERE device_id IN ({marks})",  # noqa: S608
                                    devices).fetchall())
            read = {d: None if found.get(d) is None else bytes(found[d]) for d in devices}
            ledgers = {d: decode_ledger(data) for d, data in read.items()}
            new, new_replies, duplicates = record_ids(ledgers, messages, replies)
            stored = _insert_messages(db, new, duplicates)
            replied: list[NewReply] = []
            unknown: list[NewReply] = []
            for r in sorted(new_replies, key=lambda r: r.command_id):
                if db.execute("UPDATE commands SET status='replied', replied_at=?, reply=?"
                              " WHERE id=? AND device_id=? AND status<>'replied'",
                              (r.received_at, r.payload, r.command_id, r.device_id)).rowcount:
                    replied.append(r)
                elif db.execute("SELECT 1 FROM commands WHERE id=? AND device_id=?",
                                (r.command_id, r.device_id)).fetchone() is not None:
                    duplicates.append(r)  # its command has its reply already
                else:
                    unknown.append(r)
            if stored:
                last = max(m.received_at for m in stored)
                db.executemany("UPDATE devices SET last_seen=? WHERE device_id=?",
                               [(last, d) for d in sorted({m.device_id for m in stored})])
            encoded = {d: ledger.encode() for d, ledger in ledgers.items()}
            db.executemany("INSERT INTO ledgers(device_id, ledger) VALUES (?, ?)"
                           " ON CONFLICT(device_id) DO UPDATE SET ledger=excluded.ledger",
                           [(d, data) for d, data in encoded.items() if data != read[d]])
        return CommitResult(stored, replied, unknown, duplicates, ledgers)

    def ledger(self, device_id: str) -> bytes | None:
        """The device's persisted ledger (``sealmq.delivery.Ledger.encode()``), if any."""
        with self._lock:
            row = self._db.execute("SELECT ledger FROM ledgers WHERE device_id=?", (device_id,)).fetchone()
        return bytes(row[0]) if row is not None else None

    def messages(self, device_id: str | None = None, limit: int = 1000) -> list[StoredMessage]:
        query = "SELECT id, device_id, received_at, kind, epoch, seq, size, payload, msg_id FROM messages"
        params: tuple[object, ...] = ()
        if device_id is not None:
            query += " WHERE device_id=?"
            params = (device_id,)
        query += " ORDER BY id LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, (*params, limit)).fetchall()
        return [StoredMessage(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], bytes(r[7]), r[8]) for r in rows]

    def recent_messages(self, device_id: str, kind: str, limit: int = 200) -> list[StoredMessage]:
        """The newest ``limit`` messages of one device and kind, oldest first (the console's charts)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, device_id, received_at, kind, epoch, seq, size, payload FROM messages"
                " WHERE device_id=? AND kind=? ORDER BY id DESC LIMIT ?", (device_id, kind, limit)
            ).fetchall()
        return [StoredMessage(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], bytes(r[7])) for r in reversed(rows)]

    def stored_bytes(self, device_id: str) -> int:
        """Bytes stored for a device: its telemetry payloads plus its verified media files."""
        with self._lock:
            messages = self._db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM messages WHERE device_id=?", (device_id,)).fetchone()
            media = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM media WHERE device=?", (device_id,)).fetchone()
        return int(messages[0]) + int(media[0])

    def count_messages(self, device_id: str | None = None) -> int:
        with self._lock:
            if device_id is None:
                row = self._db.execute("SELECT COUNT(*) FROM messages").fetchone()
            else:
                row = self._db.execute("SELECT COUNT(*) FROM messages WHERE device_id=?", (device_id,)).fetchone()
        return int(row[0])

    # -- commands ----------------------------------------------------------------------------
    def queue_command(self, device_id: str, name: str, args: bytes, now: float) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO commands(device_id, created_at, name, args) VALUES (?, ?, ?, ?)",
                (device_id, now, name, args),
            )
            return int(cur.lastrowid or 0)

    def pending_commands(self, device_ids: set[str] | None, *, resend_before: float | None = None) -> list[Command]:
        """Commands to seal now for devices with a session: the queued ones, and the ones sent
        before ``resend_before`` that got no reply (a lost record; the device runs an id once).
        ``device_ids`` None: of every device."""
        if device_ids is not None and not device_ids:
            return []
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE status='queued'"  # noqa: S608
                " OR (status='sent' AND sent_at < ?) ORDER BY id",
                (-1.0 if resend_before is None else resend_before,),
            ).fetchall()
        return [_command(r) for r in rows if device_ids is None or r[1] in device_ids]

    def mark_command(self, command_id: int, status: str, now: float, reply: bytes | None = None) -> None:
        if status not in COMMAND_STATES:
            raise ValueError(f"command state must be one of {', '.join(COMMAND_STATES)}")
        column = "sent_at" if status in ("sent", "queued") else "replied_at"
        # replied is final: a reply committed by the ingest (outside the service's lock, or on
        # another worker) just before the service marks the command sent again stays
        final = "" if status == "replied" else " AND status<>'replied'"
        with self._tx() as db:
            db.execute(
                f"UPDATE commands SET status=?, {column}=?, reply=COALESCE(?, reply) WHERE id=?{final}",  # noqa: S608
                (status, now, reply, command_id),
            )

    def requeue_commands(self, device_id: str) -> int:
        """A new session for ``device_id``: its sent, unanswered commands go out again."""
        with self._tx() as db:
            return db.execute("UPDATE commands SET status='queued' WHERE device_id=? AND status='sent'",
                              (device_id,)).rowcount

    def expire_commands(self, created_before: float) -> list[Command]:
        """Queued or sent commands created before ``created_before`` become ``expired``; returns them."""
        with self._tx() as db:
            rows = db.execute(f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE status IN ('queued', 'sent')"  # noqa: S608
                              " AND created_at < ?", (created_before,)).fetchall()
            db.executemany("UPDATE commands SET status='expired' WHERE id=?", [(r[0],) for r in rows])
        return [_command(r) for r in rows]

    def count_commands(self, status: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM commands WHERE status=?", (status,)).fetchone()
        return int(row[0])

    # -- media (verified files; the files themselves are in backend.media's directories) -------
    def add_media(self, r: MediaRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO media (device, name, stored_path, content_type, size, sha256, "
                "signature_verified, created, received_at, transfer_id) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (r.device_id, r.name, r.stored_path, r.content_type, r.size, r.sha256, int(r.signature_verified),
                 r.created, r.received_at, r.transfer_id),
            )

    def has_media(self, device_id: str, transfer_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM media WHERE device = ? AND transfer_id = ?", (device_id, transfer_id)
            ).fetchone()
        return row is not None

    def media(self) -> list[MediaRecord]:
        """Every verified file received, oldest first (``sealmq backend media``)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT device, name, stored_path, content_type, size, sha256, signature_verified, created, "
                "received_at, transfer_id FROM media ORDER BY received_at, id"
            ).fetchall()
        return [
            MediaRecord(d, n, p, t, int(s), h, bool(v), int(c), float(ra), tid)
            for d, n, p, t, s, h, v, c, ra, tid in rows
        ]

    def command(self, command_id: int) -> Command | None:
        with self._lock:
            r = self._db.execute(f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE id=?",  # noqa: S608
                                 (command_id,)).fetchone()
        return None if r is None else _command(r)

    def commands(self, device_id: str | None = None, state: str | None = None,
                 command_id: int | None = None) -> list[CommandRow]:
        """Commands, oldest first, optionally of one device, in one state (COMMAND_STATES), or one id."""
        if state is not None and state not in COMMAND_STATES:
            raise ValueError(f"command state must be one of {', '.join(COMMAND_STATES)}")
        query = "SELECT id, device_id, name, status, created_at, sent_at, replied_at, reply FROM commands WHERE 1=1"
        params: list[object] = []
        if device_id is not None:
            query += " AND device_id=?"
            params.append(device_id)
        if state is not None:
            query += " AND status=?"
            params.append(state)
        if command_id is not None:
            query += " AND id=?"
            params.append(command_id)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", params).fetchall()
        return [
            CommandRow(int(r[0]), r[1], r[2], r[3], float(r[4]), r[5], r[6], bytes(r[7]) if r[7] is not None else None)
            for r in rows
        ]


_INSERT_MESSAGE = ("INSERT INTO messages(device_id, received_at, kind, epoch, seq, size, payload, msg_id)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device_id, msg_id) DO NOTHING")


def _insert_messages(db: sqlite3.Connection, new: list[NewMessage],
                     duplicates: list[NewMessage | NewReply]) -> list[NewMessage]:
    """Insert the messages the ledgers found new; returns those written. A row the unique index
    refuses (already there although its ledger did not say so: a ledger reset by hand) joins
    ``duplicates`` instead of failing the batch, which would fail again on every delivery."""
    rows = [(m.device_id, m.received_at, m.kind, m.epoch, m.seq, len(m.payload), m.payload, m.msg_id) for m in new]
    db.execute("SAVEPOINT batch_messages")
    if db.executemany(_INSERT_MESSAGE, rows).rowcount == len(rows):  # one call: the common case
        db.execute("RELEASE batch_messages")
        return new
    db.execute("ROLLBACK TO batch_messages")  # learn which one(s), row by row
    stored: list[NewMessage] = []
    for m, row in zip(new, rows, strict=True):
        (stored if db.execute(_INSERT_MESSAGE, row).rowcount else duplicates).append(m)
    db.execute("RELEASE batch_messages")
    return stored


# -- the operator's view of commands (``sealmq backend command`` / ``commands``) -------------------
@dataclass(frozen=True)
class CommandRow:
    id: int
    device_id: str
    name: str
    state: str  # one of COMMAND_STATES (a database of an older version is migrated when opened)
    created_at: float
    sent_at: float | None
    replied_at: float | None
    reply: bytes | None


