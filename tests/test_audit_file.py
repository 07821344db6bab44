"""The audit trail's file: appended line by line, rotated, private, and never in the caller's way."""

from __future__ import annotations

import json
import logging
import shutil
import stat
from pathlib import Path

import pytest

from runtime.audit import AuditLog, read_audit


def _trail(path: Path, backups: int) -> list[dict[str, object]]:
    """Every entry still on disk, oldest first (log.<backups> ... log.1, log)."""
    files = [path.with_name(f"{path.name}.{i}") for i in range(backups, 0, -1)] + [path]
    return [entry for f in files for entry in read_audit(f)]


def test_entries_rotate_through_the_backups_oldest_dropped_all_private(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "log.jsonl"
    audit = AuditLog(path, component="backend", max_bytes=600, backups=2, throttle=None)
    for i in range(40):
        audit.event("handshake_completed", device=f"dev-{i:02d}", suite=6)
    audit.close()
    sizes = {p.name: p.stat().st_size for p in path.parent.iterdir()}
    assert set(sizes) == {"log.jsonl", "log.jsonl.1", "log.jsonl.2"}  # no log.jsonl.3: dropped
    assert all(0 < size <= 600 for size in sizes.values())
    kept = [e["device"] for e in _trail(path, 2)]
    # the newest entries, in order, with nothing lost between the files that are kept
    assert kept == [f"dev-{i:02d}" for i in range(40 - len(kept), 40)] and len(kept) >= 12
    for p in path.parent.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    # each line is one whole JSON entry
    for p in path.parent.iterdir():
        for line in p.read_text().splitlines():
            assert json.loads(line)["component"] == "backend"


def test_an_existing_trail_is_appended_to_and_its_size_counts(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    first = AuditLog(path, component="device", max_bytes=10_000, throttle=None)
    first.event("started")
    first.close()
    size = path.stat().st_size
    second = AuditLog(path, component="device", max_bytes=size + 10, throttle=None)
    second.event("started")  # the file plus this entry exceed max_bytes: rotated first
    second.close()
    assert [e["event"] for e in read_audit(path.with_name("log.jsonl.1"))] == ["started"]
    assert [e["event"] for e in read_audit(path)] == ["started"]


def test_a_trail_that_cannot_be_written_does_not_stop_the_caller_and_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit" / "log.jsonl"
    audit = AuditLog(path, component="backend", max_bytes=300, backups=1, throttle=None)
    audit.event("started")
    shutil.rmtree(path.parent)  # the next rotation cannot rename: the write fails
    with caplog.at_level(logging.ERROR, logger="sealmq.audit"):
        for _ in range(5):
            audit.event("handshake_completed", device="dev-1", suite=6)
    assert [r.message for r in caplog.records].count(f"cannot write the audit trail {path}") == 1  # once
    assert audit.counts["handshake_completed"] == 5  # counted all the same
    path.parent.mkdir()
    audit.event("handshake_completed", device="dev-2", suite=6)
    audit.close()
    assert read_audit(path)[-1]["device"] == "dev-2"
