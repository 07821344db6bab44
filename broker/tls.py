"""TLS for the brokers: the files a TLS listener needs, the server context, client certificate identities.

Both brokers serve ``mqtts`` with a server certificate from the operator's CA (``sealmq pki
issue-broker``) and authenticate devices and the backend by the X.509 certificate they already use
for EDHOC. The files come from the PKI directory's standard layout (docs/pki.md)::

    DIR/ca/ca.crt                     the CA clients' certificates must chain to
    DIR/ca/crl.pem                    the CRL(s): revoked client certificates are refused
    DIR/broker/<name>/chain.pem       the broker's certificate (+ intermediates), key.pem (0600)

The embedded broker maps a verified client certificate to the account its SAN URI names
(``urn:sealmq:<role>:<name>``, role checked against the account's); mosquitto maps its CN
(``use_identity_as_username``), which the PKI keeps equal to the name and unique across roles.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.passwd import AccountRole
from sealmq.errors import ConfigError, Reason
from sealmq.topics import valid_device_id

log = logging.getLogger("sealmq.broker")

DEFAULT_TLS_PORT = 8883
IDENTITY_PREFIX = "urn:sealmq:"
CERT_ROLES = {"device": AccountRole.DEVICE, "backend": AccountRole.BACKEND}


@dataclass(frozen=True)
class TlsFiles:
    cafile: Path
    certfile: Path  # the broker's certificate, then its intermediates
    keyfile: Path
    crlfile: Path | None = None

    @classmethod
    def from_pki(cls, pki_dir: str | Path, name: str = "broker") -> TlsFiles:
        """The standard layout of ``sealmq pki`` (docs/pki.md)."""
        root = Path(pki_dir)
        crl = root / "ca" / "crl.pem"
        return cls(root / "ca" / "ca.crt", root / "broker" / name / "chain.pem",
                   root / "broker" / name / "key.pem", crl if crl.exists() else None)

    def check(self) -> None:
        for path in (self.cafile, self.certfile, self.keyfile, *([self.crlfile] if self.crlfile else [])):
            if not Path(path).is_file():
                raise ConfigError(Reason.CONFIG_INVALID, f"TLS file missing: {path}")

    def server_context(self, *, client_certificates: bool = True) -> ssl.SSLContext:
        """TLS 1.2 and 1.3 only; client certificates required and verified against the CA and the
        CRL (leaf), or (``client_certificates=False``, a listener for passwords) not asked for."""
        self.check()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(self.certfile), str(self.keyfile))
            ctx.load_verify_locations(cafile=str(self.cafile))
            if self.crlfile is not None:
                ctx.load_verify_locations(cafile=str(self.crlfile))
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(Reason.CONFIG_INVALID, f"cannot load the TLS files: {exc}") from None
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        ctx.verify_mode = ssl.CERT_REQUIRED if client_certificates else ssl.CERT_NONE
        # No TLS 1.3 session tickets (OpenSSL sends two per full handshake): our clients never
        # resume, so making them is wasted work at every login. mosquitto gets the same setting
        # from the generated openssl.cnf (broker/mosquitto/openssl.cnf).
        ctx.num_tickets = 0
        return ctx


def certificate_identity(der: bytes) -> tuple[AccountRole, str] | None:
    """The account a (chain-verified) client certificate names: its one ``urn:sealmq:`` SAN URI."""
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except (ValueError, x509.ExtensionNotFound):
        return None
    if len(uris) != 1 or not uris[0].startswith(IDENTITY_PREFIX):
        return None
    role, _, name = uris[0][len(IDENTITY_PREFIX):].partition(":")
    if role not in CERT_ROLES or not valid_device_id(name):
        return None
    return CERT_ROLES[role], name


class RevokedSerials:
    """The serials the CRL file revokes, re-read when the file changes.

    This re-check at CONNECT time makes a revocation effective without restarting the broker. Only
    CRLs signed by a CA in ``cafile`` count; a file that cannot be read or verified keeps the last
    good list (and is logged). A changed file is also added to the TLS contexts in ``contexts``:
    OpenSSL picks the newest CRL of an issuer, so a re-issued CRL replaces one whose nextUpdate
    has passed (which would otherwise make the TLS layer refuse every client certificate).
    """

    def __init__(self, crlfile: Path, cafile: Path, chainfile: Path) -> None:
        self.contexts: list[ssl.SSLContext] = []
        self._crlfile = crlfile
        self._cafile = cafile
        self._chainfile = chainfile  # the broker's own chain: its intermediates sign the leaves' CRL
        self._stamp: tuple[int, int] | None = None
        self._revoked: set[tuple[bytes, int]] = set()
        self.refresh()

    def refresh(self) -> None:
        try:
            st = os.stat(self._crlfile)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            cas = [*x509.load_pem_x509_certificates(self._cafile.read_bytes()),
                   *x509.load_pem_x509_certificates(self._chainfile.read_bytes())[1:]]
            revoked: set[tuple[bytes, int]] = set()
            for crl in _load_crls(self._crlfile.read_bytes()):
                if not any(ca.subject == crl.issuer and _signed_by(crl, ca) for ca in cas):
                    log.warning("ignoring a CRL in %s not signed by a trusted CA", self._crlfile)
                    continue
                revoked |= {(crl.issuer.public_bytes(), r.serial_number) for r in crl}
        except (OSError, ValueError) as exc:
            log.warning("cannot reload %s (%s): keeping the last list", self._crlfile, type(exc).__name__)
            return
        first = self._stamp is None
        self._revoked, self._stamp = revoked, stamp
        if not first:
            log.info("reloaded %s (%d revoked certificates)", self._crlfile, len(revoked))
            for ctx in self.contexts:
                try:
                    ctx.load_verify_locations(cafile=str(self._crlfile))
                except (OSError, ssl.SSLError) as exc:
                    log.warning("TLS layer kept its CRLs: %s", exc)

    def is_revoked(self, der: bytes) -> bool:
        self.refresh()
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return True
        return (cert.issuer.public_bytes(), cert.serial_number) in self._revoked


def _load_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    marker = b"-----BEGIN X509 CRL-----"
    parts = data.split(marker)[1:]
    return [x509.load_pem_x509_crl(marker + p) for p in parts]


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey)):
        return False
    return crl.is_signature_valid(key)
