"""The backend's enrolment service: zero-touch enrolment with claim credentials, automatic
renewal, and the expiry warnings (docs/pki.md, "Zero-touch enrolment and renewal").

- :class:`ClaimAwareAuthenticator` lets a device in whose certificate is a claim
  (``urn:sealmq:claim:<id>``, :mod:`pki.claim`), validated like any certificate (path, validity,
  CRL) *and* live in the claim registry (not revoked, uses left). Anything else goes to the
  backend's usual authenticator. The session it yields carries a
  :class:`pki.verify.VerifiedClaim`, which :meth:`EnrolmentService.confine` holds to ENROL_REQUEST
  records: every other kind is refused and audited (``claim_confined``).
- :meth:`EnrolmentService.handle` answers an ENROL_REQUEST: the CSR goes through the CA's own
  policy (``pki.store.sign_csr`` -> ``pki.issue.check_csr``; role device, the session's device id),
  then the claim's use is counted (claim sessions) or the renewal policy applied (device sessions:
  not before ``renew_after`` of the current certificate's lifetime). Certificates are issued at the
  service's clock (time passed in), by the issuing CA of ``--pki`` (the root when single-level).
- A superseded certificate is revoked (``superseded``) once the device has completed a handshake
  with its new one, if the policy says so; otherwise it is left to expire.
- :meth:`EnrolmentService.warnings` audits ``certificate_expiring`` (a live session's certificate
  within ``warn_before`` of its end) and ``crl_expiring`` (the CRL within ``crl_warn_before`` of its
  nextUpdate), once per certificate / CRL; the metrics count them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pki import claim as pki_claim
from pki import store
from pki.verify import CLAIM_URI_PREFIX, VerifiedClaim, claim_name_of, load_certificate
from runtime.audit import AuditLog
from sealmq import cbor, enrol
from sealmq.edhoc import AuthenticatedPeer, PeerAuthenticator
from sealmq.edhoc.wire import IdCred
from sealmq.endpoint import Received
from sealmq.errors import EdhocError, PkiError, Reason, SealmqError
from sealmq.identity import Role
from sealmq.topics import RecordKind


@dataclass(frozen=True)
class EnrolPolicy:
    cert_lifetime: timedelta = timedelta(days=365)  # of certificates issued by enrolment and renewal
    renew_after: float = 0.5  # refuse a renewal before this fraction of the current lifetime passed
    revoke_superseded: bool = True  # revoke the old certificate once the new one is in use
    warn_before: float = 1 / 6  # warn when less than this fraction of a certificate's lifetime is left
    crl_warn_before: timedelta = timedelta(days=7)
    check_interval: float = 60.0  # seconds between expiry checks


_CLAIM_MARK = CLAIM_URI_PREFIX.encode()


def is_claim(peer: Any) -> bool:
    return isinstance(peer, VerifiedClaim)


class ClaimAwareAuthenticator:
    """Claim certificates (by value) to the claim checks, everything else to ``inner``."""

    def __init__(self, inner: PeerAuthenticator, trust_store: Any, pki_dir: Path, now: float) -> None:
        self.inner = inner
        self.trust_store = trust_store
        self.pki_dir = pki_dir
        self.now = now

    def authenticate(self, id_cred: IdCred) -> AuthenticatedPeer:
        chain = id_cred.get_x5chain()
        # A claim certificate's only SAN is its claim URI, which DER holds as plain ASCII: a leaf
        # without those bytes is no claim, and is not parsed here (the trust store parses it next).
        if chain and _CLAIM_MARK in chain[0]:
            try:
                name = claim_name_of(load_certificate(chain[0]))
            except SealmqError:
                name = None
            if name is not None:
                return self._claim(chain)
        return self.inner.authenticate(id_cred)

    def _claim(self, chain: list[bytes]) -> AuthenticatedPeer:
        try:
            verified = self.trust_store.verify_claim(chain, now=datetime.fromtimestamp(self.now, UTC))
            pki_claim.check_usable(self.pki_dir, verified.certificate.serial_number, verified.name)
        except PkiError as exc:
            raise EdhocError(exc.reason, "claim refused") from exc
        return AuthenticatedPeer(cred=cbor.dumps(chain[0]), public_key=verified.public_key, identity=verified)


class EnrolmentService:
    def __init__(self, pki_dir: Path, audit: AuditLog, policy: EnrolPolicy | None = None,
                 passphrase: bytes | None = None) -> None:
        self.pki_dir = pki_dir
        self.audit = audit
        self.policy = policy or EnrolPolicy()
        self.passphrase = passphrase
        self._superseded: dict[str, int] = {}  # device -> serial to revoke once the new one is used
        self._warned: set[tuple[str, int]] = set()
        self._next_check = 0.0

    def authenticator(self, inner: PeerAuthenticator, trust_store: Any, now: float) -> PeerAuthenticator:
        return ClaimAwareAuthenticator(inner, trust_store, self.pki_dir, now)

    # -- records -------------------------------------------------------------------------------
    def confine(self, rec: Received, peer: Any) -> bool:
        """True if the record is not allowed (audited): a claim session only enrols."""
        if is_claim(peer) and rec.kind is not RecordKind.ENROL_REQUEST:
            self.audit.event("message_rejected", device=rec.device_id, stage="claim", reason=Reason.CLAIM_CONFINED,
                             kind=rec.kind.name)
            return True
        return False

    def handle(self, rec: Received, peer: Any, now: float) -> bytes | None:
        """The ENROL_RESPONSE body for an ENROL_REQUEST (None: undecodable, audited, no answer)."""
        try:
            request = enrol.decode_request(rec.plaintext)
        except SealmqError as err:
            self.audit.event("enrolment_rejected", device=rec.device_id, reason=err.reason, detail=err.detail)
            return None
        when = datetime.fromtimestamp(now, UTC)
        claim = is_claim(peer)
        try:
            if claim:
                pki_claim.check_usable(self.pki_dir, peer.certificate.serial_number, rec.device_id)
            else:
                self._check_renewal(peer, when)
            issued = store.sign_csr(self.pki_dir, request.csr_der, Role.DEVICE, passphrase=self.passphrase,
                                    now=when, expected_name=rec.device_id, lifetime=self.policy.cert_lifetime)
            if claim:
                used = pki_claim.consume(self.pki_dir, peer.certificate.serial_number, rec.device_id,
                                         issued.certificate.serial_number, when)
        except SealmqError as err:
            event = "enrolment_rejected" if claim else "renewal_rejected"
            self.audit.event(event, device=rec.device_id, reason=err.reason, detail=err.detail)
            return enrol.EnrolResponse.refused(request.req_id, err.reason.value).encode()
        serial = f"{issued.certificate.serial_number:x}"
        if claim:
            self.audit.event("device_enrolled", device=rec.device_id, serial=serial,
                             claim=f"{peer.certificate.serial_number:x}", claim_uses=used.uses,
                             claim_max_uses=used.max_uses)
        else:
            old = getattr(peer, "certificate", None)
            if old is not None and self.policy.revoke_superseded:
                self._superseded[rec.device_id] = old.serial_number
            self.audit.event("certificate_renewed", device=rec.device_id, serial=serial,
                             not_after=issued.certificate.not_valid_after_utc.isoformat())
        return enrol.EnrolResponse.issued(request.req_id, [c.public_bytes(Encoding.DER) for c in issued.chain]).encode()

    def _check_renewal(self, peer: Any, when: datetime) -> None:
        cert: x509.Certificate | None = getattr(peer, "certificate", None)
        if cert is None:
            raise PkiError(Reason.POLICY_VIOLATION, "only certificate devices renew this way")
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        if when < cert.not_valid_before_utc + lifetime * self.policy.renew_after:
            raise PkiError(Reason.POLICY_VIOLATION, "renewal too early in the certificate's lifetime")

    # -- after a handshake ---------------------------------------------------------------------
    def on_handshake(self, device_id: str, identity: Any, now: float) -> None:
        """Revoke the superseded certificate once the device authenticated with another one."""
        old = self._superseded.get(device_id)
        cert = getattr(identity, "certificate", None)
        if old is None or cert is None or is_claim(identity) or cert.serial_number == old:
            return
        del self._superseded[device_id]
        try:
            store.revoke(self.pki_dir, serial=old, reason="superseded", passphrase=self.passphrase,
                         now=datetime.fromtimestamp(now, UTC))
        except SealmqError as err:
            self.audit.event("revocation_failed", device=device_id, serial=f"{old:x}", reason=err.reason)
            return
        self.audit.event("certificate_superseded", device=device_id, serial=f"{old:x}")

    # -- expiry warnings -----------------------------------------------------------------------
    def warnings(self, now: float, peers: Callable[[], list[tuple[str, Any]]], trust_store: Any) -> None:
        if now < self._next_check:
            return
        self._next_check = now + self.policy.check_interval
        when = datetime.fromtimestamp(now, UTC)
        for device_id, peer in peers():
            cert = getattr(peer, "certificate", None)
            if cert is None or is_claim(peer):
                continue
            lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
            left = cert.not_valid_after_utc - when
            key = (device_id, cert.serial_number)
            if left < lifetime * self.policy.warn_before and key not in self._warned:
                self._warned.add(key)
                self.audit.event("certificate_expiring", device=device_id, serial=f"{cert.serial_number:x}",
                                 seconds_left=int(left.total_seconds()))
        for crl in getattr(trust_store, "crls", ()):
            nxt = crl.next_update_utc
            if nxt is None:
                continue
            key = ("crl", int(nxt.timestamp()))
            if nxt - when < self.policy.crl_warn_before and key not in self._warned:
                self._warned.add(key)
                self.audit.event("crl_expiring", issuer=crl.issuer.rfc4514_string(),
                                 seconds_left=int((nxt - when).total_seconds()))
