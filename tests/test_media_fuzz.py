"""Hypothesis: every media decoder, fed arbitrary bytes or mutations of valid bodies, either
decodes or raises a SealmqError subclass; never another exception."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given
from hypothesis import strategies as st

from backend.media import MediaStore
from backend.storage import Storage
from sealmq import cbor, media
from sealmq.errors import DecodeError, Reason, SealmqError
from sealmq.media import (
    Ack,
    AckStatus,
    Control,
    ControlOp,
    Manifest,
    decode_ack,
    decode_chunk,
    decode_control,
    decode_manifest,
    encode_chunk,
    parse_signed_manifest,
    rejected_ack,
    sign_manifest,
    verify_manifest,
)
from sealmq.media_receiver import MediaLimits
from sealmq.topics import RecordKind

KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(32))
MANIFEST = Manifest.create(device_id="cam-01", name="a.png", content_type="image/png", size=70_000,
                           sha256=bytes(32), created=5, chunk_size=32_768)
SIGNED = sign_manifest(KEY, MANIFEST)
TID = MANIFEST.transfer_id
VALID = [
    SIGNED,
    MANIFEST.to_cbor(),
    encode_chunk(TID, 1, b"\x01" * 40),
    Ack(TID, AckStatus.IN_PROGRESS, 3, b"\x81\x01").encode(),
    rejected_ack(TID, Reason.TOO_LARGE).encode(),
    Control(ControlOp.ABORT, TID).encode(),
]

DECODERS: list[Callable[[bytes], Any]] = [
    decode_chunk, decode_ack, decode_control, decode_manifest, parse_signed_manifest,
    lambda b: verify_manifest(b, KEY.public_key()),
]


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for op, pos, val in edits:
        if not out:
            out.append(val)
            continue
        i = pos % len(out)
        if op == 0:
            out[i] = val
        elif op == 1:
            del out[i]
        elif op == 2:
            out.insert(i, val)
        else:
            del out[i:]
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                 max_size=4)


def only_sealmq_errors(body: bytes) -> None:
    for decode in DECODERS:
        with contextlib.suppress(SealmqError):
            decode(body)


@given(st.binary(max_size=300))
def test_arbitrary_bytes(body: bytes) -> None:
    only_sealmq_errors(body)


@given(st.sampled_from(VALID), edits)
def test_mutated_valid_bodies(body: bytes, e: list[tuple[int, int, int]]) -> None:
    only_sealmq_errors(mutate(body, e))


def test_valid_bodies_decode() -> None:
    # The mutation test starts from bodies that really are valid.
    assert verify_manifest(SIGNED, KEY.public_key()) == MANIFEST
    assert decode_manifest(VALID[1]) == MANIFEST
    assert decode_chunk(VALID[2]).index == 1
    assert decode_ack(VALID[3]).base == 3
    assert decode_ack(VALID[4]).status is AckStatus.REJECTED
    assert decode_control(VALID[5]).op is ControlOp.ABORT


_tmp = tempfile.TemporaryDirectory()
_STORE = MediaStore(Path(_tmp.name) / "data", Storage(Path(_tmp.name) / "db"), limits=MediaLimits(), durable=False)
_STORE.handle("cam-01", KEY.public_key(), RecordKind.MEDIA_MANIFEST, SIGNED, 1.0)


@given(st.sampled_from([RecordKind.MEDIA_MANIFEST, RecordKind.MEDIA_CHUNK, RecordKind.MEDIA_CONTROL]),
       st.sampled_from(VALID), edits)
def test_store_handles_mutations_with_sealmq_errors_only(kind: RecordKind, body: bytes,
                                                         e: list[tuple[int, int, int]]) -> None:
    with contextlib.suppress(SealmqError):
        _STORE.handle("cam-01", KEY.public_key(), kind, mutate(body, e), 2.0)
    # Whatever came in, the one genuine transfer is still open (an ABORT body can close it: reopen).
    if not _STORE.open_transfers():
        _STORE.handle("cam-01", KEY.public_key(), RecordKind.MEDIA_MANIFEST, SIGNED, 3.0)
    assert len(_STORE.open_transfers()) <= 1


# --- decode_chunk's fast path and its reference: the same chunk or the same error ----------------

def chunk_outcome(decode: Callable[[bytes], Any], body: bytes) -> tuple[Any, ...]:
    try:
        c = decode(body)
    except SealmqError as err:
        return ("error", type(err), err.reason)
    return ("ok", c.transfer_id, c.index, c.data)


def reference_chunk(body: bytes) -> Any:
    # decode_chunk's size bound first, as decode_chunk has it, then the generic decoder only
    if len(body) > media.MAX_CHUNK_SIZE + media.CHUNK_ENVELOPE:
        raise DecodeError(Reason.TOO_LARGE, "chunk message too large")
    return media._decode_chunk_reference(body)


# chunks at every width of the index and data heads and their edges, and at the size bounds
CHUNK_INDEXES = st.one_of(st.integers(0, 300), st.sampled_from(
    [23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**40]))
CHUNK_SIZES = st.one_of(st.integers(0, 300), st.sampled_from(
    [23, 24, 255, 256, media.MAX_CHUNK_SIZE - 1, media.MAX_CHUNK_SIZE, media.MAX_CHUNK_SIZE + 1, 65535, 65536]))


@given(CHUNK_INDEXES, CHUNK_SIZES, st.binary(min_size=16, max_size=16) | st.binary(min_size=14, max_size=18),
       edits | st.just([]))
def test_chunk_fast_path_decides_like_the_reference(index: int, size: int, tid: bytes,
                                                    e: list[tuple[int, int, int]]) -> None:
    # built with the generic encoder (so out-of-bounds values are possible), then maybe mutated
    body = mutate(cbor.dumps([tid, index, bytes([index & 0xFF]) * size]), e) if e else cbor.dumps(
        [tid, index, bytes([index & 0xFF]) * size])
    assert chunk_outcome(decode_chunk, body) == chunk_outcome(reference_chunk, body)


@given(st.binary(max_size=300) | st.builds(lambda b: b"\x83\x50" + b, st.binary(max_size=80)))
def test_chunk_fast_path_on_arbitrary_bytes(body: bytes) -> None:
    assert chunk_outcome(decode_chunk, body) == chunk_outcome(reference_chunk, body)


def _uint_forms(major: int, value: int) -> list[bytes]:
    """Every head of ``value`` in major type ``major``: the shortest and each longer one."""
    forms = [bytes([major << 5 | value])] if value < 24 else []
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * width):
            forms.append(bytes([major << 5 | info]) + value.to_bytes(width, "big"))
    return forms


def test_chunk_fast_path_at_every_head_form_and_bound() -> None:
    """Each index and data length at its edges, written with every head form (shortest or not),
    with data of the stated length, one byte short and one byte over: both paths agree."""
    checked = 0
    for index in (0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32):
        for size in (0, 23, 24, 255, 256, media.MAX_CHUNK_SIZE, media.MAX_CHUNK_SIZE + 1):
            for index_head in _uint_forms(0, index):
                for data_head in _uint_forms(2, size):
                    for data in (b"d" * size, b"d" * (size - 1), b"d" * (size + 1)):
                        body = b"\x83\x50" + TID + index_head + data_head + data
                        assert chunk_outcome(decode_chunk, body) == chunk_outcome(reference_chunk, body)
                        checked += 1
    assert checked > 1000


def test_chunk_fast_path_is_taken_and_declines_non_shortest_heads() -> None:
    usual = encode_chunk(TID, 300, b"d" * 1000)
    fast = media._decode_chunk_fast(usual)
    assert fast is not None and (fast.index, fast.data) == (300, b"d" * 1000)
    # index 5 written with a one-byte argument (0x18 0x05): not deterministic; the fast path
    # declines and the reference refuses it
    long_index = usual[:18] + b"\x18\x05" + usual[21:]
    assert media._decode_chunk_fast(long_index) is None
    assert chunk_outcome(decode_chunk, long_index)[:3] == ("error", chunk_outcome(reference_chunk, long_index)[1],
                                                             Reason.NOT_DETERMINISTIC)
    # a trailing byte: declined by the fast path, TRAILING_DATA from the reference
    assert media._decode_chunk_fast(usual + b"\x00") is None
    assert chunk_outcome(decode_chunk, usual + b"\x00")[2] is Reason.TRAILING_DATA
