"""The sealmq record format: golden vectors (both directions), strict decoding, binding, replay window.

Regenerate tests/vectors/sealmq_records.json only on a deliberate format change:
``python3 -m tests.test_record`` (then review the diff).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from hypothesis import given
from hypothesis import strategies as st

from sealmq import cbor, limits, oscore, record
from sealmq.errors import DecodeError, DecryptError, Reason, ReplayError, SealmqError
from sealmq.replay import ReplayWindow
from sealmq.topics import RecordKind
from tests.conftest import VECTORS, load_vectors

VECTOR_FILE = "sealmq_records.json"
TRACE1 = load_vectors("rfc9529_trace1.json")["values"]

# Inputs of the golden vectors: fixed keys (epoch 0 of RFC 9529 trace 1's session), fixed records.
CASES: list[dict[str, Any]] = [
    {"name": "telemetry, device->backend, epoch 0, piv 0", "is_initiator": True,
     "kind": 1, "epoch": 0, "piv": 0, "topic": "sealmq/v1/dev-1/data/up", "plaintext": "7b2274223a32317d"},
    {"name": "command, backend->device, epoch 0, piv 20", "is_initiator": False,
     "kind": 2, "epoch": 0, "piv": 20, "topic": "sealmq/v1/dev-1/data/down", "plaintext": "a1636f6e6f6666"},
    {"name": "media chunk, epoch 3, piv 2**32 (5-byte Partial IV)", "is_initiator": True,
     "kind": 6, "epoch": 3, "piv": 2**32, "topic": "sealmq/v1/dev-1/media/up",
     "plaintext": "00" * 40},
    {"name": "empty plaintext, largest piv", "is_initiator": False,
     "kind": 7, "epoch": 0, "piv": 2**40 - 1, "topic": "sealmq/v1/dev-1/media/down", "plaintext": ""},
]


def h(value: str) -> bytes:
    return bytes.fromhex(value)


def contexts(app_aead: int = 10) -> tuple[oscore.SecurityContext, oscore.SecurityContext]:
    prk_out, c_i, c_r = h(TRACE1["PRK_out"]), h(TRACE1["C_I"]), h(TRACE1["C_R"])
    return (oscore.from_edhoc(prk_out, c_i, c_r, True, app_aead=app_aead),
            oscore.from_edhoc(prk_out, c_i, c_r, False, app_aead=app_aead))


def compute(case: dict[str, Any]) -> dict[str, str]:
    device, backend = contexts()
    sender = device if case["is_initiator"] else backend
    kind = RecordKind(case["kind"])
    piv_bytes = oscore.partial_iv(case["piv"])
    return {
        "sender_key": sender.sender_key.hex(),
        "common_iv": sender.common_iv.hex(),
        "kid": sender.sender_id.hex(),
        "nonce": sender.sender_nonce(piv_bytes).hex(),
        "options": record.options(case["epoch"], kind, case["topic"]).hex(),
        "aad": record.record_aad(10, kid=sender.sender_id, piv=case["piv"], epoch=case["epoch"],
                                 kind=kind, topic=case["topic"]).hex(),
        "record": record.seal(sender, kind=kind, epoch=case["epoch"], piv=case["piv"],
                              topic=case["topic"], plaintext=h(case["plaintext"])).hex(),
    }


def build_vectors() -> dict[str, Any]:
    return {
        "about": "sealmq record golden vectors: keys of RFC 9529 trace 1's OSCORE contexts (epoch 0 "
                 "of its PRK_out, C_I=2d, C_R=18); record = [kind, kid, epoch, piv, ciphertext]; "
                 "AAD = Enc_structure with aad_array "
                 "[1, [10], kid, piv_bytes, bstr .cbor [epoch, kind, topic]]",
        "vectors": [{"input": case, "output": compute(case)} for case in CASES],
    }


STORED = load_vectors(VECTOR_FILE)["vectors"] if (VECTORS / VECTOR_FILE).exists() else []


def test_vector_file_covers_all_cases() -> None:
    assert [v["input"] for v in STORED] == CASES


@pytest.mark.parametrize("index", range(len(CASES)))
def test_golden_encode(index: int) -> None:
    assert compute(STORED[index]["input"]) == STORED[index]["output"]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_golden_decode(index: int) -> None:
    case, out = STORED[index]["input"], STORED[index]["output"]
    rec = record.decode(h(out["record"]))
    assert rec.kind == case["kind"]
    assert rec.kid.hex() == out["kid"]
    assert (rec.epoch, rec.piv) == (case["epoch"], case["piv"])
    assert rec.encode().hex() == out["record"]
    device, backend = contexts()
    receiver = backend if case["is_initiator"] else device
    assert record.open_(receiver, rec, case["topic"]) == h(case["plaintext"])
    # Independently of sealmq's code paths: the stored key, nonce and AAD open the stored ciphertext.
    raw = AESCCM(h(out["sender_key"]), tag_length=8)
    assert raw.decrypt(h(out["nonce"]), rec.ciphertext, h(out["aad"])) == h(case["plaintext"])
    enc_structure = ["Encrypt0", b"", cbor.dumps([1, [10], rec.kid, oscore.partial_iv(rec.piv),
                                                   h(out["options"])])]
    assert cbor.dumps(enc_structure).hex() == out["aad"]
    assert cbor.loads(h(out["options"])) == [case["epoch"], case["kind"], case["topic"]]


# --- binding: the record fails anywhere else -------------------------------------------------------

def _sample() -> tuple[bytes, oscore.SecurityContext, str]:
    device, backend = contexts()
    topic = "sealmq/v1/dev-1/data/up"
    data = record.seal(device, kind=RecordKind.TELEMETRY, epoch=2, piv=7, topic=topic, plaintext=b"21.5C")
    return data, backend, topic


def test_open_roundtrip() -> None:
    data, backend, topic = _sample()
    assert record.open_(backend, record.decode(data), topic) == b"21.5C"


@pytest.mark.parametrize("other_topic", ["sealmq/v1/dev-2/data/up", "sealmq/v1/dev-1/media/up",
                                         "sealmq/v1/dev-1/data/down", "sealmq/v1/dev-1/data/up/"])
def test_moved_to_another_topic_fails(other_topic: str) -> None:
    data, backend, _ = _sample()
    with pytest.raises(DecryptError):
        record.open_(backend, record.decode(data), other_topic)


@pytest.mark.parametrize("field", ["kind", "epoch", "piv"])
def test_changed_header_fails(field: str) -> None:
    data, backend, topic = _sample()
    rec = record.decode(data)
    changed = {
        "kind": record.Record(RecordKind.REPLY, rec.kid, rec.epoch, rec.piv, rec.ciphertext),
        "epoch": record.Record(rec.kind, rec.kid, rec.epoch + 1, rec.piv, rec.ciphertext),
        "piv": record.Record(rec.kind, rec.kid, rec.epoch, rec.piv + 1, rec.ciphertext),
    }[field]
    with pytest.raises(DecryptError):
        record.open_(backend, record.decode(changed.encode()), topic)


def test_wrong_direction_key_fails() -> None:
    data, _, topic = _sample()
    device, _ = contexts()
    with pytest.raises(DecryptError):
        record.open_(device, record.decode(data), topic)  # the sender cannot open its own record


# --- strict decoding --------------------------------------------------------------------------------

def _enc(items: list[Any]) -> bytes:
    return cbor.dumps(items)


@pytest.mark.parametrize(("items", "reason"), [
    ([1, b"\x18", 0, 0], Reason.WRONG_TYPE),
    ([1, b"\x18", 0, 0, b"t" * 8, 0], Reason.WRONG_TYPE),
    ([10, b"\x18", 0, 0, b"t" * 8], Reason.UNSUPPORTED),
    ([0, b"\x18", 0, 0, b"t" * 8], Reason.UNSUPPORTED),
    ([-1, b"\x18", 0, 0, b"t" * 8], Reason.WRONG_TYPE),
    ([1, "18", 0, 0, b"t" * 8], Reason.WRONG_TYPE),
    ([1, b"123456789", 0, 0, b"t" * 8], Reason.TOO_LARGE),
    ([1, b"\x18", 2**32, 0, b"t" * 8], Reason.WRONG_TYPE),
    ([1, b"\x18", 0, 2**40, b"t" * 8], Reason.WRONG_TYPE),
    ([1, b"\x18", 0, -1, b"t" * 8], Reason.WRONG_TYPE),
    ([1, b"\x18", 0, 0, b"t" * 7], Reason.MALFORMED),
    ([1, b"\x18", 0, 0, "text"], Reason.WRONG_TYPE),
    ([True, b"\x18", 0, 0, b"t" * 8], Reason.WRONG_TYPE),
])
def test_decode_rejects(items: list[Any], reason: Reason) -> None:
    with pytest.raises(DecodeError) as info:
        record.decode(_enc(items))
    assert info.value.reason is reason


def test_decode_rejects_non_deterministic_and_oversized() -> None:
    good = _enc([1, b"\x18", 0, 0, b"t" * 8])
    with pytest.raises(DecodeError) as info:
        record.decode(b"\x85\x18\x01" + good[2:])  # kind 1 as a two-byte integer
    assert info.value.reason is Reason.NOT_DETERMINISTIC
    with pytest.raises(DecodeError):
        record.decode(b"\x9f" + good[1:] + b"\xff")  # indefinite-length array
    with pytest.raises(DecodeError) as info:
        record.decode(good + b"\x00")
    assert info.value.reason is Reason.TRAILING_DATA
    with pytest.raises(DecodeError) as info:
        record.decode(b"\x00" * (limits.MAX_RECORD_SIZE + 1))
    assert info.value.reason is Reason.TOO_LARGE
    # the largest plaintext with the longest tag (A128GCM's 16 bytes) decodes; one byte more does not
    record.decode(_enc([6, b"\x18", 0, 0, b"t" * (limits.MAX_PLAINTEXT + 16)]))
    big = _enc([6, b"\x18", 0, 0, b"t" * (limits.MAX_PLAINTEXT + 17)])
    with pytest.raises(DecodeError):
        record.decode(big)


@pytest.mark.parametrize("app_aead", [10, 1])
def test_largest_record_fits_the_size_bound(app_aead: int) -> None:
    device, backend = contexts(app_aead)
    topic = "sealmq/v1/dev-1/media/up"
    data = record.seal(device, kind=RecordKind.MEDIA_CHUNK, epoch=limits.MAX_EPOCH, piv=limits.MAX_PIV,
                       topic=topic, plaintext=b"x" * limits.MAX_PLAINTEXT)
    assert len(data) <= limits.MAX_RECORD_SIZE
    assert record.open_(backend, record.decode(data), topic) == b"x" * limits.MAX_PLAINTEXT
    with pytest.raises(SealmqError):
        record.seal(device, kind=RecordKind.MEDIA_CHUNK, epoch=0, piv=0, topic=topic,
                    plaintext=b"x" * (limits.MAX_PLAINTEXT + 1))


@given(st.binary(max_size=200))
def test_decode_arbitrary_bytes_only_raises_decode_error(data: bytes) -> None:
    try:
        rec = record.decode(data)
    except DecodeError:
        return
    assert rec.encode() == data  # whatever is accepted is canonical


@given(st.data())
def test_decode_mutated_records(data: st.DataObject) -> None:
    base = bytearray(h(STORED[data.draw(st.integers(0, len(STORED) - 1))]["output"]["record"]))
    ops = data.draw(st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]),
                                       st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
    for op, pos, byte in ops:
        if not base:
            break
        i = pos % len(base)
        if op == "flip":
            base[i] ^= 1 << (byte % 8)
        elif op == "insert":
            base.insert(i, byte)
        elif op == "delete":
            del base[i]
        else:
            del base[i:]
    try:
        rec = record.decode(bytes(base))
    except DecodeError:
        return
    assert rec.encode() == bytes(base)


# --- replay window ----------------------------------------------------------------------------------

def test_replay_window_basics() -> None:
    w = ReplayWindow(4)
    for seq in (0, 2, 1, 5):
        w.check(seq)
        w.mark(seq)
    for seq in (0, 1, 2, 5):
        with pytest.raises(ReplayError):
            w.check(seq)
    w.check(3)  # in the window, unseen
    w.check(4)
    w.mark(4)
    with pytest.raises(ReplayError):
        w.check(1)  # 5 - 1 >= 4: too old
    w.mark(2**40 - 1)  # a huge jump stays cheap and forgets the past
    assert w.state() == (2**40 - 1, 1)
    with pytest.raises(ReplayError):
        w.check(2**40 - 5)
    w.check(2**40 - 4)


def test_replay_window_check_does_not_mark() -> None:
    w = ReplayWindow()
    w.check(3)
    w.check(3)
    assert w.state() == (-1, 0)


@given(st.lists(st.integers(0, 600), max_size=80), st.sampled_from([1, 8, 32, 256]))
def test_replay_window_matches_model(seqs: list[int], size: int) -> None:
    w = ReplayWindow(size)
    seen: set[int] = set()
    highest = -1
    for seq in seqs:
        fresh = seq not in seen and seq > highest - size
        try:
            w.check(seq)
            accepted = True
        except ReplayError:
            accepted = False
        assert accepted == fresh
        if accepted:
            w.mark(seq)
            seen.add(seq)
            highest = max(highest, seq)
    assert w.highest == highest


if __name__ == "__main__":
    (VECTORS / VECTOR_FILE).write_text(json.dumps(build_vectors(), indent=1) + "\n")
    print(f"wrote {VECTORS / VECTOR_FILE}")
