"""TrustStore (pki/verify.py): real certificates issued through the API, each rejection with its reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pki import issue, keys, layout, store
from pki.verify import TrustStore, identity_of, load_certificates_pem, load_crls_pem
from sealmq.errors import CertificateError, Reason
from sealmq.identity import Role


def now() -> datetime:
    return datetime.now(UTC) + timedelta(minutes=1)  # a verifier whose clock runs a little ahead


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def two_level(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki = tmp_path_factory.mktemp("two") / "pki"
    store.init_ca(pki, two_level=True)
    store.enroll(pki, Role.DEVICE, "dev-ec")
    store.enroll(pki, Role.DEVICE, "dev-ed", key_type="ed25519")
    store.enroll(pki, Role.BACKEND, "backend")
    return pki


@pytest.fixture(scope="module")
def rsa_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki = tmp_path_factory.mktemp("rsa") / "pki"
    store.init_ca(pki, key_type="rsa3072")
    store.enroll(pki, Role.DEVICE, "dev-rsa", key_type="rsa2048")
    return pki


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki = tmp_path_factory.mktemp("other") / "pki"
    store.init_ca(pki)
    store.enroll(pki, Role.DEVICE, "dev-ec")  # same name, foreign CA
    return pki


def chain(pki: Path, role: Role, name: str) -> list[x509.Certificate]:
    return store.load_identity(layout.identity_dir(pki, role, name)).chain


def expect(
    reason: Reason,
    ts: TrustStore,
    certs: list[x509.Certificate] | list[bytes],
    role: Role,
    at: datetime | None = None,
    name: str | None = None,
) -> CertificateError:
    with pytest.raises(CertificateError) as info:
        ts.verify(certs, role=role, now=at or now(), expected_name=name)
    assert info.value.reason is reason, info.value
    return info.value


@pytest.mark.parametrize(
    ("role", "name", "key_type"),
    [
        (Role.DEVICE, "dev-ec", "p256"),
        (Role.DEVICE, "dev-ed", "ed25519"),
        (Role.BACKEND, "backend", "p256"),
    ],
)
def test_valid_two_level_chains_verify(two_level: Path, role: Role, name: str, key_type: str) -> None:
    ts = store.load_trust_store(two_level)
    certs = chain(two_level, role, name)
    assert len(certs) == 2  # leaf + issuing CA
    peer = ts.verify([der(c) for c in certs], role=role, now=now(), expected_name=name)
    assert (peer.role, peer.name) == (role, name)
    assert keys.describe_public_key(peer.public_key) == key_type
    # The store's intermediates also complete a leaf-only chain.
    assert ts.verify(certs[:1], role=role, now=now()).name == name


def test_rsa_ca_and_rsa_leaf(rsa_pki: Path) -> None:
    ts = store.load_trust_store(rsa_pki)
    peer = ts.verify(
        chain(rsa_pki, Role.DEVICE, "dev-rsa"), role=Role.DEVICE, now=now(), expected_name="dev-rsa"
    )
    assert isinstance(peer.public_key, rsa.RSAPublicKey)
    assert peer.public_key.key_size == 2048


def test_wrong_role_and_identity(two_level: Path) -> None:
    ts = store.load_trust_store(two_level)
    expect(Reason.WRONG_ROLE, ts, chain(two_level, Role.DEVICE, "dev-ec"), Role.BACKEND)
    expect(Reason.WRONG_ROLE, ts, chain(two_level, Role.BACKEND, "backend"), Role.DEVICE)
    expect(Reason.IDENTITY_MISMATCH, ts, chain(two_level, Role.DEVICE, "dev-ec"), Role.DEVICE, name="dev-ed")


def test_other_ca_is_unknown(two_level: Path, other_ca: Path) -> None:
    ts = store.load_trust_store(two_level)
    expect(Reason.UNKNOWN_CA, ts, chain(other_ca, Role.DEVICE, "dev-ec"), Role.DEVICE)


def test_validity_window(two_level: Path) -> None:
    ts = store.load_trust_store(two_level)
    leaf = chain(two_level, Role.DEVICE, "dev-ec")
    expect(Reason.EXPIRED, ts, leaf, Role.DEVICE, at=leaf[0].not_valid_after_utc + timedelta(seconds=1))
    expect(
        Reason.NOT_YET_VALID, ts, leaf, Role.DEVICE, at=leaf[0].not_valid_before_utc - timedelta(seconds=1)
    )


def test_backdated_issue_is_expired_now(two_level: Path, tmp_path: Path) -> None:
    key = keys.generate(keys.KeyType.P256)
    csr = issue.make_csr(key, Role.DEVICE, "old-dev").public_bytes(serialization.Encoding.PEM)
    issued = store.sign_csr(two_level, csr, Role.DEVICE, days=10, now=now() - timedelta(days=11))
    ts = store.load_trust_store(two_level)
    err = expect(Reason.EXPIRED, ts, issued.chain, Role.DEVICE)
    assert "expired" in str(err)


def test_ca_created_in_the_past_issues_certs_valid_then(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    then = now() - timedelta(days=400)
    store.init_ca(pki, now=then)
    d = store.enroll(pki, Role.DEVICE, "old", now=then, days=365)
    certs = store.load_identity(d).chain
    ts = store.load_trust_store(pki, require_crl=False)  # that CRL is long stale
    assert ts.verify(certs, role=Role.DEVICE, now=then + timedelta(days=1)).name == "old"
    expect(Reason.EXPIRED, ts, certs, Role.DEVICE, at=then + timedelta(days=366))
    expect(Reason.CRL_INVALID, store.load_trust_store(pki), certs, Role.DEVICE, at=then + timedelta(days=31))


def test_tampered_signature_is_bad_signature(two_level: Path) -> None:
    ts = store.load_trust_store(two_level)
    leaf = der(chain(two_level, Role.DEVICE, "dev-ec")[0])
    bad = leaf[:-3] + bytes([leaf[-3] ^ 0x01]) + leaf[-2:]
    expect(Reason.BAD_SIGNATURE, ts, [bad], Role.DEVICE)


def test_a_forged_signature_is_bad_signature_whatever_else_fails(tmp_path: Path) -> None:
    """A link taken by name has its signature checked by the library's path validation, after
    the revocation check; the reason must still be BAD_SIGNATURE, as when every link's signature
    was checked first: a revoked, expired or stale-CRL certificate with a tampered signature."""
    pki = tmp_path / "pki"
    store.init_ca(pki, two_level=True)
    d = store.enroll(pki, Role.DEVICE, "victim")
    leaf = der(store.load_identity(d).chain[0])
    forged = leaf[:-3] + bytes([leaf[-3] ^ 0x01]) + leaf[-2:]
    parsed = x509.load_der_x509_certificate(forged)
    store.revoke(pki, cert_path=d / layout.CERT)
    ts = store.load_trust_store(pki)
    expect(Reason.REVOKED, ts, [leaf], Role.DEVICE)  # the genuine one: revoked
    expect(Reason.BAD_SIGNATURE, ts, [forged], Role.DEVICE)
    crl = load_crls_pem(layout.crl(pki).read_bytes())[0]
    assert crl.next_update_utc is not None and crl.next_update_utc < parsed.not_valid_after_utc
    expect(Reason.BAD_SIGNATURE, ts, [forged], Role.DEVICE, at=crl.next_update_utc + timedelta(seconds=1))


def test_a_valid_chain_has_its_signatures_verified_once(two_level: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """By the library's path validation only (pki/verify.py's own check would be the same ECDSA
    verification again); a refused one is re-checked link by link for its reason."""
    import pki.verify as verify

    calls: list[str] = []
    real = verify._signed_by
    monkeypatch.setattr(verify, "_signed_by", lambda c, i: calls.append("ours") or real(c, i))
    ts = TrustStore.from_pem(layout.anchor(two_level).read_bytes(), layout.crl(two_level).read_bytes(),
                             layout.issuing_cert(two_level).read_bytes())
    assert ts.verify(chain(two_level, Role.DEVICE, "dev-ec"), role=Role.DEVICE, now=now()).name == "dev-ec"
    assert calls == []
    leaf = der(chain(two_level, Role.DEVICE, "dev-ec")[0])
    expect(Reason.BAD_SIGNATURE, ts, [leaf[:-3] + bytes([leaf[-3] ^ 0x01]) + leaf[-2:]], Role.DEVICE)
    assert calls  # the refusal's reason came from checking the links one by one


def test_revocation_and_crl_freshness(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    store.init_ca(pki, two_level=True)
    d = store.enroll(pki, Role.DEVICE, "victim")
    keep = store.enroll(pki, Role.DEVICE, "keeper")
    victim = store.load_identity(d).chain
    assert store.load_trust_store(pki).verify(victim, role=Role.DEVICE, now=now()).name == "victim"
    serial = store.revoke(pki, cert_path=d / layout.CERT, reason="keyCompromise")
    assert serial == victim[0].serial_number
    ts = store.load_trust_store(pki)
    expect(Reason.REVOKED, ts, victim, Role.DEVICE)
    ok = store.load_identity(keep).chain
    assert ts.verify(ok, role=Role.DEVICE, now=now()).name == "keeper"
    # The CRL goes stale after nextUpdate: hard fail, not "not revoked".
    crl = load_crls_pem(layout.crl(pki).read_bytes())[0]
    assert crl.next_update_utc is not None
    expect(Reason.CRL_INVALID, ts, ok, Role.DEVICE, at=crl.next_update_utc + timedelta(seconds=1))
    # Index records it; revoking twice is refused.
    entry = next(e for e in store.read_index(pki)["certificates"] if e["name"] == "victim")
    assert entry["revocation_reason"] == "keyCompromise"
    with pytest.raises(Exception) as info:
        store.revoke(pki, serial=serial)
    assert getattr(info.value, "reason", None) is Reason.ALREADY_EXISTS


def test_crl_from_another_ca_or_missing_is_crl_invalid(two_level: Path, other_ca: Path) -> None:
    anchors = load_certificates_pem(layout.anchor(two_level).read_bytes())
    inter = load_certificates_pem(layout.issuing_cert(two_level).read_bytes())
    foreign = load_crls_pem(layout.crl(other_ca).read_bytes())
    ts = TrustStore(anchors, inter, foreign)
    expect(Reason.CRL_INVALID, ts, chain(two_level, Role.DEVICE, "dev-ec"), Role.DEVICE)
    # Only the root's CRL: the issuing CA's leaves are not covered.
    own = load_crls_pem(layout.crl(two_level).read_bytes())
    assert len(own) == 2
    ts = TrustStore(anchors, inter, [c for c in own if c.issuer == anchors[0].subject])
    expect(Reason.CRL_INVALID, ts, chain(two_level, Role.DEVICE, "dev-ec"), Role.DEVICE)


@pytest.mark.parametrize("issuer_in_store", [True, False])
def test_a_crl_not_signed_by_its_named_issuer_is_ignored(two_level: Path, issuer_in_store: bool) -> None:
    """A CRL naming the issuing CA but signed by another key covers nothing: CRL_INVALID, whether
    the CA is in the store (its CRL signatures are checked once, when the store is built) or only
    presented in the chain (checked at each validation). The genuine CRL, as a control, validates."""
    ca = store.load_ca(two_level)
    anchors = load_certificates_pem(layout.anchor(two_level).read_bytes())
    own = load_crls_pem(layout.crl(two_level).read_bytes())
    root_crl = next(c for c in own if c.issuer == anchors[0].subject)
    genuine = next(c for c in own if c.issuer == ca.issuer.subject)
    forged = issue.make_crl(ca.issuer, keys.generate("p256"), [], now() - timedelta(minutes=5), number=99)
    assert forged.issuer == genuine.issuer and not forged.is_signature_valid(ca.issuer.public_key())
    leaf = chain(two_level, Role.DEVICE, "dev-ec")[0]
    inter = [ca.issuer] if issuer_in_store else []
    presented = [leaf] if issuer_in_store else [leaf, ca.issuer]
    expect(Reason.CRL_INVALID, TrustStore(anchors, inter, [root_crl, forged]), presented, Role.DEVICE)
    ok = TrustStore(anchors, inter, [root_crl, forged, genuine])
    assert ok.verify(presented, role=Role.DEVICE, now=now()).name == "dev-ec"


def test_revoked_intermediate(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    store.init_ca(pki, two_level=True)
    d = store.enroll(pki, Role.DEVICE, "d1")
    ca = store.load_ca(pki)
    assert ca.root_key is not None
    root_crl = issue.make_crl(
        ca.root, ca.root_key, [issue.Revocation(ca.issuer.serial_number, now())], now(), number=9
    )
    leaf_crl = load_crls_pem(layout.crl(pki).read_bytes())[0]
    ts = TrustStore([ca.root], [ca.issuer], [leaf_crl, root_crl])
    err = expect(Reason.REVOKED, ts, store.load_identity(d).chain, Role.DEVICE)
    assert "intermediate" in str(err)


def test_expired_intermediate(tmp_path: Path) -> None:
    root_key, inter_key, leaf_key = (keys.generate(keys.KeyType.P256) for _ in range(3))
    root = issue.make_root(root_key, now() - timedelta(days=60), path_len=1)
    inter = issue.make_issuing(inter_key, root, root_key, now() - timedelta(days=30), days=10)
    checked = issue.check_csr(issue.make_csr(leaf_key, Role.DEVICE, "d"), Role.DEVICE)
    leaf = issue.issue_leaf(checked, inter, inter_key, now() - timedelta(days=25), days=365)
    assert leaf.not_valid_after_utc == inter.not_valid_after_utc  # clipped to the CA's lifetime
    ts = TrustStore([root], [inter])
    expect(Reason.EXPIRED, ts, [leaf], Role.DEVICE)
    assert ts.verify([leaf, inter], role=Role.DEVICE, now=now() - timedelta(days=24)).name == "d"


def test_leaf_profile_violations_are_refused(two_level: Path) -> None:
    """Certificates our CA would never issue, signed with the real issuing key."""
    ca = store.load_ca(two_level)
    ts = store.load_trust_store(two_level, require_crl=False)
    key = ec.generate_private_key(ec.SECP256R1())

    def build(
        *, ca_flag: bool = False, eku: bool = True, san: x509.GeneralName | None = None
    ) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .issuer_name(ca.issuer.subject)
            .public_key(key.public_key())
            .serial_number(issue.random_serial())
            .not_valid_before(now() - timedelta(hours=1))
            .not_valid_after(now() + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([san or x509.UniformResourceIdentifier("urn:sealmq:device:x")]),
                critical=False,
            )
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, ca_flag, False, False, False), critical=True
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.issuer_key.public_key()), critical=False
            )
        )  # type: ignore[arg-type]
        if eku:
            b = b.add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        return b.sign(ca.issuer_key, keys.signing_hash(ca.issuer_key))

    assert ts.verify([build()], role=Role.DEVICE, now=now()).name == "x"  # the builder itself is fine
    expect(Reason.POLICY_VIOLATION, ts, [build(ca_flag=True)], Role.DEVICE)
    expect(Reason.WRONG_ROLE, ts, [build(eku=False)], Role.DEVICE)
    expect(Reason.POLICY_VIOLATION, ts, [build(san=x509.DNSName("evil.example"))], Role.DEVICE)
    expect(
        Reason.POLICY_VIOLATION,
        ts,
        [build(san=x509.UniformResourceIdentifier("urn:sealmq:device:Bad/Id"))],
        Role.DEVICE,
    )


def test_identity_of_parses_san_uri(two_level: Path) -> None:
    assert identity_of(chain(two_level, Role.BACKEND, "backend")[0]) == (Role.BACKEND, "backend")


def test_malformed_inputs(two_level: Path) -> None:
    ts = store.load_trust_store(two_level)
    expect(Reason.MALFORMED, ts, [b"garbage"], Role.DEVICE)
    expect(Reason.MALFORMED, ts, [], Role.DEVICE)
    pem = layout.identity_dir(two_level, Role.DEVICE, "dev-ec").joinpath(layout.CERT).read_bytes()
    expect(Reason.MALFORMED, ts, [pem[: len(pem) // 2]], Role.DEVICE)
    with pytest.raises(CertificateError) as info:
        TrustStore.from_pem(b"not pem")
    assert info.value.reason is Reason.MALFORMED


def test_identity_uri_golden_both_directions() -> None:
    from pki.verify import identity_uri, parse_identity_uri

    golden = {
        (Role.DEVICE, "cam-1"): "urn:sealmq:device:cam-1",
        (Role.BACKEND, "backend"): "urn:sealmq:backend:backend",
    }
    for (role, name), uri in golden.items():
        assert identity_uri(role, name) == uri
        assert parse_identity_uri(uri) == (role, name)
    for bad in (
        "urn:sealmq:device:",
        "urn:sealmq:admin:x",
        "urn:sealmq:device:A",
        "urn:other:device:x",
        "urn:sealmq:device:a/b",
        "urn:sealmq:device",
    ):
        with pytest.raises(CertificateError) as info:
            parse_identity_uri(bad)
        assert info.value.reason is Reason.POLICY_VIOLATION
    assert layout.serial_hex(0xABC) == "0" * 37 + "abc"


def test_verify_module_is_pure() -> None:
    """The handshake calls it: no file, clock or randomness (the AST check of tests/test_sans_io.py)."""
    import ast

    from tests.test_sans_io import FORBIDDEN_MODULES, FORBIDDEN_NAMES

    tree = ast.parse((Path(__file__).parents[1] / "pki" / "verify.py").read_text())
    forbidden = FORBIDDEN_MODULES | {"os", "io", "pathlib", "shutil", "tempfile"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] not in forbidden for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in forbidden
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert (node.value.id, node.attr) not in FORBIDDEN_NAMES
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "open"


def test_rotation_overlap_two_anchors(two_level: Path, other_ca: Path) -> None:
    """During a CA rotation the verifier trusts both roots (ca.crt and crl.pem concatenated)."""
    ts = TrustStore.from_pem(
        layout.anchor(two_level).read_bytes() + layout.anchor(other_ca).read_bytes(),
        layout.crl(two_level).read_bytes() + layout.crl(other_ca).read_bytes(),
    )
    old = chain(two_level, Role.DEVICE, "dev-ec")
    new = chain(other_ca, Role.DEVICE, "dev-ec")
    assert ts.verify(old, role=Role.DEVICE, now=now()).certificate == old[0]
    assert ts.verify(new, role=Role.DEVICE, now=now()).certificate == new[0]


# --- the cache of validated chains ------------------------------------------------------------------

def _count_full_validations(ts: TrustStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = ts._verify

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ts, "_verify", counting)
    return calls


def test_validated_chain_is_cached_per_store_role_and_time(two_level: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ts = store.load_trust_store(two_level)
    ts.clear_cache()  # the process's shared store: earlier tests validated this chain in it
    calls = _count_full_validations(ts, monkeypatch)
    ders = [der(c) for c in chain(two_level, Role.DEVICE, "dev-ec")]
    t = now()
    first = ts.verify(ders, role=Role.DEVICE, now=t)
    again = ts.verify(ders, role=Role.DEVICE, now=t + timedelta(hours=1), expected_name="dev-ec")
    assert again is first and calls[0] == 1
    # the name is still checked on a hit; the role is part of the key
    expect(Reason.IDENTITY_MISMATCH, ts, ders, Role.DEVICE, at=t, name="dev-other")
    expect(Reason.WRONG_ROLE, ts, ders, Role.BACKEND, at=t)
    assert calls[0] == 2  # the backend attempt validated (and failed) in full
    # outside the window: before the first validation, or after the leaf expired -> full validation
    ts.verify(ders, role=Role.DEVICE, now=t - timedelta(minutes=5))
    assert calls[0] == 3
    leaf = chain(two_level, Role.DEVICE, "dev-ec")[0]
    expect(Reason.EXPIRED, ts, ders, Role.DEVICE, at=leaf.not_valid_after_utc + timedelta(seconds=1))
    # Certificate objects (not DER) are never cached
    ts.verify(chain(two_level, Role.DEVICE, "dev-ec"), role=Role.DEVICE, now=t)
    assert calls[0] == 5


def test_parties_loading_the_same_files_share_one_store_and_its_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulator's devices (one process, the same CA files) validate the backend's chain once."""
    pki = tmp_path / "pki"
    store.init_ca(pki)
    backend = [der(c) for c in store.load_identity(store.enroll(pki, Role.BACKEND, "api")).chain]
    first = store.load_trust_store(pki)
    calls = _count_full_validations(first, monkeypatch)
    second = store.load_trust_store(pki)
    assert second is first
    first.verify(backend, role=Role.BACKEND, now=now())
    second.verify(backend, role=Role.BACKEND, now=now())
    assert calls[0] == 1
    # another CRL is another store, which validates in full (and applies the new CRL)
    store.revoke(pki, cert_path=layout.backend_dir(pki, "api") / layout.CERT)
    reloaded = store.load_trust_store(pki)
    assert reloaded is not first
    expect(Reason.REVOKED, reloaded, backend, Role.BACKEND)
    # the stores kept are bounded: the oldest is built again when it is loaded again
    others = []
    for i in range(store.SHARED_STORES):
        other = tmp_path / f"other-{i}"
        store.init_ca(other)
        others.append(store.load_trust_store(other))
    assert store.load_trust_store(pki) is not reloaded
    assert store.load_trust_store(tmp_path / "other-0") is not others[0]
    assert store.load_trust_store(tmp_path / f"other-{store.SHARED_STORES - 1}") is others[-1]


def test_refused_chains_are_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = tmp_path / "pki"
    store.init_ca(pki)
    d = store.enroll(pki, Role.DEVICE, "victim")
    ders = [der(c) for c in store.load_identity(d).chain]
    store.revoke(pki, cert_path=d / layout.CERT)
    ts = store.load_trust_store(pki)
    calls = _count_full_validations(ts, monkeypatch)
    for _ in range(2):
        expect(Reason.REVOKED, ts, ders, Role.DEVICE)
    assert calls[0] == 2


def test_revocation_applies_through_a_reloaded_store(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    store.init_ca(pki)
    d = store.enroll(pki, Role.DEVICE, "victim")
    ders = [der(c) for c in store.load_identity(d).chain]
    before = store.load_trust_store(pki)
    assert before.verify(ders, role=Role.DEVICE, now=now()).name == "victim"
    store.revoke(pki, cert_path=d / layout.CERT)
    expect(Reason.REVOKED, store.load_trust_store(pki), ders, Role.DEVICE)  # a reload is a new cache


def test_a_crl_becoming_valid_ends_the_cached_answer(tmp_path: Path) -> None:
    """Two CRLs of one issuer: the newer (revoking the leaf) starts later. Once it is valid it is
    the freshest, so a cached acceptance must not outlive its lastUpdate."""
    pki = tmp_path / "pki"
    store.init_ca(pki)
    d = store.enroll(pki, Role.DEVICE, "victim")
    leaf_chain = store.load_identity(d).chain
    ders = [der(c) for c in leaf_chain]
    ca = store.load_ca(pki)
    t = now()
    old = issue.make_crl(ca.issuer, ca.issuer_key, [], t - timedelta(days=1), number=50)
    later = t + timedelta(days=2)
    new = issue.make_crl(ca.issuer, ca.issuer_key, [issue.Revocation(leaf_chain[0].serial_number, later)],
                         later, number=51)
    ts = TrustStore([ca.root], [], [old, new])
    assert ts.verify(ders, role=Role.DEVICE, now=t).name == "victim"
    assert ts.verify(ders, role=Role.DEVICE, now=t + timedelta(hours=1)).name == "victim"
    expect(Reason.REVOKED, ts, ders, Role.DEVICE, at=later + timedelta(hours=1))
