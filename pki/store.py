"""The PKI on disk: create the CA, issue, revoke, publish CRLs, load trust stores and identities.

Every operation validates first and writes last; files appear atomically (temp file + rename,
or a temp directory renamed into place), private keys are created 0600 inside 0700
directories, and nothing is overwritten unless ``force`` is asked for. Changes to
``ca/index.json`` happen under an exclusive lock (``ca/.lock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki import issue, keys, layout
from pki.keys import KeyType, PrivateKey
from pki.verify import (
    TrustStore,
    describe_public_key,
    identity_of,
    load_certificates_pem,
    load_chain,
    load_crls_pem,
)
from runtime.files import atomic_write, fsync_dir, private_dir
from sealmq.errors import CertificateError, KeyFileError, PkiError, Reason
from sealmq.identity import Role

MAX_FILE = 1 << 20


# --- small file helpers --------------------------------------------------------------------
def _utcnow() -> datetime:
    return datetime.now(UTC)


def read_bytes(path: Path | str, what: str, error: type[PkiError] = PkiError) -> bytes:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_FILE:
            raise error(Reason.TOO_LARGE, f"{what} {p} is too large")
        return p.read_bytes()
    except FileNotFoundError:
        raise error(Reason.NOT_FOUND, f"{what} {p} not found") from None
    except IsADirectoryError:
        raise error(Reason.NOT_FOUND, f"{what} {p} is a directory") from None
    except PermissionError:
        raise error(Reason.NOT_FOUND, f"{what} {p} is not readable") from None


def read_passphrase_file(path: Path | str) -> bytes:
    data = read_bytes(path, "passphrase file", KeyFileError).rstrip(b"\r\n")
    if not data:
        raise KeyFileError(Reason.BAD_PASSPHRASE, "the passphrase file is empty")
    return data


def write_atomic(path: Path, data: bytes, *, private: bool = False, force: bool = False) -> None:
    """Write ``data`` to ``path`` durably and atomically (0600 if private), refusing to replace
    an existing file unless ``force``."""
    if path.exists() and not force:
        raise PkiError(Reason.ALREADY_EXISTS, f"{path} exists (use --force to replace it)")
    atomic_write(path, data, mode=0o600 if private else 0o644)


@contextlib.contextmanager
def _new_dir(final: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temp directory that becomes ``final`` only if the block succeeds."""
    if final.exists() and not force:
        raise PkiError(Reason.ALREADY_EXISTS, f"{final} exists (use --force to replace it)")
    created_parent = not final.parent.exists()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old"))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_parent:
            with contextlib.suppress(OSError):
                final.parent.rmdir()
        raise


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


@contextlib.contextmanager
def _locked(pki_dir: Path) -> Iterator[None]:
    lock = layout.ca_dir(pki_dir) / layout.LOCK
    with open(lock, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --- the CA --------------------------------------------------------------------------------
def init_ca(
    pki_dir: Path | str,
    *,
    key_type: KeyType | str = KeyType.P256,
    passphrase: bytes | None = None,
    two_level: bool = False,
    force: bool = False,
    now: datetime | None = None,
) -> Path:
    """Create ``DIR/ca`` (root, optional issuing CA, anchor, empty CRL(s), index). Returns ``DIR/ca``."""
    pki = Path(pki_dir)
    kt = keys.parse_key_type(str(key_type), keys.CA_KEY_TYPES)
    when = now or _utcnow()
    final = layout.ca_dir(pki)
    root_key = keys.generate(kt)
    root = issue.make_root(root_key, when, path_len=1 if two_level else 0)
    with _new_dir(final, force=force) as tmp:
        os.chmod(tmp, 0o755)  # noqa: S103 - verifiers read ca.crt and crl.pem; the keys themselves are 0600
        (tmp / layout.ISSUED).mkdir(mode=0o755)
        write_atomic(tmp / layout.ROOT_KEY, keys.to_pem(root_key, passphrase), private=True)
        write_atomic(tmp / layout.ROOT_CERT, _pem(root))
        write_atomic(tmp / layout.ANCHOR, _pem(root))
        crls = []
        if two_level:
            issuing_key = keys.generate(kt)
            issuing = issue.make_issuing(issuing_key, root, root_key, when)
            write_atomic(tmp / layout.ISSUING_KEY, keys.to_pem(issuing_key, passphrase), private=True)
            write_atomic(tmp / layout.ISSUING_CERT, _pem(issuing))
            crls.append(issue.make_crl(issuing, issuing_key, [], when, number=1))
            crls.append(issue.make_crl(root, root_key, [], when, number=1, days=issue.ROOT_CRL_DAYS))
        else:
            crls.append(issue.make_crl(root, root_key, [], when, number=1))
        write_atomic(tmp / layout.CRL, b"".join(_crl_pem(c) for c in crls))
        index = {"version": 1, "two_level": two_level, "crl_number": 1, "certificates": []}
        write_atomic(tmp / layout.INDEX, _index_bytes(index))
    return final


@dataclass
class CaKeys:
    issuer: x509.Certificate  # signs leaves and the leaves' CRL
    issuer_key: PrivateKey
    root: x509.Certificate
    intermediates: list[x509.Certificate]  # what goes into chain.pem after the leaf
    root_key: PrivateKey | None = None  # None when moved offline (two-level)


def _load_key_file(path: Path, passphrase: bytes | None) -> PrivateKey:
    return keys.from_pem(read_bytes(path, "key file", KeyFileError), passphrase)


def load_ca(pki_dir: Path | str, passphrase: bytes | None = None) -> CaKeys:
    pki = Path(pki_dir)
    if not layout.anchor(pki).exists():
        raise PkiError(Reason.NOT_FOUND, f"no CA in {pki} (run 'sealmq pki init')")
    root = load_certificates_pem(read_bytes(layout.root_cert(pki), "root certificate"))[0]
    root_key = None
    if layout.root_key(pki).exists():
        root_key = _load_key_file(layout.root_key(pki), passphrase)
    if layout.issuing_cert(pki).exists():
        issuing = load_certificates_pem(read_bytes(layout.issuing_cert(pki), "issuing certificate"))[0]
        issuing_key = _load_key_file(layout.issuing_key(pki), passphrase)
        return CaKeys(issuing, issuing_key, root, [issuing], root_key)
    if root_key is None:
        raise KeyFileError(Reason.NOT_FOUND, "the root key is needed to issue (single-level CA)")
    return CaKeys(root, root_key, root, [], root_key)


# --- index ---------------------------------------------------------------------------------
def _index_bytes(index: dict[str, Any]) -> bytes:
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


def read_index(pki_dir: Path | str) -> dict[str, Any]:
    raw = read_bytes(layout.index(pki_dir), "index")
    try:
        index = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise PkiError(Reason.MALFORMED, "ca/index.json is not JSON") from None
    if not isinstance(index, dict) or not isinstance(index.get("certificates"), list):
        raise PkiError(Reason.MALFORMED, "ca/index.json has the wrong shape")
    return index


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds")


# --- issuing -------------------------------------------------------------------------------
@dataclass
class Issued:
    certificate: x509.Certificate
    chain: list[x509.Certificate] = field(default_factory=list)  # leaf first

    def chain_pem(self) -> bytes:
        return b"".join(_pem(c) for c in self.chain)

    def cert_pem(self) -> bytes:
        return _pem(self.certificate)


def sign_csr(
    pki_dir: Path | str,
    csr_pem: bytes,
    role: Role | str,
    *,
    days: int | None = None,
    passphrase: bytes | None = None,
    now: datetime | None = None,
    expected_name: str | None = None,
    san_uri: str | None = None,
    index_role: str | None = None,
    lifetime: timedelta | None = None,
) -> Issued:
    """Validate a CSR and issue its certificate; records it in ``ca/issued`` and the index.

    Writes nothing but the CA's records, and only once everything has been checked.
    ``san_uri``/``index_role``: claim certificates (:mod:`pki.claim`).
    """
    pki = Path(pki_dir)
    role = Role(role)
    when = now or _utcnow()
    checked = issue.check_csr(issue.load_csr(csr_pem), role, expected_name)
    ca = load_ca(pki, passphrase)
    cert = issue.issue_leaf(
        checked, ca.issuer, ca.issuer_key, when, days=issue.DEFAULT_LEAF_DAYS if days is None else days,
        san_uri=san_uri, lifetime=lifetime,
    )
    with _locked(pki):
        _record(pki, cert, index_role or role.value, checked.name, key_type=checked.key_type, when=when)
    return Issued(cert, [cert, *ca.intermediates])


def _side(role: Any) -> Any:
    return "device" if role == "claim" else role


def _holder_of_other_role(index: dict[str, Any], role: str, name: str) -> str | None:
    for e in index["certificates"]:
        # a claim (pki.claim) is the device's own: the same name, the device side
        if e.get("name") == name and _side(e.get("role")) != _side(role) and not e.get("revoked_at"):
            return str(e.get("role"))
    return None


def _record(pki: Path, cert: x509.Certificate, role: str, name: str, *, key_type: str, when: datetime) -> None:
    """Add an issued certificate to ``ca/issued`` and the index (call under the lock).

    A name is held by one role at a time: a broker that maps a client certificate's CN to an
    account (mosquitto's ``use_identity_as_username``) must not take a device named like the
    backend for the backend.
    """
    index = read_index(pki)
    other = _holder_of_other_role(index, role, name)
    if other is not None:
        raise PkiError(Reason.POLICY_VIOLATION, f"the name {name!r} belongs to a {other} certificate")
    index["certificates"].append(
        {
            "serial": layout.serial_hex(cert.serial_number),
            "role": role,
            "name": name,
            "key_type": key_type,
            "not_before": _iso(cert.not_valid_before_utc),
            "not_after": _iso(cert.not_valid_after_utc),
            "issued_at": _iso(when),
            "revoked_at": None,
            "revocation_reason": None,
        }
    )
    write_atomic(layout.issued_cert(pki, cert.serial_number), _pem(cert))
    write_atomic(layout.index(pki), _index_bytes(index), force=True)


def write_issued(
    issued: Issued, out: Path | str, chain_out: Path | str | None = None, *, force: bool = False
) -> tuple[Path, Path]:
    out_p = Path(out)
    chain_p = Path(chain_out) if chain_out else out_p.parent / layout.CHAIN
    for p in (out_p, chain_p):
        if p.exists() and not force:
            raise PkiError(Reason.ALREADY_EXISTS, f"{p} exists (use --force to replace it)")
    write_atomic(out_p, issued.cert_pem(), force=force)
    write_atomic(chain_p, issued.chain_pem(), force=force)
    return out_p, chain_p


# --- owner side ----------------------------------------------------------------------------
def keygen(
    out_dir: Path | str,
    key_type: KeyType | str = KeyType.P256,
    *,
    passphrase: bytes | None = None,
    force: bool = False,
) -> Path:
    """Create ``out_dir/key.pem`` (0600, directory 0700). Returns the key path."""
    kt = keys.parse_key_type(str(key_type), keys.LEAF_KEY_TYPES)
    d = Path(out_dir)
    path = d / layout.KEY
    if path.exists() and not force:
        raise PkiError(Reason.ALREADY_EXISTS, f"{path} exists (use --force to replace it)")
    pem = keys.to_pem(keys.generate(kt), passphrase)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, pem, private=True, force=force)
    return path


def make_csr_file(
    key_path: Path | str,
    role: Role | str,
    name: str,
    out: Path | str,
    *,
    passphrase: bytes | None = None,
    force: bool = False,
) -> Path:
    key = _load_key_file(Path(key_path), passphrase)
    csr = issue.make_csr(key, Role(role), name)
    out_p = Path(out)
    write_atomic(out_p, csr.public_bytes(serialization.Encoding.PEM), force=force)
    return out_p


def enroll(
    pki_dir: Path | str,
    role: Role | str,
    name: str,
    key_type: KeyType | str = KeyType.P256,
    *,
    passphrase: bytes | None = None,
    days: int | None = None,
    now: datetime | None = None,
    force: bool = False,
    extra: bool = False,
) -> Path:
    """Development convenience: key, CSR and certificate into ``DIR/devices/<id>`` (or backend).

    ``extra`` (backend only) enrolls another certificate of the backend, for another key type, in
    ``DIR/backend/<name>/extra/<key-type>``: a backend serves the suites its credentials fit.
    ``force`` replaces the key, CSR and certificate and keeps everything else in the directory
    (the broker password, a CCS credential, extra certificates): it rotates the certificate.
    """
    pki = Path(pki_dir)
    role = Role(role)
    final = layout.identity_dir(pki, role, name)
    kt = keys.parse_key_type(str(key_type), keys.LEAF_KEY_TYPES)
    if extra:
        if role is not Role.BACKEND:
            raise PkiError(Reason.POLICY_VIOLATION, "only a backend holds extra certificates")
        final = layout.extra_dir(final, kt.value)
    if final.exists() and not force:
        raise PkiError(Reason.ALREADY_EXISTS, f"{final} exists (use --force to replace it)")
    key = keys.generate(kt)
    csr_pem = issue.make_csr(key, role, name).public_bytes(serialization.Encoding.PEM)
    replaced = (layout.KEY, layout.CSR, layout.CERT, layout.CHAIN)
    with _new_dir(final, force=force) as tmp:
        os.chmod(tmp, 0o700)
        issued = sign_csr(pki, csr_pem, role, days=days, passphrase=passphrase, now=now, expected_name=name)
        write_atomic(tmp / layout.KEY, keys.to_pem(key), private=True)
        write_atomic(tmp / layout.CSR, csr_pem)
        write_atomic(tmp / layout.CERT, issued.cert_pem())
        write_atomic(tmp / layout.CHAIN, issued.chain_pem())
        if final.exists():
            _keep_the_rest(final, tmp, skip=replaced)
    return final


def _keep_the_rest(old: Path, new: Path, *, skip: tuple[str, ...]) -> None:
    """Hard-link what ``old`` holds besides ``skip`` into ``new`` (same file system, no copy of a
    secret; modes kept), so that the directory swap replaces only the files it regenerates."""
    for entry in old.iterdir():
        if entry.name in skip:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=os.link)
        else:
            os.link(entry, new / entry.name, follow_symlinks=False)


def enroll_broker(
    pki_dir: Path | str,
    name: str,
    hosts: list[str],
    key_type: KeyType | str = KeyType.P256,
    *,
    passphrase: bytes | None = None,
    days: int | None = None,
    now: datetime | None = None,
    force: bool = False,
) -> Path:
    """A broker's TLS key and server certificate into ``DIR/broker/<name>`` (key.pem, cert.pem, chain.pem)."""
    pki = Path(pki_dir)
    final = layout.broker_dir(pki, name)
    kt = keys.parse_key_type(str(key_type), keys.LEAF_KEY_TYPES)
    if final.exists() and not force:
        raise PkiError(Reason.ALREADY_EXISTS, f"{final} exists (use --force to replace it)")
    key = keys.generate(kt)
    when = now or _utcnow()
    ca = load_ca(pki, passphrase)
    cert = issue.issue_server(key, name, hosts, ca.issuer, ca.issuer_key, now=when,
                              days=issue.DEFAULT_LEAF_DAYS if days is None else days)
    issued = Issued(cert, [cert, *ca.intermediates])
    with _new_dir(final, force=force) as tmp:
        os.chmod(tmp, 0o700)
        with _locked(pki):
            _record(pki, cert, layout.BROKER_ROLE, name, key_type=describe_public_key(key.public_key()), when=when)
        write_atomic(tmp / layout.KEY, keys.to_pem(key), private=True)
        write_atomic(tmp / layout.CERT, issued.cert_pem())
        write_atomic(tmp / layout.CHAIN, issued.chain_pem())
    return final


# --- revocation ----------------------------------------------------------------------------
def parse_serial(text: str) -> int:
    """Decimal, ``0x``-prefixed hex, or colon-separated hex (as openssl prints it)."""
    t = text.strip().lower()
    try:
        if t.startswith("0x"):
            return int(t[2:], 16)
        if ":" in t:
            return int(t.replace(":", ""), 16)
        return int(t, 10)
    except ValueError:
        raise PkiError(Reason.MALFORMED, f"not a serial number: {text!r}") from None


def revoke(
    pki_dir: Path | str,
    *,
    serial: int | None = None,
    cert_path: Path | str | None = None,
    reason: str = "unspecified",
    passphrase: bytes | None = None,
    now: datetime | None = None,
    crl_days: int = issue.DEFAULT_CRL_DAYS,
) -> int:
    """Mark a certificate we issued as revoked and re-issue the CRL. Returns the serial."""
    pki = Path(pki_dir)
    if (serial is None) == (cert_path is None):
        raise PkiError(Reason.POLICY_VIOLATION, "give exactly one of a certificate or a serial")
    if reason not in issue.REVOCATION_REASONS:
        raise PkiError(
            Reason.POLICY_VIOLATION, f"reason must be one of {', '.join(issue.REVOCATION_REASONS)}"
        )
    if cert_path is not None:
        serial = load_chain(read_bytes(cert_path, "certificate", CertificateError))[0].serial_number
    assert serial is not None
    when = now or _utcnow()
    ca = load_ca(pki, passphrase)  # fail on a wrong passphrase before touching anything
    with _locked(pki):
        index = read_index(pki)
        entries = [e for e in index["certificates"] if e.get("serial") == layout.serial_hex(serial)]
        if not entries:
            raise PkiError(Reason.NOT_FOUND, f"serial {serial:x} was not issued by this CA")
        if entries[0].get("revoked_at"):
            raise PkiError(Reason.ALREADY_EXISTS, f"serial {serial:x} is already revoked")
        entries[0]["revoked_at"] = _iso(when)
        entries[0]["revocation_reason"] = reason
        crl_bytes, number = _crl_bytes(pki, ca, index, when, crl_days)
        index["crl_number"] = number
        write_atomic(layout.index(pki), _index_bytes(index), force=True)
        write_atomic(layout.crl(pki), crl_bytes, force=True)
    return serial


def issue_crl(
    pki_dir: Path | str,
    *,
    passphrase: bytes | None = None,
    now: datetime | None = None,
    days: int = issue.DEFAULT_CRL_DAYS,
) -> list[x509.CertificateRevocationList]:
    """Re-issue ``ca/crl.pem`` from the index (run it before nextUpdate, e.g. from cron)."""
    pki = Path(pki_dir)
    when = now or _utcnow()
    ca = load_ca(pki, passphrase)
    with _locked(pki):
        index = read_index(pki)
        crl_bytes, number = _crl_bytes(pki, ca, index, when, days)
        index["crl_number"] = number
        write_atomic(layout.index(pki), _index_bytes(index), force=True)
        write_atomic(layout.crl(pki), crl_bytes, force=True)
    return load_crls_pem(crl_bytes)


def _crl_bytes(pki: Path, ca: CaKeys, index: dict[str, Any], when: datetime, days: int) -> tuple[bytes, int]:
    number = int(index.get("crl_number", 0)) + 1
    revoked = [
        issue.Revocation(
            int(e["serial"], 16),
            datetime.fromisoformat(e["revoked_at"]),
            issue.REVOCATION_REASONS.get(e.get("revocation_reason") or "unspecified"),
        )
        for e in index["certificates"]
        if e.get("revoked_at")
    ]
    crls = [issue.make_crl(ca.issuer, ca.issuer_key, revoked, when, number=number, days=days)]
    if ca.issuer is not ca.root:
        if ca.root_key is not None:
            crls.append(
                issue.make_crl(ca.root, ca.root_key, [], when, number=number, days=issue.ROOT_CRL_DAYS)
            )
        else:
            # Root key offline: keep the root's current CRL (re-sign it offline before it expires).
            old = load_crls_pem(read_bytes(layout.crl(pki), "CRL", CertificateError))
            crls.extend(c for c in old if c.issuer == ca.root.subject)
    return b"".join(_crl_pem(c) for c in crls), number


# --- CRL high-water marks ------------------------------------------------------------------
# The file a verifier (backend data directory, device state directory) keeps its marks in.
CRL_SEEN_FILE = "crl_seen.json"


_Mark = tuple[int | None, datetime]  # (CRL number, thisUpdate)


def _crl_mark(crl: x509.CertificateRevocationList) -> _Mark:
    try:
        number: int | None = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = None
    return number, crl.last_update_utc


def _compare(a: _Mark, b: _Mark) -> int:
    """-1, 0, 1: is ``a`` older than, the same as, newer than ``b`` (by number, then thisUpdate)."""
    if a[0] is not None and b[0] is not None and a[0] != b[0]:
        return -1 if a[0] < b[0] else 1
    return (a[1] > b[1]) - (a[1] < b[1])


def check_crl_monotonic(
    crls: list[x509.CertificateRevocationList], ca_certs: list[x509.Certificate], seen_path: Path,
) -> None:
    """Refuse CRLs older than the newest this verifier has already accepted from their issuer.

    An older CRL may be validly signed and unexpired, yet predate a revocation: putting it back
    would re-admit the revoked certificate. The highest CRL number (and thisUpdate) accepted per
    issuer (by its public key) is kept in ``seen_path`` (JSON, 0600, written atomically) so that a restart does not
    forget it. Only CRLs signed by one of ``ca_certs`` move a mark: a forged CRL with a huge number
    cannot lock out the real ones. Raises ``CertificateError(CRL_INVALID)`` and records nothing
    when any CRL goes backwards.
    """
    marks = _read_marks(seen_path)
    newest: dict[str, _Mark] = {}  # per issuer; the trust store also uses its newest CRL
    for crl in crls:
        signer = next((c for c in ca_certs if c.subject == crl.issuer
                       and crl.is_signature_valid(c.public_key())), None)  # type: ignore[arg-type]
        if signer is None:
            continue  # the trust store ignores it too
        # per issuer *key*: a CA created afresh under the same name starts its own numbering
        spki = signer.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        key = hashlib.sha256(spki).hexdigest()
        mark = _crl_mark(crl)
        if key not in newest or _compare(mark, newest[key]) > 0:
            newest[key] = mark
    updated = dict(marks)
    for key, mark in newest.items():
        seen = marks.get(key)
        order = 1 if seen is None else _compare(mark, seen)
        if order < 0:
            assert seen is not None
            raise CertificateError(
                Reason.CRL_INVALID,
                f"CRL rollback: number {mark[0]} of {mark[1].isoformat()} is older than number "
                f"{seen[0]} of {seen[1].isoformat()}, already accepted from this issuer",
            )
        if order > 0:
            updated[key] = mark
    if updated != marks:
        data = {k: {"number": n, "this_update": t.isoformat()} for k, (n, t) in sorted(updated.items())}
        private_dir(seen_path.parent)
        atomic_write(seen_path, _index_bytes(data), mode=0o600)


def _read_marks(seen_path: Path) -> dict[str, _Mark]:
    if not seen_path.exists():
        return {}
    try:
        raw = json.loads(seen_path.read_bytes())
        marks: dict[str, _Mark] = {}
        for key, value in raw.items():
            number = value["number"]
            if number is not None and (not isinstance(number, int) or isinstance(number, bool)):
                raise ValueError(key)
            this_update = datetime.fromisoformat(value["this_update"])
            if this_update.tzinfo is None:  # only ever written in UTC; naive cannot be compared
                raise ValueError(key)
            marks[str(key)] = (number, this_update)
        return marks
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        raise CertificateError(Reason.CRL_INVALID, f"{seen_path} is unreadable: refusing to forget which "
                                                   "CRLs were seen (restore it, or remove it knowingly)") from None


# --- loading for verifiers and endpoints ---------------------------------------------------
# Trust stores already built in this process, by the exact bytes they were built from. A
# TrustStore is immutable (a CRL reload builds another one) and a pure function of those bytes, so
# every party of a process that loads the same files (the simulator's devices, a backend reloading
# an unchanged CRL) gets the same store, and with it one cache of validated chains: the backend's
# chain is validated once per simulator process, not once per simulated device.
SHARED_STORES = 8
_shared: OrderedDict[tuple[bytes, bytes | None, bytes | None], TrustStore] = OrderedDict()
_shared_lock = threading.Lock()


def _shared_store(anchors: bytes, crl_pem: bytes | None, inter_pem: bytes | None) -> TrustStore:
    key = (anchors, crl_pem, inter_pem)
    with _shared_lock:
        store = _shared.get(key)
        if store is not None:
            _shared.move_to_end(key)
            return store
    store = TrustStore.from_pem(anchors, crl_pem, inter_pem)  # outside the lock: it verifies CRLs
    with _shared_lock:
        store = _shared.setdefault(key, store)  # another thread may have built the same one
        _shared.move_to_end(key)
        while len(_shared) > SHARED_STORES:
            _shared.popitem(last=False)
    return store


def load_trust_store(
    pki_dir: Path | str, *, require_crl: bool = True, crl_seen: Path | None = None,
) -> TrustStore:
    """Anchors from ``ca/ca.crt``, the issuing CA if any, and ``ca/crl.pem`` (required by default).

    With ``crl_seen`` (a file in the verifier's own directory), a CRL older than one already
    accepted is refused (see :func:`check_crl_monotonic`).
    """
    pki = Path(pki_dir)
    anchors = read_bytes(layout.anchor(pki), "trust anchor", CertificateError)
    inter = layout.issuing_cert(pki)
    inter_pem = read_bytes(inter, "issuing certificate", CertificateError) if inter.exists() else None
    crl_path = layout.crl(pki)
    if crl_path.exists():
        crl_pem: bytes | None = read_bytes(crl_path, "CRL", CertificateError)
    elif require_crl:
        raise CertificateError(Reason.CRL_INVALID, f"{crl_path} not found")
    else:
        crl_pem = None
    store = _shared_store(anchors, crl_pem, inter_pem)
    if crl_seen is not None and crl_pem is not None:
        ca_certs = load_certificates_pem(anchors) + (load_certificates_pem(inter_pem) if inter_pem else [])
        check_crl_monotonic(load_crls_pem(crl_pem), ca_certs, crl_seen)
    return store


@dataclass
class Identity:
    private_key: PrivateKey
    chain: list[x509.Certificate]  # leaf first
    role: Role
    name: str
    path: Path


def load_identity(identity_dir: Path | str, passphrase: bytes | None = None) -> Identity:
    """``key.pem`` + ``chain.pem`` (or ``cert.pem``) of one device or backend; the key must match."""
    d = Path(identity_dir)
    key = _load_key_file(d / layout.KEY, passphrase)
    chain_path = d / layout.CHAIN if (d / layout.CHAIN).exists() else d / layout.CERT
    chain = load_chain(read_bytes(chain_path, "certificate chain", CertificateError))
    role, name = identity_of(chain[0])
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(serialization.Encoding.DER, spki) != key.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise KeyFileError(Reason.IDENTITY_MISMATCH, "key.pem does not match the certificate")
    return Identity(private_key=key, chain=chain, role=role, name=name, path=d)
