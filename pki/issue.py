"""Building certificates, CSRs and CRLs: the CA's issuance policy, with time passed in.

- CA certificates: a self-signed root (pathLen 1 with an issuing CA, else 0) and optionally an
  issuing CA signed by it (pathLen 0). keyUsage keyCertSign + cRLSign (critical).
- Leaves: CN = name, SAN URI ``urn:sealmq:<role>:<name>``, basicConstraints CA:false (critical),
  keyUsage digitalSignature (critical), EKU device -> clientAuth; backend -> serverAuth +
  clientAuth, SKI/AKI, random 159-bit serial, bounded validity.
- Broker (TLS server) certificates: CN = name, SAN DNS names / IP addresses only (no sealmq URI,
  so one can never pass as an EDHOC identity), EKU serverAuth only, keyUsage digitalSignature +
  keyEncipherment (RSA key exchange in TLS 1.2).
- CSRs are validated before anything is signed (:func:`check_csr`).

No file I/O here (see :mod:`pki.store`).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.keys import PrivateKey, signing_hash
from pki.verify import (
    PARSE_ERRORS,
    describe_public_key,
    identity_uri,
    parse_identity_uri,
    valid_name,
)
from sealmq.errors import CertificateError, CsrError, PkiError, Reason
from sealmq.identity import Role

DEFAULT_LEAF_DAYS = 365
MAX_LEAF_DAYS = 825
ROOT_DAYS = 20 * 365
ISSUING_DAYS = 10 * 365
DEFAULT_CRL_DAYS = 30
MAX_CRL_DAYS = 366
ROOT_CRL_DAYS = 365
# Leaves start slightly in the past so a device whose clock lags a little accepts them.
BACKDATE = timedelta(minutes=5)
MAX_CSR_BYTES = 64 * 1024

RandomBytes = Callable[[int], bytes]


def random_serial(random_bytes: RandomBytes = os.urandom) -> int:
    """A positive serial of up to 159 random bits (fits RFC 5280's 20 octets with the sign bit clear)."""
    while True:
        serial = int.from_bytes(random_bytes(20), "big") >> 1
        if serial:
            return serial


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca_builder(
    subject: str,
    *,
    key: PrivateKey,
    issuer: x509.Certificate | None,
    now: datetime,
    days: int,
    path_len: int,
    random_bytes: RandomBytes,
) -> x509.CertificateBuilder:
    pub = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(pub)
        .serial_number(random_serial(random_bytes))
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(_aki_from(issuer), critical=False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(pub), critical=False
        )
    return builder


def _aki_from(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def make_root(
    key: PrivateKey,
    now: datetime,
    *,
    path_len: int,
    name: str = "sealmq root CA",
    days: int = ROOT_DAYS,
    random_bytes: RandomBytes = os.urandom,
) -> x509.Certificate:
    return _ca_builder(
        name, key=key, issuer=None, now=now, days=days, path_len=path_len, random_bytes=random_bytes
    ).sign(key, signing_hash(key))


def make_issuing(
    key: PrivateKey,
    root: x509.Certificate,
    root_key: PrivateKey,
    now: datetime,
    *,
    name: str = "sealmq issuing CA",
    days: int = ISSUING_DAYS,
    random_bytes: RandomBytes = os.urandom,
) -> x509.Certificate:
    days = min(days, max(1, (root.not_valid_after_utc - now).days))
    builder = _ca_builder(
        name, key=key, issuer=root, now=now, days=days, path_len=0, random_bytes=random_bytes
    )
    return builder.sign(root_key, signing_hash(root_key))


# --- CSRs ----------------------------------------------------------------------------------
def make_csr(key: PrivateKey, role: Role, name: str) -> x509.CertificateSigningRequest:
    uri = identity_uri(Role(role), name)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(name))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .sign(key, signing_hash(key))
    )


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """A PEM (or DER) CSR; any parse failure is CsrError(MALFORMED)."""
    if not isinstance(data, bytes) or len(data) > MAX_CSR_BYTES:
        raise CsrError(Reason.MALFORMED, "CSR must be bytes and small")
    try:
        csr = x509.load_pem_x509_csr(data) if data.lstrip().startswith(b"-----BEGIN") else x509.load_der_x509_csr(data)
        _ = (csr.subject, [str(a.value) for a in csr.subject])
    except PARSE_ERRORS:
        raise CsrError(Reason.MALFORMED, "not a certificate signing request") from None
    return csr


@dataclass(frozen=True)
class CheckedCsr:
    csr: x509.CertificateSigningRequest
    role: Role
    name: str
    key_type: str


def check_csr(
    csr: x509.CertificateSigningRequest, role: Role, expected_name: str | None = None
) -> CheckedCsr:
    """Everything the CA refuses to sign: broken self-signature, weak or foreign key types,
    an invalid name, a CA:true request, any SAN other than our own URI for this role and name."""
    role = Role(role)
    _parse = PARSE_ERRORS
    try:
        pub = csr.public_key()
    except _parse:
        raise CsrError(Reason.UNSUPPORTED_ALGORITHM, "unsupported public key in CSR") from None
    try:
        key_type = describe_public_key(pub)
    except PkiError as exc:
        raise CsrError(exc.reason, exc.detail) from None
    try:
        sig_ok = csr.is_signature_valid
    except _parse:
        sig_ok = False
    if not sig_ok:
        raise CsrError(Reason.BAD_SIGNATURE, "the CSR's self-signature does not verify")
    try:
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        exts = list(csr.extensions)
    except _parse:
        raise CsrError(Reason.MALFORMED, "unparsable CSR subject or extensions") from None
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise CsrError(Reason.POLICY_VIOLATION, "the CSR subject needs exactly one CN")
    name = cns[0].value
    if not valid_name(name):
        raise CsrError(Reason.POLICY_VIOLATION, f"invalid {role.value} name in CN")
    if expected_name is not None and name != expected_name:
        raise CsrError(Reason.IDENTITY_MISMATCH, "CSR names another identity")
    for ext in exts:
        value = ext.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise CsrError(Reason.POLICY_VIOLATION, "the CSR asks for CA:true")
        if isinstance(value, x509.SubjectAlternativeName):
            _check_requested_san(list(value), role, name)
    return CheckedCsr(csr=csr, role=role, name=name, key_type=key_type)


def _check_requested_san(names: Iterable[x509.GeneralName], role: Role, name: str) -> None:
    names = list(names)
    if len(names) != 1 or not isinstance(names[0], x509.UniformResourceIdentifier):
        raise CsrError(Reason.POLICY_VIOLATION, "the CSR asks for a foreign subjectAltName")
    try:
        got = parse_identity_uri(names[0].value)
    except CertificateError:
        raise CsrError(Reason.POLICY_VIOLATION, "the CSR asks for a foreign subjectAltName") from None
    if got != (role, name):
        raise CsrError(Reason.POLICY_VIOLATION, "the CSR's SAN URI does not match role and CN")


# --- leaves --------------------------------------------------------------------------------
def _eku(role: Role) -> x509.ExtendedKeyUsage:
    if role is Role.BACKEND:
        return x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    return x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])


def issue_leaf(
    checked: CheckedCsr,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    now: datetime,
    *,
    days: int = DEFAULT_LEAF_DAYS,
    random_bytes: RandomBytes = os.urandom,
    san_uri: str | None = None,
    lifetime: timedelta | None = None,
) -> x509.Certificate:
    """Sign a checked CSR. ``now`` may be in the past (tests issue expired certificates this way).

    ``san_uri`` replaces the identity URI: claim certificates (:mod:`pki.claim`) name
    ``urn:sealmq:claim:<id>``, which no verifier accepts as a device. ``lifetime`` replaces ``days``
    for short-lived certificates (automatic renewal, tests): at least a minute, at most the maximum."""
    if lifetime is not None:
        if not timedelta(minutes=1) <= lifetime <= timedelta(days=MAX_LEAF_DAYS):
            raise PkiError(Reason.POLICY_VIOLATION, f"validity must be 1 minute..{MAX_LEAF_DAYS} days")
    elif not 1 <= days <= MAX_LEAF_DAYS:
        raise PkiError(Reason.POLICY_VIOLATION, f"validity must be 1..{MAX_LEAF_DAYS} days")
    if issuer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != issuer_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise PkiError(Reason.POLICY_VIOLATION, "the CA key does not match the CA certificate")
    pub = checked.csr.public_key()
    # A leaf never outlives its CA: clip rather than issue a certificate that fails validation.
    not_after = min(now + (lifetime or timedelta(days=days)), issuer.not_valid_after_utc)
    builder = (
        _leaf_builder(checked.name, issuer, pub, now=now, not_after=not_after, random_bytes=random_bytes,
                      key_encipherment=False)
        .add_extension(_eku(checked.role), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(san_uri or identity_uri(checked.role, checked.name))]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(_aki_from(issuer), critical=False)
    )
    return builder.sign(issuer_key, signing_hash(issuer_key))


def _leaf_builder(
    name: str, issuer: x509.Certificate, public_key: Any, *, now: datetime, not_after: datetime,
    random_bytes: RandomBytes, key_encipherment: bool,
) -> x509.CertificateBuilder:
    """What every leaf (device, backend, claim, broker) shares: subject, issuer, key, random
    serial, validity, CA:false and a critical key usage; the caller adds EKU, SAN and key ids."""
    return (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(random_serial(random_bytes))
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=key_encipherment,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


# --- broker (TLS server) certificates -------------------------------------------------------
def server_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """SAN entries for the host names and IP addresses a broker serves (checked, deduplicated)."""
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            label = host.lower().rstrip(".")
            parts = label.split(".")
            if not label or len(label) > 253 or not all(
                0 < len(p) <= 63 and p.replace("-", "").isalnum() and p.isascii()
                and not p.startswith("-") and not p.endswith("-") for p in parts
            ):
                raise PkiError(Reason.POLICY_VIOLATION, f"not a host name or IP address: {host!r}") from None
            entry = x509.DNSName(label)
        if entry not in out:
            out.append(entry)
    if not out:
        raise PkiError(Reason.POLICY_VIOLATION, "a broker certificate needs at least one --host")
    return out


def issue_server(
    key: PrivateKey,
    name: str,
    hosts: Iterable[str],
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    *,
    now: datetime,
    days: int = DEFAULT_LEAF_DAYS,
    random_bytes: RandomBytes = os.urandom,
) -> x509.Certificate:
    """A TLS server certificate for ``key``'s owner (a broker): serverAuth only, hosts as DNS/IP SANs."""
    if not valid_name(name):
        raise PkiError(Reason.POLICY_VIOLATION, "invalid broker name")
    if not 1 <= days <= MAX_LEAF_DAYS:
        raise PkiError(Reason.POLICY_VIOLATION, f"validity must be 1..{MAX_LEAF_DAYS} days")
    public_key = key.public_key()
    describe_public_key(public_key)  # the leaf key types we accept anywhere
    not_after = min(now + timedelta(days=days), issuer.not_valid_after_utc)
    builder = (
        # key_encipherment: an RSA broker key serves TLS 1.2 RSA key exchange
        _leaf_builder(name, issuer, public_key, now=now, not_after=not_after, random_bytes=random_bytes,
                      key_encipherment=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(server_names(hosts)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki_from(issuer), critical=False)
    )
    return builder.sign(issuer_key, signing_hash(issuer_key))


# --- CRLs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Revocation:
    serial: int
    revoked_at: datetime
    reason: x509.ReasonFlags | None = None


REVOCATION_REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
}


def make_crl(
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    revoked: Iterable[Revocation],
    now: datetime,
    *,
    number: int,
    days: int = DEFAULT_CRL_DAYS,
) -> x509.CertificateRevocationList:
    if not 1 <= days <= MAX_CRL_DAYS:
        raise PkiError(Reason.POLICY_VIOLATION, f"CRL validity must be 1..{MAX_CRL_DAYS} days")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now - BACKDATE)  # like certificates: tolerate verifiers whose clock lags
        .next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_aki_from(issuer), critical=False)
    )
    for item in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(item.serial).revocation_date(item.revoked_at)
        if item.reason is not None and item.reason is not x509.ReasonFlags.unspecified:
            entry = entry.add_extension(x509.CRLReason(item.reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(issuer_key, signing_hash(issuer_key))
