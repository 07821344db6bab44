"""Media wire formats: golden vectors both ways, COSE_Sign1 for every key type, bitmaps, bounds."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from sealmq import cbor
from sealmq.cose import ALG_EDDSA, ALG_ES256, ALG_PS256
from sealmq.errors import ConfigError, DecodeError, MediaError, Reason
from sealmq.media import (
    CHUNK_ENVELOPE,
    MAX_ACK_BITMAP,
    MAX_CHUNK_SIZE,
    MAX_RECORD_PLAINTEXT,
    Ack,
    AckStatus,
    Bitmap,
    Chunk,
    Control,
    ControlOp,
    Manifest,
    decode_ack,
    decode_chunk,
    decode_control,
    decode_manifest,
    encode_chunk,
    max_chunk_size_for,
    parse_signed_manifest,
    rejected_ack,
    sign_manifest,
    transfer_id,
    verify_manifest,
)

ED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
EC_KEY = ec.derive_private_key(0x1234567890ABCDEF, ec.SECP256R1())
MANIFEST = Manifest.create(
    device_id="cam-01", name="cat.png", content_type="image/png", size=100_000, sha256=bytes(range(32)),
    created=1_764_000_000, chunk_size=32_768,
)
TID = "dd9d404738f3c2b4106ab3e4539e3d69"
MANIFEST_HEX = (
    "a90150" + TID + "026663616d2d303103676361742e706e670469696d6167652f706e67051a000186a006582000010203"
    "0405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f071a69248100081980000904"
)
ED_SIG = (
    "228e462f0458faef8b40dfe4af918d92b7547d597002550cfaaa6462f73c4e19c24759642d793fd81110e21228b6d6c5"
    "6b92e89e3f7ef3569331df26164cb009"
)
EC_SIG = (
    "dca36ec8fbe8a980b349e07ba0926d06afc64d9cec5ff19b574384c8c71584f6d3b99090ba7fee298aa1d1387674f09f"
    "2a6abe67a2ec6e505d78907e0514ab98"
)
# COSE_Sign1 = [h'A10127' / {1: -8} /, {}, payload, signature]
ED_COSE_HEX = "8443a10127a05864" + MANIFEST_HEX + "5840" + ED_SIG
EC_COSE_HEX = "8443a10126a05864" + MANIFEST_HEX + "5840" + EC_SIG


def test_manifest_golden_both_ways() -> None:
    assert MANIFEST.transfer_id.hex() == TID
    assert MANIFEST.chunk_count == 4
    assert MANIFEST.to_cbor().hex() == MANIFEST_HEX
    assert decode_manifest(bytes.fromhex(MANIFEST_HEX)) == MANIFEST


@pytest.mark.parametrize(("key", "golden"), [(ED_KEY, ED_COSE_HEX), (EC_KEY, EC_COSE_HEX)])
def test_cose_sign1_golden_both_ways(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
                                     golden: str) -> None:
    # Ed25519 and RFC 6979 ECDSA are deterministic, so the signed bytes are a fixed vector.
    assert sign_manifest(key, MANIFEST).hex() == golden
    assert verify_manifest(bytes.fromhex(golden), key.public_key()) == MANIFEST


def test_sig_structure_checked_by_openssl(tmp_path: Path) -> None:
    """Independent check: openssl verifies our Ed25519 signature over a hand-built Sig_structure."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    payload = bytes.fromhex(MANIFEST_HEX)
    # ["Signature1", h'A10127', h'', payload] written out by hand (RFC 9052 section 4.4)
    tbs = bytes.fromhex("846a5369676e61747572653143a1012740" + "5864") + payload
    (tmp_path / "tbs").write_bytes(tbs)
    (tmp_path / "sig").write_bytes(bytes.fromhex(ED_SIG))
    (tmp_path / "pub.pem").write_bytes(ED_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    ok = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin",
                         "-in", "tbs", "-sigfile", "sig"], cwd=tmp_path, capture_output=True, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (tmp_path / "tbs").write_bytes(tbs[:-1] + b"\x00")
    bad = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin",
                          "-in", "tbs", "-sigfile", "sig"], cwd=tmp_path, capture_output=True, check=False)
    assert bad.returncode != 0


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize(
    ("key", "alg"),
    [(ED_KEY, ALG_EDDSA), (EC_KEY, ALG_ES256), (RSA_KEY, ALG_PS256),
     (ed448.Ed448PrivateKey.generate(), ALG_EDDSA)],
    ids=["ed25519", "p256", "rsa2048", "ed448"],
)
def test_sign_verify_each_key_type(key: object, alg: int) -> None:
    signed = sign_manifest(key, MANIFEST)  # type: ignore[arg-type]
    assert parse_signed_manifest(signed).alg == alg
    assert verify_manifest(signed, key.public_key()) == MANIFEST  # type: ignore[attr-defined]
    # Any flipped signature bit fails with BAD_SIGNATURE.
    arr = cbor.loads(signed)
    arr[3] = bytes([arr[3][0] ^ 1]) + arr[3][1:]
    with pytest.raises(MediaError) as exc:
        verify_manifest(cbor.dumps(arr), key.public_key())  # type: ignore[attr-defined]
    assert exc.value.reason is Reason.BAD_SIGNATURE


def test_forged_and_confused_signatures() -> None:
    signed = bytes.fromhex(ED_COSE_HEX)
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(MediaError) as exc:
        verify_manifest(signed, other.public_key())
    assert exc.value.reason is Reason.BAD_SIGNATURE
    # An EdDSA-labelled manifest offered against a P-256 device key: alg must follow the key.
    with pytest.raises(MediaError) as exc:
        verify_manifest(signed, EC_KEY.public_key())
    assert exc.value.reason is Reason.BAD_SIGNATURE
    # A payload changed after signing (bigger size, same signature).
    arr = cbor.loads(signed)
    forged = Manifest.create(device_id="cam-01", name="cat.png", content_type="image/png", size=200_000,
                             sha256=bytes(range(32)), created=1_764_000_000, chunk_size=32_768)
    arr[2] = forged.to_cbor()
    with pytest.raises(MediaError) as exc:
        verify_manifest(cbor.dumps(arr), ED_KEY.public_key())
    assert exc.value.reason is Reason.BAD_SIGNATURE


def test_weak_and_unsupported_keys_refused() -> None:
    with pytest.raises(MediaError) as exc:
        sign_manifest(ec.generate_private_key(ec.SECP384R1()), MANIFEST)
    assert exc.value.reason is Reason.UNSUPPORTED_ALGORITHM
    with pytest.raises(MediaError) as exc:
        sign_manifest(rsa.generate_private_key(public_exponent=65537, key_size=1024), MANIFEST)
    assert exc.value.reason is Reason.WEAK_KEY


def test_manifest_rules() -> None:
    # The transfer id is bound to device, hash, size and name.
    assert transfer_id("cam-02", bytes(range(32)), 100_000, "cat.png") != MANIFEST.transfer_id
    assert transfer_id("cam-01", bytes(range(32)), 100_000, "dog.png") != MANIFEST.transfer_id
    m = cbor.loads(bytes.fromhex(MANIFEST_HEX))
    for key, value, reason in [
        (1, bytes(16), Reason.MALFORMED),  # tid not derived from the fields
        (9, 5, Reason.MALFORMED),  # chunk count inconsistent
        (8, 100, Reason.TOO_LARGE),  # chunk size below the minimum
        (3, "", Reason.WRONG_TYPE),  # empty name
        (3, "a\nb", Reason.WRONG_TYPE),  # control character in the name
        (4, "png", Reason.WRONG_TYPE),  # not type/subtype
        (2, "Cam 01", Reason.WRONG_TYPE),  # not a device id
    ]:
        bad = dict(m)
        bad[key] = value
        with pytest.raises((MediaError, DecodeError)) as exc:
            decode_manifest(cbor.dumps(bad))
        assert exc.value.reason is reason, (key, value)
    extra = dict(m)
    extra[10] = 1
    with pytest.raises(DecodeError):
        decode_manifest(cbor.dumps(extra))


def test_other_bodies_golden_both_ways() -> None:
    tid = bytes.fromhex(TID)
    vectors = [
        (encode_chunk(tid, 3, b"abc"), "8350" + TID + "0343616263"),
        (Ack(tid, AckStatus.IN_PROGRESS, 2, b"\xa0").encode(), "8450" + TID + "000241a0"),
        (rejected_ack(tid, Reason.HASH_MISMATCH).encode(),
         "8550" + TID + "0200406d686173685f6d69736d61746368"),
        (Control(ControlOp.STATUS, tid).encode(), "820150" + TID),
    ]
    for body, hex_ in vectors:
        assert body.hex() == hex_
    assert decode_chunk(bytes.fromhex(vectors[0][1])) == Chunk(tid, 3, b"abc")
    assert decode_ack(bytes.fromhex(vectors[1][1])) == Ack(tid, AckStatus.IN_PROGRESS, 2, b"\xa0")
    rejected = Ack(tid, AckStatus.REJECTED, 0, b"", Reason.HASH_MISMATCH)
    assert decode_ack(bytes.fromhex(vectors[2][1])) == rejected
    assert decode_control(bytes.fromhex(vectors[3][1])) == Control(ControlOp.STATUS, tid)


@pytest.mark.parametrize(
    "body",
    [
        cbor.dumps([bytes(15), 0, b""]),  # short tid
        cbor.dumps([bytes(16), -1, b""]),  # negative index
        cbor.dumps([bytes(16), 0, b"", 1]),  # extra element
        cbor.dumps([bytes(16), 0, "text"]),
    ],
)
def test_bad_chunks(body: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_chunk(body)


def test_bad_acks_and_controls() -> None:
    tid = bytes(16)
    for body in [
        cbor.dumps([tid, 3, 0, b""]),  # unknown status
        cbor.dumps([tid, 0, 0, b"\x80\x00"]),  # untrimmed bitmap: two encodings of one ack
        cbor.dumps([tid, 2, 0, b""]),  # rejected without reason
        cbor.dumps([tid, 0, 0, b"", "x"]),  # reason on a non-rejection
        cbor.dumps([tid, 0, 0, bytes(MAX_ACK_BITMAP) + b"\x01"]),  # over the bitmap bound
    ]:
        with pytest.raises(DecodeError):
            decode_ack(body)
    with pytest.raises(DecodeError):
        decode_control(cbor.dumps([9, tid]))
    # An unknown reason from a newer peer is still a rejection.
    assert decode_ack(cbor.dumps([tid, 2, 0, b"", "new_reason"])).reason is Reason.PEER_ERROR


def test_chunk_sizes_fit_a_sealed_record() -> None:
    assert max_chunk_size_for() == MAX_CHUNK_SIZE == 63 * 1024
    # The largest chunk body stays within AES-CCM's 65,535-byte plaintext limit.
    body = encode_chunk(bytes(16), 2**32 - 1, bytes(MAX_CHUNK_SIZE))
    assert len(body) <= MAX_RECORD_PLAINTEXT
    assert len(body) - MAX_CHUNK_SIZE <= CHUNK_ENVELOPE
    assert max_chunk_size_for(32 * 1024) == 31 * 1024
    # Broker limit: chunk + envelope + record overhead fits the message limit.
    for limit in (4096, 10_000, 40_000, 65_600, 1 << 28):
        size = max_chunk_size_for(limit)
        assert size % 1024 == 0
        assert size + CHUNK_ENVELOPE + 64 <= limit
    with pytest.raises(ConfigError):
        max_chunk_size_for(1000)
    with pytest.raises(MediaError):
        encode_chunk(bytes(16), 0, bytes(MAX_CHUNK_SIZE + 1))


def test_bitmap_ack_view_round_trip() -> None:
    bm = Bitmap(20)
    for i in (0, 1, 2, 5, 9, 19):
        bm.add(i)
    base, bits = bm.ack_view()
    assert base == 3
    # bit j = chunk 3 + j: chunks 5, 9, 19 -> bits 2, 6, 16
    assert bits == bytes([0b00100010, 0, 0b10000000])
    again = Bitmap.from_ack(20, base, bits)
    assert again.to_bytes() == bm.to_bytes()
    assert again.count == 6
    assert list(again.missing()) == [3, 4, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    full = Bitmap(9, b"\xff\x80")
    assert full.complete()
    assert full.ack_view() == (9, b"")
    with pytest.raises(DecodeError):
        Bitmap(9, b"\xff\xc0")  # bit past the end
    with pytest.raises(MediaError) as exc:
        Bitmap.from_ack(20, 18, b"\x20")  # marks chunk 20
    assert exc.value.reason is Reason.CHUNK_OUT_OF_RANGE
    with pytest.raises(MediaError):
        Bitmap.from_ack(20, 21, b"")


# --- the CDDL in docs/media.md against real messages ------------------------------------------
DOC = Path(__file__).resolve().parents[1] / "docs" / "media.md"


def cddl_schema(root: str) -> object:
    pycddl = pytest.importorskip("pycddl")
    text = DOC.read_text()
    cddl = text.split("```cddl\n", 1)[1].split("```", 1)[0]
    return pycddl.Schema(f"root = {root}\n{cddl}")


def test_docs_cddl_accepts_real_messages_and_refuses_bad_ones() -> None:
    pycddl = pytest.importorskip("pycddl")
    tid = bytes.fromhex(TID)
    good = {
        "media-manifest-message": [bytes.fromhex(ED_COSE_HEX), bytes.fromhex(EC_COSE_HEX),
                                   sign_manifest(RSA_KEY, MANIFEST)],
        "manifest": [MANIFEST.to_cbor()],
        "media-chunk": [encode_chunk(tid, 3, b"abc"), encode_chunk(tid, 0, bytes(MAX_CHUNK_SIZE))],
        "media-ack": [Ack(tid, AckStatus.IN_PROGRESS, 2, b"\xa0").encode(),
                      Ack(tid, AckStatus.COMPLETE, 0, b"").encode(),
                      rejected_ack(tid, Reason.HASH_MISMATCH).encode()],
        "media-control": [Control(ControlOp.ABORT, tid).encode()],
    }
    bad = {
        "media-chunk": [cbor.dumps([bytes(15), 0, b""]), cbor.dumps([tid, 0, bytes(MAX_CHUNK_SIZE + 1)])],
        "media-ack": [cbor.dumps([tid, 2, 0, b""]), cbor.dumps([tid, 3, 0, b""])],
        "media-control": [cbor.dumps([3, tid])],
        "manifest": [cbor.dumps({**cbor.loads(MANIFEST.to_cbor()), 8: 100})],
    }
    for signed in good["media-manifest-message"]:
        parsed = parse_signed_manifest(signed)
        good.setdefault("protected-header", []).append(parsed.protected)
        good["manifest"].append(parsed.payload)
    bad["protected-header"] = [cbor.dumps({1: -9}), cbor.dumps({1: -7, 4: b"kid"})]
    for root, bodies in good.items():
        schema = cddl_schema(root)
        for body in bodies:
            schema.validate_cbor(body)  # type: ignore[attr-defined]
    for root, bodies in bad.items():
        schema = cddl_schema(root)
        for body in bodies:
            with pytest.raises(pycddl.ValidationError):
                schema.validate_cbor(body)  # type: ignore[attr-defined]
