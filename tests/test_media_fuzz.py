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
from sealmq.errors import Reason, SealmqError
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
