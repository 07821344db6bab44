"""What a restart needs to resume a media transfer, persisted incrementally.

Per transfer, next to its ``.part`` file under ``incoming/<device>/``:

- ``<tid>.state``: CBOR ``{1: signed manifest}``, written once (atomically) when the transfer opens;
- ``<tid>.bits``: the received bitmap (bit i = chunk i, MSB first), a fixed-size file updated in
  place: only the 4 KiB blocks that changed since the last update are rewritten. A status request
  that changes nothing writes nothing.

Rewriting one file holding both (the previous layout, still read) cost a 130 KB write and a rename
per acknowledgement of a 1 GiB transfer, under the lock every other device waits for.

Neither file is synced: the guarantee (an acknowledged chunk is on disk) is the data sync the
media store makes before it updates the bitmap. Bits only ever go from 0 to 1 while a transfer is
open, so whatever a crash leaves of an in-place update (old blocks, new blocks, a mix) names only
chunks that are on disk; a missing or short ``.bits`` file starts the bitmap again. Either way
the backend at worst asks for chunks again, which the device still holds (it forgets a file only
on the final "complete" ack, sent after the file is synced, moved and recorded).
"""

from __future__ import annotations

import os
from pathlib import Path

from runtime.files import PRIVATE_FILE, atomic_write
from sealmq import cbor

BLOCK = 4096  # bytes of bitmap rewritten at a time (one page)


class BitmapFile:
    """The on-disk received bitmap of one transfer, and a copy of what it holds."""

    def __init__(self, path: Path, saved: bytes, count: int) -> None:
        self.path = path
        self._saved = bytearray(saved)
        self.count = count  # chunks the file names

    def update(self, current: bytes, count: int) -> int:
        """Write the blocks of ``current`` that differ from the file; returns the bytes written."""
        if len(current) != len(self._saved):
            raise ValueError("the bitmap of a transfer does not change size")
        written = 0
        fd: int | None = None
        try:
            for start in range(0, len(current), BLOCK):
                block = current[start:start + BLOCK]
                if block == self._saved[start:start + BLOCK]:
                    continue
                if fd is None:
                    fd = os.open(self.path, os.O_WRONLY)
                os.pwrite(fd, block, start)
                self._saved[start:start + BLOCK] = block
                written += len(block)
        finally:
            if fd is not None:
                os.close(fd)
        self.count = count
        return written


def open_state(state: Path, bits: Path, signed_manifest: bytes, bitmap: bytes, *, count: int = 0) -> BitmapFile:
    """Start a transfer's state: the bitmap file (sparse where it is zero), then the manifest."""
    fd = os.open(bits, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    try:
        os.ftruncate(fd, len(bitmap))
        if any(bitmap):
            os.pwrite(fd, bitmap, 0)
    finally:
        os.close(fd)
    atomic_write(state, cbor.dumps({1: signed_manifest}), mode=PRIVATE_FILE, durable=False)
    return BitmapFile(bits, bitmap, count)


def read_state(state: Path, bits: Path) -> tuple[bytes, bytes | None, bytes | None]:
    """(signed manifest, bitmap file bytes or None, bitmap of the previous layout or None).

    Raises DecodeError on a malformed state file and OSError on an unreadable one."""
    saved = cbor.as_map(cbor.loads(state.read_bytes()), "media state")
    signed = cbor.as_bytes(saved.get(1), "signed manifest")
    legacy = cbor.as_bytes(saved[2], "received bitmap") if 2 in saved else None
    current = bits.read_bytes() if bits.exists() else None
    return signed, current, legacy
