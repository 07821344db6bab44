"""One durable atomic file write, for everything that persists a file (PKI, broker users,
media state, bootstrap secrets); private directories and files for plaintext at rest; and a
file watch for the trust files both endpoints reload.

The data goes to a temp file in the same directory (created with the requested mode, 0600 for
secrets, so it is never readable by others even for a moment), is fsynced, renamed over the
target, and the directory is fsynced: after a crash the file is either the old one or the new
one, never empty or half written.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path | str) -> Path:
    """Create ``path`` (and missing parents) 0700, and tighten it to 0700 if it exists looser.

    Decrypted payloads, audit trails and transfer state live under such directories: under the
    usual umask 022 a plain ``mkdir`` would leave them listable and readable by every local user.
    A directory we do not own is left alone (its owner decides).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    private_mode(path, PRIVATE_DIR)
    return path


def private_mode(path: Path | str, mode: int = PRIVATE_FILE) -> None:
    """Tighten an existing file or directory to ``mode`` if it grants more (ours only)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & ~mode:
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)


def private_database(path: Path | str) -> None:
    """Prepare an SQLite database file to hold plaintext: its directory 0700, the file created 0600
    before SQLite opens it (SQLite gives the -wal and -shm files it creates the database's mode),
    and files an older version left readable tightened."""
    path = Path(path)
    private_dir(path.parent)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
    for suffix in ("", "-wal", "-shm", "-journal"):
        private_mode(f"{path}{suffix}")


class FileWatch:
    """Says when a file (or a directory's listing) changed since it last looked (by mtime)."""

    def __init__(self, path: Path, *, seen: bool) -> None:
        self.path = path
        self._mtime = self._now() if seen else None

    def _now(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def changed(self) -> bool:
        mtime = self._now()
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        return True


def fsync_dir(path: Path) -> None:
    """Make a rename (or a new file) in ``path`` survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path | str, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically; ``mode`` is the file's mode (default 0600).

    ``durable=False`` skips the two fsyncs (only for tests that write thousands of states).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)
