"""runtime.files.atomic_write: the one way the project replaces a file (mode, atomicity, cleanup)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from runtime import files
from runtime.files import atomic_write


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secret_is_0600_and_public_keeps_its_mode(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        atomic_write(tmp_path / "key", b"secret")
        atomic_write(tmp_path / "cert", b"public", mode=0o644)
    finally:
        os.umask(old_umask)
    assert _mode(tmp_path / "key") == 0o600
    assert _mode(tmp_path / "cert") == 0o644
    assert (tmp_path / "key").read_bytes() == b"secret"


def test_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "users"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state"
    target.write_bytes(b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_durable_write_syncs_the_file_and_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[bool] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", spy)
    atomic_write(tmp_path / "f", b"x")
    assert synced == [False, True]
    synced.clear()
    atomic_write(tmp_path / "g", b"x", durable=False)
    assert synced == []
