"""The key-update sub-protocol of a session (docs/protocol.md section 6): its two messages, the
state one side keeps between them, and the decision what an accepted KEY_UPDATE record does.

A = the side that starts, B = its peer, both under epoch n::

    A -> B:  [1, n+1, nonce_A]            (request)
    B -> A:  [2, n+1, nonce_A, nonce_B]   (answer)

:class:`KeyUpdate` decides (:meth:`KeyUpdate.plan`) without changing anything, so that a refused
record leaves the session as it was; :class:`sealmq.session.Session` owns the epochs and applies
the :class:`Plan`. See the :mod:`sealmq.session` docstring for the grace window and buffering.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sealmq import cbor, kdf, limits
from sealmq.errors import DecodeError, LocalProtocolError, Reason, RecordError

KU_REQUEST = 1
KU_ANSWER = 2

RandomBytes = Callable[[int], bytes]


class Action(Enum):
    """What an accepted KEY_UPDATE record makes this side do."""

    ANSWER = "answer"  # B: answer a new request and switch to the new epoch
    REANSWER = "reanswer"  # B: the request came again (our answer was lost): the same answer again
    SWITCH = "switch"  # A: the answer to our pending request: switch to the new epoch
    IGNORE = "ignore"  # a request that lost the tie-break, or a repeated answer


@dataclass(frozen=True)
class Pending:
    """Our request, not answered yet."""

    target: int
    nonce: bytes
    sent_at: float


@dataclass(frozen=True)
class Answered:
    """The last request we answered (to answer a repeat identically)."""

    target: int
    nonce_a: bytes
    nonce_b: bytes


@dataclass(frozen=True)
class Plan:
    """What an accepted KEY_UPDATE record will do, decided before any state changes."""

    action: Action
    target: int = 0
    nonce_a: bytes = b""
    nonce_b: bytes = b""


def request(target: int, nonce_a: bytes) -> bytes:
    return cbor.dumps([KU_REQUEST, target, nonce_a])


def answer(target: int, nonce_a: bytes, nonce_b: bytes) -> bytes:
    return cbor.dumps([KU_ANSWER, target, nonce_a, nonce_b])


def parse(plaintext: bytes, nonce_max: int = limits.MAX_KEY_UPDATE_NONCE) -> tuple[int, int, bytes, bytes]:
    """(type, target epoch, nonce_A, nonce_B or b"") of a KEY_UPDATE body; raises RecordError."""
    items = cbor.as_list(cbor.loads(plaintext), "key update")
    if not items:
        raise RecordError(Reason.MALFORMED, "empty key update")
    msg_type = cbor.as_uint(items[0], "key update type", max_value=255)
    expected = {KU_REQUEST: 3, KU_ANSWER: 4}.get(msg_type)
    if expected is None or len(items) != expected:
        raise RecordError(Reason.MALFORMED, "unknown key update message")
    target = cbor.as_uint(items[1], "epoch", max_value=limits.MAX_EPOCH)
    nonces = [cbor.as_bytes(n, "nonce", max_len=nonce_max) for n in items[2:]]
    if any(len(n) < limits.MIN_KEY_UPDATE_NONCE for n in nonces):
        raise RecordError(Reason.MALFORMED, "key update nonce too short")
    return msg_type, target, nonces[0], nonces[1] if len(nonces) > 1 else b""


def next_prk_out(prk_out: bytes, plan: Plan, hash_name: str) -> bytes:
    """PRK_out of the plan's target epoch: EDHOC_KeyUpdate(PRK_out, nonce_A || nonce_B)."""
    return kdf.key_update(prk_out, plan.nonce_a + plan.nonce_b, hash_name)


class KeyUpdate:
    """One side's key-update state: our pending request, the last request we answered, and the
    last request of ours that completed (to ignore a repeated answer)."""

    def __init__(self, *, is_initiator: bool, nonce_length: int) -> None:
        self.is_initiator = is_initiator
        self.nonce_length = nonce_length
        self.pending: Pending | None = None
        self.answered: Answered | None = None
        self.last_switch: tuple[int, bytes] | None = None  # (epoch, nonce_A) of our last completed request

    def start(self, target: int, nonce: bytes, now: float) -> bytes:
        """Our request for ``target`` (the caller checked that one may start); remember it."""
        self.pending = Pending(target, nonce, now)
        return request(target, nonce)

    def resend(self, now: float) -> bytes:
        """The pending request again (it was not answered in time)."""
        p = self.pending
        if p is None:
            raise LocalProtocolError(Reason.UNEXPECTED_MESSAGE, "no key update pending")
        self.pending = Pending(p.target, p.nonce, now)
        return request(p.target, p.nonce)

    def plan(self, plaintext: bytes, *, record_epoch: int, current: int, check_can_send: Callable[[], None],
             rng: RandomBytes | None) -> Plan:
        """Decide what a KEY_UPDATE record received under ``record_epoch`` does; raise (changing
        nothing) if it must be refused. ``check_can_send`` raises if we may not seal an answer."""
        msg_type, target, nonce_a, nonce_b = parse(plaintext)
        if msg_type == KU_REQUEST:
            if record_epoch == current and target == current + 1:
                if self.pending is not None and self.is_initiator:
                    return Plan(Action.IGNORE)  # simultaneous: the device's own request wins
                if target > limits.MAX_EPOCH:
                    raise RecordError(Reason.UNKNOWN_EPOCH, "key epochs exhausted")
                check_can_send()
                if rng is None:
                    raise LocalProtocolError(Reason.CONFIG_INVALID, "no random source to answer a key update")
                fresh = bytes(rng(self.nonce_length))
                if len(fresh) != self.nonce_length:
                    raise LocalProtocolError(Reason.CONFIG_INVALID, "random_bytes returned a wrong length")
                return Plan(Action.ANSWER, target, nonce_a, fresh)
            ans = self.answered
            if (ans is not None and ans.target == target == record_epoch + 1
                    and hmac.compare_digest(ans.nonce_a, nonce_a)):
                check_can_send()
                return Plan(Action.REANSWER, target, ans.nonce_a, ans.nonce_b)
            raise RecordError(Reason.UNEXPECTED_MESSAGE, "key update request for an unexpected epoch")
        p = self.pending
        if (p is not None and record_epoch == current and target == p.target
                and hmac.compare_digest(p.nonce, nonce_a)):
            return Plan(Action.SWITCH, target, nonce_a, nonce_b)
        last = self.last_switch
        if last is not None and last[0] == target and hmac.compare_digest(last[1], nonce_a):
            return Plan(Action.IGNORE)  # a repeated answer to a request we already completed
        raise RecordError(Reason.UNEXPECTED_MESSAGE, "key update answer without a matching request")

    def answer_of(self, plan: Plan) -> bytes:
        """The answer body for an ANSWER/REANSWER plan; an ANSWER is remembered for repeats."""
        if plan.action is Action.ANSWER:
            self.answered = Answered(plan.target, plan.nonce_a, plan.nonce_b)
        return answer(plan.target, plan.nonce_a, plan.nonce_b)

    def switched(self, plan: Plan) -> None:
        """We now send under ``plan.target``."""
        if plan.action is Action.SWITCH:
            self.last_switch = (plan.target, plan.nonce_a)
        self.pending = None

    def epoch_dropped(self, number: int) -> None:
        if self.answered is not None and self.answered.target == number + 1:
            self.answered = None  # cannot re-answer without the old sender keys

    def state(self) -> tuple[Any, ...]:
        return (self.pending, self.answered, self.last_switch)

    # --- snapshot (docs/protocol.md section 12: ku-state) ----------------------------------------

    def to_cbor(self) -> list[Any]:
        """``[pending, answered, last_switch]``, each ``null`` or an array (a CBOR-ready value)."""
        p, a, last = self.pending, self.answered, self.last_switch
        return [None if p is None else [p.target, p.nonce, float(p.sent_at)],
                None if a is None else [a.target, a.nonce_a, a.nonce_b],
                None if last is None else [last[0], last[1]]]

    @classmethod
    def from_cbor(cls, item: Any, *, is_initiator: bool, nonce_length: int) -> KeyUpdate:
        """Inverse of :meth:`to_cbor`; shapes and ranges checked here (``DecodeError``), how the
        state fits the session's epochs by :meth:`sealmq.session.Session.from_bytes`."""
        pending, answered, last = cbor.as_list(item, "key update state", length=3)
        ku = cls(is_initiator=is_initiator, nonce_length=nonce_length)
        if pending is not None:
            target, nonce, sent_at = cbor.as_list(pending, "pending key update", length=3)
            ku.pending = Pending(_target(target), _nonce(nonce), cbor.as_float(sent_at, "sent_at"))
        if answered is not None:
            target, nonce_a, nonce_b = cbor.as_list(answered, "answered key update", length=3)
            ku.answered = Answered(_target(target), _nonce(nonce_a), _nonce(nonce_b))
        if last is not None:
            target, nonce_a = cbor.as_list(last, "last key update", length=2)
            ku.last_switch = (_target(target), _nonce(nonce_a))
        return ku


def _target(value: Any) -> int:
    target = cbor.as_uint(value, "key update epoch", max_value=limits.MAX_EPOCH)
    if target < 1:
        raise DecodeError(Reason.WRONG_TYPE, "a key update targets epoch 1 or later")
    return target


def _nonce(value: Any) -> bytes:
    nonce = cbor.as_bytes(value, "key update nonce", max_len=limits.MAX_KEY_UPDATE_NONCE)
    if len(nonce) < limits.MIN_KEY_UPDATE_NONCE:
        raise DecodeError(Reason.WRONG_TYPE, "key update nonce shorter than 8 bytes")
    return nonce
