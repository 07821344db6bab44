"""``sealmq pki ...``: a thin command line over :mod:`pki.store` (all logic lives there)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pki import ccs, claim, issue, keys, layout, release, show, store
from pki.verify import identity_of, load_chain
from sealmq.errors import CertificateError, PkiError, Reason
from sealmq.identity import Role

ROLES = [r.value for r in Role]


def _passphrase(args: argparse.Namespace) -> bytes | None:
    f = getattr(args, "passphrase_file", None)
    return store.read_passphrase_file(f) if f else None


def _cmd_init(args: argparse.Namespace) -> int:
    ca = store.init_ca(
        args.pki,
        key_type=args.key_type,
        passphrase=_passphrase(args),
        two_level=args.two_level,
        force=args.force,
    )
    print(f"CA created in {ca} (trust anchor: {layout.anchor(args.pki)})")
    if args.two_level:
        print(
            f"the root key {layout.root_key(args.pki)} is only needed to re-sign the root CRL: "
            "move it offline"
        )
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    path = store.keygen(args.out, args.key_type, passphrase=_passphrase(args), force=args.force)
    print(f"private key written to {path} (0600)")
    return 0


def _cmd_csr(args: argparse.Namespace) -> int:
    out = store.make_csr_file(
        args.key, args.role, args.name, args.out, passphrase=_passphrase(args), force=args.force
    )
    print(f"CSR written to {out}")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    csr_pem = store.read_bytes(args.csr, "CSR")
    out = Path(args.out)
    chain_out = Path(args.chain_out) if args.chain_out else out.parent / layout.CHAIN
    for p in (out, chain_out):  # checked before issuing, so a refusal leaves no record behind
        if p.exists() and not args.force:
            raise PkiError(Reason.ALREADY_EXISTS, f"{p} exists (use --force to replace it)")
    issued = store.sign_csr(
        args.pki, csr_pem, args.role, days=args.days, passphrase=_passphrase(args), expected_name=args.name
    )
    cert_path, chain_path = store.write_issued(issued, out, chain_out, force=args.force)
    role, name = identity_of(issued.certificate)
    print(
        f"issued {role.value} {name}: serial {issued.certificate.serial_number:x} "
        f"-> {cert_path}, {chain_path}"
    )
    return 0


def _cmd_enroll(args: argparse.Namespace) -> int:
    name = args.name or (layout.DEFAULT_BACKEND if args.role == Role.BACKEND.value else None)
    if name is None:
        raise PkiError(Reason.POLICY_VIOLATION, "enroll device needs a NAME")
    d = store.enroll(
        args.pki,
        args.role,
        name,
        args.key_type,
        passphrase=_passphrase(args),
        days=args.days,
        force=args.force,
        extra=args.extra,
    )
    print(f"enrolled {args.role} {name} in {d}")
    return 0


def _cmd_issue_broker(args: argparse.Namespace) -> int:
    d = store.enroll_broker(args.pki, args.name, args.host, args.key_type, passphrase=_passphrase(args),
                            days=args.days, force=args.force)
    print(f"broker TLS certificate for {', '.join(args.host)} in {d} (key.pem 0600, cert.pem, chain.pem)")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    serial = store.parse_serial(args.serial) if args.serial else None
    got = store.revoke(
        args.pki,
        serial=serial,
        cert_path=args.cert,
        reason=args.reason,
        passphrase=_passphrase(args),
        crl_days=args.crl_days,
    )
    print(f"revoked serial {got:x}; CRL re-issued: {layout.crl(args.pki)}")
    return 0


def _cmd_crl(args: argparse.Namespace) -> int:
    crls = store.issue_crl(args.pki, passphrase=_passphrase(args), days=args.days)
    now = datetime.now(UTC)
    for crl in crls:
        nxt = crl.next_update_utc
        print(f"CRL of {crl.issuer.rfc4514_string()}: {len(list(crl))} revoked, next update {nxt}")
        if nxt is not None and (nxt - now).days < 30:
            print(f"warning: this CRL expires in {(nxt - now).days} days", file=sys.stderr)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    trust = store.load_trust_store(args.pki)
    chain = load_chain(store.read_bytes(args.cert, "certificate", CertificateError))
    role = Role(args.role) if args.role else identity_of(chain[0])[0]
    peer = trust.verify(chain, role=role, now=datetime.now(UTC), expected_name=args.id)
    print(
        f"ok: {peer.role.value} {peer.name} (serial {peer.certificate.serial_number:x}, "
        f"valid until {peer.certificate.not_valid_after_utc.isoformat()})"
    )
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    chain = load_chain(store.read_bytes(args.cert, "certificate", CertificateError))
    print("\n\n".join(show.render(c) for c in chain))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("pki", help="the operator's PKI: CA, keys, CSRs, certificates, CRLs")
    sub = p.add_subparsers(dest="pki_command", metavar="PKI_COMMAND", required=True)

    def cmd(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(func=func)
        return sp

    def pki_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--pki", required=True, type=Path, help="the PKI directory")

    def pass_arg(sp: argparse.ArgumentParser, what: str) -> None:
        sp.add_argument("--passphrase-file", type=Path, help=f"file holding the passphrase of {what}")

    leaf_types = [str(k) for k in keys.LEAF_KEY_TYPES]

    sp = cmd("init", _cmd_init, "create the CA (root, optionally an issuing CA) in DIR/ca")
    pki_arg(sp)
    sp.add_argument("--key-type", default="p256", choices=[str(k) for k in keys.CA_KEY_TYPES],
                    help="CA key type (default: %(default)s)")
    pass_arg(sp, "the CA keys (encrypts them)")
    sp.add_argument("--two-level", action="store_true", help="offline root -> issuing CA -> leaves")
    sp.add_argument("--force", action="store_true", help="replace an existing CA")

    sp = cmd("keygen", _cmd_keygen, "owner side: create a private key OUT/key.pem (0600)")
    sp.add_argument("--out", required=True, type=Path, help="directory for key.pem (created)")
    sp.add_argument("--key-type", default="p256", choices=leaf_types, help="key type (default: %(default)s)")
    pass_arg(sp, "the new key (encrypts it)")
    sp.add_argument("--force", action="store_true", help="replace an existing key")

    sp = cmd("csr", _cmd_csr, "owner side: a CSR for KEY naming the role and identity")
    sp.add_argument("--key", required=True, type=Path, help="the owner's key.pem (sealmq pki keygen)")
    sp.add_argument("--role", required=True, choices=ROLES, help="the role the certificate will carry")
    sp.add_argument("--name", required=True, help="device id or backend name")
    sp.add_argument("--out", required=True, type=Path, help="CSR file to write (PEM)")
    pass_arg(sp, "the key")
    sp.add_argument("--force", action="store_true", help="replace an existing file")

    sp = cmd("sign", _cmd_sign, "CA side: validate a CSR and issue its certificate (+ chain.pem)")
    pki_arg(sp)
    sp.add_argument("--csr", required=True, type=Path, help="the CSR (sealmq pki csr)")
    sp.add_argument("--role", required=True, choices=ROLES, help="refuse unless the CSR asks for this role")
    sp.add_argument("--name", help="refuse unless the CSR names this identity")
    sp.add_argument(
        "--days",
        type=int,
        default=None,
        help=f"validity (default {issue.DEFAULT_LEAF_DAYS}, max {issue.MAX_LEAF_DAYS})",
    )
    sp.add_argument("--out", required=True, type=Path, help="certificate file to write (PEM)")
    sp.add_argument("--chain-out", type=Path, help="default: chain.pem next to --out")
    pass_arg(sp, "the CA key")
    sp.add_argument("--force", action="store_true", help="replace existing files")

    sp = cmd("enroll", _cmd_enroll, "development: key + CSR + certificate into the standard layout")
    pki_arg(sp)
    sp.add_argument("role", choices=ROLES, help="device or backend")
    sp.add_argument("name", nargs="?", help="device id, or backend name (default 'backend')")
    sp.add_argument("--key-type", default="p256", choices=leaf_types, help="key type (default: %(default)s)")
    sp.add_argument("--days", type=int, default=None,
                    help=f"validity (default {issue.DEFAULT_LEAF_DAYS}, max {issue.MAX_LEAF_DAYS})")
    pass_arg(sp, "the CA key")
    sp.add_argument("--extra", action="store_true",
                    help="backend only: another certificate of another key type, in backend/<name>/extra/<key-type>")
    sp.add_argument("--force", action="store_true",
                    help="rotate: a new key and certificate; other files in the directory are kept")

    sp = cmd("issue-broker", _cmd_issue_broker, "a broker's TLS key + server certificate into DIR/broker/NAME")
    pki_arg(sp)
    sp.add_argument("name", nargs="?", default=layout.DEFAULT_BROKER, help="the broker's name (default 'broker')")
    sp.add_argument("--host", action="append", required=True,
                    help="a DNS name or IP address clients use to reach the broker (repeat)")
    sp.add_argument("--key-type", default="p256", choices=leaf_types, help="key type (default: %(default)s)")
    sp.add_argument("--days", type=int, default=None,
                    help=f"validity (default {issue.DEFAULT_LEAF_DAYS}, max {issue.MAX_LEAF_DAYS})")
    pass_arg(sp, "the CA key")
    sp.add_argument("--force", action="store_true", help="replace an existing broker certificate")

    sp = cmd("revoke", _cmd_revoke, "revoke an issued certificate and re-issue the CRL")
    pki_arg(sp)
    sp.add_argument("cert", nargs="?", type=Path, help="the certificate file")
    sp.add_argument("--serial", help="decimal, 0x-hex or colon hex")
    sp.add_argument("--reason", default="unspecified", choices=list(issue.REVOCATION_REASONS),
                    help="CRL reason code (default: %(default)s)")
    sp.add_argument("--crl-days", type=int, default=issue.DEFAULT_CRL_DAYS,
                    help="days until the new CRL's nextUpdate (default: %(default)s)")
    pass_arg(sp, "the CA key")

    sp = cmd("crl", _cmd_crl, "re-issue ca/crl.pem (before its nextUpdate)")
    pki_arg(sp)
    sp.add_argument("--days", type=int, default=issue.DEFAULT_CRL_DAYS,
                    help="days until nextUpdate (default: %(default)s)")
    pass_arg(sp, "the CA key")

    sp = cmd("verify", _cmd_verify, "full path validation of a certificate (chain) against DIR")
    pki_arg(sp)
    sp.add_argument("cert", type=Path, help="certificate or chain file (leaf first)")
    sp.add_argument("--role", choices=ROLES, help="default: the role the certificate claims")
    sp.add_argument("--id", help="the identity it must name")

    sp = cmd("show", _cmd_show, "a readable summary of a certificate (or each of a chain)")
    sp.add_argument("cert", type=Path, help="certificate or chain file (PEM)")

    ccs.register_cli(sub)  # sealmq pki ccs issue|register|list|revoke (EDHOC method 3)
    claim.register_cli(sub)  # sealmq pki claim issue|list|revoke (zero-touch enrolment, issue 16)
    release.register_cli(sub)  # sealmq pki release-key init|sign (signed updates, issue 16)
