"""The storage contract: SQLite (the embedded default) and PostgreSQL (several workers) answer alike.

Every test runs against both implementations of :class:`backend.store.BackendStore`; PostgreSQL is a
real server started by the test session (``tests/postgres.py``). The last tests are PostgreSQL's own:
several workers (connections) writing at once, the schema created by workers starting together, and a
connection that survives a server restart.
"""

from __future__ import annotations

import itertools
import random
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.storage import CommitResult, MediaRecord, NewHandshake, NewMessage, NewReply, Storage, db_path
from backend.store import BackendStore, open_store
from sealmq.delivery import Ledger
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


def test_a_batch_records_its_handshakes_first_as_record_handshake_does(store: BackendStore) -> None:
    """The handshakes a batch carries (the service queues them with the next ingest batch rather
    than a transaction of their own): counted, in order, before the batch's messages, so a new
    device's first message already has its row (its last_seen follows the message)."""
    store.record_handshake("dev-b", 10.0, "aa" * 32)
    msg = NewMessage("dev-new", 21.0, "telemetry", 0, 1, b"t", 1)
    store.commit_batch([msg], [], [NewHandshake("dev-new", 20.0, "dd" * 32), NewHandshake("dev-b", 20.5, "ee" * 32),
                                   NewHandshake("dev-b", 20.7, "ff" * 32)])
    assert store.devices() == [("dev-b", 10.0, 20.7, 3), ("dev-new", 20.0, 21.0, 1)]
    assert [m.payload for m in store.messages("dev-new")] == [b"t"]
    store.commit_batch([], [], [NewHandshake("dev-c", 30.0, "11" * 32)])  # nothing but a handshake
    assert store.devices()[1:] == [("dev-c", 30.0, 30.0, 1), ("dev-new", 20.0, 21.0, 1)]


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
    assert [c.id for c in store.pending_commands(None)] == [c1, c2, c3]  # of every device
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


def test_batches_store_what_is_new_and_merge_the_ledgers(store: BackendStore) -> None:
    store.record_handshake("dev-1", 1.0, "00" * 32)
    cid = store.queue_command("dev-1", "x", b"", 1.5)
    other = store.queue_command("dev-2", "y", b"", 1.5)
    assert store.ledger("dev-1") is None
    a = NewMessage("dev-1", 2.0, "telemetry", 0, 5, b"a", 17)
    legacy = NewMessage("dev-1", 3.0, "telemetry", 0, 6, b"b", None)  # no id: always stored
    again = NewMessage("dev-1", 3.1, "telemetry", 0, 7, b"a", 17)  # a repeat within the batch
    b = NewMessage("dev-2", 3.2, "telemetry", 0, 1, b"c", 1)
    reply = NewReply("dev-1", cid, 3.5, b"\xf6", 18)
    stray = NewReply("dev-1", other, 3.6, b"\xf6", 19)  # another device's command
    nowhere = NewReply("dev-2", cid + other + 100, 3.7, b"\xf6", 2)  # no such command
    result = store.commit_batch([a, legacy, again, b], [reply, stray, nowhere])
    assert result.stored == [a, legacy, b] and result.duplicates == [again]
    assert result.replied == [reply] and sorted(result.unknown, key=lambda r: r.msg_id) == [nowhere, stray]
    assert sorted(result.ledgers) == ["dev-1", "dev-2"]
    assert (result.ledgers["dev-1"].mark, result.ledgers["dev-1"].above) == (0, {17, 18, 19})
    assert (result.ledgers["dev-2"].mark, result.ledgers["dev-2"].above) == (2, set())
    got = store.messages("dev-1")
    assert [(m.seq, m.payload, m.msg_id) for m in got] == [(5, b"a", 17), (6, b"b", None)]
    replied = store.command(cid)
    assert replied is not None and (replied.status, replied.reply, replied.replied_at) == ("replied", b"\xf6", 3.5)
    untouched = store.command(other)
    assert untouched is not None and untouched.status == "queued"
    assert store.ledger("dev-1") == result.ledgers["dev-1"].encode()
    assert store.ledger("dev-2") == result.ledgers["dev-2"].encode()
    assert store.devices()[0][2] == 3.2  # last_seen follows the batch (its newest stored message)

    # everything again, plus one new message and a second reply (new id) to the replied command
    late = NewReply("dev-1", cid, 4.0, b"\xf5", 20)
    c = NewMessage("dev-1", 4.1, "telemetry", 0, 8, b"d", 21)
    result = store.commit_batch([a, b, c], [reply, late])
    assert result.stored == [c] and result.replied == [] and result.unknown == []
    assert sorted(map(id, result.duplicates)) == sorted(map(id, [a, b, reply, late]))
    assert store.command(cid).reply == b"\xf6"  # type: ignore[union-attr]  # the first reply stays
    assert result.ledgers["dev-1"].above == {17, 18, 19, 20, 21}
    assert store.count_messages() == 4
    empty = store.commit_batch([], [])
    assert (empty.stored, empty.duplicates, empty.ledgers) == ([], [], {})


def test_a_replied_command_stays_replied(store: BackendStore) -> None:
    # the service marks a command sent (a resend, under its lock) just after the ingest committed
    # the command's reply (outside that lock, or on another worker): the reply wins
    cid = store.queue_command("dev-1", "x", b"", 1.0)
    store.mark_command(cid, "sent", 2.0)
    store.commit_batch([], [NewReply("dev-1", cid, 3.0, b"\xf6", 1)])
    for status in ("sent", "queued", "failed"):
        store.mark_command(cid, status, 4.0)
    cmd = store.command(cid)
    assert cmd is not None and (cmd.status, cmd.reply, cmd.sent_at, cmd.replied_at) == ("replied", b"\xf6", 2.0, 3.0)


def test_a_failed_batch_records_nothing(store: BackendStore) -> None:
    # the second message violates NOT NULL: the first one, and both ids, are rolled back
    with pytest.raises(Exception):  # noqa: B017 - each engine's driver raises its own error type
        store.commit_batch([NewMessage("dev-1", 1.0, "telemetry", 0, 1, b"a", 1),
                            NewMessage("dev-1", 1.0, None, 0, 2, b"b", 2)], [])  # type: ignore[arg-type]
    assert store.count_messages() == 0 and store.ledger("dev-1") is None
    result = store.commit_batch([NewMessage("dev-1", 1.0, "telemetry", 0, 1, b"a", 1)], [])
    assert len(result.stored) == 1 and store.count_messages() == 1  # usable after the failure; id 1 is new


_ROW = ("INSERT INTO messages(device_id, received_at, kind, epoch, seq, size, payload, msg_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


def _sql(location: str, kind: str, statements: list[tuple[str, tuple[object, ...]]]) -> None:
    """Run statements on the store's database behind its back (one transaction), as an operator could."""
    if kind == "sqlite":
        with sqlite3.connect(location) as lite:
            for statement, params in statements:
                lite.execute(statement, params)
        return
    import psycopg

    with psycopg.connect(location) as conn:
        for statement, params in statements:
            conn.execute(statement.replace("?", "%s"), params)


def test_a_row_its_ledger_does_not_know_is_a_duplicate_not_a_failure(store: BackendStore, location: str,
                                                                      kind: str) -> None:
    first = NewMessage("dev-1", 1.0, "telemetry", 0, 1, b"a", 1)
    store.commit_batch([first], [])
    _sql(location, kind, [("DELETE FROM ledgers WHERE device_id=?", ("dev-1",))])  # a ledger reset by hand
    second = NewMessage("dev-1", 2.0, "telemetry", 0, 2, b"b", 2)
    result = store.commit_batch([first, second], [])  # the unique index refuses id 1 again
    assert result.stored == [second] and result.duplicates == [first]
    assert result.ledgers["dev-1"].mark == 2
    assert [m.msg_id for m in store.messages()] == [1, 2]


def test_the_unique_index_holds_even_behind_the_stores_back(store: BackendStore, location: str, kind: str) -> None:
    store.commit_batch([NewMessage("dev-1", 1.0, "telemetry", 0, 1, b"a", 7)], [])
    row = _ROW
    with pytest.raises(Exception, match=r"(?i)unique"):
        _sql(location, kind, [(row, ("dev-1", 2.0, "telemetry", 0, 2, 1, b"b", 7))])
    _sql(location, kind, [(row, ("dev-1", 2.0, "telemetry", 0, 2, 1, b"b", None)),  # ids NULL: rows from
                          (row, ("dev-1", 2.0, "telemetry", 0, 3, 1, b"c", None))])  # before ids existed
    assert store.count_messages() == 3


def test_an_older_database_with_repeats_starts_and_sets_them_aside(location: str, kind: str, tmp_path: Path) -> None:
    """A database made before the unique index, holding rows repeated by workers that raced: the
    store starts, the repeats (all but the first row of a device and id) move to
    messages_repeated, and the index is then in place."""
    s = open_store(location, tmp_path)
    s.close()
    row = _ROW
    rows = [("dev-1", 1.0, 1, b"a", 1), ("dev-1", 2.0, 2, b"b", 2), ("dev-1", 3.0, 3, b"a'", 1),
            ("dev-2", 4.0, 1, b"c", 1), ("dev-1", 5.0, 4, b"a''", 1), ("dev-1", 6.0, 5, b"x", None),
            ("dev-1", 7.0, 6, b"y", None), ("dev-2", 8.0, 2, b"c'", 1)]
    _sql(location, kind, [("DROP INDEX messages_msg_id", ()),  # the indexes of an older version
                          ("CREATE INDEX messages_device ON messages(device_id, received_at)", ()),
                          *[(row, (d, at, "telemetry", 0, seq, len(p), p, mid)) for d, at, seq, p, mid in rows]])
    s = open_store(location, tmp_path)
    try:
        assert s.set_aside == 3  # type: ignore[attr-defined]
        assert [(m.device_id, m.payload, m.msg_id) for m in s.messages()] == [
            ("dev-1", b"a", 1), ("dev-1", b"b", 2), ("dev-2", b"c", 1), ("dev-1", b"x", None), ("dev-1", b"y", None)]
        with pytest.raises(Exception, match=r"(?i)unique"):
            _sql(location, kind, [(row, ("dev-1", 9.0, "telemetry", 0, 9, 1, b"z", 2))])
    finally:
        s.close()
    if kind == "sqlite":
        with sqlite3.connect(location) as lite:
            aside = lite.execute("SELECT payload, received_at FROM messages_repeated ORDER BY id").fetchall()
            indexes = {r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE tbl_name='messages'"
                                                  " AND type='index' AND sql IS NOT NULL")}
    else:
        import psycopg

        with psycopg.connect(location) as conn:
            aside = conn.execute("SELECT payload, received_at FROM messages_repeated ORDER BY id").fetchall()
            indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename='messages'"
                                                  " AND indexname <> 'messages_pkey'")}
    assert [(bytes(p), at) for p, at in aside] == [(b"a'", 3.0), (b"a''", 5.0), (b"c'", 8.0)]
    assert indexes == {"messages_msg_id"}  # it replaces messages_device (device_id, received_at)
    again = open_store(location, tmp_path)  # the index is there: nothing to do
    try:
        assert again.set_aside == 0  # type: ignore[attr-defined]
    finally:
        again.close()


# -- exactly once across writers: two connections (two workers) on one database -------------------

_example = itertools.count()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 1), st.lists(st.tuples(st.integers(0, 2), st.integers(1, 40),
                                                                 st.booleans()), max_size=12)),
                min_size=1, max_size=12))
def test_batches_through_two_connections_agree_with_a_model(location: str, tmp_path: Path,
                                                            batches: list[tuple[int, list[tuple[int, int, bool]]]],
                                                            ) -> None:
    """Batches (with repeats within and across them, telemetry and replies of one id space per
    device) committed alternately through two connections: each id is new exactly once, whichever
    connection committed it before, and the results, ledgers and rows agree with a plain set."""
    n = next(_example)  # fresh devices per example, on the same database
    writers = [open_store(location, tmp_path), open_store(location, tmp_path)]
    try:
        devices = [f"h{n}-dev-{d}" for d in range(3)]
        command = {d: writers[0].queue_command(d, "c", b"", 0.0) for d in devices}
        seen: dict[str, set[int]] = {d: set() for d in devices}
        replied: set[str] = set()
        for w, items in batches:
            messages = [NewMessage(devices[d], 1.0, "telemetry", 0, i, b"p", i) for d, i, is_reply in items
                        if not is_reply]
            replies = [NewReply(devices[d], command[devices[d]], 1.0, b"r", i) for d, i, is_reply in items if is_reply]
            result = writers[w].commit_batch(messages, replies)
            given_: list[NewMessage | NewReply] = [*messages, *replies]  # the order the store takes them in
            outcome = [*result.stored, *result.replied, *result.unknown, *result.duplicates]
            assert sorted(map(id, outcome)) == sorted(map(id, given_))  # each item in exactly one list
            assert result.unknown == []
            for item in given_:
                first = item.msg_id not in seen[item.device_id]
                seen[item.device_id].add(item.msg_id)  # type: ignore[arg-type]
                if isinstance(item, NewMessage):
                    assert any(item is m for m in result.stored) is first
                else:
                    assert any(item is r for r in result.replied) is (first and item.device_id not in replied)
                    if first:
                        replied.add(item.device_id)
            assert sorted(result.ledgers) == sorted({item.device_id for item in given_})
            for d, ledger in result.ledgers.items():
                assert all(ledger.seen(i) for i in seen[d]) and ledger.above | set(range(1, ledger.mark + 1)) == seen[d]
        for d in devices:
            rows = writers[1].messages(d, limit=10_000)
            assert len(rows) == len({m.msg_id for m in rows})
            data = writers[0].ledger(d)
            if seen[d]:
                assert data is not None and all(Ledger.decode(data).seen(i) for i in seen[d])
    finally:
        for s in writers:
            s.close()


def test_two_workers_committing_the_same_device_at_once_store_each_message_once(location: str,
                                                                               tmp_path: Path) -> None:
    """Two writers (connections, as two workers have), each in its own thread, commit overlapping
    batches of the same devices' messages and replies at the same moment, round after round: every
    id is stored exactly once, every commit result is consistent, the final ledgers cover every id
    and the two never deadlock (PostgreSQL: devices and commands are locked in one order)."""
    rng = random.Random(14)
    writers = [open_store(location, tmp_path), open_store(location, tmp_path)]
    devices = ["dev-a", "dev-b", "dev-c"]
    rounds, per_round = 40, 60  # a round's ids are within one window (MESSAGE_WINDOW = 256)
    telemetry = {d: set[int]() for d in devices}  # every telemetry id sent, to one worker or both
    plans: list[list[list[tuple[list[NewMessage], list[NewReply]]]]] = [[], []]
    commands: list[int] = []
    for r in range(rounds):
        ids = range(r * per_round + 1, (r + 1) * per_round)  # the round's last id: dev-b's reply
        for d in devices:
            telemetry[d] |= set(ids)
        cmd = writers[0].queue_command("dev-b", "c", b"", float(r))
        commands.append(cmd)
        for w in (0, 1):
            # worker i % 2 always gets id i, the other one most of the time; and a few old ids again
            messages = [NewMessage(d, float(r), "telemetry", w, i, bytes([w]), i) for d in devices for i in ids
                        if w == i % 2 or rng.random() < 0.6]
            messages += [NewMessage(d, float(r), "telemetry", w, i, b"old", i) for d in devices
                         for i in rng.sample(sorted(telemetry[d] - set(ids)), min(r * (per_round - 1), 5))]
            rng.shuffle(messages)
            reply = NewReply("dev-b", cmd, float(r), bytes([w]), (r + 1) * per_round)  # to both workers
            cut = rng.randrange(len(messages) + 1)
            plans[w].append([(messages[:cut], [reply]), (messages[cut:], [])])
    results: list[list[tuple[list[NewMessage | NewReply], CommitResult]]] = [[], []]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2, timeout=60)

    def work(w: int) -> None:
        try:
            for batches in plans[w]:
                barrier.wait()  # both workers commit the round at the same moment
                for messages, replies in batches:
                    results[w].append(([*messages, *replies], writers[w].commit_batch(messages, replies)))
        except BaseException as e:  # asserted below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    try:
        assert errors == [] and not any(t.is_alive() for t in threads)
        stored: dict[str, list[int]] = {d: [] for d in devices}
        replied: list[int] = []
        for given_, result in results[0] + results[1]:
            outcome = [*result.stored, *result.replied, *result.unknown, *result.duplicates]
            assert sorted(map(id, outcome)) == sorted(map(id, given_))  # each item in exactly one list
            assert result.unknown == []
            for m in result.stored:
                stored[m.device_id].append(m.msg_id or 0)
            replied += [r.command_id for r in result.replied]
            # the ACK a worker sends covers everything it was given, whoever committed it
            assert all(result.ledgers[item.device_id].seen(item.msg_id or 0) for item in given_)
        for d in devices:
            assert sorted(stored[d]) == sorted(telemetry[d])  # each id stored by exactly one worker
            assert sorted(m.msg_id or 0 for m in writers[0].messages(d, limit=100_000)) == sorted(telemetry[d])
            final = Ledger.decode(writers[1].ledger(d) or b"")
            assert all(final.seen(i) for i in telemetry[d])
        assert sorted(replied) == commands  # each command replied once, by one of the two workers
        assert {c.state for c in writers[1].commands(device_id="dev-b")} == {"replied"}
    finally:
        for s in writers:
            s.close()


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


def _open_storage(path: str, go: object, out: object) -> None:
    go.wait()  # type: ignore[attr-defined]
    try:
        Storage(Path(path)).close()
        out.put("ok")  # type: ignore[attr-defined]
    except Exception as exc:  # reported to the test, which shows it
        out.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]


def test_two_processes_open_one_new_sqlite_file_at_once(tmp_path: Path) -> None:
    """Backend workers started together on one data folder: both open the new database at the same
    moment. SQLite refused the second switch to WAL with "database is locked" at once (about 1 open
    in 8 here, which failed a worker's start); Storage now waits for it. 40 rounds of 2 processes:
    without the wait, some round fails with near certainty."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    outcomes: list[str] = []
    for i in range(40):
        path = str(tmp_path / f"round-{i}.db")
        go, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_open_storage, args=(path, go, out)) for _ in range(2)]
        for p in procs:
            p.start()
        go.set()
        outcomes += [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
    assert outcomes == ["ok"] * 80, sorted(set(outcomes))
