"""Handshake framing on the ``hs`` topics (after RFC 9528 Appendix A.2, which does this for CoAP).

* up (device -> backend): ``true || message_1``, ``C_R || message_3``, ``C_R || error``
* down (backend -> device): ``C_I || message_2``, ``C_I || message_4``, ``C_I || error``, and
  ``null || error`` for "no session with that id" (the backend lost its state; the device then
  runs a new handshake).

The prefix is one deterministic CBOR item: what lets MQTT, which has no request/response
pairing, correlate the messages of one handshake.
"""

from __future__ import annotations

from typing import Any

from sealmq import cbor
from sealmq.errors import DecodeError, Reason, SealmqError

TRUE_PREFIX = cbor.dumps(True)
NULL_PREFIX = cbor.dumps(None)


def split_frame(payload: bytes) -> tuple[Any, bytes]:
    """Split ``prefix-item || rest``; the prefix is one deterministic CBOR item."""
    if not payload:
        raise DecodeError(Reason.MALFORMED, "empty handshake frame")
    items = cbor.loads_seq(payload)
    prefix = items[0]
    if isinstance(prefix, (list, dict, float)):
        raise DecodeError(Reason.WRONG_TYPE, "handshake frame prefix must be true, null, int or bstr")
    head = cbor.dumps(prefix)
    rest = payload[len(head):]
    if not rest:
        raise DecodeError(Reason.MALFORMED, "handshake frame without an EDHOC message")
    return prefix, rest


def c_i_prefix_of(message_1: bytes) -> bytes | None:
    """C_I of a message_1 we refused, as its CBOR item, to address the error; None if unreadable."""
    try:
        items = cbor.loads_seq(message_1, max_items=64)
    except SealmqError:
        return None
    if len(items) < 4 or not isinstance(items[3], (int, bytes)) or isinstance(items[3], bool):
        return None
    return cbor.dumps(items[3])
