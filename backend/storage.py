"""The backend's embedded SQLite database: devices, received records, commands, received media.

This class owns the database: nothing else opens the file (``DB_FILE`` under the data directory).

Decrypted payloads go here (and to handlers), never to logs. The database is opened in WAL
mode so that ``sealmq backend ...`` tools can read while the service writes; the service is
the only writer. Data survives restarts: the file is the state.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
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
    device_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    kind TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_device ON messages(device_id, received_at);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    name TEXT NOT NULL,
    args BLOB NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',   -- pending | sent | replied | failed
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

# The database's file name inside the backend's data directory (``--data``).
DB_FILE = "backend.sqlite3"


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
    status: str
    reply: bytes | None


class Storage:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

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

    # -- devices -----------------------------------------------------------------------------
    def record_handshake(self, device_id: str, now: float, cert_sha256: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO devices(device_id, first_seen, last_seen, last_handshake, handshakes, cert_sha256)"
                " VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT(device_id) DO UPDATE SET last_seen=excluded.last_seen,"
                " last_handshake=excluded.last_handshake, handshakes=handshakes+1, cert_sha256=excluded.cert_sha256",
                (device_id, now, now, now, cert_sha256),
            )

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

    def messages(self, device_id: str | None = None, limit: int = 1000) -> list[StoredMessage]:
        query = "SELECT id, device_id, received_at, kind, epoch, seq, size, payload FROM messages"
        params: tuple[object, ...] = ()
        if device_id is not None:
            query += " WHERE device_id=?"
            params = (device_id,)
        query += " ORDER BY id LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, (*params, limit)).fetchall()
        return [StoredMessage(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], bytes(r[7])) for r in rows]

    def recent_messages(self, device_id: str, kind: str, limit: int = 200) -> list[StoredMessage]:
        """The newest ``limit`` messages of one device and kind, oldest first (the console's charts)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, device_id, received_at, kind, epoch, seq, size, payload FROM messages"
                " WHERE device_id=? AND kind=? ORDER BY id DESC LIMIT ?", (device_id, kind, limit)
            ).fetchall()
        return [StoredMessage(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], bytes(r[7])) for r in reversed(rows)]

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

    def pending_commands(self, device_ids: set[str]) -> list[Command]:
        if not device_ids:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT id, device_id, name, args, status, reply FROM commands WHERE status='pending' ORDER BY id"
            ).fetchall()
        return [Command(int(r[0]), r[1], r[2], bytes(r[3]), r[4], None) for r in rows if r[1] in device_ids]

    def mark_command(self, command_id: int, status: str, now: float, reply: bytes | None = None) -> None:
        column = "sent_at" if status == "sent" else "replied_at"
        with self._tx() as db:
            db.execute(
                f"UPDATE commands SET status=?, {column}=?, reply=COALESCE(?, reply) WHERE id=?",  # noqa: S608
                (status, now, reply, command_id),
            )

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
            r = self._db.execute(
                "SELECT id, device_id, name, args, status, reply FROM commands WHERE id=?", (command_id,)
            ).fetchone()
        if r is None:
            return None
        return Command(int(r[0]), r[1], r[2], bytes(r[3]), r[4], bytes(r[5]) if r[5] is not None else None)


    def commands(self, device_id: str | None = None, state: str | None = None,
                 command_id: int | None = None) -> list[CommandRow]:
        """Commands, oldest first, optionally of one device, in one state (as shown), or one id."""
        query = "SELECT id, device_id, name, status, created_at, sent_at, replied_at, reply FROM commands WHERE 1=1"
        params: list[object] = []
        if device_id is not None:
            query += " AND device_id=?"
            params.append(device_id)
        if state is not None:
            query += " AND status=?"
            params.append(_STATUS_OF_STATE.get(state, state))
        if command_id is not None:
            query += " AND id=?"
            params.append(command_id)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", params).fetchall()
        return [
            CommandRow(int(r[0]), r[1], r[2], _STATE_OF_STATUS.get(r[3], r[3]), float(r[4]), r[5], r[6],
                       bytes(r[7]) if r[7] is not None else None)
            for r in rows
        ]


# -- the operator's view of commands (``sealmq backend command`` / ``commands``) -------------------
@dataclass(frozen=True)
class CommandRow:
    id: int
    device_id: str
    name: str
    state: str  # queued | sent | replied | expired | failed (the database's 'pending' is shown as queued)
    created_at: float
    sent_at: float | None
    replied_at: float | None
    reply: bytes | None


# The stored status values and the state an operator sees for each.
_STATE_OF_STATUS = {"pending": "queued"}
_STATUS_OF_STATE = {v: k for k, v in _STATE_OF_STATUS.items()}

