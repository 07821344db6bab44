"""One durable atomic file write, for everything that persists a file (PKI, broker users,
media state, bootstrap secrets).

The data goes to a temp file in the same directory (created with the requested mode, 0600 for
secrets, so it is never readable by others even for a moment), is fsynced, renamed over the
target, and the directory is fsynced: after a crash the file is either the old one or the new
one, never empty or half written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


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
