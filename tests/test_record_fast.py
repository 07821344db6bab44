"""The record fast path (sealmq.record.EpochCodec, decode_fast, Session's hot paths) against the
reference implementation: identical bytes, identical rejections, identical session state.

The reference is ``record.seal``/``record.open_``/``record.decode`` and a Session with
``_fast = False``; the golden vectors and RFC 8613's vectors also go through the fast path here.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealmq import cbor, limits, oscore, record
from sealmq.errors import DecryptError, Reason, SealmqError, SessionError
from sealmq.events import Publish
from sealmq.session import Session, SessionConfig, _Hot
from sealmq.topics import RecordKind
from tests.test_oscore import REQUESTS, VEC, _opt
from tests.test_record import CASES, STORED, contexts, h
from tests.test_session import C_I, C_R, DOWN_KINDS, PRK_OUT, UP_KINDS, rng

# The application AEADs of the suites the endpoints negotiate: AES-CCM-16-64-128 (suite 2) and A128GCM
# (suite 6). Every comparison of the fast path with the reference below runs under both.
AEAD_IDS = [10, 1]
AEADS = st.sampled_from(AEAD_IDS)

TOPICS = ["sealmq/v1/dev-1/data/up", "sealmq/v1/dev-1/media/up", "sealmq/v1/dev-1/data/down",
          "sealmq/v1/dev-1/media/down", "sealmq/v1/dev-2/data/up", "x", "", "sealmq/v1/dev-1/data/up/"]


COMPILED = record.speedups


@pytest.fixture(autouse=True, params=["compiled", "python"])
def framing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs twice: with the fast path's compiled framing (sealmq/_speedups.c, what
    a normal install runs) and with its Python code (the fallback without a C compiler). Both
    against the same reference."""
    if request.param == "compiled":
        if COMPILED is None:
            pytest.fail("sealmq._speedups is not built: install with a C compiler (pip install -e .)")
    else:
        monkeypatch.setattr(record, "speedups", None)
    return str(request.param)


class SpySpeedups:
    """Stands for the compiled module and records what it was asked and what it answered."""

    def __init__(self, real: Any, fail: bool = False) -> None:
        self.real, self.fail = real, fail
        self.seals = 0
        self.opens: list[bool] = []  # answered (not None) or declined, per call

    def seal(self, *args: Any) -> bytes:
        if self.fail:
            raise AssertionError("fast path used")
        self.seals += 1
        return bytes(self.real.seal(*args))

    def open_hot(self, *args: Any) -> Any:
        if self.fail:
            raise AssertionError("fast path used")
        got = self.real.open_hot(*args)
        self.opens.append(got is not None)
        return got


def outcome(fn: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """("ok", value) or ("error", (exception type, reason)): what must match between the paths."""
    try:
        return "ok", fn(*args, **kwargs)
    except SealmqError as exc:
        return "error", (type(exc), exc.reason)


def reference_fields(data: bytes) -> tuple[str, Any]:
    def dec() -> record.RecordFields:
        rec = record.decode(data)
        return (int(rec.kind), rec.kid, rec.epoch, rec.piv, rec.ciphertext)
    return outcome(dec)


def check_decode(data: bytes) -> None:
    ref = reference_fields(data)
    fast = record.decode_fast(data)
    if fast is not None:
        assert ref == ("ok", fast)
    assert outcome(record.decode_fields, data) == ref


# --- golden and RFC vectors through the fast path -------------------------------------------------

@pytest.mark.parametrize("index", range(len(CASES)))
def test_golden_vectors_through_the_codec(index: int) -> None:
    case, out = STORED[index]["input"], STORED[index]["output"]
    device, backend = contexts()
    sender, receiver = (device, backend) if case["is_initiator"] else (backend, device)
    kind = RecordKind(case["kind"])
    sealed = record.EpochCodec(sender, case["epoch"]).seal(kind, case["topic"], case["piv"],
                                                          h(case["plaintext"]))
    assert sealed.hex() == out["record"]
    fields = record.decode_fast(sealed)
    assert fields is not None
    assert fields == (case["kind"], h(out["kid"]), case["epoch"], case["piv"], fields[4])
    opened = record.EpochCodec(receiver, case["epoch"]).open(kind, case["topic"], case["piv"], fields[4])
    assert opened == h(case["plaintext"])
    template = record.AadTemplate(10, h(out["kid"]), record.options(case["epoch"], kind, case["topic"]))
    assert template.aad(case["piv"]).hex() == out["aad"]
    assert (record.nonce_base(sender.common_iv, sender.sender_id) ^ case["piv"]).to_bytes(13, "big").hex() \
        == out["nonce"]


@pytest.mark.parametrize(("name", "kd_section", "kd_side"), REQUESTS)
def test_rfc8613_nonce_and_aad_through_the_templates(name: str, kd_section: str, kd_side: str) -> None:
    v, kd = VEC[name], VEC[kd_section][kd_side]
    client = oscore.SecurityContext.derive(
        master_secret=h(kd["Master Secret"]), master_salt=_opt(kd, "Master Salt") or b"",
        sender_id=h(kd["Sender ID"]), recipient_id=h(kd["Recipient ID"]), id_context=_opt(kd, "ID Context"))
    seq = int(v["Sender Sequence Number"])
    assert (record.nonce_base(client.common_iv, client.sender_id) ^ seq).to_bytes(13, "big") == h(v["nonce"])
    assert record.AadTemplate(10, h(v["kid"]), b"").aad(seq) == h(v["AAD"])


def test_rfc8613_key_derivation_nonces_through_nonce_base() -> None:
    section = VEC["C.1 Test Vector 1: Key Derivation with Master Salt"]
    for side in ("C.1.1 Client", "C.1.2 Server"):
        v = section[side]
        base = record.nonce_base(h(v["Common IV"]), h(v["Sender ID"]))
        assert base.to_bytes(13, "big") == h(v["sender nonce"])


# --- decoding: the hand-written parser never disagrees with the reference -------------------------

@given(st.binary(max_size=120))
def test_decode_arbitrary_bytes(data: bytes) -> None:
    check_decode(data)


def _mutate(buf: bytearray, ops: list[tuple[str, int, int]]) -> bytes:
    for op, pos, byte in ops:
        if not buf:
            break
        i = pos % len(buf)
        if op == "flip":
            buf[i] ^= 1 << (byte % 8)
        elif op == "set":
            buf[i] = byte
        elif op == "insert":
            buf.insert(i, byte)
        elif op == "delete":
            del buf[i]
        else:
            del buf[i:]
    return bytes(buf)


MUTATIONS = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                               st.integers(0, 10**6), st.integers(0, 255)), min_size=0, max_size=4)


@given(st.sampled_from([v["output"]["record"] for v in STORED]), MUTATIONS)
def test_decode_mutated_golden_records(record_hex: str, ops: list[tuple[str, int, int]]) -> None:
    check_decode(_mutate(bytearray(h(record_hex)), ops))


HEADS = st.one_of(st.integers(0, 30), st.integers(0, 2**64 - 1),
                  st.sampled_from([23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**40 - 1, 2**40]))


FORMS = st.sampled_from(["short", "short", "short", "long1", "long2", "long4", "long8"])


@settings(max_examples=400)
@given(st.one_of(st.integers(1, 8), st.integers(0, 30)), st.one_of(st.binary(max_size=8), st.binary(max_size=10)),
       HEADS, HEADS, st.one_of(st.integers(8, 300), st.integers(0, 300)),
       st.lists(FORMS, min_size=5, max_size=5), st.one_of(st.just([]), MUTATIONS))
def test_decode_structured_records(kind: int, kid: bytes, epoch: int, piv: int, ct_len: int,
                                   forms: list[str], ops: list[tuple[str, int, int]]) -> None:
    """Valid and almost-valid records, including non-shortest heads (per field), through both decoders."""
    def head(major: int, value: int, form: str) -> bytes:
        mt = major << 5
        if form == "long1" and value < 256:
            return bytes([mt | 24, value])
        if form == "long2" and value < 65536:
            return bytes([mt | 25]) + value.to_bytes(2, "big")
        if form == "long4" and value < 2**32:
            return bytes([mt | 26]) + value.to_bytes(4, "big")
        if form == "long8":
            return bytes([mt | 27]) + value.to_bytes(8, "big")
        shortest = cbor.uint_head(value)
        return bytes([mt | shortest[0]]) + shortest[1:]

    ct = bytes(range(256))[:ct_len % 256] * (1 + ct_len // 256)
    data = (b"\x85" + head(0, kind, forms[0]) + head(2, len(kid), forms[1]) + kid + head(0, epoch, forms[2])
            + head(0, piv, forms[3]) + head(2, len(ct), forms[4]) + ct)
    check_decode(_mutate(bytearray(data), ops))


def test_decode_large_ciphertexts_agree() -> None:
    for size in (limits.MIN_TAG_LENGTH, limits.MAX_TAG_LENGTH, 255, 256, 65535, 65536,
                 limits.MAX_PLAINTEXT + limits.MIN_TAG_LENGTH, limits.MAX_PLAINTEXT + limits.MAX_TAG_LENGTH,
                 limits.MAX_PLAINTEXT + limits.MAX_TAG_LENGTH + 1):
        data = b"\x85\x06\x41\x18\x00\x00" + cbor.bstr_head(size) + b"c" * size
        check_decode(data)
        check_decode(bytearray(data))  # not bytes: always the reference
    assert record.decode_fast(b"\x85\x06\x41\x18\x00\x00" + cbor.bstr_head(65536) + b"c" * 65536) is not None


# --- sealing and opening: same bytes, same plaintext, same errors ---------------------------------

KINDS = st.sampled_from(list(RecordKind))
EPOCHS = st.one_of(st.integers(0, 5), st.sampled_from([2**32 - 1, 2**32, -1]))
# every width of the Partial IV's CBOR head (1, 2, 3, 5 and 9 bytes) and its edges
PIV_EDGES = [0, 23, 24, 255, 256, 65535, 65536, 2**24 - 1, 2**24, 2**32 - 1, 2**32, 2**40 - 1]
PIVS = st.one_of(st.integers(0, 70_000), st.integers(0, 2**40 - 1), st.sampled_from([*PIV_EDGES, 2**40, -1]))


def codec_seal(ctx: oscore.SecurityContext, kind: RecordKind, epoch: int, piv: int, topic: str,
               plaintext: bytes) -> bytes:
    return record.EpochCodec(ctx, epoch).seal(kind, topic, piv, plaintext)


@given(KINDS, EPOCHS, PIVS, st.sampled_from(TOPICS) | st.text(max_size=30), st.binary(max_size=80),
       st.booleans(), AEADS)
def test_seal_identical(kind: RecordKind, epoch: int, piv: int, topic: str, plaintext: bytes,
                        initiator: bool, app_aead: int) -> None:
    device, backend = contexts(app_aead)
    ctx = device if initiator else backend
    ref = outcome(record.seal, ctx, kind=kind, epoch=epoch, piv=piv, topic=topic, plaintext=plaintext)
    assert outcome(codec_seal, ctx, kind, epoch, piv, topic, plaintext) == ref


@pytest.mark.parametrize("app_aead", AEAD_IDS)
def test_seal_too_large_identical(app_aead: int) -> None:
    device, _ = contexts(app_aead)
    for size in (limits.MAX_PLAINTEXT, limits.MAX_PLAINTEXT + 1):
        ref = outcome(record.seal, device, kind=RecordKind.MEDIA_CHUNK, epoch=0, piv=3, topic=TOPICS[1],
                      plaintext=b"p" * size)
        assert outcome(codec_seal, device, RecordKind.MEDIA_CHUNK, 0, 3, TOPICS[1], b"p" * size) == ref


@settings(max_examples=300)
@given(KINDS, st.integers(0, 4), st.integers(0, 2**40 - 1), st.sampled_from(TOPICS[:4]), st.binary(max_size=40),
       st.data(), AEADS)
def test_open_identical_for_moved_and_mutated_records(kind: RecordKind, epoch: int, piv: int, topic: str,
                                                      plaintext: bytes, data: st.DataObject, app_aead: int) -> None:
    device, backend = contexts(app_aead)
    sealed = record.seal(device, kind=kind, epoch=epoch, piv=piv, topic=topic, plaintext=plaintext)
    rec = record.decode(sealed)
    # move it: another kind, epoch, piv or topic, or damage the ciphertext
    o_kind = data.draw(st.sampled_from([kind, *RecordKind]))
    o_epoch = data.draw(st.sampled_from([epoch, epoch + 1, 0]))
    o_piv = data.draw(st.sampled_from([piv, piv + 1, piv ^ 1, 0, 2**40 - 1]))
    o_topic = data.draw(st.sampled_from([topic, *TOPICS]))
    ct = bytearray(rec.ciphertext)
    if data.draw(st.booleans()):
        bit = data.draw(st.integers(0, len(ct) * 8 - 1))
        ct[bit // 8] ^= 1 << (bit % 8)
    moved = record.Record(o_kind, rec.kid, o_epoch, o_piv, bytes(ct))
    ref = outcome(record.open_, backend, moved, o_topic)
    fast = outcome(record.EpochCodec(backend, o_epoch).open, o_kind, o_topic, o_piv, bytes(ct))
    assert fast == ref
    if (o_kind, o_epoch, o_piv, o_topic, bytes(ct)) == (kind, epoch, piv, topic, rec.ciphertext):
        assert ref == ("ok", plaintext)


@pytest.mark.parametrize("app_aead", AEAD_IDS)
def test_seal_identical_at_every_head_width(app_aead: int) -> None:
    """The fast path writes the Partial IV's head from its bytes (record._UINT_HEAD_PREFIX): the same
    bytes as the reference at each edge, and each record opens under the same Partial IV."""
    device, backend = contexts(app_aead)
    sealer, opener = record.EpochCodec(device, 0), record.EpochCodec(backend, 0)
    for piv in PIV_EDGES:
        data = sealer.seal(RecordKind.TELEMETRY, TOPICS[0], piv, b"edge")
        assert data == record.seal(device, kind=RecordKind.TELEMETRY, epoch=0, piv=piv, topic=TOPICS[0],
                                   plaintext=b"edge")
        rec = record.decode(data)
        assert rec.piv == piv
        assert opener.open(RecordKind.TELEMETRY, TOPICS[0], piv, rec.ciphertext) == b"edge"


def test_aad_cache_is_bounded() -> None:
    device, _ = contexts()
    codec = record.EpochCodec(device, 0)
    for i in range(100):
        topic = f"sealmq/v1/dev-{i}/data/up"
        assert codec.seal(RecordKind.TELEMETRY, topic, i, b"x") == record.seal(
            device, kind=RecordKind.TELEMETRY, epoch=0, piv=i, topic=topic, plaintext=b"x")
    assert len(codec._send) <= record._AAD_CACHE_SIZE


# --- whole sessions: a fast and a reference session, fed the same, stay identical ----------------

def warm_routes(session: Session) -> None:
    """Give a fast session's receive hot path the route of every (topic, kind) pair it receives, as
    its first record of each would. The compiled hot path answers only on a known route (the first
    record of a pair goes through the Python one, which adds it): without this, each test's first
    record, often the one under test, would never reach the compiled code."""
    if not session._fast or len(session._epochs) != 1:
        return
    hot = session._hot = session._hot or _Hot(session._epochs[session._current], session.device_id)
    for topic in session._recv_topics:
        for kind in session._recv_kinds:
            session._hot_route(hot, topic, kind)


def session_pairs(config: SessionConfig | None = None, app_aead: int = 10,
                  warm: bool = True) -> tuple[list[Session], list[Session]]:
    """([fast device, reference device], [fast backend, reference backend]); ``warm``: the fast
    ones with their hot routes known (:func:`warm_routes`)."""
    devices, backends = [], []
    for fast in (True, False):
        d = Session.from_edhoc(prk_out=PRK_OUT, c_i=C_I, c_r=C_R, is_initiator=True, device_id="dev-1",
                               now=0.0, random_bytes=rng(b"device"), config=config, app_aead=app_aead)
        b = Session.from_edhoc(prk_out=PRK_OUT, c_i=C_I, c_r=C_R, is_initiator=False, device_id="dev-1",
                               now=0.0, random_bytes=rng(b"backend"), config=config, app_aead=app_aead)
        d._fast = b._fast = fast
        if warm:
            warm_routes(d)
            warm_routes(b)
        devices.append(d)
        backends.append(b)
    return devices, backends


def same(sessions: list[Session], method: str, *args: Any) -> tuple[str, Any]:
    results = [outcome(getattr(s, method), *args) for s in sessions]
    assert results[0] == results[1], (method, results)
    assert sessions[0]._state(include_failed=True) == sessions[1]._state(include_failed=True)
    return results[0]


OPS = st.lists(st.one_of(
    st.tuples(st.just("up"), st.sampled_from([*UP_KINDS, *DOWN_KINDS, RecordKind.KEY_UPDATE, 0, 99]),
              st.binary(max_size=20), st.integers(1, 4)),
    st.tuples(st.just("down"), st.sampled_from([*DOWN_KINDS, *UP_KINDS]), st.binary(max_size=20),
              st.integers(1, 4)),
    st.tuples(st.just("deliver_up"), st.integers(0, 10**6), MUTATIONS),
    st.tuples(st.just("deliver_down"), st.integers(0, 10**6), MUTATIONS),
    st.tuples(st.just("retopic_up"), st.integers(0, 10**6), st.sampled_from(TOPICS)),
    st.tuples(st.just("key_update"), st.sampled_from(["device", "backend"]), st.binary(min_size=8, max_size=8)),
    st.tuples(st.just("poll"), st.sampled_from(["device", "backend"]), st.floats(0, 100)),
), max_size=30)


@settings(max_examples=150, deadline=None)
@given(OPS, st.booleans(), AEADS)
def test_fast_and_reference_sessions_behave_identically(ops: list[tuple[Any, ...]], small: bool,
                                                        app_aead: int) -> None:
    config = SessionConfig(max_records_per_key=6, key_update_after_records=6, max_failed_decryptions=3,
                           replay_window=4, max_buffered=2) if small else None
    devices, backends = session_pairs(config, app_aead)
    up: list[tuple[str, bytes]] = []
    down: list[tuple[str, bytes]] = []
    now = 0.0
    for op in ops:
        name = op[0]
        if name in ("up", "down"):
            senders, wire = (devices, up) if name == "up" else (backends, down)
            for _ in range(op[3]):
                status, value = same(senders, "seal", op[1], op[2], now)
                if status == "ok":
                    wire.append(value)
        elif name in ("deliver_up", "deliver_down"):
            wire, receivers = (up, backends) if name == "deliver_up" else (down, devices)
            if wire:
                topic, data = wire[op[1] % len(wire)]
                same(receivers, "open", topic, _mutate(bytearray(data), op[2]), now)
        elif name == "retopic_up":
            if up:
                same(backends, "open", op[2], up[op[1] % len(up)][1], now)
        elif name == "key_update":
            senders, wire = (devices, up) if op[1] == "device" else (backends, down)
            status, value = same(senders, "start_key_update", op[2], now)
            if status == "ok":
                wire.append(value)
        else:
            now += op[2]
            status, value = same(devices if op[1] == "device" else backends, "poll", now)
            if status == "ok":
                for event in value:
                    if hasattr(event, "payload"):
                        (up if op[1] == "device" else down).append((event.topic, event.payload))


def test_reference_session_flag_really_switches_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above is not vacuous: a reference session never touches the codec or the
    receive hot path, and a fast one takes the hot path for the usual record."""
    devices, backends = session_pairs()

    def boom(*_: Any) -> bytes:
        raise AssertionError("fast path used")

    monkeypatch.setattr(record.EpochCodec, "seal", boom)
    monkeypatch.setattr(record.EpochCodec, "open", boom)
    monkeypatch.setattr(Session, "_open_hot", boom)
    if record.speedups is not None:
        monkeypatch.setattr(record, "speedups", SpySpeedups(record.speedups, fail=True))
    topic, data = devices[1].seal(RecordKind.TELEMETRY, b"t", 0.0)
    assert backends[1].open(topic, data, 0.0)
    with pytest.raises(AssertionError):
        devices[0].seal(RecordKind.TELEMETRY, b"t", 0.0)
    with pytest.raises(AssertionError, match="fast path used"):
        backends[0].open(topic, data, 0.0)


def test_usual_records_take_the_hot_path_and_others_the_general_one(monkeypatch: pytest.MonkeyPatch,
                                                                     framing: str) -> None:
    """The hot path answers the usual record itself; it declines a KEY_UPDATE record, and is not
    asked while two epochs are held: the general path (which the codec serves) takes those. With
    the compiled framing, the compiled hot path answers every usual record but the first of its
    topic and kind (whose route the Python hot path adds); the KEY_UPDATE it declines, and so
    does the Python one after it."""
    devices, backends = session_pairs(warm=False)
    device, backend = devices[0], backends[0]
    python_answers: list[bool] = []
    real = Session._open_hot

    def spy(self: Session, *args: Any) -> Any:
        got = real(self, *args)
        python_answers.append(got is not None)
        return got

    monkeypatch.setattr(Session, "_open_hot", spy)
    compiled = SpySpeedups(record.speedups)
    if framing == "compiled":
        monkeypatch.setattr(record, "speedups", compiled)
    for text in (b"t", b"t2", b"t3"):
        topic, data = device.seal(RecordKind.TELEMETRY, text, 0.0)
        assert [e.plaintext for e in backend.open(topic, data, 0.0)] == [text]  # type: ignore[union-attr]
    topic, data = device.start_key_update(b"n" * 8, 0.0)
    events = backend.open(topic, data, 0.0)
    assert len(backend.epochs) == 2 and events  # KEY_UPDATE: declined by the hot paths
    topic, data = device.seal(RecordKind.TELEMETRY, b"u", 0.0)
    assert backend.open(topic, data, 0.0)  # two epochs held: no hot path asked
    if framing == "compiled":
        assert compiled.opens == [False, True, True, False]
        assert python_answers == [True, False]
        assert compiled.seals == 6  # the device's five records (its KEY_UPDATE among them), the backend's answer
    else:
        assert python_answers == [True, True, True, False]
        assert compiled.opens == [] and compiled.seals == 0


_UNLIMITED = SessionConfig(max_records_per_key=limits.MAX_PIV + 1, key_update_after_records=limits.MAX_PIV + 1)

def test_a_record_of_another_epoch_is_refused_alike() -> None:
    """The epoch byte is part of what the hot path recognises: a record naming an epoch the session
    does not hold is refused as unknown by both sessions, never counted as a failed decryption
    (more of them than max_failed_decryptions would otherwise close the session)."""
    devices, backends = session_pairs()
    _, (topic, data) = same(devices, "seal", RecordKind.TELEMETRY, b"reading", 0.0)
    rec = record.decode(data)
    other = record.Record(rec.kind, rec.kid, 1, rec.piv, rec.ciphertext).encode()
    for _ in range(5):
        assert same(backends, "open", topic, other, 0.0)[0] == "error"
    assert same(backends, "open", topic, data, 0.0)[0] == "ok"


def test_a_record_of_a_dropped_epoch_is_refused_after_a_key_update() -> None:
    """After a key update the hot path serves the new epoch only: a record sealed under the old
    epoch, held back until that epoch was dropped, is refused by both sessions."""
    devices, backends = session_pairs()
    _, (old_topic, old_data) = same(devices, "seal", RecordKind.TELEMETRY, b"old", 0.0)
    _, (topic, data) = same(devices, "seal", RecordKind.TELEMETRY, b"first", 0.0)
    assert same(backends, "open", topic, data, 0.0)[0] == "ok"  # the hot path was in use
    _, (ku_topic, ku_data) = same(devices, "start_key_update", b"n" * 8, 0.0)
    _, events = same(backends, "open", ku_topic, ku_data, 0.0)
    answer = next(e for e in events if isinstance(e, Publish))
    same(devices, "open", answer.topic, answer.payload, 0.0)
    _, (topic, data) = same(devices, "seal", RecordKind.TELEMETRY, b"new", 0.0)
    assert same(backends, "open", topic, data, 0.0)[0] == "ok"
    same(backends, "poll", 1e6)
    assert backends[0].epochs == backends[1].epochs == (1,)
    assert same(backends, "open", old_topic, old_data, 1e6)[0] == "error"
    _, (topic, data) = same(devices, "seal", RecordKind.TELEMETRY, b"newer", 1e6)
    assert same(backends, "open", topic, data, 1e6)[0] == "ok"


# Every Partial IV head (1, 2, 3, 5 and 9 bytes) and ciphertext head, up to the largest plaintext.
SEQS = st.one_of(st.integers(0, 2**40 - 2), st.sampled_from(
    [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**40 - 2]))
SIZES = st.one_of(st.integers(0, 300), st.sampled_from(
    [15, 16, 17, 247, 248, 65527, 65528, 65529, limits.MAX_PLAINTEXT]))


@settings(max_examples=200, deadline=None)
@given(SEQS, st.sampled_from(UP_KINDS), SIZES, MUTATIONS, st.integers(1, 3), AEADS)
def test_hot_path_agrees_at_any_sequence_number_and_size(seq: int, kind: RecordKind, size: int,
                                                         ops: list[tuple[str, int, int]], copies: int,
                                                         app_aead: int) -> None:
    """Fast and reference sessions, the device's numbers moved to ``seq``: the same record (mutated
    or not, delivered ``copies`` times) gives the same events, rejections and state."""
    devices, backends = session_pairs(_UNLIMITED, app_aead)
    for d in devices:
        d.advance_send_seq(seq)
    status, sealed = same(devices, "seal", kind, b"p" * size, 0.0)
    assert status == "ok"
    topic, data = sealed
    mutated = _mutate(bytearray(data), ops)
    for _ in range(copies):
        same(backends, "open", topic, mutated, 0.0)
    same(backends, "open", topic, data, 0.0)
    same(backends, "open", topic, mutated, 0.0)  # now a replay unless the mutation moved the number


_LONGER_HEADS = [(b"\x18", 1), (b"\x19", 2), (b"\x1a", 4), (b"\x1b", 8)]


@pytest.mark.parametrize("seq", [0, 5, 23, 24, 255, 256, 65535, 65536, 2**32 - 1])
def test_non_shortest_sequence_numbers_are_refused_by_both_sessions(seq: int) -> None:
    """A sealed record re-encoded with a longer Partial IV head than needed is not the same
    record: both sessions refuse it (the hot path leaves it to the general path), for every
    longer head, and the shortest form still opens afterwards."""
    devices, backends = session_pairs(_UNLIMITED)
    for d in devices:
        d.advance_send_seq(seq)
    _, (topic, data) = same(devices, "seal", RecordKind.TELEMETRY, b"reading", 0.0)
    rec = record.decode(data)
    header = data[:data.index(rec.kid) + len(rec.kid) + 1]  # array, kind, kid, one-byte epoch
    body = cbor.bstr_head(len(rec.ciphertext)) + rec.ciphertext
    shortest = cbor.uint_head(seq)
    longer = [head + seq.to_bytes(size, "big") for head, size in _LONGER_HEADS
              if len(head) + size > len(shortest) and seq < 2 ** (8 * size)]
    assert longer and header + shortest + body == data
    for piv in longer:
        status, _ = same(backends, "open", topic, header + piv + body, 0.0)
        assert status == "error"
    status, events = same(backends, "open", topic, data, 0.0)
    assert status == "ok" and len(events) == 1


@pytest.mark.parametrize("app_aead", AEAD_IDS)
@pytest.mark.parametrize("length", range(limits.MIN_TAG_LENGTH))
def test_ciphertexts_shorter_than_the_tag_are_refused_alike(length: int, app_aead: int) -> None:
    """A well-framed record whose ciphertext cannot even hold the shortest tag: the same refusal
    from both sessions (malformed, before any decryption, so no failed decryption is counted)."""
    devices, backends = session_pairs(app_aead=app_aead)
    _, (topic, data) = same(devices, "seal", RecordKind.TELEMETRY, b"", 0.0)
    ct = record.decode(data).ciphertext
    short = data[:len(data) - len(ct) - 1] + cbor.bstr_head(length) + ct[:length]
    same(backends, "open", topic, short, 0.0)
    for _ in range(5):  # more than max_failed_decryptions would close the session if they counted
        same(backends, "open", topic, short, 0.0)
    assert same(backends, "open", topic, data, 0.0)[0] == "ok"


@pytest.mark.parametrize("length", range(limits.MIN_TAG_LENGTH, 16))
def test_gcm_ciphertexts_shorter_than_its_tag_fail_decryption_alike(length: int) -> None:
    """8 to 15 bytes hold AES-CCM-16-64-128's tag but not A128GCM's: the record decoder (which does
    not know the session's AEAD) passes them, and the GCM session refuses them as a record that does
    not decrypt, counted like any other, the same on both paths."""
    config = SessionConfig(max_failed_decryptions=3)
    devices, backends = session_pairs(config, app_aead=1)
    _, (topic, data) = same(devices, "seal", RecordKind.TELEMETRY, b"", 0.0)
    ct = record.decode(data).ciphertext
    assert len(ct) == 16
    short = data[:len(data) - len(ct) - 1] + cbor.bstr_head(length) + ct[:length]
    for _ in range(2):
        assert same(backends, "open", topic, short, 0.0) == ("error", (DecryptError, Reason.DECRYPT_FAILED))
    assert same(backends, "open", topic, data, 0.0)[0] == "ok"
    _, (topic, data) = same(devices, "seal", RecordKind.TELEMETRY, b"", 0.0)
    short = data[:len(data) - len(ct) - 1] + cbor.bstr_head(length) + record.decode(data).ciphertext[:length]
    assert same(backends, "open", topic, short, 0.0) == ("error", (SessionError, Reason.KEY_LIMIT_REACHED))


@pytest.mark.parametrize("app_aead", AEAD_IDS)
@pytest.mark.parametrize("extra", [1, 2, 20])
def test_ciphertexts_longer_than_the_largest_plaintext_are_refused_alike(extra: int, app_aead: int) -> None:
    """Past the largest plaintext plus the longest tag, a record is refused as too large by both
    sessions (before any decryption) even while it fits the record size bound."""
    devices, backends = session_pairs(app_aead=app_aead)
    _, (topic, data) = same(devices, "seal", RecordKind.TELEMETRY, b"", 0.0)
    ct = record.decode(data).ciphertext
    big = bytes(limits.MAX_PLAINTEXT + limits.MAX_TAG_LENGTH + extra)
    forged = data[:len(data) - len(ct) - 1] + cbor.bstr_head(len(big)) + big
    assert len(forged) <= limits.MAX_RECORD_SIZE
    for _ in range(5):
        assert same(backends, "open", topic, forged, 0.0)[0] == "error"
    assert same(backends, "open", topic, data, 0.0)[0] == "ok"


_LONGER_BSTR_HEADS = [(b"\x58", 1), (b"\x59", 2), (b"\x5a", 4), (b"\x5b", 8)]


@pytest.mark.parametrize("app_aead", AEAD_IDS)
@pytest.mark.parametrize("size", [0, 7, 8, 15, 16, 239, 240, 247, 248, 65519, 65527])
def test_non_shortest_ciphertext_heads_are_refused_by_both_sessions(size: int, app_aead: int) -> None:
    """Likewise a ciphertext byte string with a longer length head than needed."""
    devices, backends = session_pairs(app_aead=app_aead)
    _, (topic, data) = same(devices, "seal", RecordKind.TELEMETRY, b"r" * size, 0.0)
    ct = record.decode(data).ciphertext
    shortest = cbor.bstr_head(len(ct))
    assert data.endswith(shortest + ct)
    header = data[:len(data) - len(shortest) - len(ct)]
    longer = [head + len(ct).to_bytes(n, "big") for head, n in _LONGER_BSTR_HEADS
              if len(head) + n > len(shortest) and len(ct) < 2 ** (8 * n)]
    assert longer
    for head in longer:
        status, _ = same(backends, "open", topic, header + head + ct, 0.0)
        assert status == "error"
    status, events = same(backends, "open", topic, data, 0.0)
    assert status == "ok" and len(events) == 1


@pytest.mark.parametrize("field", ["epoch", "piv"])
@pytest.mark.parametrize(("head", "value"), [
    (b"\x18", 0), (b"\x18", 23), (b"\x19", 0), (b"\x19", 5), (b"\x19", 255),
    (b"\x1a", 0), (b"\x1a", 65535), (b"\x1b", 0), (b"\x1b", 2**32 - 1),
])
def test_non_shortest_integers_are_refused_by_both_decoders(field: str, head: bytes, value: int) -> None:
    """The fast decoder reads the usual one- and three-byte heads itself: a longer head than the
    value needs is never accepted there (the reference decoder refuses it as not deterministic)."""
    width = {b"\x18": 1, b"\x19": 2, b"\x1a": 4, b"\x1b": 8}[head]
    long = head + value.to_bytes(width, "big")
    epoch, piv = (long, b"\x07") if field == "epoch" else (b"\x00", long)
    data = b"\x85\x01\x41\x00" + epoch + piv + b"\x48" + b"c" * 8
    assert record.decode_fast(data) is None
    check_decode(data)


@pytest.mark.parametrize("app_aead", AEAD_IDS)
def test_every_change_to_the_record_header_is_refused_alike(app_aead: int) -> None:
    """Each byte of the header the hot paths compare whole (array head, kind, kid, epoch) set to
    every other value: both sessions give the same answer (the kid and the epoch are not in the
    AEAD's input as bytes of the record, so only this comparison refuses a changed kid or epoch
    byte before the AEAD would accept it), and the record itself still opens afterwards."""
    devices, backends = session_pairs(app_aead=app_aead)
    _, (topic, data) = same(devices, "seal", RecordKind.TELEMETRY, b"reading", 0.0)
    header_len = 2 + len(cbor.bstr_head(len(backends[0].recipient_id))) + len(backends[0].recipient_id) + 1
    for pos in range(header_len):
        for value in range(256):
            if value != data[pos]:
                changed = data[:pos] + bytes([value]) + data[pos + 1:]
                assert same(backends, "open", topic, changed, 0.0)[0] == "error", (pos, value)
    status, events = same(backends, "open", topic, data, 0.0)
    assert status == "ok" and len(events) == 1


@pytest.mark.parametrize("piv", [2**40, 2**40 + 1, 2**63, 2**64 - 1])
def test_sequence_numbers_beyond_the_largest_partial_iv_are_refused_alike(piv: int) -> None:
    """A Partial IV head of 8 bytes holding a number above 2**40 - 1 (which no sender can seal) is
    refused as out of range by both sessions, not taken to the AEAD."""
    devices, backends = session_pairs()
    _, (topic, data) = same(devices, "seal", RecordKind.TELEMETRY, b"reading", 0.0)
    rec = record.decode(data)
    header = data[:data.index(rec.kid) + len(rec.kid) + 1]
    body = cbor.bstr_head(len(rec.ciphertext)) + rec.ciphertext
    for _ in range(2):
        status, err = same(backends, "open", topic, header + b"\x1b" + piv.to_bytes(8, "big") + body, 0.0)
        assert status == "error" and err[1] is not Reason.DECRYPT_FAILED
    assert same(backends, "open", topic, data, 0.0)[0] == "ok"
