"""The console's device list: enrolment (PKI, CCS registry), revocation, live session, counters."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cryptography import x509

from backend.console.feed import ConsoleFeed
from pki import layout
from pki.verify import load_crls_pem
from sealmq.identity import CredentialKind


def _cert_info(cert: x509.Certificate) -> dict[str, Any]:
    return {"type": "x509", "subject": cert.subject.rfc4514_string(), "serial": f"{cert.serial_number:x}",
            "not_after": cert.not_valid_after_utc.isoformat()}


def _enrolled(pki_dir: Path) -> dict[str, x509.Certificate]:
    certs: dict[str, x509.Certificate] = {}
    try:
        ids = layout.enrolled_devices(pki_dir)
    except OSError:
        return certs
    for device_id in ids:
        try:
            certs[device_id] = x509.load_pem_x509_certificate(
                (layout.device_dir(pki_dir, device_id) / layout.CERT).read_bytes())
        except (OSError, ValueError):
            continue
    return certs


def _revoked_serials(pki_dir: Path) -> set[int]:
    try:
        crls = load_crls_pem(layout.crl(pki_dir).read_bytes())
    except (OSError, ValueError):
        return set()
    return {r.serial_number for crl in crls for r in crl}


def device_rows(service: Any, feed: ConsoleFeed) -> list[dict[str, Any]]:
    """One row per device the backend knows of: enrolled, registered (CCS), seen or in session."""
    pki_dir = Path(service.settings.pki_dir)
    enrolled = _enrolled(pki_dir)
    revoked = _revoked_serials(pki_dir)
    registry = service.registry
    ccs_devices = {e.name: e for e in registry.entries() if e.role == "device"} if registry is not None else {}
    stored = {d: (first, last, hs) for d, first, last, hs in service.storage.devices()}
    sessions = dict(service.endpoint.sessions)  # a copy: the service thread changes the dict
    stats = feed.device_stats()
    now = time.time()
    rows = []
    for device_id in sorted(set(enrolled) | set(ccs_devices) | set(stored) | set(sessions) | set(stats)):
        est = sessions.get(device_id)
        credential: dict[str, Any] | None = None
        is_revoked = False
        peer = est.peer if est is not None else None
        # the credential the live session authenticated with, else what is enrolled
        peer_cert = (x509.load_der_x509_certificate(peer.credential_ref)
                     if peer is not None and peer.kind is CredentialKind.X509 else None)
        cert = peer_cert if peer_cert is not None else enrolled.get(device_id)
        if cert is not None:
            credential = _cert_info(cert)
            is_revoked = cert.serial_number in revoked
        entry = ccs_devices.get(device_id)
        kid = (peer.credential_ref if peer is not None and peer.kind is CredentialKind.CCS
               else entry.ccs.kid if entry is not None else None)
        if credential is None and kid is not None:
            credential = {"type": "ccs", "kid": bytes(kid).hex()}
            is_revoked = bool(entry is not None and entry.revoked)
        s = stats.get(device_id)
        _first, last, handshakes = stored.get(device_id, (None, None, 0))
        last_seen = max(last or 0.0, s.last_seen if s else 0.0)
        rows.append({
            "id": device_id,
            "credential": credential,
            "revoked": is_revoked,
            "session": "established" if est is not None else "none",
            "session_since": est.since if est is not None else None,
            "epoch": est.session.epoch if est is not None else (s.last_epoch if s else None),
            "last_seen": last_seen or None,
            "seen_ago": round(now - last_seen, 1) if last_seen else None,
            "handshakes": handshakes,
            "records_in": s.records_in if s else 0,
            "records_out": s.records_out if s else 0,
            "rejections": s.rejections if s else 0,
        })
    return rows
