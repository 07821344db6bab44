"""Certificate path validation for the handshake: pure (no file I/O, no clock; ``now`` is passed in).

:class:`TrustStore` validates a peer's chain (leaf first) against the operator's trust anchors,
the CRLs of every CA on the path, the validity period of every certificate, the role (SAN URI
``urn:sealmq:<role>:<name>`` and the extended key usage) and, optionally, the expected name.
Each failure raises :class:`~sealmq.errors.CertificateError` with a precise :class:`Reason`.

Checks are ours first (so that an expired leaf says ``EXPIRED``, a device presented as a
backend says ``WRONG_ROLE``...), then ``cryptography.x509.verification`` validates the same path
again as an independent second opinion (RFC 5280 / CA-B-forum-style profile checks).

This module also holds the small pure helpers other parts share: certificate/CRL loading from
PEM or DER, the identity URI scheme, and the key-type policy.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from sealmq.errors import CertificateError, PkiError, Reason
from sealmq.identity import CredentialKind, Role

URI_PREFIX = "urn:sealmq:"
# Names end up in topics, SAN URIs and directory names: the device-id alphabet for both roles.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
MIN_RSA_BITS = 2048
ALLOWED_CURVES = ("secp256r1", "secp384r1")
MAX_CHAIN_CERTS = 8
MAX_INPUT_BYTES = 1 << 20  # a chain or CRL larger than this is garbage, not a certificate
VERIFIED_CACHE_SIZE = 4096  # validated chains remembered per trust store (one per device, typically)

# Parsing of X.509 in cryptography is lazy: a certificate that loads can still raise when a
# field is touched. Everything below converts these into our errors.
PARSE_ERRORS = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    IndexError,
    KeyError,
    OverflowError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    x509.AttributeNotFound,
)


class _X509Credential:
    """What an identity proven by an X.509 leaf says of its credential (``certificate`` is the leaf)."""

    certificate: x509.Certificate

    @property
    def kind(self) -> CredentialKind:
        return CredentialKind.X509

    @property
    def credential_ref(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class VerifiedPeer(_X509Credential):
    """A peer whose certificate chain validated; a :class:`sealmq.identity.PeerIdentity`."""

    role: Role
    name: str  # device id or backend name, from the SAN URI
    certificate: x509.Certificate  # the leaf
    public_key: Any  # the leaf's public key object (cryptography)

    @property
    def credential(self) -> str:
        return f"x509 serial {self.certificate.serial_number:x}"


@dataclass(frozen=True)
class _Verified:
    """A cached validation: the peer, valid while ``not_before <= now < not_after``."""

    peer: VerifiedPeer
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class VerifiedClaim(_X509Credential):
    """A device that proved only a claim credential: it may enrol and do nothing else.

    Its ``role`` is the device's (it speaks the device side of the protocol); ``claim`` is what the
    backend checks to confine the session to enrolment.
    """

    name: str  # the device id the claim is bound to
    certificate: x509.Certificate
    public_key: Any
    role: Role = Role.DEVICE
    claim: bool = True

    @property
    def credential(self) -> str:
        return f"claim serial {self.certificate.serial_number:x}"


CLAIM_URI_PREFIX = "urn:sealmq:claim:"


def claim_uri(name: str) -> str:
    if not valid_name(name):
        raise PkiError(Reason.POLICY_VIOLATION, "invalid device id for a claim")
    return CLAIM_URI_PREFIX + name


def claim_name_of(cert: x509.Certificate) -> str | None:
    """The device id a claim certificate is bound to, or None if it is not a claim certificate."""
    try:
        names = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return None
    if len(names) != 1 or not isinstance(names[0], x509.UniformResourceIdentifier):
        return None
    uri = names[0].value
    if not uri.startswith(CLAIM_URI_PREFIX) or not valid_name(uri[len(CLAIM_URI_PREFIX):]):
        return None
    return uri[len(CLAIM_URI_PREFIX):]


# --- identity ------------------------------------------------------------------------------
def valid_name(name: str) -> bool:
    return isinstance(name, str) and bool(NAME_RE.match(name))


def identity_uri(role: Role, name: str) -> str:
    if not valid_name(name):
        raise PkiError(Reason.POLICY_VIOLATION, f"invalid {role.value} name")
    return f"{URI_PREFIX}{Role(role).value}:{name}"


def parse_identity_uri(uri: str) -> tuple[Role, str]:
    """``urn:sealmq:<role>:<name>`` -> (role, name); anything else is a POLICY_VIOLATION."""
    if not uri.startswith(URI_PREFIX):
        raise CertificateError(Reason.POLICY_VIOLATION, "SAN URI outside urn:sealmq:")
    role_text, sep, name = uri[len(URI_PREFIX) :].partition(":")
    if not sep or role_text not in {r.value for r in Role} or not valid_name(name):
        raise CertificateError(Reason.POLICY_VIOLATION, "malformed sealmq identity URI")
    return Role(role_text), name


def identity_of(cert: x509.Certificate) -> tuple[Role, str]:
    """The (role, name) a leaf certifies: exactly one SAN entry, a sealmq URI."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = list(san)
    except x509.ExtensionNotFound:
        raise CertificateError(Reason.POLICY_VIOLATION, "no subjectAltName") from None
    except PARSE_ERRORS:
        raise CertificateError(Reason.MALFORMED, "unparsable extensions") from None
    if len(names) != 1 or not isinstance(names[0], x509.UniformResourceIdentifier):
        raise CertificateError(Reason.POLICY_VIOLATION, "subjectAltName must be one sealmq URI")
    return parse_identity_uri(names[0].value)


# --- keys ----------------------------------------------------------------------------------
def describe_public_key(key: object) -> str:
    """Short name of an acceptable public key (``p256``, ``ed25519``, ``rsa3072``...).

    Raises UNSUPPORTED_ALGORITHM for any other algorithm or curve, WEAK_KEY for short RSA.
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_CURVES:
            raise PkiError(Reason.UNSUPPORTED_ALGORITHM, f"curve {key.curve.name} not allowed")
        return "p256" if key.curve.name == "secp256r1" else "p384"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise PkiError(Reason.WEAK_KEY, f"RSA key of {key.key_size} bits (< {MIN_RSA_BITS})")
        return f"rsa{key.key_size}"
    raise PkiError(Reason.UNSUPPORTED_ALGORITHM, f"key type {type(key).__name__} not allowed")


def _cert_key_description(cert: x509.Certificate) -> str:
    try:
        key = cert.public_key()
    except PARSE_ERRORS:
        raise CertificateError(Reason.UNSUPPORTED_ALGORITHM, "unsupported public key") from None
    try:
        return describe_public_key(key)
    except PkiError as exc:
        raise CertificateError(exc.reason, exc.detail) from None


# --- loading -------------------------------------------------------------------------------
_PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]*?-----END CERTIFICATE-----")


def load_certificate(data: bytes | x509.Certificate) -> x509.Certificate:
    """One certificate from PEM or DER; its fields are touched so later access cannot raise."""
    if isinstance(data, x509.Certificate):
        cert = data
    else:
        if not isinstance(data, bytes | bytearray) or len(data) > MAX_INPUT_BYTES:
            raise CertificateError(Reason.MALFORMED, "certificate must be bytes")
        raw = bytes(data)
        try:
            if raw.lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(raw)
            else:
                cert = x509.load_der_x509_certificate(raw)
        except PARSE_ERRORS:
            raise CertificateError(Reason.MALFORMED, "not a certificate") from None
    _touch(cert)
    return cert


def _touch(cert: x509.Certificate) -> None:
    try:
        _ = (cert.version, cert.subject, cert.issuer, cert.serial_number, cert.not_valid_before_utc)
        _ = (cert.not_valid_after_utc, cert.extensions, cert.signature_hash_algorithm)
        _ = [str(a.value) for a in cert.subject] + [str(a.value) for a in cert.issuer]
    except PARSE_ERRORS:
        raise CertificateError(Reason.MALFORMED, "unparsable certificate fields") from None


def load_certificates_pem(data: bytes) -> list[x509.Certificate]:
    """All certificates of a PEM bundle (order kept). No certificate at all is MALFORMED."""
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_INPUT_BYTES:
        raise CertificateError(Reason.MALFORMED, "PEM bundle must be bytes")
    blocks = _PEM_CERT_RE.findall(bytes(data))
    if not blocks:
        raise CertificateError(Reason.MALFORMED, "no PEM certificate found")
    return [load_certificate(block) for block in blocks]


def load_chain(data: bytes) -> list[x509.Certificate]:
    """A chain file: a PEM bundle (leaf first) or one DER certificate."""
    if isinstance(data, bytes | bytearray) and bytes(data).lstrip().startswith(b"-----BEGIN"):
        return load_certificates_pem(data)
    return [load_certificate(data)]


def load_crls_pem(data: bytes) -> list[x509.CertificateRevocationList]:
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_INPUT_BYTES:
        raise CertificateError(Reason.CRL_INVALID, "CRL must be bytes")
    blocks = re.findall(
        rb"-----BEGIN X509 CRL-----\r?\n[A-Za-z0-9+/=\r\n]*?-----END X509 CRL-----", bytes(data)
    )
    if not blocks:
        raise CertificateError(Reason.CRL_INVALID, "no PEM CRL found")
    crls = []
    for block in blocks:
        try:
            crl = x509.load_pem_x509_crl(block)
            _ = (crl.issuer, crl.last_update_utc, crl.next_update_utc, crl.extensions, list(crl))
        except PARSE_ERRORS:
            raise CertificateError(Reason.CRL_INVALID, "unparsable CRL") from None
        crls.append(crl)
    return crls


# --- the trust store -----------------------------------------------------------------------
def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def _aki(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return None


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, *PARSE_ERRORS):
        return False
    return True


def _crl_signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        return bool(crl.is_signature_valid(issuer.public_key()))  # type: ignore[arg-type]
    except PARSE_ERRORS:
        return False


def _check_validity(cert: x509.Certificate, now: datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateError(Reason.NOT_YET_VALID, f"{what} not valid before {cert.not_valid_before_utc}")
    if now > cert.not_valid_after_utc:
        raise CertificateError(Reason.EXPIRED, f"{what} expired at {cert.not_valid_after_utc}")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca


def _check_leaf_profile(leaf: x509.Certificate, role: Role) -> None:
    exts = leaf.extensions
    if _is_ca(leaf):
        raise CertificateError(Reason.POLICY_VIOLATION, "leaf is a CA certificate")
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise CertificateError(Reason.POLICY_VIOLATION, "leaf has no keyUsage") from None
    if not ku.digital_signature:
        raise CertificateError(Reason.POLICY_VIOLATION, "leaf keyUsage lacks digitalSignature")
    try:
        eku = set(exts.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        raise CertificateError(Reason.WRONG_ROLE, "leaf has no extendedKeyUsage") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise CertificateError(Reason.WRONG_ROLE, "leaf EKU lacks clientAuth")
    has_server = ExtendedKeyUsageOID.SERVER_AUTH in eku
    if role is Role.BACKEND and not has_server:
        raise CertificateError(Reason.WRONG_ROLE, "backend certificate needs serverAuth EKU")
    if role is Role.DEVICE and has_server:
        raise CertificateError(Reason.WRONG_ROLE, "device certificate must not have serverAuth EKU")


def _as_utc(now: datetime) -> datetime:
    if not isinstance(now, datetime):
        raise TypeError("now must be a datetime")
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


class TrustStore:
    """Trust anchors, known intermediates and CRLs. Immutable after construction.

    If any CRL is given, every certificate on a path below the anchor must be covered by a
    valid, fresh CRL of its issuer (hard fail: a missing or stale CRL is ``CRL_INVALID``).
    With no CRLs at all, revocation is not checked (the caller's explicit choice).
    """

    def __init__(
        self,
        anchors: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate] = (),
        crls: Sequence[x509.CertificateRevocationList] = (),
    ) -> None:
        if not anchors:
            raise CertificateError(Reason.UNKNOWN_CA, "a trust store needs at least one anchor")
        self._anchors = tuple(load_certificate(a) for a in anchors)
        self._intermediates = tuple(load_certificate(i) for i in intermediates)
        self._crls = tuple(crls)
        # Whether each CRL is signed by each CA of the store that could have issued it, checked
        # once here (an ECDSA verification each, about 90 us) rather than in every cold validation;
        # a CA presented in a chain, not in the store, is checked at each validation.
        self._crl_signed: dict[tuple[int, bytes], bool] = {}
        for ca in (*self._anchors, *self._intermediates):
            for i, crl in enumerate(self._crls):
                if crl.issuer == ca.subject:
                    self._crl_signed[(i, ca.public_bytes(serialization.Encoding.DER))] = _crl_signed_by(crl, ca)
        try:
            self._store = verification.Store(list(self._anchors))
        except PARSE_ERRORS:
            raise CertificateError(Reason.MALFORMED, "anchor not usable") from None
        # Chains that validated, by (DER of each certificate, role), with the time window in which
        # the same validation gives the same answer. The store is immutable (a CRL reload builds a
        # new one), so its anchors and CRLs are the cache's version: nothing else can change the
        # answer. Only successes are remembered; a refused chain is validated in full every time.
        # Each OrderedDict operation is atomic under the GIL; a race between two of them (another
        # thread evicting the key in between) only costs a full validation (see _remember).
        self._verified: OrderedDict[tuple[tuple[bytes, ...], Role], _Verified] = OrderedDict()

    def clear_cache(self) -> None:
        """Forget every validated chain (the next verify of each validates in full)."""
        self._verified.clear()

    @property
    def anchors(self) -> tuple[x509.Certificate, ...]:
        return self._anchors

    @property
    def crls(self) -> tuple[x509.CertificateRevocationList, ...]:
        return self._crls

    @property
    def checks_revocation(self) -> bool:
        return bool(self._crls)

    @staticmethod
    def from_pem(
        anchors_pem: bytes, crl_pem: bytes | None = None, intermediates_pem: bytes | None = None
    ) -> TrustStore:
        anchors = load_certificates_pem(anchors_pem)
        intermediates = load_certificates_pem(intermediates_pem) if intermediates_pem else []
        crls = load_crls_pem(crl_pem) if crl_pem else []
        return TrustStore(anchors, intermediates, crls)

    def verify(
        self,
        chain: Sequence[bytes | x509.Certificate],
        *,
        role: Role,
        now: datetime,
        expected_name: str | None = None,
    ) -> VerifiedPeer:
        """Validate ``chain`` (leaf first) for ``role`` at time ``now``; return the peer identity."""
        role = Role(role)
        when = _as_utc(now)
        if isinstance(chain, bytes | bytearray | x509.Certificate) or not chain:
            raise CertificateError(Reason.MALFORMED, "chain must be a non-empty sequence, leaf first")
        if len(chain) > MAX_CHAIN_CERTS:
            raise CertificateError(Reason.MALFORMED, "chain too long")
        key: tuple[tuple[bytes, ...], Role] | None = None
        ders = tuple(c for c in chain if type(c) is bytes)
        if len(ders) == len(chain):
            key = (ders, role)
            hit = self._verified.get(key)
            if hit is not None and hit.not_before <= when < hit.not_after:
                with contextlib.suppress(KeyError):  # evicted by another thread meanwhile: still valid
                    self._verified.move_to_end(key)
                if expected_name is not None and hit.peer.name != expected_name:
                    raise CertificateError(Reason.IDENTITY_MISMATCH, "certificate names another peer")
                return hit.peer
        certs = [load_certificate(c) for c in chain]
        try:
            peer, window = self._verify(certs, role, when, expected_name)
        except PARSE_ERRORS:
            # Lazily parsed fields deep in an extension; garbage, not a crash.
            raise CertificateError(Reason.MALFORMED, "unparsable certificate") from None
        if key is not None:
            self._remember(key, _Verified(peer, *window))
        return peer

    def _remember(self, key: tuple[tuple[bytes, ...], Role], entry: _Verified) -> None:
        try:
            self._verified[key] = entry
            self._verified.move_to_end(key)
            while len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)  # the least recently validated
        except KeyError:  # another thread evicted it meanwhile: not remembered, still correct
            pass

    def verify_claim(
        self, chain: Sequence[bytes | x509.Certificate], *, now: datetime, expected_name: str | None = None
    ) -> VerifiedClaim:
        """Validate a claim certificate (SAN ``urn:sealmq:claim:<id>``, device profile): the same
        path, validity and revocation checks as :meth:`verify`, for the enrolment service only."""
        when = _as_utc(now)
        if isinstance(chain, bytes | bytearray | x509.Certificate) or not chain or len(chain) > MAX_CHAIN_CERTS:
            raise CertificateError(Reason.MALFORMED, "chain must be a short non-empty sequence, leaf first")
        certs = [load_certificate(c) for c in chain]
        try:
            leaf = certs[0]
            name = claim_name_of(leaf)
            if name is None:
                raise CertificateError(Reason.WRONG_ROLE, "not a claim certificate")
            if expected_name is not None and name != expected_name:
                raise CertificateError(Reason.IDENTITY_MISMATCH, "claim names another device")
            _check_leaf_profile(leaf, Role.DEVICE)
            _cert_key_description(leaf)
            self._check_path(leaf, certs[1:], when)
        except PARSE_ERRORS:
            raise CertificateError(Reason.MALFORMED, "unparsable certificate") from None
        return VerifiedClaim(name=name, certificate=leaf, public_key=leaf.public_key())

    def _verify(
        self, certs: list[x509.Certificate], role: Role, now: datetime, expected_name: str | None
    ) -> tuple[VerifiedPeer, tuple[datetime, datetime]]:
        leaf = certs[0]
        # Cheap, precise checks on the leaf first, so the reason says what is wrong with it.
        peer_role, name = identity_of(leaf)
        if peer_role is not role:
            raise CertificateError(
                Reason.WRONG_ROLE, f"a {peer_role.value} certificate, expected {role.value}"
            )
        if expected_name is not None and name != expected_name:
            raise CertificateError(Reason.IDENTITY_MISMATCH, "certificate names another peer")
        _check_leaf_profile(leaf, role)
        _cert_key_description(leaf)
        try:
            # Each link found by name (and key identifier) when only one candidate has the name:
            # its signature is verified once, by the library's path validation, rather than
            # twice (the same ECDSA verification through the same library, about 80 us each).
            path, crls = self._check_path(leaf, certs[1:], now, by_name=True)
        except CertificateError as refused:
            # Refused: the same checks again, each link's signature verified as the path is built,
            # so the reason is the one they always gave (a forged signature is BAD_SIGNATURE, not
            # whatever failed after the unverified link). They cannot pass where the first failed:
            # the same links with good signatures meet the same checks. Should they, still refused.
            self._check_path(leaf, certs[1:], now)
            raise refused from None
        # The same answer holds from now on while every certificate on the path and every CRL used
        # is current, and until a CRL not yet valid becomes valid (it could then be the freshest).
        ends = [c.not_valid_after_utc for c in path] + [c.next_update_utc for c in crls if c.next_update_utc]
        ends += [c.last_update_utc for c in self._crls if c.last_update_utc > now]
        window = (now, min(ends))
        return VerifiedPeer(role=role, name=name, certificate=leaf, public_key=leaf.public_key()), window

    def _check_path(
        self, leaf: x509.Certificate, presented: list[x509.Certificate], now: datetime, *, by_name: bool = False
    ) -> tuple[list[x509.Certificate], list[x509.CertificateRevocationList]]:
        """The path to an anchor (``_build_path``), its revocation, then the library's RFC 5280
        validation of it; returns the path and the CRLs the answer rests on."""
        path = self._build_path(leaf, presented, now, by_name=by_name)
        crls = self._check_revocation(path, now)
        self._library_check(leaf, path, now)
        return path, crls

    def _build_path(
        self, leaf: x509.Certificate, presented: list[x509.Certificate], now: datetime, *, by_name: bool = False
    ) -> list[x509.Certificate]:
        """leaf -> ... -> anchor, checking each link's signature, validity and CA-ness. With
        ``by_name`` a link to the only candidate of the issuer's name (key identifiers agreeing) is
        taken without its signature: the caller must then have the library validate the path."""
        pool = [*presented, *self._intermediates]
        path = [leaf]
        cert = leaf
        _check_validity(leaf, now, "certificate")
        for _ in range(MAX_CHAIN_CERTS):
            anchor = self._find_issuer(cert, list(self._anchors), by_name)
            if anchor is not None:
                _check_validity(anchor, now, "trust anchor")
                path.append(anchor)
                return path
            inter = self._find_issuer(cert, [c for c in pool if c not in path], by_name)
            if inter is None:
                aki = _aki(cert)
                known = [*self._anchors, *pool]
                if aki is not None and any(_ski(k) == aki for k in known):
                    raise CertificateError(Reason.BAD_SIGNATURE, "signature does not verify under its CA")
                raise CertificateError(Reason.UNKNOWN_CA, "not issued by a trusted CA")
            if not _is_ca(inter):
                raise CertificateError(Reason.POLICY_VIOLATION, "issuer is not a CA")
            _check_validity(inter, now, "intermediate CA")
            path.append(inter)
            cert = inter
        raise CertificateError(Reason.UNKNOWN_CA, "no path to a trust anchor")

    @staticmethod
    def _find_issuer(
        cert: x509.Certificate, candidates: list[x509.Certificate], by_name: bool = False
    ) -> x509.Certificate | None:
        named = [cand for cand in candidates if cand.subject == cert.issuer]
        if by_name and len(set(named)) == 1:  # one certificate (an intermediate may be both presented and known)
            aki, ski = _aki(cert), _ski(named[0])
            if aki is None or ski is None or aki == ski:  # public identifiers: a plain comparison
                return named[0]
        for cand in named:
            if _signed_by(cert, cand):
                return cand
        return None

    def _check_revocation(
        self, path: list[x509.Certificate], now: datetime
    ) -> list[x509.CertificateRevocationList]:
        """Raise if anything on the path is revoked; return the CRLs the answer rests on."""
        if not self._crls:
            return []
        used = []
        for cert, issuer in itertools.pairwise(path):
            crl = self._fresh_crl(issuer, now)
            entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if entry is not None:
                what = "certificate" if cert is path[0] else "intermediate CA"
                raise CertificateError(Reason.REVOKED, f"{what} serial {cert.serial_number:x} revoked")
            used.append(crl)
        return used

    def _fresh_crl(self, issuer: x509.Certificate, now: datetime) -> x509.CertificateRevocationList:
        der = issuer.public_bytes(serialization.Encoding.DER)
        best: x509.CertificateRevocationList | None = None
        stale = False
        for i, crl in enumerate(self._crls):
            if crl.issuer != issuer.subject:
                continue
            signed = self._crl_signed.get((i, der))
            if not (signed if signed is not None else _crl_signed_by(crl, issuer)):
                continue
            nxt = crl.next_update_utc
            if nxt is None or now > nxt or now < crl.last_update_utc:
                stale = True
                continue
            if best is None or crl.last_update_utc > best.last_update_utc:
                best = crl
        if best is None:
            detail = "CRL expired or not yet valid" if stale else "no valid CRL from the issuer"
            raise CertificateError(Reason.CRL_INVALID, detail)
        return best

    def _library_check(self, leaf: x509.Certificate, path: list[x509.Certificate], now: datetime) -> None:
        """Independent second opinion: cryptography's RFC 5280 path validation of the same path."""
        builder = verification.PolicyBuilder().store(self._store).time(now).max_chain_depth(MAX_CHAIN_CERTS)
        verifier = builder.build_client_verifier()
        try:
            verifier.verify(leaf, path[1:-1])
        except verification.VerificationError as exc:
            raise CertificateError(Reason.POLICY_VIOLATION, f"path validation: {exc}") from None
