"""The production CCS credential (sealmq.edhoc.ccs) and its on-disk registry (pki.ccs):
a golden vector both ways, RFC 9529 trace 2 replayed byte for byte with the *production*
classes, every authenticator refusal with its reason, Hypothesis on the decoders, and the CLI."""

from __future__ import annotations

import contextlib
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from app.cli import main
from pki import ccs as pki_ccs
from pki import layout
from sealmq import cbor
from sealmq.edhoc import (
    CcsAuthenticator,
    CcsCredential,
    CcsEntry,
    CcsRegistry,
    IdCred,
    Initiator,
    Responder,
    decode_ccs,
    encode_ccs,
)
from sealmq.edhoc.ccs import HDR_KCCS, MixedAuthenticator, ccs_from_item
from sealmq.errors import DecodeError, EdhocError, LocalProtocolError, PkiError, Reason, SealmqError
from tests.conftest import load_vectors
from tests.edhoc_helpers import p256_key, run_handshake

T2 = load_vectors("rfc9529_trace2.json")["values"]


def h(name: str) -> bytes:
    return bytes.fromhex(T2[name])


# --- golden vector of our own format, both directions -----------------------------------------

GOLDEN_KEY_SEED = 7
GOLDEN = bytes.fromhex(
    "a402781a75726e3a7365616c6d713a6465766963653a6465762d30303031041a6b49d200061a6553f10008a101a501"
    "02024401020304200121582034a026e8e116349e42bfa4a6d8690f871bbf4621d783ab312d57251c4baf7ac9225820"
    "3a9b7f0c04fa84c7ecced864a098cf49f80da1f3a0de435f94d3574d29845ff8"
)


def test_golden_encode() -> None:
    key = p256_key(GOLDEN_KEY_SEED)
    got = encode_ccs("urn:sealmq:device:dev-0001", b"\x01\x02\x03\x04", key.public_key(),
                     issued_at=1_700_000_000, expires=1_800_000_000)
    assert got.hex() == GOLDEN.hex()


def test_golden_decode() -> None:
    c = decode_ccs(GOLDEN)
    assert (c.subject, c.kid, c.issued_at, c.expires, c.not_before, c.issuer) == (
        "urn:sealmq:device:dev-0001", b"\x01\x02\x03\x04", 1_700_000_000, 1_800_000_000, None, None)
    assert c.identity == ("device", "dev-0001")
    assert c.public_key.public_numbers() == p256_key(GOLDEN_KEY_SEED).public_key().public_numbers()
    assert c.encoded == GOLDEN


@pytest.mark.parametrize("side", ["I", "R"])
def test_decodes_the_rfc9529_trace_2_credentials(side: str) -> None:
    c = decode_ccs(h(f"CRED_{side}_cbor"))
    nums = c.public_key.public_numbers()
    assert nums.x.to_bytes(32, "big") == h(f"PK_{side}_x")
    assert nums.y.to_bytes(32, "big") == h(f"PK_{side}_y")
    assert c.kid == (b"\x2b" if side == "I" else b"\x32")
    assert c.identity is None  # "42-50-31-FF-EF-37-32-39" / "example.edu": role from the registry


# --- RFC 9529 trace 2 with the production credential and authenticator -------------------------

def trace_key(side: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(h(f"SK_{side}"), "big"), ec.SECP256R1())


def trace_registry() -> CcsRegistry:
    return CcsRegistry([
        CcsEntry.from_bytes(h("CRED_I_cbor"), role="device", name="42-50-31-FF-EF-37-32-39"),
        CcsEntry.from_bytes(h("CRED_R_cbor"), role="backend", name="example.edu"),
    ])


def trace_pair(**res_kw: Any) -> tuple[Initiator, Responder]:
    reg = res_kw.pop("registry", trace_registry())
    ini = Initiator(CcsCredential(trace_key("I"), h("CRED_I_cbor")), CcsAuthenticator(reg, "backend"),
                    c_i=h("C_I"), suites=[6, 2], method=3, ephemeral_key=h("X"), debug=True)
    ini._offered = (6, 2)  # the state after the trace's suite negotiation
    res = Responder(CcsCredential(trace_key("R"), h("CRED_R_cbor")), CcsAuthenticator(reg, "device", **res_kw),
                    c_r=h("C_R"), suites=[2], methods=[3], ephemeral_key=h("Y"), debug=True)
    return ini, res


def test_trace_2_byte_for_byte_with_production_classes() -> None:
    ini, res = trace_pair()
    msgs = run_handshake(ini, res)
    for name in ("message_1", "message_2", "message_3", "message_4"):
        assert msgs[name].hex() == h(name).hex(), name
    for party in (ini, res):
        r = party.result()
        assert r.prk_out == h("PRK_out")
        assert r.oscore_master_secret() == h("OSCORE_Master_Secret")
        assert r.oscore_master_salt() == h("OSCORE_Master_Salt")
    assert res.result().peer.identity.name == "42-50-31-FF-EF-37-32-39"
    assert ini.result().peer.identity.name == "example.edu"


@pytest.mark.parametrize(
    ("registry", "kw", "reason"),
    [
        ("unknown", {}, Reason.UNKNOWN_CREDENTIAL),
        ("revoked", {}, Reason.REVOKED),
        ("wrong_role", {}, Reason.WRONG_ROLE),
        ("ok", {"now": 0.0}, None),
    ],
)
def test_trace_2_refusals_by_the_responder(registry: str, kw: dict[str, Any], reason: Reason | None) -> None:
    r_entry = CcsEntry.from_bytes(h("CRED_R_cbor"), role="backend", name="example.edu")
    i_bytes = h("CRED_I_cbor")
    entries = {
        "unknown": [r_entry],
        "revoked": [r_entry, CcsEntry.from_bytes(i_bytes, role="device", name="i", revoked=True)],
        "wrong_role": [r_entry, CcsEntry.from_bytes(i_bytes, role="backend", name="i")],
        "ok": [r_entry, CcsEntry.from_bytes(i_bytes, role="device", name="i")],
    }[registry]
    ini, res = trace_pair(registry=CcsRegistry(entries), **kw)
    if reason is None:
        run_handshake(ini, res)
        return
    res.process_message_1(ini.create_message_1())
    ini.process_message_2(res.create_message_2())
    with pytest.raises(EdhocError) as info:
        res.process_message_3(ini.create_message_3())
    assert info.value.reason is reason


def issued(subject: str, seed: int, kid: bytes, **kw: Any) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = p256_key(seed)
    return key, encode_ccs(subject, kid, key.public_key(), **kw)


@pytest.mark.parametrize(
    ("now", "reason"),
    [(999.0, Reason.NOT_YET_VALID), (1000.0, None), (1999.0, None), (2000.0, Reason.EXPIRED), (None, None)],
)
def test_validity_window(now: float | None, reason: Reason | None) -> None:
    _, dev = issued("urn:sealmq:device:d", 1, b"\x01\x02", not_before=1000, expires=2000)
    auth = CcsAuthenticator(CcsRegistry([CcsEntry.from_bytes(dev)]), "device", now)
    if reason is None:
        assert auth.authenticate(IdCred.kid(b"\x01\x02")).identity.name == "d"
    else:
        with pytest.raises(EdhocError) as info:
            auth.authenticate(IdCred.kid(b"\x01\x02"))
        assert info.value.reason is reason


def test_kccs_must_equal_the_registered_ccs() -> None:
    key, dev = issued("urn:sealmq:device:d", 2, b"\x07")
    auth = CcsAuthenticator(CcsRegistry([CcsEntry.from_bytes(dev)]), "device")
    by_value = CcsCredential(key, dev, by_value=True).id_cred
    assert set(by_value.params) == {HDR_KCCS}
    assert auth.authenticate(by_value).identity.kid == b"\x07"
    # same kid, another key (or any changed claim): not the registered credential
    _, forged = issued("urn:sealmq:device:d", 3, b"\x07")
    with pytest.raises(EdhocError) as info:
        auth.authenticate(IdCred.from_map({HDR_KCCS: cbor.loads(forged)}))
    assert info.value.reason is Reason.UNKNOWN_CREDENTIAL
    with pytest.raises(EdhocError) as info:
        auth.authenticate(IdCred.from_map({HDR_KCCS: {2: "x"}}))
    assert info.value.reason is Reason.WRONG_TYPE
    with pytest.raises(EdhocError) as info:
        auth.authenticate(IdCred.x5t(b"cert"))
    assert info.value.reason is Reason.UNKNOWN_CREDENTIAL


def test_mixed_authenticator_routes_by_id_cred_kind() -> None:
    class Marker:
        def __init__(self, tag: str) -> None:
            self.tag = tag

        def authenticate(self, id_cred: IdCred) -> Any:
            raise EdhocError(Reason.PEER_ERROR, self.tag)

    mixed = MixedAuthenticator(Marker("ccs"), Marker("x509"))
    for id_cred, tag in [(IdCred.kid(b"\x01"), "ccs"), (IdCred.from_map({14: {2: "a"}}), "ccs"),
                         (IdCred.x5t(b"c"), "x509"), (IdCred.x5chain([b"c"]), "x509")]:
        with pytest.raises(EdhocError, match=tag):
            mixed.authenticate(id_cred)
    with pytest.raises(EdhocError) as info:
        MixedAuthenticator(None, Marker("x509")).authenticate(IdCred.kid(b"\x01"))
    assert info.value.reason is Reason.UNKNOWN_CREDENTIAL


def test_credential_refuses_a_key_that_is_not_its_own() -> None:
    _, dev = issued("urn:sealmq:device:d", 4, b"\x01")
    with pytest.raises(LocalProtocolError) as info:
        CcsCredential(p256_key(5), dev)
    assert info.value.reason is Reason.CONFIG_INVALID


def test_registry_refuses_duplicate_kid_and_contradicting_entries() -> None:
    _, a = issued("urn:sealmq:device:a", 1, b"\x09")
    _, b = issued("urn:sealmq:device:b", 2, b"\x09")
    with pytest.raises(LocalProtocolError) as info:
        CcsRegistry([CcsEntry.from_bytes(a), CcsEntry.from_bytes(b)])
    assert info.value.reason is Reason.ALREADY_EXISTS
    with pytest.raises(DecodeError) as info2:
        CcsEntry.from_bytes(a, role="device", name="b")
    assert info2.value.reason is Reason.IDENTITY_MISMATCH


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: m.pop(2), Reason.WRONG_TYPE),  # no sub
        (lambda m: m.update({3: "aud"}), Reason.UNSUPPORTED),  # claim we do not know
        (lambda m: m.update({"x": 1}), Reason.WRONG_TYPE),
        (lambda m: m[8][1].update({-1: 2}), Reason.UNSUPPORTED_ALGORITHM),  # P-384 label
        (lambda m: m[8][1].update({3: -7}), Reason.UNSUPPORTED),  # alg parameter
        (lambda m: m[8][1].update({-3: True}), Reason.WRONG_TYPE),  # compressed sign bit
        (lambda m: m[8][1].update({-2: b"\x00" * 32}), Reason.INVALID_POINT),
        (lambda m: m[8][1].update({2: b""}), Reason.WRONG_TYPE),
        (lambda m: m[8].update({3: 1}), Reason.UNSUPPORTED),
        (lambda m: m.update({4: -1}), Reason.WRONG_TYPE),
    ],
)
def test_malformed_ccs_reasons(mutate: Any, reason: Reason) -> None:
    m = cbor.loads(GOLDEN)
    mutate(m)
    with pytest.raises(DecodeError) as info:
        decode_ccs(cbor.dumps(m))
    assert info.value.reason is reason


def test_non_deterministic_ccs_is_refused() -> None:
    import cbor2

    m = cbor.loads(GOLDEN)
    # same map, indefinite-length / non-canonical encodings
    for data in (bytes([0xBF]) + GOLDEN[1:] + b"\xff", cbor2.dumps(dict(reversed(list(m.items()))))):
        with pytest.raises(DecodeError):
            decode_ccs(data)


@given(st.binary(max_size=300))
def test_decode_ccs_garbage_only_typed_errors(data: bytes) -> None:
    with contextlib.suppress(SealmqError):
        decode_ccs(data)


@given(st.integers(0, len(GOLDEN) - 1), st.integers(1, 255))
def test_decode_ccs_mutations_only_typed_errors(pos: int, xor: int) -> None:
    data = bytearray(GOLDEN)
    data[pos] ^= xor
    try:
        c = decode_ccs(bytes(data))
    except SealmqError:
        return
    assert c.encoded == bytes(data)  # decodable => it is exactly what was given


@given(st.recursive(st.none() | st.booleans() | st.integers(-30, 30) | st.binary(max_size=40) | st.text(max_size=10),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.integers(-4, 9), c, max_size=5),
                    max_leaves=12))
def test_kccs_arbitrary_items_only_typed_errors(item: Any) -> None:
    auth = CcsAuthenticator(CcsRegistry([CcsEntry.from_bytes(GOLDEN)]), "device")
    try:
        ccs_from_item(item)
        auth.authenticate(IdCred.from_map({HDR_KCCS: item}))
    except SealmqError:
        pass


# --- pki.ccs and the CLI ---------------------------------------------------------------------------

def test_issue_register_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = tmp_path / "pki"
    assert main(["pki", "ccs", "issue", "--pki", str(pki), "device", "dev-1"]) == 0
    assert main(["pki", "ccs", "issue", "--pki", str(pki), "backend"]) == 0
    d = layout.device_dir(pki, "dev-1")
    assert stat.S_IMODE((d / layout.CCS_KEY).stat().st_mode) == 0o600
    cred = pki_ccs.load_credential(pki, "device", "dev-1")
    assert cred.ccs.identity == ("device", "dev-1") and len(cred.ccs.kid) == pki_ccs.KID_LENGTH
    assert cred.ccs.expires is not None and cred.ccs.issued_at is not None
    reg = pki_ccs.load_registry(pki)
    assert reg.by_kid(cred.ccs.kid) is not None and len(reg) == 2
    assert [e.name for e in reg.find("backend", "backend")] == ["backend"]

    # refuses to overwrite; --force replaces and revokes the old kid
    assert main(["pki", "ccs", "issue", "--pki", str(pki), "device", "dev-1"]) == 2
    assert "already_exists" in capsys.readouterr().err
    assert main(["pki", "ccs", "issue", "--pki", str(pki), "device", "dev-1", "--force", "--days", "0"]) == 0
    new = pki_ccs.load_credential(pki, "device", "dev-1")
    assert new.ccs.kid != cred.ccs.kid and new.ccs.expires is None and new.ccs.issued_at is None
    reg = pki_ccs.load_registry(pki)
    assert reg.by_kid(cred.ccs.kid).revoked and not reg.by_kid(new.ccs.kid).revoked  # type: ignore[union-attr]

    # register a CCS made elsewhere (key generated on the device)
    _, outside = issued("urn:sealmq:device:dev-2", 9, b"\xaa\xbb")
    f = tmp_path / "dev-2.ccs"
    f.write_bytes(outside)
    assert main(["pki", "ccs", "register", "--pki", str(pki), str(f)]) == 0
    assert main(["pki", "ccs", "register", "--pki", str(pki), str(f)]) == 2  # kid already registered
    capsys.readouterr()
    assert main(["pki", "ccs", "list", "--pki", str(pki)]) == 0
    listing = capsys.readouterr().out
    assert "aabb  device   dev-2  active" in listing and f"{cred.ccs.kid.hex()}  device   dev-1  revoked" in listing

    assert main(["pki", "ccs", "revoke", "--pki", str(pki), "--kid", "aabb"]) == 0
    assert pki_ccs.load_registry(pki).by_kid(b"\xaa\xbb").revoked  # type: ignore[union-attr]
    assert main(["pki", "ccs", "revoke", "--pki", str(pki), "device", "nobody"]) == 2
    assert "not_found" in capsys.readouterr().err


def test_register_refuses_foreign_subjects_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(PkiError) as info:
        pki_ccs.register_ccs(tmp_path, h("CRED_I_cbor"))
    assert info.value.reason is Reason.POLICY_VIOLATION
    with pytest.raises(PkiError) as info:
        pki_ccs.register_ccs(tmp_path, b"\xa1\x02")
    assert info.value.reason is Reason.MALFORMED
    assert not layout.ccs_registry(tmp_path).exists()


def test_corrupt_registry_is_a_typed_error(tmp_path: Path) -> None:
    pki_ccs.issue_ccs(tmp_path, "device", "d")
    path = layout.ccs_registry(tmp_path)
    doc = json.loads(path.read_text())
    doc["entries"][0]["kid"] = "00"
    path.write_text(json.dumps(doc))
    with pytest.raises(PkiError) as info:
        pki_ccs.load_registry(tmp_path)
    assert info.value.reason is Reason.MALFORMED
    for text in ("{", "[]", '{"version": 1, "entries": [{}]}', '{"version": 2, "entries": []}'):
        path.write_text(text)
        with pytest.raises(PkiError):
            pki_ccs.load_registry(tmp_path)
