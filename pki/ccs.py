"""CCS credentials on disk: issuing static-DH key pairs with their CCS, and the backend's
registry of the CCS credentials it trusts (EDHOC method 3, see :mod:`sealmq.edhoc.ccs`).

A CCS has no CA signature: whoever holds ``DIR/ccs/registry.json`` decides which raw public
keys are trusted. ``issue`` writes the key (0600) and the CCS into the identity's directory and
registers the CCS; ``register`` adds a CCS made elsewhere (e.g. a key generated on the device);
``revoke`` marks entries revoked (kept, so a kid is never reused). Layout in :mod:`pki.layout`.

Registry format (JSON, version 1)::

    {"version": 1, "entries": [{"kid": hex, "role": "device"|"backend", "name": str,
      "ccs": hex, "registered": iso-8601, "revoked": bool, "revoked_at": iso-8601|null}]}
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from pki import issue, keys, layout
from pki.store import read_bytes, write_atomic
from pki.verify import valid_name
from sealmq.edhoc.ccs import CcsCredential, CcsEntry, CcsRegistry, decode_ccs, encode_ccs, subject_uri
from sealmq.errors import KeyFileError, PkiError, Reason, SealmqError
from sealmq.identity import Role

REGISTRY_VERSION = 1
KID_LENGTH = 4  # short on the wire (method 3 is for constrained links), unique by construction


@dataclass(frozen=True)
class IssuedCcs:
    role: Role
    name: str
    kid: bytes
    ccs: bytes
    key_path: Path
    ccs_path: Path


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).replace(microsecond=0).isoformat()


@contextlib.contextmanager
def _locked(pki_dir: Path) -> Iterator[None]:
    d = layout.ccs_dir(pki_dir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / layout.LOCK, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_registry(pki_dir: Path | str) -> list[dict[str, Any]]:
    """The registry's entries as stored (an absent registry is empty)."""
    path = layout.ccs_registry(pki_dir)
    if not path.exists():
        return []
    try:
        doc = json.loads(read_bytes(path, "CCS registry"))
        if doc.get("version") != REGISTRY_VERSION or not isinstance(doc.get("entries"), list):
            raise PkiError(Reason.UNSUPPORTED, "unknown CCS registry version")
        entries: list[dict[str, Any]] = doc["entries"]
        for e in entries:
            _entry_of(e)  # validate every entry now, not on first use
        return entries
    except (ValueError, AttributeError, TypeError, KeyError):
        raise PkiError(Reason.MALFORMED, f"{path} is not a CCS registry") from None


def _entry_of(e: dict[str, Any]) -> CcsEntry:
    try:
        entry = CcsEntry.from_bytes(
            bytes.fromhex(e["ccs"]), role=str(e["role"]), name=str(e["name"]), revoked=bool(e["revoked"])
        )
    except SealmqError as exc:
        raise PkiError(exc.reason, "invalid CCS in the registry") from exc
    if entry.ccs.kid.hex() != e["kid"]:
        raise PkiError(Reason.MALFORMED, "registry kid does not match its CCS")
    return entry


def _write_registry(pki_dir: Path, entries: list[dict[str, Any]]) -> None:
    doc = {"version": REGISTRY_VERSION, "entries": entries}
    write_atomic(layout.ccs_registry(pki_dir), (json.dumps(doc, indent=1) + "\n").encode(), force=True)


def load_registry(pki_dir: Path | str) -> CcsRegistry:
    """The registry as :class:`~sealmq.edhoc.ccs.CcsRegistry` (revoked entries included, flagged)."""
    return CcsRegistry(_entry_of(e) for e in read_registry(pki_dir))


def _add(entries: list[dict[str, Any]], ccs: bytes, role: Role, name: str, now: datetime) -> None:
    entry = CcsEntry.from_bytes(ccs, role=role.value, name=name)
    kid = entry.ccs.kid.hex()
    if any(e["kid"] == kid for e in entries):
        raise PkiError(Reason.ALREADY_EXISTS, f"kid {kid} is already registered")
    entries.append(
        {"kid": kid, "role": role.value, "name": name, "ccs": ccs.hex(), "registered": _iso(now),
         "revoked": False, "revoked_at": None}
    )


def _check(role: Role | str, name: str) -> Role:
    role = Role(role)
    if not valid_name(name):
        raise PkiError(Reason.POLICY_VIOLATION, f"invalid {role.value} name")
    return role


def issue_ccs(
    pki_dir: Path | str,
    role: Role | str,
    name: str,
    *,
    days: int | None = issue.DEFAULT_LEAF_DAYS,
    now: datetime | None = None,
    force: bool = False,
) -> IssuedCcs:
    """A new P-256 static DH key (0600) and its CCS in the identity's directory, registered.

    With ``force`` an existing CCS of that identity is replaced and its old entry revoked.
    ``days=None`` issues a minimal CCS (``sub`` and ``cnf`` only, no ``iat``/``exp``): what
    lakers-based devices need; such a credential is valid until revoked.
    """
    pki = Path(pki_dir)
    role = _check(role, name)
    if days is not None and not 0 < days <= issue.MAX_LEAF_DAYS:
        raise PkiError(Reason.POLICY_VIOLATION, f"validity must be 1..{issue.MAX_LEAF_DAYS} days")
    now = now or datetime.now(UTC)
    d = layout.identity_dir(pki, role, name)
    key_path, ccs_path = d / layout.CCS_KEY, d / layout.CCS_CRED
    if not force and (key_path.exists() or ccs_path.exists()):
        raise PkiError(Reason.ALREADY_EXISTS, f"{ccs_path} exists (use --force to replace it)")
    key = ec.generate_private_key(ec.SECP256R1())
    with _locked(pki):
        entries = read_registry(pki)
        used = {e["kid"] for e in entries}
        kid = secrets.token_bytes(KID_LENGTH)
        while kid.hex() in used:
            kid = secrets.token_bytes(KID_LENGTH)
        ccs = encode_ccs(
            subject_uri(role.value, name),
            kid,
            key.public_key(),
            # days=None: a minimal CCS {sub, cnf} (RFC 9529's shape; all lakers 0.6.2 can parse)
            issued_at=None if days is None else int(now.timestamp()),
            expires=None if days is None else int((now + timedelta(days=days)).timestamp()),
        )
        if force:
            for e in entries:
                if e["role"] == role.value and e["name"] == name and not e["revoked"]:
                    e["revoked"], e["revoked_at"] = True, _iso(now)
        _add(entries, ccs, role, name, now)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        write_atomic(key_path, keys.to_pem(key), private=True, force=force)
        write_atomic(ccs_path, ccs, force=force)
        _write_registry(pki, entries)
    return IssuedCcs(role, name, kid, ccs, key_path, ccs_path)


def register_ccs(pki_dir: Path | str, ccs: bytes, *, now: datetime | None = None) -> CcsEntry:
    """Register a CCS made elsewhere; its ``sub`` must be ``urn:sealmq:<role>:<name>``."""
    pki = Path(pki_dir)
    try:
        parsed = decode_ccs(ccs)
    except SealmqError as exc:
        raise PkiError(exc.reason, "not a valid CCS") from exc
    ident = parsed.identity
    if ident is None:
        raise PkiError(Reason.POLICY_VIOLATION, "CCS subject is not urn:sealmq:<role>:<name>")
    role = _check(ident[0], ident[1])
    with _locked(pki):
        entries = read_registry(pki)
        _add(entries, parsed.encoded, role, ident[1], now or datetime.now(UTC))
        _write_registry(pki, entries)
    return CcsEntry(parsed, role.value, ident[1])


def revoke_ccs(
    pki_dir: Path | str,
    *,
    role: Role | str | None = None,
    name: str | None = None,
    kid: bytes | None = None,
    now: datetime | None = None,
) -> list[bytes]:
    """Revoke by kid, or every live credential of (role, name). Returns the kids revoked."""
    pki = Path(pki_dir)
    if kid is None and (role is None or name is None):
        raise PkiError(Reason.CONFIG_INVALID, "revoke needs a kid or a role and a name")
    when = _iso(now or datetime.now(UTC))
    with _locked(pki):
        entries = read_registry(pki)
        hits = [
            e for e in entries
            if (e["kid"] == kid.hex() if kid is not None else (e["role"] == Role(role or "") and e["name"] == name))
        ]
        if not hits:
            raise PkiError(Reason.NOT_FOUND, "no such registered CCS")
        done = []
        for e in hits:
            if not e["revoked"]:
                e["revoked"], e["revoked_at"] = True, when
                done.append(bytes.fromhex(e["kid"]))
        _write_registry(pki, entries)
    return done


def load_credential(
    pki_dir: Path | str, role: Role | str, name: str, *, by_value: bool = False, passphrase: bytes | None = None
) -> CcsCredential:
    """This identity's :class:`~sealmq.edhoc.ccs.CcsCredential` from its directory."""
    d = layout.identity_dir(pki_dir, Role(role), name)
    key = keys.from_pem(read_bytes(d / layout.CCS_KEY, "CCS key", KeyFileError), passphrase)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(Reason.UNSUPPORTED_ALGORITHM, "a CCS key is a P-256 key")
    try:
        return CcsCredential(key, read_bytes(d / layout.CCS_CRED, "CCS"), by_value=by_value)
    except SealmqError as exc:
        raise PkiError(exc.reason, f"{d / layout.CCS_CRED} does not fit its key") from exc


# --- command line: ``sealmq pki ccs ...`` --------------------------------------------------------


def _cmd_issue(args: argparse.Namespace) -> int:
    name = args.name or (layout.DEFAULT_BACKEND if args.role == Role.BACKEND.value else None)
    if name is None:
        raise PkiError(Reason.POLICY_VIOLATION, "issue device needs a NAME")
    days = None if args.days == 0 else args.days
    got = issue_ccs(args.pki, args.role, name, days=days, force=args.force)
    print(f"issued CCS for {got.role.value} {got.name}: kid {got.kid.hex()} -> {got.key_path} (0600), {got.ccs_path}")
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    entry = register_ccs(args.pki, read_bytes(args.ccs, "CCS"))
    print(f"registered {entry.role} {entry.name}: kid {entry.ccs.kid.hex()}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    for e in read_registry(args.pki):
        state = f"revoked {e['revoked_at']}" if e["revoked"] else "active"
        exp = decode_ccs(bytes.fromhex(e["ccs"])).expires
        until = "no expiry" if exp is None else datetime.fromtimestamp(exp, UTC).isoformat()
        print(f"{e['kid']}  {e['role']:<7}  {e['name']}  {state}  (until {until})")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    try:
        kid = bytes.fromhex(args.kid) if args.kid else None
    except ValueError:
        raise PkiError(Reason.MALFORMED, "kid must be hex") from None
    done = revoke_ccs(args.pki, role=args.role, name=args.name, kid=kid)
    print("revoked " + (", ".join(k.hex() for k in done) if done else "nothing (already revoked)"))
    return 0


def register_cli(sub: Any) -> None:
    """Add ``ccs`` (issue, register, list, revoke) to the ``sealmq pki`` subparsers."""
    p = sub.add_parser("ccs", help="CCS static-DH credentials (EDHOC method 3) and their registry")
    csub = p.add_subparsers(dest="ccs_command", metavar="CCS_COMMAND", required=True)
    roles = [r.value for r in Role]

    sp = csub.add_parser("issue", help="new static DH key (0600) + CCS for an identity, registered")
    sp.set_defaults(func=_cmd_issue)
    sp.add_argument("--pki", required=True, type=Path, help="the PKI directory")
    sp.add_argument("role", choices=roles, help="device or backend")
    sp.add_argument("name", nargs="?", help="device id, or backend name (default 'backend')")
    sp.add_argument("--days", type=int, default=issue.DEFAULT_LEAF_DAYS,
                    help="validity; 0 = minimal CCS without iat/exp (lakers devices)")
    sp.add_argument("--force", action="store_true", help="replace (and revoke) an existing CCS")

    sp = csub.add_parser("register", help="register a CCS made elsewhere (sub = urn:sealmq:<role>:<name>)")
    sp.set_defaults(func=_cmd_register)
    sp.add_argument("--pki", required=True, type=Path, help="the PKI directory")
    sp.add_argument("ccs", type=Path, help="the CCS file (CBOR)")

    sp = csub.add_parser("list", help="the registered CCS credentials")
    sp.set_defaults(func=_cmd_list)
    sp.add_argument("--pki", required=True, type=Path, help="the PKI directory")

    sp = csub.add_parser("revoke", help="revoke a registered CCS by kid, or all of an identity's")
    sp.set_defaults(func=_cmd_revoke)
    sp.add_argument("--pki", required=True, type=Path, help="the PKI directory")
    sp.add_argument("role", nargs="?", choices=roles, help="device or backend (with NAME)")
    sp.add_argument("name", nargs="?", help="device id or backend name: revoke all its CCS")
    sp.add_argument("--kid", help="revoke only this kid (hex)")
