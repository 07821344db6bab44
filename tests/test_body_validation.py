"""Sealed bodies are decoded with the core codecs (sealmq.bodies) on both sides: what the backend
stores is a valid telemetry body, what it and the device refuse is audited, and a reply naming a
command id SQLite cannot hold is a typed rejection, not an OverflowError (issue 18, the refactor's
leftovers). Real broker, real agent and service, real PKI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from runtime.audit import read_audit
from sealmq import cbor
from sealmq.bodies import MAX_COMMAND_ID, Command, decode_reply
from sealmq.errors import LocalProtocolError
from sealmq.topics import RecordKind
from tests.e2e import System, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    sys_ = System(tmp_path_factory.mktemp("sys"), ["cam-1"])
    try:
        sys_.start_backend()
        sys_.agent("cam-1")
        yield sys_
    finally:
        sys_.close()


def _rejections(system: System, stage: str) -> list[dict[str, Any]]:
    return [e for e in system.audit() if e["event"] == "message_rejected" and e.get("stage") == stage]


def _agent(system: System) -> Any:
    return next(iter(system.agents.values()))


# {"t": 1.5 as a float64 (fb 3ff8...), "v": {}}: 1.5 has a shorter exact form (f9 3e00)
FLOAT64_T = bytes.fromhex("a2" "6174" "fb3ff8000000000000" "6176" "a0")
UNSORTED = bytes.fromhex("a2" "6176" "a0" "6174" "01")  # "v" before "t"
BAD_TELEMETRY = {
    "float64": (FLOAT64_T, "not_deterministic"),
    "unsorted keys": (UNSORTED, "not_deterministic"),
    "array": (cbor.dumps([1, {}]), "bad_body"),
    "not cbor": (b"\xff\x00garbage", "malformed"),
    "extra key": (cbor.dumps({"t": 1, "v": {}, "x": 0}), "bad_body"),
}


def test_only_valid_telemetry_is_stored_the_rest_is_audited(system: System) -> None:
    backend, agent = system.backend, _agent(system)
    assert backend is not None
    before = backend.storage.count_messages("cam-1")
    for data, _ in BAD_TELEMETRY.values():
        agent.send(RecordKind.TELEMETRY, data)
    agent.send_telemetry({"n": 1})
    assert wait_for(lambda: backend.storage.count_messages("cam-1") == before + 1
                    and len(_rejections(system, "telemetry")) >= len(BAD_TELEMETRY))
    reasons = sorted(e["reason"] for e in _rejections(system, "telemetry"))
    assert reasons == sorted(reason for _, reason in BAD_TELEMETRY.values())
    stored = backend.storage.messages("cam-1")[-1]
    assert cbor.loads(stored.payload)["v"] == {"n": 1}
    # the session survives: the device still gets through
    agent.send_telemetry({"n": 2})
    assert wait_for(lambda: backend.storage.count_messages("cam-1") == before + 2)


def test_backend_messages_cli_shows_the_decoded_body(system: System) -> None:
    backend = system.backend
    assert backend is not None
    n = backend.storage.count_messages("cam-1")
    _agent(system).send_telemetry({"n": 42})
    assert wait_for(lambda: backend.storage.count_messages("cam-1") == n + 1)
    out = subprocess.run([sys.executable, "-m", "app.cli", "backend", "messages", "--data",
                          str(system.dep.backend_data)], capture_output=True, text=True, check=True)
    assert '"v": {"n": 42}' in out.stdout
    assert "bytes" not in out.stdout


@pytest.mark.parametrize(("body", "reason"), [
    ([MAX_COMMAND_ID + 1, True, None, 1], "bad_body"),  # was an OverflowError from SQLite in the MQTT thread
    ([2**64 - 1, False, "x", 1], "bad_body"),
    ([-1, True, None, 1], "bad_body"),
    ([1, "yes", None, 1], "bad_body"),
    ([1, True, None], "bad_body"),  # no message id
    # well formed, but no such command of this device (a message id above the agent's own: ids at or
    # below the backend's ledger mark would be dropped as repeats before the command is looked up)
    ([987654, True, None, 2**62], "unknown_command"),
])
def test_bad_replies_are_typed_audited_rejections(system: System, body: list[Any], reason: str) -> None:
    backend, agent = system.backend, _agent(system)
    assert backend is not None
    n = len(_rejections(system, "reply"))
    agent.send(RecordKind.REPLY, cbor.dumps(body))
    assert wait_for(lambda: len(_rejections(system, "reply")) == n + 1)
    assert _rejections(system, "reply")[-1]["reason"] == reason
    assert backend.endpoint.sessions.get("cam-1") is not None  # nothing else harmed


def test_a_record_kind_the_backend_has_no_use_for_is_audited(system: System) -> None:
    backend = system.backend
    assert backend is not None
    # a reply is the only kind of the data channel besides telemetry the backend consumes; a
    # handler-less kind reaching dispatch is audited with the Reason member
    from sealmq.endpoint import Received

    backend._on_record(Received("cam-1", RecordKind.KEY_UPDATE, b"", 0, 0), 0.0)
    entry = _rejections(system, "dispatch")[-1]
    assert entry["reason"] == "unexpected_kind"


def test_commands_and_replies_go_through_the_codecs(system: System) -> None:
    backend, agent = system.backend, _agent(system)
    assert backend is not None
    agent.commands["boom"] = lambda args: 1 / 0
    agent.commands["weird"] = lambda args: {1, 2}  # not plain CBOR data: answered as a failure
    ids = [backend.send_command("cam-1", name, args) for name, args in
           (("ping", None), ("status", None), ("nope", [1]), ("boom", None), ("weird", None))]
    assert wait_for(lambda: all(backend.storage.command(i).status == "replied" for i in ids))  # type: ignore[union-attr]
    replies = [decode_reply(backend.storage.command(i).reply or b"") for i in ids]  # type: ignore[union-attr]
    assert [(r.ok, r.value) for r in replies[:1]] == [(True, "pong")]
    assert replies[1].ok and replies[1].value["device"] == "cam-1"
    assert [r.error for r in replies[2:]] == ["unknown command nope", "ZeroDivisionError", "unencodable result"]
    with pytest.raises(LocalProtocolError):
        backend.send_command("cam-1", "x" * 65)  # the device would refuse it: not queued


def test_device_refuses_a_command_id_sqlite_cannot_hold(system: System) -> None:
    backend = system.backend
    assert backend is not None
    log = system.dep.device_state("cam-1") / "device_log.jsonl"

    def rejected() -> list[dict[str, Any]]:
        return [e for e in read_audit(log) if e["event"] == "command_rejected"]

    n = len(rejected())
    body = cbor.dumps([MAX_COMMAND_ID + 1, "ping", None])  # Command() refuses to build it; sealed raw
    with pytest.raises(LocalProtocolError):
        Command(MAX_COMMAND_ID + 1, "ping")
    backend.seal_to("cam-1", RecordKind.COMMAND, body)
    assert wait_for(lambda: len(rejected()) == n + 1)
    assert rejected()[-1]["reason"] == "bad_body"


def test_an_unsendable_queued_command_fails_once(system: System) -> None:
    backend = system.backend
    assert backend is not None
    # queued behind the service's back (as `sealmq backend command` writes to the database)
    cid = backend.storage.queue_command("cam-1", "y" * 100, cbor.dumps(None), 0.0)
    assert wait_for(lambda: backend.storage.command(cid).status == "failed")  # type: ignore[union-attr]
    assert [e["id"] for e in system.audit() if e["event"] == "command_failed"] == [cid]


def test_rejected_bodies_stay_out_of_the_audit_log(system: System) -> None:
    # rejected bodies leave an audit entry with the reason, never the payload
    text = (system.dep.backend_data / "audit" / "server_log.jsonl").read_text()
    assert "garbage" not in text and FLOAT64_T.hex() not in text
