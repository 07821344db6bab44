"""The storage contract: SQLite (the embedded default) and PostgreSQL (several workers) answer alike.

Every test runs against both implementations of :class:`backend.store.BackendStore`; PostgreSQL is a
real server started by the test session (``tests/postgres.py``). The last tests are PostgreSQL's own:
several workers (connections) writing at once, the schema created by workers starting together, and a
connection that survives a server restart.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.storage import MediaRecord, NewMessage, NewReply, Storage, db_path
from backend.store import BackendStore, open_store
from tests.postgres import PostgresProcess, needs_postgres, postgres

__all__ = ["postgres"]  # the session fixture, imported for pytest


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=needs_postgres)])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def location(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Where a store of this kind lives: an SQLite file, or a fresh PostgreSQL database's URL."""
    if kind == "sqlite":
        return str(tmp_path / "backend.sqlite3")
    server: PostgresProcess = request.getfixturevalue("postgres")
    return server.new_database()


@pytest.fixture
def store(location: str, tmp_path: Path) -> Iterator[BackendStore]:
    s = open_store(location, tmp_path)
    yield s
    s.close()


def test_open_store_default_is_the_sqlite_file_under_the_data_dir(tmp_path: Path) -> None:
    s = open_store(None, tmp_path / "data")
    try:
        assert isinstance(s, Storage)
        assert s.path == db_path(tmp_path / "data")
    finally:
        s.close()


def test_both_implementations_satisfy_the_protocol(store: BackendStore) -> None:
    assert isinstance(store, BackendStore)


def test_devices_count_handshakes_and_keep_first_seen(store: BackendStore) -> None:
    assert store.devices() == []
    store.record_handshake("dev-b", 10.0, "aa" * 32)
    store.record_handshake("dev-a", 11.0, "bb" * 32)
    store.record_handshake("dev-b", 12.5, "cc" * 32)
    assert store.devices() == [("dev-a", 11.0, 11.0, 1), ("dev-b", 10.0, 12.5, 2)]


def test_messages_round_trip_in_order_and_bump_last_seen(store: BackendStore) -> None:
    store.record_handshake("dev-1", 1.0, "00" * 32)
    payloads = [b"", b"\x00\xff" * 10, bytes(range(256))]
    ids = [store.store_message("dev-1", 2.0 + i, "telemetry", 3, 40 + i, p) for i, p in enumerate(payloads)]
    other = store.store_message("dev-2", 9.0, "reply", 0, 1, b"x")
    assert ids == sorted(ids) and len(set(ids)) == 3 and other > ids[-1]
    got = store.messages("dev-1")
    assert [m.id for m in got] == ids
    assert [(m.device_id, m.received_at, m.kind, m.epoch, m.seq, m.size, m.payload) for m in got] == [
        ("dev-1", 2.0 + i, "telemetry", 3, 40 + i, len(p), p) for i, p in enumerate(payloads)
    ]
    assert all(isinstance(m.payload, bytes) for m in got)
    assert [m.id for m in store.messages()] == [*ids, other]
    assert [m.id for m in store.messages(limit=2)] == ids[:2]
    assert store.count_messages() == 4
    assert store.count_messages("dev-1") == 3
    assert store.count_messages("nobody") == 0
    assert store.devices() == [("dev-1", 1.0, 4.0, 1)]


def test_large_epoch_and_seq_survive(store: BackendStore) -> None:
    # the record format allows partial IVs up to 5 bytes: more than a 32-bit column holds
    store.store_message("dev-1", 1.0, "telemetry", 2**31, 2**40 - 1, b"p")
    m = store.messages()[0]
    assert (m.epoch, m.seq) == (2**31, 2**40 - 1)


def test_recent_messages_are_the_newest_of_one_kind_oldest_first(store: BackendStore) -> None:
    for i in range(6):
        store.store_message("dev-1", float(i), "telemetry" if i % 2 == 0 else "reply", 0, i, bytes([i]))
    store.store_message("dev-2", 7.0, "telemetry", 0, 0, b"other")
    recent = store.recent_messages("dev-1", "telemetry", limit=2)
    assert [m.payload for m in recent] == [b"\x02", b"\x04"]
    assert store.recent_messages("dev-3", "telemetry") == []


def test_commands_queue_send_reply(store: BackendStore) -> None:
    c1 = store.queue_command("dev-1", "reboot", b"\xa0", 1.0)
    c2 = store.queue_command("dev-2", "blink", b"\x01", 2.0)
    c3 = store.queue_command("dev-1", "blink", b"\x02", 3.0)
    assert len({c1, c2, c3}) == 3
    assert store.pending_commands(set()) == []
    pending = store.pending_commands({"dev-1"})
    assert [(c.id, c.device_id, c.name, c.args, c.status, c.reply, c.created_at, c.sent_at) for c in pending] == [
        (c1, "dev-1", "reboot", b"\xa0", "queued", None, 1.0, None),
        (c3, "dev-1", "blink", b"\x02", "queued", None, 3.0, None),
    ]
    assert [c.id for c in store.pending_commands({"dev-1", "dev-2", "dev-9"})] == [c1, c2, c3]
    store.mark_command(c1, "sent", 4.0)
    assert [c.id for c in store.pending_commands({"dev-1"})] == [c3]
    # sent before resend_before and unanswered: due again
    assert [c.id for c in store.pending_commands({"dev-1"}, resend_before=4.5)] == [c1, c3]
    assert [c.id for c in store.pending_commands({"dev-1"}, resend_before=4.0)] == [c3]
    assert store.count_commands("queued") == 2 and store.count_commands("sent") == 1
    store.mark_command(c1, "replied", 5.0, b"\xf5")
    cmd = store.command(c1)
    assert cmd is not None and (cmd.status, cmd.reply, cmd.sent_at, cmd.replied_at) == ("replied", b"\xf5", 4.0, 5.0)
    store.mark_command(c1, "replied", 6.0)  # no reply given: the stored one stays
    cmd = store.command(c1)
    assert cmd is not None and cmd.reply == b"\xf5"
    assert store.command(c1 + c2 + c3 + 100) is None
    assert store.count_commands("replied") == 1
    with pytest.raises(ValueError):
        store.mark_command(c2, "pending", 7.0)


def test_commands_listed_requeued_and_expired(store: BackendStore) -> None:
    c1 = store.queue_command("dev-1", "a", b"", 1.0)
    c2 = store.queue_command("dev-1", "b", b"", 2.0)
    c3 = store.queue_command("dev-2", "c", b"", 3.0)
    store.mark_command(c1, "sent", 4.0)
    store.mark_command(c3, "sent", 4.0)
    assert [c.id for c in store.commands()] == [c1, c2, c3]
    assert [c.id for c in store.commands(device_id="dev-1")] == [c1, c2]
    assert [c.id for c in store.commands(state="sent")] == [c1, c3]
    assert [c.id for c in store.commands(device_id="dev-2", state="sent")] == [c3]
    assert [c.id for c in store.commands(command_id=c2)] == [c2]
    row = store.commands(command_id=c1)[0]
    assert (row.device_id, row.name, row.state, row.created_at, row.sent_at, row.replied_at, row.reply) == (
        "dev-1", "a", "sent", 1.0, 4.0, None, None)
    with pytest.raises(ValueError):
        store.commands(state="pending")
    assert store.requeue_commands("dev-1") == 1  # a new session: c1 goes out again
    assert [c.id for c in store.commands(state="queued")] == [c1, c2]
    expired = store.expire_commands(2.5)
    assert [(c.id, c.status) for c in expired] == [(c1, "queued"), (c2, "queued")]  # as they were
    assert [c.id for c in store.commands(state="expired")] == [c1, c2]
    assert store.expire_commands(2.5) == []
    assert [c.id for c in store.commands(state="sent")] == [c3]


def test_batches_store_messages_replies_and_ledgers_at_once(store: BackendStore) -> None:
    store.record_handshake("dev-1", 1.0, "00" * 32)
    cid = store.queue_command("dev-1", "x", b"", 1.5)
    assert store.ledger("dev-1") is None
    store.commit_batch(
        [NewMessage("dev-1", 2.0, "telemetry", 0, 5, b"a", 17),
         NewMessage("dev-1", 3.0, "telemetry", 0, 6, b"b", None)],
        [NewReply(cid, 3.5, b"\xf6")],
        {"dev-1": b"ledger-1", "dev-2": b"ledger-2"},
    )
    got = store.messages("dev-1")
    assert [(m.seq, m.payload, m.msg_id) for m in got] == [(5, b"a", 17), (6, b"b", None)]
    reply = store.command(cid)
    assert reply is not None and (reply.status, reply.reply, reply.replied_at) == ("replied", b"\xf6", 3.5)
    assert store.ledger("dev-1") == b"ledger-1" and store.ledger("dev-2") == b"ledger-2"
    assert store.devices()[0][2] == 3.0  # last_seen follows the batch
    store.commit_batch([], [], {"dev-1": b"ledger-1b"})
    assert store.ledger("dev-1") == b"ledger-1b"
    store.commit_batch([], [], {})
    assert store.count_messages() == 2


def test_a_failed_batch_stores_nothing(store: BackendStore) -> None:
    # the ledger (written last) violates NOT NULL: the messages inserted before it are rolled back
    with pytest.raises(Exception):  # noqa: B017 - each engine's driver raises its own error type
        store.commit_batch([NewMessage("dev-1", 1.0, "telemetry", 0, 1, b"a", 1)], [],
                           {"dev-1": None})  # type: ignore[dict-item]
    assert store.count_messages() == 0 and store.ledger("dev-1") is None
    store.commit_batch([NewMessage("dev-1", 1.0, "telemetry", 0, 1, b"a", 1)], [], {"dev-1": b"L"})
    assert store.count_messages() == 1  # the store is usable after the failure


def _media(device: str, tid: str, at: float, name: str = "img.jpg") -> MediaRecord:
    return MediaRecord(device, name, f"media/{device}/{tid}", "image/jpeg", 1234, "ab" * 32, True, 1700000000, at, tid)


def test_media_is_recorded_once_per_transfer(store: BackendStore) -> None:
    assert not store.has_media("dev-1", "t1")
    store.add_media(_media("dev-1", "t1", 2.0))
    store.add_media(_media("dev-2", "t1", 1.0, name="<script>"))
    store.add_media(_media("dev-1", "t1", 3.0, name="again"))  # a repeat of a finished transfer: ignored
    assert store.has_media("dev-1", "t1") and not store.has_media("dev-1", "t2")
    got = store.media()
    assert got == [_media("dev-2", "t1", 1.0, name="<script>"), _media("dev-1", "t1", 2.0)]
    assert isinstance(got[0].signature_verified, bool)


def test_data_survives_reopening(location: str, tmp_path: Path) -> None:
    first = open_store(location, tmp_path)
    first.record_handshake("dev-1", 1.0, "00" * 32)
    mid = first.store_message("dev-1", 2.0, "telemetry", 0, 0, b"kept")
    cid = first.queue_command("dev-1", "x", b"", 3.0)
    first.close()
    second = open_store(location, tmp_path)  # the schema is created again: a no-op
    try:
        assert [m.id for m in second.messages()] == [mid]
        assert second.command(cid) is not None
        assert second.devices()[0][0] == "dev-1"
        assert second.store_message("dev-1", 4.0, "telemetry", 0, 1, b"next") > mid
    finally:
        second.close()


# -- PostgreSQL: several workers on one database ----------------------------------------------------

@needs_postgres
def test_workers_starting_together_create_the_schema_once(postgres: PostgresProcess, tmp_path: Path) -> None:
    url = postgres.new_database()
    stores: list[BackendStore] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            stores.append(open_store(url, tmp_path))
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert len(stores) == 4
    finally:
        for s in stores:
            s.close()


@needs_postgres
def test_workers_writing_at_once_lose_nothing_and_share_one_id_space(postgres: PostgresProcess,
                                                                      tmp_path: Path) -> None:
    url = postgres.new_database()
    workers = [open_store(url, tmp_path) for _ in range(3)]
    per_worker = 60
    ids: list[list[int]] = [[] for _ in workers]

    def run(w: int) -> None:
        for i in range(per_worker):
            ids[w].append(workers[w].store_message(f"dev-{i % 5}", float(i), "telemetry", w, i, bytes([w, i])))
            workers[w].record_handshake(f"dev-{i % 5}", float(i), "00" * 32)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        every = [i for w in ids for i in w]
        assert len(set(every)) == len(workers) * per_worker
        assert workers[0].count_messages() == len(workers) * per_worker
        stored = {(m.epoch, m.seq) for m in workers[1].messages(limit=10_000)}
        assert stored == {(w, i) for w in range(len(workers)) for i in range(per_worker)}
        assert sum(hs for *_, hs in workers[2].devices()) == len(workers) * per_worker
    finally:
        for s in workers:
            s.close()


@needs_postgres
def test_a_store_reconnects_after_the_server_drops_its_connection(postgres: PostgresProcess,
                                                                   tmp_path: Path) -> None:
    import psycopg

    url = postgres.new_database()
    s = open_store(url, tmp_path)
    try:
        s.store_message("dev-1", 1.0, "telemetry", 0, 0, b"a")
        with psycopg.connect(url, autocommit=True) as admin:  # what a server restart does to a worker
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        with pytest.raises(psycopg.OperationalError):
            s.count_messages()  # the call in flight fails (the caller retries or redelivers)
        assert s.count_messages() == 1  # the next one runs on a new connection
        s.store_message("dev-1", 2.0, "telemetry", 0, 1, b"b")
        assert s.count_messages() == 2
    finally:
        s.close()


def test_stored_bytes_count_telemetry_and_media_per_device(store: BackendStore) -> None:
    # the per-device storage quota (backend/quotas.py) reads this on both implementations
    assert store.stored_bytes("dev-1") == 0
    store.store_message("dev-1", 1.0, "telemetry", 0, 1, b"x" * 100)
    store.store_message("dev-2", 1.0, "telemetry", 0, 1, b"y" * 7)
    store.add_media(_media("dev-1", "t1", 2.0))
    assert store.stored_bytes("dev-1") == 100 + 1234
    assert store.stored_bytes("dev-2") == 7
    assert store.stored_bytes("nobody") == 0
