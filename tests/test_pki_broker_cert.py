"""`sealmq pki issue-broker`: a broker's TLS server certificate, checked by openssl; one role per name."""

from __future__ import annotations

import shutil
import stat
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from app.bootstrap import bootstrap
from app.cli import main
from pki import layout, store
from sealmq.errors import CertificateError, PkiError, Reason
from sealmq.identity import Role

OPENSSL = shutil.which("openssl")


def test_issue_broker_cli_writes_a_server_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = tmp_path / "pki"
    assert main(["pki", "init", "--pki", str(pki), "--two-level"]) == 0
    assert main(["pki", "issue-broker", "--pki", str(pki), "--host", "broker.example", "--host", "10.0.0.7",
                 "--host", "::1"]) == 0
    assert "broker.example, 10.0.0.7, ::1" in capsys.readouterr().out
    d = layout.broker_dir(pki)
    assert stat.S_IMODE((d / "key.pem").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((d / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7", "::1"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []  # never an EDHOC identity
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert len(x509.load_pem_x509_certificates((d / "chain.pem").read_bytes())) == 2  # leaf + issuing CA
    assert main(["pki", "show", str(d / "cert.pem")]) == 0
    shown = capsys.readouterr().out
    assert "role:        broker" in shown and "hosts:       broker.example, 10.0.0.7, ::1" in shown
    # an EDHOC verifier refuses it for either role
    trust = store.load_trust_store(pki)
    chain = x509.load_pem_x509_certificates((d / "chain.pem").read_bytes())
    for role in Role:
        with pytest.raises(CertificateError):
            trust.verify(chain, role=role, now=datetime.now(UTC))
    # listed in the index, so it can be revoked like any other
    entries = [e for e in store.read_index(pki)["certificates"] if e["role"] == "broker"]
    assert [e["name"] for e in entries] == ["broker"]
    if OPENSSL is not None:
        untrusted = ["-untrusted", str(layout.issuing_cert(pki))]
        ok = subprocess.run([OPENSSL, "verify", "-CAfile", str(layout.anchor(pki)), *untrusted, "-purpose",
                             "sslserver", "-verify_hostname", "broker.example", str(d / "cert.pem")],
                            capture_output=True, text=True, check=False)
        assert ok.returncode == 0, ok.stderr
        as_client = subprocess.run([OPENSSL, "verify", "-CAfile", str(layout.anchor(pki)), *untrusted,
                                    "-purpose", "sslclient", str(d / "cert.pem")],
                                   capture_output=True, text=True, check=False)
        assert as_client.returncode != 0  # serverAuth only: no broker certificate logs in as a client
        wrong_host = subprocess.run([OPENSSL, "verify", "-CAfile", str(layout.anchor(pki)), *untrusted,
                                     "-verify_hostname", "other.example", str(d / "cert.pem")],
                                    capture_output=True, text=True, check=False)
        assert wrong_host.returncode != 0


@pytest.mark.parametrize("hosts", [[], ["bad host"], ["-x.example"], ["a..b"], ["é.example"], ["x" * 64 + ".io"]])
def test_issue_broker_refuses_bad_hosts_and_writes_nothing(tmp_path: Path, hosts: list[str]) -> None:
    store.init_ca(tmp_path / "pki")
    with pytest.raises(PkiError) as exc:
        store.enroll_broker(tmp_path / "pki", "broker", hosts)
    assert exc.value.reason is Reason.POLICY_VIOLATION
    assert not (tmp_path / "pki" / "broker").exists()
    assert store.read_index(tmp_path / "pki")["certificates"] == []


def test_a_name_belongs_to_one_role(tmp_path: Path) -> None:
    """mosquitto maps a client certificate's CN to the account: a device named like the backend
    would log in with the backend's rights, so the CA refuses it (and the reverse)."""
    pki = tmp_path / "pki"
    store.init_ca(pki)
    store.enroll(pki, "backend", "backend")
    store.enroll(pki, "device", "dev-1")
    for role, name in (("device", "backend"), ("backend", "dev-1")):
        with pytest.raises(PkiError, match="belongs to a"):
            store.enroll(pki, role, name)
    with pytest.raises(PkiError, match="belongs to a"):
        store.enroll_broker(pki, "dev-1", ["localhost"])
    store.enroll(pki, "device", "dev-1", force=True)  # the same role again (re-enrolment) is fine
    # once revoked, the name is free again
    store.revoke(pki, cert_path=layout.backend_dir(pki) / "cert.pem")
    store.enroll(pki, "device", "backend")


def test_bootstrap_issues_the_broker_certificate_once(tmp_path: Path) -> None:
    dep, created = bootstrap(tmp_path / "d", ["dev-001"], iterations=1000, broker_hosts=["broker"])
    assert "broker TLS certificate for localhost, 127.0.0.1, broker" in created
    cert = (layout.broker_dir(dep.pki) / "cert.pem").read_bytes()
    _, again = bootstrap(tmp_path / "d", ["dev-001"], iterations=1000, broker_hosts=["broker"])
    assert again == []
    assert (layout.broker_dir(dep.pki) / "cert.pem").read_bytes() == cert
