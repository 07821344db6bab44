"""sealmq.delivery.Ledger: the backend's memory of committed message ids. Against a model (a plain
set of every id ever added) under any delivery a windowed sender can produce: repeats, reordering,
gaps; bounded size; persistence round trip; garbage gives a typed error."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealmq import cbor
from sealmq.bodies import MESSAGE_WINDOW, decode_ack
from sealmq.delivery import Ledger
from sealmq.errors import DecodeError


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 2**40), st.sampled_from([1, 2, 16, 64, MESSAGE_WINDOW]))
def test_ledger_matches_a_set_under_any_windowed_delivery(data: st.DataObject, first: int, window: int) -> None:
    ledger = Ledger()
    added: set[int] = set()
    device_acked: set[int] = set()  # what the device has learnt from ACKs
    dropped: set[int] = set()  # given up by the device's outbox (never arrives)
    top = first + data.draw(st.integers(1, MESSAGE_WINDOW + 40))
    for _ in range(data.draw(st.integers(1, 150))):
        open_ids = [i for i in range(first, top) if i not in device_acked and i not in dropped]
        if not open_ids:
            break
        low = open_ids[0]
        sendable = [i for i in open_ids if i < low + window]  # the device's window
        action = data.draw(st.sampled_from(["send", "send", "send", "ack", "drop"]))
        if action == "ack":
            ack = decode_ack(ledger.ack().encode())
            device_acked |= {i for i in range(first, top) if ack.covers(i)}
        elif action == "drop":
            dropped.add(low)
        else:
            msg_id = data.draw(st.sampled_from(sendable))
            assert ledger.add(msg_id) is (msg_id not in added)  # new exactly once, repeats refused
            added.add(msg_id)
        assert len(ledger.above) <= MESSAGE_WINDOW
        assert all(ledger.seen(i) for i in added)
        ack = ledger.ack()
        assert all(ack.covers(i) for i in added)  # everything committed is acknowledged
        assert not any(ack.covers(i) for i in open_ids if i not in added and i >= low)  # nothing else
        restored = Ledger.decode(ledger.encode())
        assert (restored.mark, restored.above) == (ledger.mark, ledger.above)


def test_a_repeat_far_below_the_window_is_a_repeat() -> None:
    ledger = Ledger()
    assert ledger.add(10_000)
    assert ledger.mark == 10_000 - MESSAGE_WINDOW
    assert not ledger.add(5)  # the device could not send 10,000 before 5 was acknowledged


@pytest.mark.parametrize("data", [cbor.dumps([1]), cbor.dumps([-1, []]), cbor.dumps([1, [0]]),
                                  cbor.dumps([1, ["x"]]), cbor.dumps({"m": 1}), b"\xff"])
def test_ledger_garbage_is_a_typed_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        Ledger.decode(data)
