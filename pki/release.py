"""The offline release key and signed update packages (docs/pki.md, "Signed updates").

``sealmq pki release-key init --dir DIR`` makes the key (``DIR/release.key``, 0600, in a 0700
directory) and ``DIR/release.pub``; DIR must not be a PKI or backend data directory, because the
point of the key is that the backend never holds it: a compromised backend can forward packages,
not make them. ``sealmq pki release-key sign`` reads a file and writes a package
(:func:`sealmq.update.encode_package`): the COSE_Sign1 manifest (version, kind, target class or
device ids, SHA-256, size) and the payload. Devices get ``release.pub`` with their claim (or at
bootstrap) and refuse anything else.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from pki import keys, store
from runtime.files import atomic_write
from sealmq import update
from sealmq.errors import FleetError, KeyFileError, PkiError, Reason, SealmqError
from sealmq.media import alg_for_key

RELEASE_KEY = "release.key"
RELEASE_PUB = "release.pub"
MAX_PACKAGE_FILE = update.MAX_PAYLOAD


def init_release_key(directory: Path | str, *, key_type: str = "p256", passphrase: bytes | None = None,
                     force: bool = False) -> Path:
    d = Path(directory)
    if (d / "ca").exists() or (d / "audit").exists() or (d / "backend.db").exists():
        raise PkiError(Reason.POLICY_VIOLATION, f"{d} is a PKI or backend directory: keep the release key apart")
    if key_type not in ("p256", "ed25519"):
        raise PkiError(Reason.POLICY_VIOLATION, "release key type must be p256 or ed25519")
    key_path = d / RELEASE_KEY
    if key_path.exists() and not force:
        raise PkiError(Reason.ALREADY_EXISTS, f"{key_path} exists (use --force to replace it)")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    key = keys.generate(keys.KeyType(key_type))
    atomic_write(key_path, keys.to_pem(key, passphrase), mode=0o600)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write(d / RELEASE_PUB, pub, mode=0o644)
    return key_path


def load_public(path: Path | str) -> Any:
    """A release public key (PEM); KeyFileError if the file is not one we can verify with."""
    data = store.read_bytes(path, "release public key", KeyFileError)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyFileError(Reason.MALFORMED, "not a PEM public key") from None
    try:
        alg_for_key(key)  # type: ignore[arg-type]
    except SealmqError:
        raise KeyFileError(Reason.UNSUPPORTED_ALGORITHM, "release key must be P-256 or Ed25519") from None
    return key


def sign_package(key_dir: Path | str, payload_path: Path | str, out: Path | str, *, version: int, kind: str,
                 device_class: str | None = None, devices: tuple[str, ...] = (),
                 passphrase: bytes | None = None, force: bool = False) -> update.UpdateManifest:
    key = keys.from_pem(store.read_bytes(Path(key_dir) / RELEASE_KEY, "release key", KeyFileError), passphrase)
    src = Path(payload_path)
    if not src.is_file() or src.stat().st_size > MAX_PACKAGE_FILE:
        raise PkiError(Reason.TOO_LARGE if src.is_file() else Reason.NOT_FOUND, f"{src}: no file or too large")
    payload = src.read_bytes()
    manifest = update.UpdateManifest(version=version, kind=kind, digest=hashlib.sha256(payload).digest(),
                                     size=len(payload), device_class=device_class, devices=tuple(devices))
    try:
        manifest.check()
    except FleetError as exc:
        raise PkiError(Reason.POLICY_VIOLATION, exc.detail) from None
    out_p = Path(out)
    if out_p.exists() and not force:
        raise PkiError(Reason.ALREADY_EXISTS, f"{out_p} exists (use --force to replace it)")
    signed = update.sign_manifest(key, manifest)
    atomic_write(out_p, update.encode_package(signed, payload), mode=0o644)
    return manifest


# --- the command line: sealmq pki release-key init|sign ---------------------------------------
def _passphrase(args: argparse.Namespace) -> bytes | None:
    return store.read_passphrase_file(args.passphrase_file) if args.passphrase_file else None


def _cmd_init(args: argparse.Namespace) -> int:
    path = init_release_key(args.dir, key_type=args.key_type, passphrase=_passphrase(args), force=args.force)
    print(f"release key written to {path} (0600); give {Path(args.dir) / RELEASE_PUB} to the devices")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    if (args.device_class is None) == (not args.device):
        raise PkiError(Reason.POLICY_VIOLATION, "give exactly one of --class or --device (repeatable)")
    m = sign_package(args.dir, args.file, args.out, version=args.version, kind=args.kind,
                     device_class=args.device_class, devices=tuple(args.device or ()),
                     passphrase=_passphrase(args), force=args.force)
    target = f"class {m.device_class}" if m.device_class else "devices " + ", ".join(m.devices)
    print(f"package {args.out}: {m.kind} version {m.version} for {target}, {m.size} bytes, "
          f"sha256 {m.digest.hex()}")
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser("release-key", help="the offline key that signs device updates",
                       description="the offline key that signs device updates")
    rsub = p.add_subparsers(dest="release_command", metavar="RELEASE_COMMAND", required=True)
    sp = rsub.add_parser("init", help="create DIR/release.key (0600) and DIR/release.pub")
    sp.set_defaults(func=_cmd_init)
    sp.add_argument("--dir", required=True, type=Path, help="NOT the backend's or the PKI's directory")
    sp.add_argument("--key-type", default="p256", choices=["p256", "ed25519"],
                    help="ES256 (p256) or EdDSA (ed25519) signatures (default: %(default)s)")
    sp.add_argument("--passphrase-file", type=Path, help="file holding a passphrase that encrypts the key")
    sp.add_argument("--force", action="store_true", help="replace an existing release key")
    sp = rsub.add_parser("sign", help="sign FILE into an update package")
    sp.set_defaults(func=_cmd_sign)
    sp.add_argument("file", type=Path, help="the firmware or configuration file")
    sp.add_argument("--dir", required=True, type=Path, help="where release.key is")
    sp.add_argument("--version", required=True, type=int, help="monotonic; devices refuse anything not above")
    sp.add_argument("--kind", default="firmware", choices=list(update.PAYLOAD_KINDS),
                    help="what the payload is (default: %(default)s)")
    sp.add_argument("--class", dest="device_class", help="target device class")
    sp.add_argument("--device", action="append", help="target device id (repeatable)")
    sp.add_argument("--out", required=True, type=Path, help="the package file to write")
    sp.add_argument("--passphrase-file", type=Path, help="file holding the passphrase of the release key")
    sp.add_argument("--force", action="store_true", help="replace an existing package file")
