"""The backend service on PostgreSQL: the whole system end to end with the shared database instead of SQLite.

A real broker (embedded amqtt), the real backend service with ``BackendSettings.db`` set to a real
PostgreSQL database (``tests/postgres.py``), real device agents. What the service stores is what the
``sealmq backend ... --db URL`` tools read, and it is still there after the service restarts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.cli import main as sealmq_main
from backend.storage_pg import PostgresStorage
from sealmq import cbor
from tests.e2e import System, wait_for
from tests.postgres import PostgresProcess, needs_postgres, postgres

__all__ = ["postgres"]  # the session fixture, imported for pytest

pytestmark = [pytest.mark.slow, needs_postgres]


@pytest.fixture
def system(postgres: PostgresProcess, tmp_path: Path) -> Iterator[System]:
    sys_ = System(tmp_path, ["cam-1", "cam-2"])
    sys_.db = postgres.new_database()
    try:
        yield sys_
    finally:
        sys_.close()


def values(system: System, device_id: str) -> list[object]:
    assert system.backend is not None
    return [cbor.loads(m.payload)["v"]["n"] for m in system.backend.storage.messages(device_id)]


def test_backend_on_postgres_stores_serves_commands_and_survives_a_restart(
        system: System, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backend = system.start_backend()
    assert isinstance(backend.storage, PostgresStorage)
    a, b = system.agent("cam-1"), system.agent("cam-2")
    for n in range(4):
        a.send_telemetry({"n": n})
        b.send_telemetry({"n": 10 + n})
    assert wait_for(lambda: len(values(system, "cam-1")) == 4 and len(values(system, "cam-2")) == 4, 15)
    cmd = backend.send_command("cam-2", "status", {"why": "test"})
    assert wait_for(lambda: (c := backend.storage.command(cmd)) is not None and c.status == "replied", 15)
    assert not (system.dep.backend_data / "backend.sqlite3").exists()  # nothing went to the embedded default

    system.stop_backend()
    backend = system.start_backend()
    assert values(system, "cam-1") == [0, 1, 2, 3] and values(system, "cam-2") == [10, 11, 12, 13]
    a.send_telemetry({"n": 99})  # no session on the new backend: the device re-handshakes
    assert wait_for(lambda: "cam-1" in backend.endpoint.sessions, 15)
    a.send_telemetry({"n": 4})
    assert wait_for(lambda: values(system, "cam-1")[-1:] == [4], 15)
    devices = {d: hs for d, _, _, hs in backend.storage.devices()}
    assert devices == {"cam-1": 2, "cam-2": 1}

    # the inspection tools read the same database
    capsys.readouterr()
    assert system.db is not None
    assert sealmq_main(["backend", "messages", "--db", system.db, "--device", "cam-2", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert '"n": 13' in out and '"n": 11' not in out  # the last two of cam-2's four
    assert "of 4 stored" in out
    assert sealmq_main(["backend", "devices", "--db", system.db]) == 0
    assert "cam-1" in capsys.readouterr().out
    assert sealmq_main(["backend", "command", "--db", system.db, "cam-1", "status"]) == 0
    assert wait_for(lambda: backend.storage.count_commands("replied") == 2, 15)
