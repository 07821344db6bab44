"""A readable summary of a certificate (``sealmq pki show``): pure, no I/O."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pki.verify import PARSE_ERRORS, describe_public_key, identity_of
from sealmq.errors import PkiError


def summary(cert: x509.Certificate) -> list[tuple[str, str]]:
    """(label, value) pairs: subject, identity, role, key type, validity, serial, issuer, fingerprint."""
    try:
        role, name = identity_of(cert)
        identity, role_text = f"urn:sealmq:{role.value}:{name}", role.value
    except PkiError as exc:
        identity, role_text = f"(none: {exc.reason.value})", "-"
    try:
        key_type = describe_public_key(cert.public_key())
    except (PkiError, *PARSE_ERRORS) as exc:
        key_type = f"(not allowed: {exc})"
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = "yes" if bc.ca else "no"
    except x509.ExtensionNotFound:
        is_ca = "no"
    hosts: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]
    except (x509.ExtensionNotFound, *PARSE_ERRORS):
        pass
    if hosts and role_text == "-":  # a broker's TLS certificate (sealmq pki issue-broker)
        identity, role_text = "(none: a TLS server certificate)", "broker"
    return [
        ("subject", cert.subject.rfc4514_string()),
        ("identity", identity),
        ("role", role_text),
        *([("hosts", ", ".join(hosts))] if hosts else []),
        ("CA", is_ca),
        ("key type", key_type),
        ("not before", cert.not_valid_before_utc.isoformat()),
        ("not after", cert.not_valid_after_utc.isoformat()),
        ("serial", f"{cert.serial_number:x}"),
        ("issuer", cert.issuer.rfc4514_string()),
        ("sha256", cert.fingerprint(hashes.SHA256()).hex(":")),
    ]


def render(cert: x509.Certificate) -> str:
    return "\n".join(f"{label + ':':12} {value}" for label, value in summary(cert))
