"""The record path's compiled framing (``sealmq/_speedups.c``) on its own: it is built, it is what
the sessions use, it is robust against misuse and garbage, and it does not leak.

That it gives the same bytes, results and rejections as the Python code is proven in
tests/test_record_fast.py, whose every test runs once with it and once without it, against the
reference implementation.
"""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import given, settings
from hypothesis import strategies as st

from sealmq import limits, record
from sealmq.replay import ReplayWindow
from sealmq.session import Session, _Hot
from sealmq.topics import RecordKind
from tests.test_session import C_I, C_R, PRK_OUT, rng

speedups = record.speedups


def test_the_compiled_framing_is_built_and_in_use() -> None:
    """An install with a C compiler (scripts/setup, CI) builds it; the Python fallback is for builds
    without one. A missing module here means the install fell back without saying so."""
    assert speedups is not None, "sealmq._speedups is not built: install with a C compiler (pip install -e .)"
    assert speedups.__name__ == "sealmq._speedups"
    assert speedups.__file__ is not None and speedups.__file__.endswith(".so")


def pair(app_aead: int = 1) -> tuple[Session, Session]:
    device = Session.from_edhoc(prk_out=PRK_OUT, c_i=C_I, c_r=C_R, is_initiator=True, device_id="dev-1",
                                now=0.0, random_bytes=rng(b"device"), app_aead=app_aead)
    backend = Session.from_edhoc(prk_out=PRK_OUT, c_i=C_I, c_r=C_R, is_initiator=False, device_id="dev-1",
                                 now=0.0, random_bytes=rng(b"backend"), app_aead=app_aead)
    return device, backend


def hot_state(backend: Session, topic: str, data: bytes) -> _Hot:
    """The backend's hot-path state after it opened ``data`` (so that the route of its topic is known)."""
    assert backend.open(topic, data, 0.0)
    assert backend._hot is not None
    return backend._hot


def seal_args(device: Session, piv: int, plaintext: bytes) -> tuple[Any, ...]:
    codec = device._epochs[0].codec
    topic = device.topic_for(RecordKind.TELEMETRY)
    pieces = codec._pieces(codec._send, codec.ctx.sender_id, RecordKind.TELEMETRY, topic)
    return (codec._sender_aead, codec._send_base_bytes, pieces.header, pieces.prefixes, pieces.suffix, piv,
            plaintext, codec._tag_len)


@pytest.mark.parametrize("app_aead", [10, 1])
def test_seal_refuses_misuse_with_python_errors(app_aead: int) -> None:
    assert speedups is not None
    device, _ = pair(app_aead)
    good = seal_args(device, 5, b"x")
    assert isinstance(speedups.seal(*good), bytes)
    aead, base, header, prefixes, suffix, piv, plaintext, tag_len = good
    with pytest.raises(TypeError):
        speedups.seal(*good[:7])
    with pytest.raises(TypeError):
        speedups.seal(aead, bytearray(base), header, prefixes, suffix, piv, plaintext, tag_len)
    with pytest.raises(TypeError):
        speedups.seal(aead, base, header, prefixes[:5], suffix, piv, plaintext, tag_len)
    with pytest.raises(TypeError):
        speedups.seal(aead, base, header, (*prefixes[:5], "x"), suffix, 2**39, plaintext, tag_len)
    with pytest.raises(ValueError):
        speedups.seal(aead, base, header, prefixes, suffix, limits.MAX_PIV + 1, plaintext, tag_len)
    with pytest.raises(ValueError):
        speedups.seal(aead, base[:7], header, prefixes, suffix, piv, plaintext, tag_len)
    with pytest.raises(OverflowError):
        speedups.seal(aead, base, header, prefixes, suffix, -1, plaintext, tag_len)
    with pytest.raises(TypeError):
        speedups.seal(aead, base, header, prefixes, suffix, "5", plaintext, tag_len)
    with pytest.raises(AttributeError):
        speedups.seal(object(), base, header, prefixes, suffix, piv, plaintext, tag_len)
    with pytest.raises(TypeError):
        speedups.seal(aead, base, header, prefixes, suffix, piv, "text", tag_len)  # the AEAD's own refusal
    big = b"p" * 5000  # from 4 KiB the AEAD writes into the record: a wrong tag length cannot fit
    assert speedups.seal(aead, base, header, prefixes, suffix, piv, big, tag_len) == \
        speedups.seal(aead, base, header, prefixes, suffix, piv, big, 0)  # 0: the copying path
    with pytest.raises(ValueError):
        speedups.seal(aead, base, header, prefixes, suffix, piv, big, tag_len + 1)


def test_open_hot_refuses_a_malformed_state_with_type_errors() -> None:
    """A state the session never builds is a programming error: TypeError, which the session does
    not take for a failed decryption (that would count against the peer)."""
    assert speedups is not None
    device, backend = pair()
    topic, data = device.seal(RecordKind.TELEMETRY, b"first", 0.0)
    hot = hot_state(backend, topic, data)
    topic, data = device.seal(RecordKind.TELEMETRY, b"second", 0.0)
    kid_part, epoch, routes, base, aead, tag_len = hot.cstate
    window = ReplayWindow(8)
    assert speedups.open_hot(data, topic, hot.cstate, window) is not None
    assert window.state() == (1, 1)  # marked: the new highest
    fresh = ReplayWindow(8)
    with pytest.raises(TypeError):
        speedups.open_hot(data, topic, hot.cstate)
    with pytest.raises(TypeError):
        speedups.open_hot(data, topic, (kid_part, epoch, dict(routes).items(), base, aead, tag_len), fresh)
    with pytest.raises(TypeError):
        speedups.open_hot(data, topic, (kid_part, epoch, routes, base[:4], aead, tag_len), fresh)
    bad_routes = {key: value[:2] for key, value in routes.items()}
    with pytest.raises(TypeError):
        speedups.open_hot(data, topic, (kid_part, epoch, bad_routes, base, aead, tag_len), fresh)
    with pytest.raises(AttributeError):
        speedups.open_hot(data, topic, hot.cstate, object())  # not a replay window
    assert fresh.state() == (-1, 0)  # nothing refused changed it
    # what is not this module's to judge is declined, not raised: the Python path decides
    assert speedups.open_hot(bytearray(data), topic, hot.cstate, fresh) is None
    assert speedups.open_hot(data, topic, hot.cstate[:5], fresh) is None
    assert speedups.open_hot(data, topic + "/", hot.cstate, fresh) is None
    assert speedups.open_hot(data, topic, hot.cstate, window) is None  # not above the window's highest
    assert fresh.state() == (-1, 0) and window.state() == (1, 1)


@settings(max_examples=500)
@given(st.binary(max_size=120), st.integers(-1, 40), st.data())
def test_open_hot_on_arbitrary_bytes_declines_or_fails_the_tag(garbage: bytes, highest: int,
                                                               data: st.DataObject) -> None:
    """Bytes that are not a record of this state: declined (None), or, if they frame like one, the
    AEAD's InvalidTag. Never a crash, never another exception, never a plaintext."""
    assert speedups is not None
    device, backend = pair(data.draw(st.sampled_from([10, 1])))
    topic, first = device.seal(RecordKind.TELEMETRY, b"first", 0.0)
    hot = hot_state(backend, topic, first)
    # the record's own header in front half of the time, so that the tail's parsing is reached
    if data.draw(st.booleans()):
        garbage = first[:hot.header_len] + garbage
    window = ReplayWindow.restore(8, highest, 1 if highest >= 0 else 0)
    try:
        got = speedups.open_hot(garbage, topic, hot.cstate, window)
    except InvalidTag:
        got = None
    assert got is None
    assert window.state() == (highest, 1 if highest >= 0 else 0)  # unchanged


def _calls(device: Session, hot: _Hot, topic: str, good: list[bytes]) -> None:
    assert speedups is not None
    for i, data in enumerate(good):
        window = ReplayWindow.restore(256, i, 1)  # the records are numbered from 1
        with pytest.raises(InvalidTag):
            speedups.open_hot(data[:-1] + bytes([data[-1] ^ 1]), topic, hot.cstate, window)  # failed
        assert speedups.open_hot(data, topic, hot.cstate, window) is not None  # opened
        assert speedups.open_hot(data, topic, hot.cstate, window) is None  # declined: now a replay
        assert window.state() == (i + 1, 3)
        speedups.seal(*seal_args(device, i, b"p" * 40))
        speedups.seal(*seal_args(device, i, b"q" * 5000))  # written into the record
        with pytest.raises(TypeError):
            speedups.seal(*seal_args(device, i, b"p")[:3])


def test_no_memory_is_kept_by_any_path() -> None:
    """Each path (opened, declined, failed tag, sealed small and large, refused arguments) run thousands of times
    keeps no memory: a missing reference decrement would keep a bytes object per call."""
    device, backend = pair()
    topic, first = device.seal(RecordKind.TELEMETRY, b"first", 0.0)
    hot = hot_state(backend, topic, first)
    good = [device.seal(RecordKind.TELEMETRY, b"r" * 64, 0.0)[1] for _ in range(2000)]
    _calls(device, hot, topic, good[:50])  # warm up caches, interned strings, the AEAD's own state
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _calls(device, hot, topic, good)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 2,000 rounds of six paths: one leaked bytes object per call would be over 200 KB
    assert grown < 20_000, grown


@settings(max_examples=200)
@given(st.integers(1, 40), st.lists(st.integers(1, 50), min_size=1, max_size=30))
def test_open_hot_marks_the_window_as_replay_window_mark_does(size: int, steps: list[int]) -> None:
    """Records opened in increasing order, with gaps below, at and past the window's width: the
    window the compiled path marked and one marked by ReplayWindow.mark hold the same state."""
    assert speedups is not None
    device, backend = pair()
    topic, first = device.seal(RecordKind.TELEMETRY, b"first", 0.0)
    hot = hot_state(backend, topic, first)
    compiled, reference = ReplayWindow(size), ReplayWindow(size)
    seq = 0
    for step in steps:
        seq += step
        device.advance_send_seq(seq)
        _, data = device.seal(RecordKind.TELEMETRY, b"r", 0.0)
        assert speedups.open_hot(data, topic, hot.cstate, compiled) is not None
        reference.mark(seq)
        assert compiled.state() == reference.state()


def test_the_version_says_which_framing_runs(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from app.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert "(record framing: compiled)" in capsys.readouterr().out
    monkeypatch.setattr(record, "speedups", None)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "(record framing: Python (built without a C compiler))" in capsys.readouterr().out


def test_an_aead_without_encrypt_into_seals_large_records_by_copying() -> None:
    """The codec asks the compiled seal to write in place only when its AEAD can (encrypt_into is
    missing from older cryptography releases): same records either way."""
    from sealmq.oscore import from_edhoc

    class OnlyEncrypt:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
            return bytes(self.inner.encrypt(nonce, plaintext, aad))

    ctx = from_edhoc(PRK_OUT, C_I, C_R, True, app_aead=1)
    plain = record.EpochCodec(ctx, 0)
    ctx._sender = OnlyEncrypt(ctx._sender)  # type: ignore[assignment]
    limited = record.EpochCodec(ctx, 0)
    assert limited._into_tag_len == 0 and plain._into_tag_len == 16
    topic = "sealmq/v1/dev-1/media/up"
    for size in (10, 4095, 4096, 65_000):
        data = b"m" * size
        kind = RecordKind.MEDIA_CHUNK
        assert limited.seal(kind, topic, 7, data) == plain.seal(kind, topic, 7, data)
