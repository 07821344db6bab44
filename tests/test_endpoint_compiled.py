"""The backend endpoint's compiled path (``record.speedups.open_known``, used by
``BackendEndpoint.handle``) against the Python path: the same events and the same session state
for any sequence of records, replays, reorderings, forgeries, garbage and key updates.

Two backends hold the same sessions (exported from one, imported into the other). One runs with the
compiled framing, the other with the Python code throughout (``record.speedups`` None during its
calls). Every uplink message goes to both; their outputs and, at the end, their session exports
must be equal.
"""

from __future__ import annotations

import gc
import os
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealmq import record
from sealmq.endpoint import BackendEndpoint, Publish, Received, Rejected
from sealmq.endpoint.backend import MAX_RECORD_TOPICS
from sealmq.errors import LocalProtocolError, Reason
from sealmq.session import SessionConfig
from sealmq.topics import RecordKind
from tests.pki_fixtures import TestPki, make_pki
from tests.test_endpoint import Net, make

compiled = record.speedups
pytestmark = pytest.mark.skipif(compiled is None, reason="the compiled framing is not built")
DEVICES = ["cam-1", "cam-2"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("pki"), DEVICES)


def fixed_random(n: int) -> bytes:
    """The same 'random' bytes for both backends, so that their key update answers are equal."""
    return bytes(range(1, n + 1))


class Twins:
    """A backend with the compiled path and its twin on the Python path, with the same sessions."""

    def __init__(self, pki: TestPki, config: SessionConfig | None = None) -> None:
        net, self.fast, self.devices = make(pki, DEVICES, session=config)
        for d in self.devices:
            net.connect(d)
        self.now = net.now
        self.slow = BackendEndpoint(credentials=self.fast.credentials, trust_store=self.fast.trust_store,
                                    config=self.fast.config)
        for d in DEVICES:
            blob = self.fast.export_session(d)
            assert blob is not None
            self.slow.import_session(d, blob, self.now)
        self.calls = 0  # open_known's answers that were events (the compiled path took the record)
        self.wire: list[Publish] = []  # every uplink record so far, for replays and mutations

    def _python(self, fn: Callable[[], Any]) -> Any:
        saved, record.speedups = record.speedups, None
        try:
            return fn()
        finally:
            record.speedups = saved

    def deliver(self, topic: str, payload: bytes) -> list[Any]:
        counted = Counting(compiled)
        record.speedups = counted
        try:
            got = self.fast.handle(topic, payload, self.now, fixed_random)
        finally:
            record.speedups = compiled
        self.calls += counted.events
        want = self._python(lambda: self.slow.handle(topic, payload, self.now, fixed_random))
        assert got == want, (topic, payload.hex())
        return got

    def to_device(self, outputs: list[Any]) -> None:
        """The backend's downlink answers (key updates) reach the device, whose uplink answers reach both."""
        for out in outputs:
            if isinstance(out, Publish) and "/down" in out.topic:
                device = next(d for d in self.devices if d.device_id in out.topic)
                for reply in device.handle(out.topic, out.payload, self.now, fixed_random):
                    if isinstance(reply, Publish):
                        self.to_device(self.deliver(reply.topic, reply.payload))

    def later(self, seconds: float) -> None:
        """Time passes: both backends and the devices poll (grace windows end, epochs drop)."""
        self.now += seconds
        got = self.fast.poll(self.now, fixed_random)
        assert got == self._python(lambda: self.slow.poll(self.now, fixed_random))
        self.to_device(got)
        for device in self.devices:
            for out in device.poll(self.now, fixed_random):
                if isinstance(out, Publish) and "/up" in out.topic:
                    self.to_device(self.deliver(out.topic, out.payload))

    def same_state(self) -> None:
        for d in DEVICES:
            assert self.fast.export_session(d) == self.slow.export_session(d)


class Counting:
    """The compiled module, counting the records open_known took (returned events for)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.events = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open_known(self, *args: Any) -> Any:
        got = self.inner.open_known(*args)
        self.events += got is not None
        return got


def sealed(twins: Twins, index: int, size: int, kind: RecordKind = RecordKind.TELEMETRY) -> Publish:
    (pub,) = [o for o in twins.devices[index].seal(kind, os.urandom(size), twins.now) if isinstance(o, Publish)]
    twins.wire.append(pub)
    return pub


def test_usual_records_take_the_compiled_path_with_the_same_events(pki: TestPki) -> None:
    twins = Twins(pki)
    for i in range(20):
        pub = sealed(twins, i % 2, 40 + i)
        (event,) = twins.deliver(pub.topic, pub.payload)
        assert isinstance(event, Received) and event.seq == i // 2
    assert twins.calls == 18  # each device's first record teaches the endpoint its topic
    # media chunks (from 4 KiB the ciphertext is read in place) take it too
    for size in (4095, 4096, 60_000):
        pub = sealed(twins, 0, size, RecordKind.MEDIA_CHUNK)
        assert isinstance(twins.deliver(pub.topic, pub.payload)[0], Received)
    assert twins.calls == 18 + 2  # the media topic's first record went the Python way
    twins.same_state()


def test_what_the_compiled_path_declines_is_decided_by_the_python_path(pki: TestPki) -> None:
    twins = Twins(pki, SessionConfig(max_failed_decryptions=3))
    first, second, third = (sealed(twins, 0, 30) for _ in range(3))
    for pub in (first, third):
        assert isinstance(twins.deliver(pub.topic, pub.payload)[0], Received)
    calls = twins.calls
    # below the highest: a late record is opened, a replay refused, neither by the compiled path
    assert isinstance(twins.deliver(second.topic, second.payload)[0], Received)
    assert [r.reason for r in twins.deliver(third.topic, third.payload)] == [Reason.REPLAY]
    assert twins.calls == calls
    # a forged tag goes to the Python path too, which counts it: the third closes the session
    for n in range(3):
        forged = sealed(twins, 0, 30)
        bad = forged.payload[:-1] + bytes([forged.payload[-1] ^ 1])
        (out,) = twins.deliver(forged.topic, bad)
        assert isinstance(out, Rejected) if n < 2 else out.reason is Reason.KEY_LIMIT_REACHED
    assert twins.fast.sessions.get("cam-1") is None and twins.slow.sessions.get("cam-1") is None
    late = sealed(twins, 0, 30)
    assert [type(o) for o in twins.deliver(late.topic, late.payload)] == [Rejected, Publish]  # and a notice
    # the other device is unharmed, on the compiled path
    pub = sealed(twins, 1, 30)
    twins.deliver(pub.topic, pub.payload)
    pub = sealed(twins, 1, 30)
    assert isinstance(twins.deliver(pub.topic, pub.payload)[0], Received)
    assert twins.calls == calls + 1


def test_a_key_update_and_a_new_session_are_followed(pki: TestPki) -> None:
    twins = Twins(pki)
    for _ in range(3):
        pub = sealed(twins, 0, 20)
        twins.deliver(pub.topic, pub.payload)
    update = twins.devices[0].key_update(twins.now, fixed_random)
    for pub in update:
        assert isinstance(pub, Publish)
        twins.to_device(twins.deliver(pub.topic, pub.payload))
    for _ in range(3):  # records under the new epoch (the old one may still be held)
        pub = sealed(twins, 0, 20)
        assert isinstance(twins.deliver(pub.topic, pub.payload)[0], Received)
    twins.same_state()
    # an old session replaced by a new handshake: the compiled path reads the new one
    net = Net(twins.fast, twins.devices)
    before = twins.fast.sessions["cam-1"]
    net.connect(twins.devices[0])
    assert twins.fast.sessions["cam-1"] is not before
    pub = sealed(twins, 0, 20)
    assert isinstance(twins.fast.handle(pub.topic, pub.payload, twins.now, os.urandom)[0], Received)


def test_a_record_of_an_epoch_past_its_grace_window_is_refused_alike(pki: TestPki) -> None:
    """After a key update the old epoch's records are opened only during its grace window, and not
    at all once it is dropped: the compiled path must not keep the old epoch's state."""
    twins = Twins(pki)
    for _ in range(2):
        pub = sealed(twins, 0, 20)
        twins.deliver(pub.topic, pub.payload)
    update = twins.devices[0].key_update(twins.now, fixed_random)
    # sealed under epoch 0 after the request (so above every number the old window saw), delivered late
    held = [sealed(twins, 0, 20) for _ in range(3)]
    for pub in update:
        assert isinstance(pub, Publish)
        twins.to_device(twins.deliver(pub.topic, pub.payload))
    pub = sealed(twins, 0, 20)  # the new epoch: the backend knows the device switched
    assert twins.deliver(pub.topic, pub.payload)[0].epoch == 1
    assert isinstance(twins.deliver(held[0].topic, held[0].payload)[0], Received)  # within grace
    twins.later(SessionConfig().grace_seconds + 1)  # past it, the old epoch is dropped on poll
    assert len(twins.fast.sessions["cam-1"].session._epochs) == 1
    for pub in held[1:]:
        assert [r.reason for r in twins.deliver(pub.topic, pub.payload)] == [Reason.UNKNOWN_EPOCH]
    twins.same_state()


def test_a_session_offers_no_ready_state_once_closed_or_updated(pki: TestPki) -> None:
    """What open_known relies on: Session._hot is None whenever open would not take its
    compiled branch (here: closed by failed decryptions; two epochs held)."""
    twins = Twins(pki, SessionConfig(max_failed_decryptions=1))
    session = twins.fast.sessions["cam-2"].session
    for _ in range(2):
        pub = sealed(twins, 1, 20)
        twins.deliver(pub.topic, pub.payload)
    assert session._hot is not None
    forged = sealed(twins, 1, 20)
    twins.deliver(forged.topic, forged.payload[:-1] + bytes([forged.payload[-1] ^ 1]))
    assert session._closed and session._hot is None
    session = twins.fast.sessions["cam-1"].session
    pub = sealed(twins, 0, 20)
    twins.deliver(pub.topic, pub.payload)
    assert session._hot is not None
    for pub in twins.devices[0].key_update(twins.now, fixed_random):
        assert isinstance(pub, Publish)
        twins.to_device(twins.deliver(pub.topic, pub.payload))
    assert len(session._epochs) == 2 and session._hot is None


ops = st.lists(st.one_of(
    st.tuples(st.just("seal"), st.integers(0, 1), st.integers(0, 300)),
    st.tuples(st.just("hold"), st.integers(0, 1), st.integers(0, 300)),
    st.tuples(st.just("again"), st.integers(0, 10_000)),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 400), st.integers(0, 7)),
    st.tuples(st.just("move"), st.integers(0, 10_000)),
    st.tuples(st.just("garbage"), st.integers(0, 1), st.binary(max_size=60)),
    st.tuples(st.just("update"), st.integers(0, 1)),
    st.tuples(st.just("later"), st.sampled_from([1.0, 45.0, 400.0, 4000.0])),
), max_size=40)


def run_op(twins: Twins, op: tuple[Any, ...]) -> None:
    name = op[0]
    pool = twins.wire
    if name in ("seal", "hold"):
        pub = sealed(twins, op[1], op[2])
        if name == "seal":
            twins.deliver(pub.topic, pub.payload)
    elif name == "update":
        try:
            update = twins.devices[op[1]].key_update(twins.now, fixed_random)
        except LocalProtocolError:  # one in progress, or the previous epoch still held: the device's refusal
            return
        for pub in update:
            if isinstance(pub, Publish):
                twins.to_device(twins.deliver(pub.topic, pub.payload))
    elif name == "later":
        twins.later(op[1])
    elif name == "garbage":
        twins.deliver(f"sealmq/v1/{DEVICES[op[1]]}/data/up", op[2])
    elif pool:
        pub = pool[op[1] % len(pool)]
        if name == "again":
            twins.deliver(pub.topic, pub.payload)
        elif name == "flip":
            bad = bytearray(pub.payload)
            bad[op[2] % len(bad)] ^= 1 << op[3]
            twins.deliver(pub.topic, bytes(bad))
        else:
            other = "cam-2" if "cam-1" in pub.topic else "cam-1"
            twins.deliver(pub.topic.replace("cam-1", "@").replace("cam-2", other).replace("@", "cam-2"),
                          pub.payload)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_any_sequence_gives_the_same_events_and_state(pki: TestPki, sequence: list[tuple[Any, ...]]) -> None:
    twins = Twins(pki)
    for op in sequence:
        run_op(twins, op)
    twins.same_state()


def test_the_table_of_record_topics_is_bounded(pki: TestPki, monkeypatch: pytest.MonkeyPatch) -> None:
    twins = Twins(pki)
    monkeypatch.setattr("sealmq.endpoint.backend.MAX_RECORD_TOPICS", 1)
    a, b = sealed(twins, 0, 10), sealed(twins, 1, 10)
    twins.deliver(a.topic, a.payload)
    assert list(twins.fast._record_topics) == [a.topic]
    twins.deliver(b.topic, b.payload)
    assert list(twins.fast._record_topics) == [b.topic]  # full: forgotten, then learnt again
    assert MAX_RECORD_TOPICS >= 10_000


def test_open_known_refuses_misuse_with_python_errors(pki: TestPki) -> None:
    assert compiled is not None
    twins = Twins(pki)
    a = sealed(twins, 0, 10)
    twins.deliver(a.topic, a.payload)
    b = sealed(twins, 0, 10)
    fast = twins.fast
    with pytest.raises(TypeError):
        compiled.open_known(b.payload, b.topic, fast._record_topics)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        compiled.open_known(b.payload, b.topic, list(fast._record_topics), fast.sessions)  # type: ignore[arg-type]
    hot = fast.sessions["cam-1"].session._hot
    assert hot is not None
    ready = hot.ready
    try:
        hot.ready = ready[:4]
        with pytest.raises(TypeError):
            compiled.open_known(b.payload, b.topic, fast._record_topics, fast.sessions)
        hot.ready = (*ready[:2], len, *ready[3:])  # not a class: refused before anything is opened
        with pytest.raises(TypeError):
            compiled.open_known(b.payload, b.topic, fast._record_topics, fast.sessions)
    finally:
        hot.ready = ready
    # not this function's to judge: declined
    assert compiled.open_known(bytearray(b.payload), b.topic, fast._record_topics, fast.sessions) is None
    assert compiled.open_known(b.payload, "sealmq/v1/nobody/data/up", fast._record_topics, fast.sessions) is None
    (event,) = compiled.open_known(b.payload, b.topic, fast._record_topics, fast.sessions) or []
    assert event == Received("cam-1", RecordKind.TELEMETRY, event.plaintext, 0, 1)
    assert vars(event) == vars(Received("cam-1", RecordKind.TELEMETRY, event.plaintext, 0, 1))
    assert repr(event) == repr(Received("cam-1", RecordKind.TELEMETRY, event.plaintext, 0, 1))


def test_open_known_keeps_no_memory(pki: TestPki) -> None:
    """Opened, declined (a replay, an unknown topic) and failed-tag calls, 2,000 times each, keep no
    memory: a missing reference decrement would keep an object per call."""
    assert compiled is not None
    twins = Twins(pki)
    fast = twins.fast
    records = [sealed(twins, 0, 64) for _ in range(2100)]

    def calls(batch: list[Publish]) -> None:
        assert compiled is not None
        for pub in batch:
            with pytest.raises(InvalidTag):
                compiled.open_known(pub.payload[:-1] + bytes([pub.payload[-1] ^ 1]), pub.topic,
                                    fast._record_topics, fast.sessions)
            assert compiled.open_known(pub.payload, pub.topic, fast._record_topics, fast.sessions)
            assert compiled.open_known(pub.payload, pub.topic, fast._record_topics, fast.sessions) is None
            assert compiled.open_known(pub.payload, "sealmq/v1/x/data/up", fast._record_topics, fast.sessions) is None

    fast.handle(records[0].topic, records[0].payload, twins.now, os.urandom)  # learns the topic
    calls(records[1:100])  # warm up
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        calls(records[100:])
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 20_000, grown  # one leaked event per call would be over 200 KB
