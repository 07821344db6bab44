"""The per-record events (Publish, Received) keep a frozen dataclass's behaviour with their
hand-written __init__ (sealmq/events.py, _PER_RECORD)."""

from __future__ import annotations

import dataclasses

import pytest

from sealmq.events import Publish, Received
from sealmq.topics import RecordKind


def test_fields_set_by_position_and_keyword() -> None:
    r = Received("dev-1", RecordKind.TELEMETRY, b"secret", 2, 7)
    assert (r.device_id, r.kind, r.plaintext, r.epoch, r.seq) == ("dev-1", RecordKind.TELEMETRY, b"secret", 2, 7)
    assert r == Received(device_id="dev-1", kind=RecordKind.TELEMETRY, plaintext=b"secret", epoch=2, seq=7)
    p = Publish(payload=b"x", topic="t")
    assert (p.topic, p.payload) == ("t", b"x")
    assert [f.name for f in dataclasses.fields(Received)] == ["device_id", "kind", "plaintext", "epoch", "seq"]
    assert dataclasses.astuple(p) == ("t", b"x")


def test_frozen_and_hashable() -> None:
    r = Received("dev-1", RecordKind.TELEMETRY, b"secret", 2, 7)
    p = Publish("t", b"x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.seq = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.payload = b"y"  # type: ignore[misc]
    assert r.seq == 7 and p.payload == b"x"
    assert hash(r) == hash(Received("dev-1", RecordKind.TELEMETRY, b"secret", 2, 7))
    assert len({p, Publish("t", b"x"), Publish("t", b"z")}) == 2
    assert r != Received("dev-1", RecordKind.TELEMETRY, b"secret", 2, 8)


def test_replace_and_repr() -> None:
    r = Received("dev-1", RecordKind.TELEMETRY, b"secret", 2, 7)
    assert dataclasses.replace(r, seq=9) == Received("dev-1", RecordKind.TELEMETRY, b"secret", 2, 9)
    assert "secret" not in repr(r) and "len=6" in repr(r)
    assert repr(Publish("t", b"secret")) == "Publish(topic='t', len=6)"


def test_arguments_are_checked_like_a_generated_init() -> None:
    with pytest.raises(TypeError):
        Received("dev-1", RecordKind.TELEMETRY, b"secret", 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Publish("t", b"x", b"extra")  # type: ignore[call-arg]
