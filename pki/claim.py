"""Claim credentials for zero-touch enrolment (docs/pki.md, "Zero-touch enrolment").

A claim is a certificate from the operator's CA whose only SAN is ``urn:sealmq:claim:<device-id>``
(device profile: clientAuth, digitalSignature), with its key, put on a device at the factory. No
verifier accepts it as a device (the SAN is not a device identity): the backend's enrolment
service accepts it for one thing, a sealed CSR for ``<device-id>``, and only while the claim's
record in ``DIR/claims/registry.json`` allows it (not revoked, used fewer than ``max_uses`` times).
The registry is the operator's allow-list: a device id without a live claim cannot enrol.

Files::

    DIR/claims/registry.json                 serial -> device, uses, max_uses, revoked_at, issued
    DIR/devices/<id>/claim/claim_key.pem      (0600) the claim key, and claim_chain.pem
    DIR/devices/<id>/claim/release.pub        the release public key the device will trust (optional)

Changes to the registry happen under the CA's lock and are written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from pki import issue, keys, layout, store
from pki.verify import claim_uri
from runtime.files import atomic_write
from sealmq.errors import PkiError, Reason
from sealmq.identity import Role

CLAIMS = "claims"
REGISTRY = "registry.json"
CLAIM_DIR = "claim"
CLAIM_KEY = "claim_key.pem"
CLAIM_CHAIN = "claim_chain.pem"
RELEASE_PUB = "release.pub"
DEFAULT_CLAIM_DAYS = 90


def registry_path(pki_dir: Path | str) -> Path:
    return Path(pki_dir) / CLAIMS / REGISTRY


def claim_dir(pki_dir: Path | str, device_id: str) -> Path:
    return layout.device_dir(pki_dir, device_id) / CLAIM_DIR


@dataclass(frozen=True)
class Claim:
    serial: str  # 40 hex, as in ca/index.json
    device: str
    uses: int
    max_uses: int
    revoked: bool

    @property
    def usable(self) -> bool:
        return not self.revoked and self.uses < self.max_uses


def _now() -> datetime:
    return datetime.now(UTC)


def read_registry(pki_dir: Path | str) -> dict[str, dict[str, Any]]:
    path = registry_path(pki_dir)
    if not path.exists():
        return {}
    try:
        data = json.loads(store.read_bytes(path, "claim registry"))
    except (ValueError, UnicodeDecodeError):
        raise PkiError(Reason.MALFORMED, "claims/registry.json is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("claims"), dict):
        raise PkiError(Reason.MALFORMED, "claims/registry.json has the wrong shape")
    claims: dict[str, dict[str, Any]] = data["claims"]
    return claims


def _write_registry(pki_dir: Path, claims: dict[str, dict[str, Any]]) -> None:
    path = registry_path(pki_dir)
    path.parent.mkdir(mode=0o755, exist_ok=True)
    atomic_write(path, (json.dumps({"version": 1, "claims": claims}, indent=2, sort_keys=True) + "\n").encode(),
                 mode=0o644)


def _claim(entry: dict[str, Any], serial: str) -> Claim:
    return Claim(serial, str(entry["device"]), int(entry["uses"]), int(entry["max_uses"]),
                 bool(entry.get("revoked_at")))


def list_claims(pki_dir: Path | str) -> list[Claim]:
    return [_claim(e, s) for s, e in sorted(read_registry(pki_dir).items())]


def lookup(pki_dir: Path | str, serial: int) -> Claim | None:
    entry = read_registry(pki_dir).get(layout.serial_hex(serial))
    return _claim(entry, layout.serial_hex(serial)) if entry is not None else None


def check_usable(pki_dir: Path | str, serial: int, device_id: str) -> Claim:
    """The claim for this certificate serial, if it may enrol ``device_id`` now; else PkiError."""
    found = lookup(pki_dir, serial)
    if found is None:
        raise PkiError(Reason.NOT_FOUND, "no such claim in the registry")
    if found.device != device_id:
        raise PkiError(Reason.IDENTITY_MISMATCH, "claim is bound to another device")
    if found.revoked:
        raise PkiError(Reason.REVOKED, "claim revoked")
    if not found.usable:
        raise PkiError(Reason.CLAIM_EXHAUSTED, f"claim used {found.uses} of {found.max_uses} times")
    return found


def issue_claim(
    pki_dir: Path | str,
    device_id: str,
    *,
    out_dir: Path | str | None = None,
    max_uses: int = 1,
    days: int = DEFAULT_CLAIM_DAYS,
    release_pub: Path | str | None = None,
    passphrase: bytes | None = None,
    now: datetime | None = None,
    force: bool = False,
) -> Path:
    """A claim key and certificate for ``device_id`` into ``out_dir`` (default DIR/devices/<id>/claim),
    registered with ``max_uses``. Returns the directory."""
    pki = Path(pki_dir)
    if not 1 <= max_uses <= 1000:
        raise PkiError(Reason.POLICY_VIOLATION, "max uses must be 1..1000")
    uri = claim_uri(device_id)
    out = Path(out_dir) if out_dir else claim_dir(pki, device_id)
    if out.exists() and not force:
        raise PkiError(Reason.ALREADY_EXISTS, f"{out} exists (use --force to replace it)")
    release = store.read_bytes(release_pub, "release public key") if release_pub else None
    if release is not None:
        keys_public(release)  # refuse a file that is not a public key before issuing anything
    when = now or _now()
    key = keys.generate(keys.KeyType.P256)
    csr_pem = issue.make_csr(key, Role.DEVICE, device_id).public_bytes(serialization.Encoding.PEM)
    issued = store.sign_csr(pki, csr_pem, Role.DEVICE, days=days, passphrase=passphrase, now=when,
                            expected_name=device_id, san_uri=uri, index_role="claim")
    serial = layout.serial_hex(issued.certificate.serial_number)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(out, 0o700)
    atomic_write(out / CLAIM_KEY, keys.to_pem(key), mode=0o600)
    atomic_write(out / CLAIM_CHAIN, issued.chain_pem(), mode=0o644)
    if release is not None:
        atomic_write(out / RELEASE_PUB, release, mode=0o644)
    with store._locked(pki):  # the CA's one lock, shared with the index
        claims = read_registry(pki)
        claims[serial] = {"device": device_id, "uses": 0, "max_uses": max_uses, "issued_at": _iso(when),
                          "not_after": _iso(issued.certificate.not_valid_after_utc), "revoked_at": None,
                          "enrolled": []}
        _write_registry(pki, claims)
    return out


def keys_public(pem: bytes) -> Any:
    try:
        return serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise PkiError(Reason.MALFORMED, "not a PEM public key") from None


def consume(pki_dir: Path | str, serial: int, device_id: str, issued_serial: int, now: datetime) -> Claim:
    """Count one use of a claim (after its CSR was signed), atomically; refuses as check_usable."""
    pki = Path(pki_dir)
    with store._locked(pki):  # the CA's one lock, shared with the index
        check_usable(pki, serial, device_id)
        claims = read_registry(pki)
        entry = claims[layout.serial_hex(serial)]
        entry["uses"] = int(entry["uses"]) + 1
        entry["enrolled"] = [*entry.get("enrolled", []), {"serial": layout.serial_hex(issued_serial),
                                                          "at": _iso(now)}]
        _write_registry(pki, claims)
        return _claim(entry, layout.serial_hex(serial))


def revoke_claim(pki_dir: Path | str, device_id: str, *, passphrase: bytes | None = None,
                 now: datetime | None = None) -> list[str]:
    """Revoke every live claim of ``device_id`` in the registry and in the CRL. Returns serials."""
    pki = Path(pki_dir)
    when = now or _now()
    with store._locked(pki):  # the CA's one lock, shared with the index
        claims = read_registry(pki)
        serials = [s for s, e in claims.items() if e["device"] == device_id and not e.get("revoked_at")]
        if not serials:
            raise PkiError(Reason.NOT_FOUND, f"no live claim for {device_id}")
        for s in serials:
            claims[s]["revoked_at"] = _iso(when)
        _write_registry(pki, claims)
    for s in serials:
        store.revoke(pki, serial=int(s, 16), reason="cessationOfOperation", passphrase=passphrase, now=when)
    return serials


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds")


# --- the command line: sealmq pki claim issue|list|revoke ------------------------------------
def _cmd_issue(args: argparse.Namespace) -> int:
    out = issue_claim(args.pki, args.device, out_dir=args.out, max_uses=args.uses, days=args.days,
                      release_pub=args.release_pub, passphrase=store.read_passphrase_file(args.passphrase_file)
                      if args.passphrase_file else None, force=args.force)
    print(f"claim for {args.device} (usable {args.uses}x) in {out}: copy it to the device at the factory")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    for c in list_claims(args.pki):
        state = "revoked" if c.revoked else ("used up" if not c.usable else "live")
        print(f"{c.device}\tserial {c.serial}\tused {c.uses}/{c.max_uses}\t{state}")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    serials = revoke_claim(args.pki, args.device, passphrase=store.read_passphrase_file(args.passphrase_file)
                           if args.passphrase_file else None)
    print(f"revoked {len(serials)} claim(s) of {args.device}; CRL re-issued")
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser("claim", help="zero-touch enrolment: claim credentials for devices",
                       description="zero-touch enrolment: claim credentials for devices")
    csub = p.add_subparsers(dest="claim_command", metavar="CLAIM_COMMAND", required=True)
    sp = csub.add_parser("issue", help="a claim key + certificate for DEVICE, registered for N uses")
    sp.set_defaults(func=_cmd_issue)
    sp.add_argument("--pki", required=True, type=Path, help="the PKI directory")
    sp.add_argument("device", help="the device id the claim is bound to")
    sp.add_argument("--uses", type=int, default=1, help="how many enrolments it allows (default 1)")
    sp.add_argument("--days", type=int, default=DEFAULT_CLAIM_DAYS,
                    help="validity of the claim certificate (default: %(default)s)")
    sp.add_argument("--out", type=Path, help="default DIR/devices/<id>/claim")
    sp.add_argument("--release-pub", type=Path, help="release public key to install with the claim")
    sp.add_argument("--passphrase-file", type=Path, help="file holding the passphrase of the CA key")
    sp.add_argument("--force", action="store_true", help="replace an existing claim directory")
    sp = csub.add_parser("list", help="claims, their uses and state")
    sp.set_defaults(func=_cmd_list)
    sp.add_argument("--pki", required=True, type=Path, help="the PKI directory")
    sp = csub.add_parser("revoke", help="revoke DEVICE's claims (registry and CRL)")
    sp.set_defaults(func=_cmd_revoke)
    sp.add_argument("--pki", required=True, type=Path, help="the PKI directory")
    sp.add_argument("device", help="the device id whose live claims are revoked")
    sp.add_argument("--passphrase-file", type=Path, help="file holding the passphrase of the CA key")

