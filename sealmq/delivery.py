"""Exactly-once delivery bookkeeping (sans-IO): which of a device's message ids the backend has
committed, in bounded memory.

A device numbers its telemetry and replies with increasing message ids (``sealmq.bodies``) and
keeps each in its outbox until an :class:`~sealmq.bodies.Ack` covers it; it re-sends whatever is
unacknowledged after a reconnect, a new session or its own restart, so the backend sees some ids
more than once. :class:`Ledger` tells a new id from a repeat: a high-water mark (every id up to it
is committed) and the committed ids above it. The device's in-flight window
(:data:`~sealmq.bodies.MESSAGE_WINDOW`: it sends id X only once every id up to X - window is
acknowledged) lets the mark follow the largest id seen minus the window, so the set never holds
more than the window's worth of ids. The backend persists a ledger in the same transaction as the
data it describes (:meth:`Ledger.encode`), so deduplication survives restarts.
"""

from __future__ import annotations

from collections.abc import Iterable

from sealmq import cbor
from sealmq.bodies import MAX_MSG_ID, MESSAGE_WINDOW, Ack
from sealmq.errors import DecodeError, Reason


class Ledger:
    """The committed message ids of one device: ``mark`` and the ids above it."""

    __slots__ = ("above", "mark")

    def __init__(self, mark: int = 0, above: Iterable[int] = ()) -> None:
        self.mark = mark
        self.above = {i for i in above if i > mark}
        self._compact()

    def seen(self, msg_id: int) -> bool:
        """True if ``msg_id`` was committed already (a repeat to drop, and to acknowledge again)."""
        return msg_id <= self.mark or msg_id in self.above

    def add(self, msg_id: int) -> bool:
        """Record ``msg_id`` as committed; False if it was already."""
        if self.seen(msg_id):
            return False
        self.above.add(msg_id)
        self._compact()
        return True

    def _compact(self) -> None:
        if not self.above:
            return
        # Every id up to max - window was acknowledged to the device (or dropped by its outbox)
        # before it could send max, so none of them can arrive as new any more.
        floor = max(self.above) - MESSAGE_WINDOW
        mark = max(self.mark, floor)
        while mark + 1 in self.above:
            mark += 1
        if mark != self.mark:
            self.mark = mark
            self.above = {i for i in self.above if i > mark}

    def ack(self) -> Ack:
        """What to acknowledge: everything committed (bounded by the window)."""
        return Ack.of(self.mark, self.above)

    def encode(self) -> bytes:
        return cbor.dumps([self.mark, sorted(self.above)])

    @classmethod
    def decode(cls, data: bytes) -> Ledger:
        item = cbor.loads(data)
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], int) or isinstance(item[0], bool)
                or not 0 <= item[0] <= MAX_MSG_ID or not isinstance(item[1], list)
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i <= MAX_MSG_ID for i in item[1])):
            raise DecodeError(Reason.WRONG_TYPE, "ledger must be [mark, [ids]]")
        return cls(item[0], item[1])

    def __repr__(self) -> str:
        return f"Ledger(mark={self.mark}, above={len(self.above)})"
