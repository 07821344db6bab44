"""``sealmq pki ...`` end to end: real files, checked by our verifier and independently by openssl.

Every refusal: exit code 2, the reason on stderr, and not one byte written.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509.oid import NameOID

from app.cli import main
from pki import issue, keys, layout, store
from sealmq.identity import Role

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
PASS = b"correct horse battery staple\n"


def sealmq(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def openssl(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, argv)], capture_output=True, text=True, timeout=60, check=False
    )


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
        for p in sorted(root.rglob("*"))
    }


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(scope="module")
def locked_pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A two-level CA whose keys are encrypted with a passphrase."""
    base = tmp_path_factory.mktemp("locked")
    pw = base / "pass.txt"
    pw.write_bytes(PASS)
    assert main(["pki", "init", "--pki", str(base / "pki"), "--two-level", "--passphrase-file", str(pw)]) == 0
    return base / "pki", pw


def test_owner_side_flow_two_level_with_openssl(
    locked_pki: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki, pw = locked_pki
    for key_file in (layout.root_key(pki), layout.issuing_key(pki)):
        assert mode(key_file) == 0o600
        assert b"ENCRYPTED PRIVATE KEY" in key_file.read_bytes()
    owner = tmp_path / "owner"
    assert sealmq(capsys, "pki", "keygen", "--out", owner)[0] == 0
    assert mode(owner / "key.pem") == 0o600
    assert mode(owner) == 0o700
    csr = tmp_path / "csr.pem"
    rc, _, err = sealmq(
        capsys, "pki", "csr", "--key", owner / "key.pem", "--role", "device", "--name", "cam-7", "--out", csr
    )
    assert rc == 0, err
    assert openssl("req", "-verify", "-noout", "-in", csr).returncode == 0
    out = tmp_path / "issued" / "cert.pem"
    out.parent.mkdir()
    rc, stdout, err = sealmq(
        capsys,
        "pki",
        "sign",
        "--pki",
        pki,
        "--csr",
        csr,
        "--role",
        "device",
        "--out",
        out,
        "--passphrase-file",
        pw,
    )
    assert rc == 0, err
    chain = out.parent / "chain.pem"
    assert chain.read_bytes().count(b"BEGIN CERTIFICATE") == 2
    rc, stdout, err = sealmq(
        capsys, "pki", "verify", "--pki", pki, chain, "--role", "device", "--id", "cam-7"
    )
    assert (rc, stdout.split()[:3]) == (0, ["ok:", "device", "cam-7"]), err
    ca, inter, crl = layout.anchor(pki), layout.issuing_cert(pki), layout.crl(pki)
    for extra in ([], ["-crl_check", "-CRLfile", crl], ["-crl_check_all", "-CRLfile", crl]):
        r = openssl("verify", "-CAfile", ca, "-untrusted", inter, "-purpose", "sslclient", *extra, out)
        assert r.returncode == 0, (extra, r.stdout, r.stderr)
        assert ": OK" in r.stdout
    # A device certificate is not a server certificate, for openssl too.
    assert openssl("verify", "-CAfile", ca, "-untrusted", inter, "-purpose", "sslserver", out).returncode != 0
    # Without the intermediate, openssl finds no path either.
    assert openssl("verify", "-CAfile", ca, out).returncode != 0
    text = openssl("x509", "-in", out, "-noout", "-text").stdout
    for needle in (
        "CA:FALSE",
        "Digital Signature",
        "TLS Web Client Authentication",
        "URI:urn:sealmq:device:cam-7",
        "Subject: CN = cam-7",
        "X509v3 Authority Key Identifier",
    ):
        assert needle in text, needle
    assert "TLS Web Server Authentication" not in text
    assert "X509v3 Basic Constraints: critical" in text
    assert "X509v3 Key Usage: critical" in text
    # The CA recorded it.
    entry = store.read_index(pki)["certificates"][-1]
    serial = x509.load_pem_x509_certificate(out.read_bytes()).serial_number
    assert entry["serial"] == layout.serial_hex(serial)
    assert entry["name"] == "cam-7"
    assert layout.issued_cert(pki, serial).read_bytes() == out.read_bytes()
    assert 2**150 < serial < 2**159  # 159 random bits (fails with probability 2**-9)


@pytest.mark.parametrize(("ca_type", "leaf_type"), [("rsa3072", "rsa2048"), ("p384", "ed25519")])
def test_enroll_backend_and_device_with_openssl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ca_type: str, leaf_type: str
) -> None:
    pki = tmp_path / "pki"
    assert sealmq(capsys, "pki", "init", "--pki", pki, "--key-type", ca_type)[0] == 0
    assert not layout.issuing_cert(pki).exists()
    assert layout.anchor(pki).read_bytes() == layout.root_cert(pki).read_bytes()
    assert sealmq(capsys, "pki", "enroll", "--pki", pki, "backend", "--key-type", leaf_type)[0] == 0
    assert sealmq(capsys, "pki", "enroll", "--pki", pki, "device", "dev-1", "--key-type", leaf_type)[0] == 0
    b, d = layout.backend_dir(pki), layout.device_dir(pki, "dev-1")
    for ident in (b, d):
        assert mode(ident / "key.pem") == 0o600
        assert openssl("req", "-verify", "-noout", "-in", ident / "csr.pem").returncode == 0
        r = openssl(
            "verify",
            "-CAfile",
            layout.anchor(pki),
            "-crl_check",
            "-CRLfile",
            layout.crl(pki),
            ident / "cert.pem",
        )
        assert r.returncode == 0, r.stderr
    assert (
        openssl("verify", "-CAfile", layout.anchor(pki), "-purpose", "sslserver", b / "cert.pem").returncode
        == 0
    )
    assert (
        openssl("verify", "-CAfile", layout.anchor(pki), "-purpose", "sslclient", b / "cert.pem").returncode
        == 0
    )
    ident = store.load_identity(b)
    assert (ident.role, ident.name) == (Role.BACKEND, "backend")
    assert keys.key_type_of(ident.private_key) == leaf_type
    rc, out, _ = sealmq(capsys, "pki", "show", b / "cert.pem")
    assert rc == 0
    fp = openssl("x509", "-in", b / "cert.pem", "-noout", "-fingerprint", "-sha256").stdout.split("=", 1)[1]
    assert fp.strip().lower() in out
    for needle in ("urn:sealmq:backend:backend", "role:", "backend", leaf_type, "CN=sealmq root CA"):
        assert needle in out
    # A device presented as backend, and a wrong id, are refused.
    rc, _, err = sealmq(capsys, "pki", "verify", "--pki", pki, d / "chain.pem", "--role", "backend")
    assert rc == 2
    assert "wrong_role" in err
    rc, _, err = sealmq(capsys, "pki", "verify", "--pki", pki, d / "chain.pem", "--id", "dev-2")
    assert rc == 2
    assert "identity_mismatch" in err


def test_revoke_and_crl_honoured_by_us_and_openssl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = tmp_path / "pki"
    store.init_ca(pki, two_level=True)
    victim = store.enroll(pki, Role.DEVICE, "victim")
    other = store.enroll(pki, Role.DEVICE, "other")
    ca, inter, crl = layout.anchor(pki), layout.issuing_cert(pki), layout.crl(pki)
    rc, _out, err = sealmq(
        capsys, "pki", "revoke", "--pki", pki, victim / "cert.pem", "--reason", "keyCompromise"
    )
    assert rc == 0, err
    rc, _, err = sealmq(capsys, "pki", "verify", "--pki", pki, victim / "chain.pem")
    assert rc == 2
    assert "revoked" in err
    assert sealmq(capsys, "pki", "verify", "--pki", pki, other / "chain.pem")[0] == 0
    r = openssl(
        "verify", "-CAfile", ca, "-untrusted", inter, "-crl_check", "-CRLfile", crl, victim / "cert.pem"
    )
    assert r.returncode != 0
    assert "revoked" in (r.stdout + r.stderr)
    # Without a CRL check openssl still accepts it: revocation is only as good as the CRL you load.
    assert openssl("verify", "-CAfile", ca, "-untrusted", inter, victim / "cert.pem").returncode == 0
    # Revocation by serial (openssl's colon hex), then re-issue: both stay revoked, CRL number grows.
    serial = x509.load_pem_x509_certificate((other / "cert.pem").read_bytes()).serial_number
    colon = ":".join(f"{serial:x}".zfill(40)[i : i + 2] for i in range(0, 40, 2))
    assert sealmq(capsys, "pki", "revoke", "--pki", pki, "--serial", colon)[0] == 0
    assert sealmq(capsys, "pki", "crl", "--pki", pki, "--days", "7")[0] == 0
    text = openssl("crl", "-in", crl, "-noout", "-text").stdout
    assert text.count("Serial Number:") == 2
    assert "Key Compromise" in text
    both = tmp_path / "both.pem"  # the first CRL in crl.pem is the issuing CA's
    both.write_bytes(ca.read_bytes() + inter.read_bytes())
    r = openssl("crl", "-in", crl, "-noout", "-CAfile", both, "-verify")
    assert "verify OK" in r.stdout + r.stderr
    assert store.read_index(pki)["crl_number"] == 4
    crls = store.load_trust_store(pki)
    with pytest.raises(Exception) as info:
        crls.verify(store.load_identity(other).chain, role=Role.DEVICE, now=datetime.now(UTC))
    assert info.value.reason.value == "revoked"  # type: ignore[attr-defined]
    # Unknown serial: refused, CRL untouched.
    before = snapshot(pki)
    rc, _, err = sealmq(capsys, "pki", "revoke", "--pki", pki, "--serial", "12345")
    assert rc == 2
    assert "not_found" in err
    assert snapshot(pki) == before


def test_root_key_offline_keeps_root_crl(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    store.init_ca(pki, two_level=True)
    offline = tmp_path / "offline-root.key"
    layout.root_key(pki).rename(offline)
    d = store.enroll(pki, Role.DEVICE, "d1")
    store.revoke(pki, cert_path=d / "cert.pem")
    crl = layout.crl(pki)
    assert crl.read_bytes().count(b"BEGIN X509 CRL") == 2
    r = openssl(
        "verify",
        "-CAfile",
        layout.anchor(pki),
        "-untrusted",
        layout.issuing_cert(pki),
        "-crl_check_all",
        "-CRLfile",
        crl,
        d / "cert.pem",
    )
    assert r.returncode != 0
    assert "revoked" in r.stdout + r.stderr


# --- refusals: exit 2, a reason, nothing written ---
def _csr(
    key: object,
    *,
    cn: str = "dev-9",
    san: list[x509.GeneralName] | None = None,
    ca: bool = False,
) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    b = b.add_extension(
        x509.SubjectAlternativeName(
            san if san is not None else [x509.UniformResourceIdentifier(f"urn:sealmq:device:{cn}")]
        ),
        critical=False,
    )
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def _broken_signature(pem: bytes) -> bytes:
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    bad = der[:-2] + bytes([der[-2] ^ 0x55]) + der[-1:]
    return x509.load_der_x509_csr(bad).public_bytes(serialization.Encoding.PEM)


P256 = ec.generate_private_key(ec.SECP256R1())
BAD_CSRS = {
    "broken-signature": (lambda: _broken_signature(_csr(P256)), "device", "bad_signature"),
    "ca-true": (lambda: _csr(P256, ca=True), "device", "policy_violation"),
    "foreign-dns-san": (lambda: _csr(P256, san=[x509.DNSName("evil.example")]), "device", "policy_violation"),
    "foreign-uri-san": (
        lambda: _csr(P256, san=[x509.UniformResourceIdentifier("urn:sealmq:device:other")]),
        "device",
        "policy_violation",
    ),
    "two-sans": (
        lambda: _csr(
            P256, san=[x509.UniformResourceIdentifier("urn:sealmq:device:dev-9"), x509.DNSName("dev-9")]
        ),
        "device",
        "policy_violation",
    ),
    "invalid-id": (lambda: _csr(P256, cn="Dev/../9", san=[]), "device", "policy_violation"),
    "device-csr-as-backend": (lambda: _csr(P256), "backend", "policy_violation"),
    "secp256k1": (lambda: _csr(ec.generate_private_key(ec.SECP256K1())), "device", "unsupported_algorithm"),
    "dsa": (lambda: _csr(dsa.generate_private_key(2048)), "device", "unsupported_algorithm"),
    "rsa1024": (lambda: _csr(rsa.generate_private_key(65537, 1024)), "device", "weak_key"),
    "truncated": (lambda: _csr(P256)[:200], "device", "malformed"),
    "not-pem": (lambda: b"hello", "device", "malformed"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSRS))
def test_sign_refuses_bad_csr_and_writes_nothing(
    case: str, locked_pki: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki, pw = locked_pki
    make, role, reason = BAD_CSRS[case]
    csr = tmp_path / "csr.pem"
    csr.write_bytes(make())
    before, before_out = snapshot(pki), snapshot(tmp_path)
    rc, _, err = sealmq(
        capsys,
        "pki",
        "sign",
        "--pki",
        pki,
        "--csr",
        csr,
        "--role",
        role,
        "--out",
        tmp_path / "cert.pem",
        "--passphrase-file",
        pw,
    )
    assert rc == 2
    assert f"error: {reason}" in err, err
    assert snapshot(pki) == before
    assert snapshot(tmp_path) == before_out


@pytest.mark.parametrize(
    ("secret", "extra", "reason"),
    [
        (b"wrong\n", [], "bad_passphrase"),
        (None, [], "bad_passphrase"),
        (PASS, ["--days", "826"], "policy_violation"),
        (PASS, ["--name", "someone-else"], "identity_mismatch"),
    ],
)
def test_sign_refusals_on_the_ca_side(
    locked_pki: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    secret: bytes | None,
    extra: list[str],
    reason: str,
) -> None:
    pki, _ = locked_pki
    csr = tmp_path / "csr.pem"
    csr.write_bytes(_csr(P256))
    argv: list[str | Path] = [
        "pki",
        "sign",
        "--pki",
        pki,
        "--csr",
        csr,
        "--role",
        "device",
        "--out",
        tmp_path / "out" / "cert.pem",
        *extra,
    ]
    if secret is not None:
        (tmp_path / "pw").write_bytes(secret)
        argv += ["--passphrase-file", tmp_path / "pw"]
    before, before_out = snapshot(pki), snapshot(tmp_path)
    rc, _, err = sealmq(capsys, *argv)
    assert (rc, f"error: {reason}" in err) == (2, True), err
    assert snapshot(pki) == before
    assert snapshot(tmp_path) == before_out


def test_init_refuses_overwrite_and_force_replaces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = tmp_path / "pki"
    assert sealmq(capsys, "pki", "init", "--pki", pki)[0] == 0
    before = snapshot(pki)
    rc, _, err = sealmq(capsys, "pki", "init", "--pki", pki, "--two-level")
    assert rc == 2
    assert "already_exists" in err
    assert snapshot(pki) == before
    assert sealmq(capsys, "pki", "init", "--pki", pki, "--two-level", "--force")[0] == 0
    assert layout.root_cert(pki).read_bytes() != before["ca/root.crt"][1]
    assert layout.issuing_cert(pki).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pki"]  # no temp dirs left behind
    assert sorted(p.name for p in pki.iterdir()) == ["ca"]


def test_init_failure_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = sealmq(
        capsys, "pki", "init", "--pki", tmp_path / "pki", "--passphrase-file", tmp_path / "none"
    )
    assert rc == 2
    assert "not_found" in err
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    rc, _, err = sealmq(capsys, "pki", "init", "--pki", tmp_path / "pki", "--passphrase-file", empty)
    assert rc == 2
    assert "bad_passphrase" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_enroll_refusals_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = tmp_path / "pki"
    store.init_ca(pki)
    before = snapshot(pki)
    rc, _, err = sealmq(capsys, "pki", "enroll", "--pki", pki, "device", "Bad_ID")
    assert rc == 2
    assert "policy_violation" in err
    assert snapshot(pki) == before
    assert sealmq(capsys, "pki", "enroll", "--pki", pki, "device", "d1")[0] == 0
    before = snapshot(pki)
    rc, _, err = sealmq(capsys, "pki", "enroll", "--pki", pki, "device", "d1")
    assert rc == 2
    assert "already_exists" in err
    assert snapshot(pki) == before


def test_unsupported_and_locked_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    none = serialization.NoEncryption()
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    for name, key in (
        ("dsa", dsa.generate_private_key(2048)),
        ("k1", ec.generate_private_key(ec.SECP256K1())),
        ("rsa1024", rsa.generate_private_key(65537, 1024)),
    ):
        path = tmp_path / f"{name}.pem"
        path.write_bytes(key.private_bytes(pem, pkcs8, none))
        rc, _, err = sealmq(
            capsys,
            "pki",
            "csr",
            "--key",
            path,
            "--role",
            "device",
            "--name",
            "d",
            "--out",
            tmp_path / "csr.pem",
        )
        assert rc == 2
        assert "unsupported_algorithm" in err or "weak_key" in err, err
        assert not (tmp_path / "csr.pem").exists()
    pw = tmp_path / "pw"
    pw.write_bytes(b"s3cret")
    assert sealmq(capsys, "pki", "keygen", "--out", tmp_path / "k", "--passphrase-file", pw)[0] == 0
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"nope")
    for extra in ([], ["--passphrase-file", wrong]):
        rc, _, err = sealmq(
            capsys,
            "pki",
            "csr",
            "--key",
            tmp_path / "k" / "key.pem",
            "--role",
            "device",
            "--name",
            "d",
            "--out",
            tmp_path / "csr.pem",
            *extra,
        )
        assert rc == 2
        assert "bad_passphrase" in err
    assert (
        sealmq(
            capsys,
            "pki",
            "csr",
            "--key",
            tmp_path / "k" / "key.pem",
            "--role",
            "device",
            "--name",
            "d",
            "--out",
            tmp_path / "csr.pem",
            "--passphrase-file",
            pw,
        )[0]
        == 0
    )
    rc, _, err = sealmq(capsys, "pki", "keygen", "--out", tmp_path / "k")
    assert rc == 2
    assert "already_exists" in err


def test_verify_cli_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki, other = tmp_path / "pki", tmp_path / "other"
    store.init_ca(pki)
    store.init_ca(other)
    foreign = store.enroll(other, Role.DEVICE, "d1")
    rc, _, err = sealmq(capsys, "pki", "verify", "--pki", pki, foreign / "cert.pem")
    assert rc == 2
    assert "unknown_ca" in err
    key = keys.generate(keys.KeyType.P256)
    csr = issue.make_csr(key, Role.DEVICE, "old").public_bytes(serialization.Encoding.PEM)
    old = store.sign_csr(pki, csr, Role.DEVICE, days=30, now=datetime.now(UTC) - timedelta(days=31))
    (tmp_path / "old.pem").write_bytes(old.cert_pem())
    rc, _, err = sealmq(capsys, "pki", "verify", "--pki", pki, tmp_path / "old.pem")
    assert rc == 2
    assert "expired" in err
    good = store.enroll(pki, Role.DEVICE, "d2")
    (tmp_path / "trunc.pem").write_bytes((good / "cert.pem").read_bytes()[:300])
    for cmd in ("verify", "show"):
        args = ["pki", cmd, *(["--pki", pki] if cmd == "verify" else []), tmp_path / "trunc.pem"]
        rc, _, err = sealmq(capsys, *args)
        assert rc == 2
        assert "malformed" in err


def test_load_identity_checks_key_matches(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    store.init_ca(pki)
    a, b = store.enroll(pki, Role.DEVICE, "a"), store.enroll(pki, Role.DEVICE, "b")
    os.replace(b / "key.pem", a / "key.pem")
    with pytest.raises(Exception) as info:
        store.load_identity(a)
    assert info.value.reason.value == "identity_mismatch"  # type: ignore[attr-defined]


def test_real_console_exit_code(tmp_path: Path) -> None:
    """The real entry point (a child process): success 0, refusal 2 with the reason on stderr."""
    pki = tmp_path / "pki"
    run = [sys.executable, "-m", "app.cli", "pki"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run(
        [*run, "init", "--pki", str(pki)], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [*run, "verify", "--pki", str(pki), str(layout.anchor(pki))],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2
    assert "sealmq: error:" in r.stderr


def test_sign_refuses_to_overwrite_output_before_issuing(
    locked_pki: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki, pw = locked_pki
    csr = tmp_path / "csr.pem"
    csr.write_bytes(_csr(P256))
    (tmp_path / "cert.pem").write_bytes(b"old")
    before, before_out = snapshot(pki), snapshot(tmp_path)
    argv = ["pki", "sign", "--pki", pki, "--csr", csr, "--role", "device", "--out", tmp_path / "cert.pem"]
    rc, _, err = sealmq(capsys, *argv, "--passphrase-file", pw)
    assert rc == 2
    assert "already_exists" in err
    assert (snapshot(pki), snapshot(tmp_path)) == (before, before_out)  # no certificate recorded either
    assert sealmq(capsys, *argv, "--passphrase-file", pw, "--force")[0] == 0
    assert (tmp_path / "cert.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
