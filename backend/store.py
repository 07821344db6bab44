"""The storage interface of the backend, and how a backend picks its storage.

:class:`BackendStore` is what the service, the media store, the console and the ``sealmq backend``
tools ask of a database. Two implementations satisfy it and pass the same contract tests
(``tests/test_storage_contract.py``):

- :class:`backend.storage.Storage`: embedded SQLite, one file under the data directory. The default,
  for one backend worker.
- :class:`backend.storage_pg.PostgresStorage`: PostgreSQL (``pip install 'sealmq[scale]'``), for
  several workers sharing one database (issue 14, docs/scaling.md).

:func:`open_store` chooses by the ``db`` setting: nothing means the SQLite file under the data
directory (unchanged behaviour); a ``postgresql://`` URL means PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from backend.storage import (
    Command,
    CommandRow,
    CommitResult,
    MediaRecord,
    NewHandshake,
    NewMessage,
    NewReply,
    Storage,
    StoredMessage,
    db_path,
)

if TYPE_CHECKING:
    from backend.storage_pg import PostgresStorage

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@runtime_checkable
class BackendStore(Protocol):
    """Devices, received records, commands and received media of one backend deployment.

    Every method is one transaction (or one consistent read); implementations are safe to call
    from several threads. Payloads are stored and returned as bytes, never logged.
    """

    def close(self) -> None: ...

    # devices
    def record_handshake(self, device_id: str, now: float, cert_sha256: str) -> None: ...
    def devices(self) -> list[tuple[str, float, float, int]]: ...

    # messages
    def store_message(self, device_id: str, now: float, kind: str, epoch: int, seq: int,  # noqa: PLR0917
                      payload: bytes) -> int: ...
    def messages(self, device_id: str | None = None, limit: int = 1000) -> list[StoredMessage]: ...
    def recent_messages(self, device_id: str, kind: str, limit: int = 200) -> list[StoredMessage]: ...
    def count_messages(self, device_id: str | None = None) -> int: ...
    def stored_bytes(self, device_id: str) -> int: ...
    def commit_batch(self, messages: Sequence[NewMessage], replies: Sequence[NewReply],
                     handshakes: Sequence[NewHandshake] = ()) -> CommitResult:
        """Exactly once, across every writer of the database: in one transaction that holds the
        touched devices' ledgers locked, check each message id against the ledger as committed by
        anyone, write the new messages and replies (a reply's command becomes ``replied``), merge
        the ids into the ledgers and write them back. The result says what was written, what was
        a repeat, and the merged ledgers (what to acknowledge to the devices). ``handshakes`` are
        recorded first in the same transaction, in their order, as :meth:`record_handshake` does."""
        ...
    def ledger(self, device_id: str) -> bytes | None:
        """The device's committed ledger (``sealmq.delivery.Ledger.encode()``), if any."""
        ...

    # commands
    def queue_command(self, device_id: str, name: str, args: bytes, now: float) -> int: ...
    def commands(self, device_id: str | None = None, state: str | None = None,
                 command_id: int | None = None) -> list[CommandRow]: ...
    def pending_commands(self, device_ids: set[str] | None, *, resend_before: float | None = None) -> list[Command]: ...
    def mark_command(self, command_id: int, status: str, now: float, reply: bytes | None = None) -> None: ...
    def requeue_commands(self, device_id: str) -> int: ...
    def expire_commands(self, created_before: float) -> list[Command]: ...
    def count_commands(self, status: str) -> int: ...
    def command(self, command_id: int) -> Command | None: ...

    # media
    def add_media(self, r: MediaRecord) -> None: ...
    def has_media(self, device_id: str, transfer_id: str) -> bool: ...
    def media(self) -> list[MediaRecord]: ...


def is_postgres_url(db: str) -> bool:
    return db.startswith(POSTGRES_SCHEMES)


def open_store(db: str | None, data_dir: Path, *, durable: bool = True) -> BackendStore:
    """The store a backend uses: SQLite under ``data_dir`` unless ``db`` is a PostgreSQL URL.

    ``db`` may also be a path to an SQLite file. The URL is libpq's: a password in it works but
    lands in the process list; prefer ``PGPASSFILE``/``PGPASSWORD`` (docs/scaling.md). ``durable``
    is SQLite's ``synchronous=FULL``; PostgreSQL's durability is the server's (``synchronous_commit``,
    on by default: a commit returns once it is in the write-ahead log).
    """
    if db is None:
        return Storage(db_path(data_dir), durable=durable)
    if is_postgres_url(db):
        from backend.storage_pg import PostgresStorage  # the [scale] extra: only when asked for

        return PostgresStorage(db)
    return Storage(Path(db), durable=durable)


def _conforms(sqlite: Storage, postgres: PostgresStorage) -> tuple[BackendStore, BackendStore]:
    """Never called: mypy checks here that both implementations satisfy the protocol."""
    return sqlite, postgres
