"""Sliding replay window over sequence numbers (RFC 8613 section 7.4 style).

One window per receiving context and key epoch. The session calls :meth:`ReplayWindow.check`
before it decrypts and :meth:`ReplayWindow.mark` only after the record decrypted (and was
otherwise accepted), as aiocoap does: a forged record can never move the window.

The default width is 256 sequence numbers rather than OSCORE's customary 32, because several
MQTT topics (data and media) share one sender sequence space and MQTT only orders messages within
a topic, so records legitimately arrive reordered across topics.
"""

from __future__ import annotations

from sealmq.errors import DecodeError, LocalProtocolError, Reason, ReplayError


class ReplayWindow:
    """Accepts each sequence number at most once; rejects those older than the window."""

    __slots__ = ("_bits", "_highest", "size")

    def __init__(self, size: int = 256) -> None:
        if size < 1:
            raise LocalProtocolError(Reason.CONFIG_INVALID, "replay window size must be >= 1")
        self.size = size
        self._highest = -1  # nothing seen yet: every sequence number is acceptable
        self._bits = 0  # bit i set <=> (highest - i) was seen

    @classmethod
    def restore(cls, size: int, highest: int, bits: int) -> ReplayWindow:
        """A window of ``size`` in the state ``(highest, bits)`` of :meth:`state` (from a snapshot).

        Refuses (``DecodeError``) a state no sequence of :meth:`mark` calls can reach: bits outside
        the window or below sequence number 0, nothing seen but bits set, or ``highest`` not marked.
        """
        window = cls(size)
        if not -1 <= highest <= 2**40 - 1 or bits < 0:
            raise DecodeError(Reason.WRONG_TYPE, "replay window out of range")
        if highest == -1:
            if bits:
                raise DecodeError(Reason.MALFORMED, "replay window: bits set but nothing seen")
        elif not bits & 1 or bits >> min(size, highest + 1):
            raise DecodeError(Reason.MALFORMED, "replay window: bits inconsistent with its highest")
        window._highest, window._bits = highest, bits
        return window

    @property
    def highest(self) -> int:
        """Highest sequence number accepted so far (-1 if none)."""
        return self._highest

    def state(self) -> tuple[int, int]:
        """A comparable snapshot (for tests and for persisting the window)."""
        return (self._highest, self._bits)

    def seen(self, seq: int) -> bool:
        offset = self._highest - seq
        return 0 <= offset < self.size and bool(self._bits >> offset & 1)

    def check(self, seq: int) -> None:
        """Raise :class:`ReplayError` if ``seq`` is a duplicate or too old. Changes nothing."""
        if seq > self._highest:  # the usual case first (``_highest`` >= -1: never a negative seq)
            return
        if seq < 0:
            raise ReplayError(Reason.REPLAY, "negative sequence number")
        if self._highest - seq >= self.size:
            raise ReplayError(Reason.REPLAY, "sequence number older than the replay window")
        if self.seen(seq):
            raise ReplayError(Reason.REPLAY, "duplicate sequence number")

    def mark(self, seq: int) -> None:
        """Record ``seq`` as received. Call only after :meth:`check` and a successful decryption."""
        highest = self._highest
        if seq > highest:  # what check() accepts at once: the usual case, without calling it again
            shift = seq - highest
            # A jump past the whole window forgets everything (and must not build a 2**40-bit int).
            self._bits = 1 if shift >= self.size else ((self._bits << shift) | 1) & ((1 << self.size) - 1)
            self._highest = seq
        else:
            self.check(seq)
            self._bits |= 1 << (highest - seq)
