"""Where the PKI keeps its files (the standard layout other parts code against).

::

    DIR/ca/root.crt, DIR/ca/root.key (0600)        the root
    DIR/ca/issuing.crt, DIR/ca/issuing.key (0600)  only with --two-level
    DIR/ca/ca.crt                                  the trust anchor verifiers load (= root.crt)
    DIR/ca/crl.pem                                 current CRL(s): issuing CA's, then the root's
    DIR/ca/issued/<serial-hex>.crt, DIR/ca/index.json   what was issued
    DIR/devices/<id>/key.pem (0600), csr.pem, cert.pem, chain.pem
    DIR/backend/<name>/key.pem (0600), csr.pem, cert.pem, chain.pem   (default name "backend")
    DIR/backend/<name>/extra/<key-type>/key.pem, ...   more certificates of the backend, one per
                                                   signature key type (suite 0 needs Ed25519, -24 RSA)
    DIR/broker/<name>/key.pem (0600), cert.pem, chain.pem  a broker's TLS server certificate
    DIR/devices/<id>/ccs_key.pem (0600), ccs.cbor   a CCS static-DH credential (EDHOC method 3)
    DIR/backend/<name>/ccs_key.pem (0600), ccs.cbor
    DIR/ccs/registry.json                          registered CCS credentials (kid -> role, name, CCS)
"""

from __future__ import annotations

from pathlib import Path

from pki.verify import valid_name
from sealmq.errors import PkiError, Reason
from sealmq.identity import Role

CA = "ca"
ROOT_CERT = "root.crt"
ROOT_KEY = "root.key"
ISSUING_CERT = "issuing.crt"
ISSUING_KEY = "issuing.key"
ANCHOR = "ca.crt"
CRL = "crl.pem"
ISSUED = "issued"
INDEX = "index.json"
LOCK = ".lock"

KEY = "key.pem"
CSR = "csr.pem"
CERT = "cert.pem"
CHAIN = "chain.pem"

DEFAULT_BACKEND = "backend"
BROKER_ROLE = "broker"  # in the index only: a TLS server certificate, not an EDHOC identity
DEFAULT_BROKER = "broker"
ROLE_DIRS = {Role.DEVICE: "devices", Role.BACKEND: "backend"}


def ca_dir(pki_dir: Path | str) -> Path:
    return Path(pki_dir) / CA


def root_cert(pki_dir: Path | str) -> Path:
    return ca_dir(pki_dir) / ROOT_CERT


def root_key(pki_dir: Path | str) -> Path:
    return ca_dir(pki_dir) / ROOT_KEY


def issuing_cert(pki_dir: Path | str) -> Path:
    return ca_dir(pki_dir) / ISSUING_CERT


def issuing_key(pki_dir: Path | str) -> Path:
    return ca_dir(pki_dir) / ISSUING_KEY


def anchor(pki_dir: Path | str) -> Path:
    return ca_dir(pki_dir) / ANCHOR


def crl(pki_dir: Path | str) -> Path:
    return ca_dir(pki_dir) / CRL


def issued_dir(pki_dir: Path | str) -> Path:
    return ca_dir(pki_dir) / ISSUED


def issued_cert(pki_dir: Path | str, serial: int) -> Path:
    return issued_dir(pki_dir) / f"{serial_hex(serial)}.crt"


def index(pki_dir: Path | str) -> Path:
    return ca_dir(pki_dir) / INDEX


def serial_hex(serial: int) -> str:
    """40 lower-case hex digits, zero-padded (a 159-bit serial fits)."""
    return f"{serial:040x}"


def identity_dir(pki_dir: Path | str, role: Role | str, name: str) -> Path:
    """``DIR/devices/<id>`` or ``DIR/backend/<name>``; the name is checked (it becomes a path)."""
    role = Role(role)
    if not valid_name(name):
        raise PkiError(Reason.POLICY_VIOLATION, f"invalid {role.value} name")
    return Path(pki_dir) / ROLE_DIRS[role] / name


def device_dir(pki_dir: Path | str, device_id: str) -> Path:
    return identity_dir(pki_dir, Role.DEVICE, device_id)


def backend_dir(pki_dir: Path | str, name: str = DEFAULT_BACKEND) -> Path:
    return identity_dir(pki_dir, Role.BACKEND, name)


EXTRA = "extra"


def extra_dir(identity: Path | str, key_type: str) -> Path:
    """``<identity>/extra/<key-type>``: another certificate of the same backend, of another key type."""
    if not valid_name(key_type):
        raise PkiError(Reason.POLICY_VIOLATION, "invalid key type name")
    return Path(identity) / EXTRA / key_type


def extra_dirs(identity: Path | str) -> list[Path]:
    """The extra identities under ``<identity>/extra/`` that hold a key, sorted by key type."""
    root = Path(identity) / EXTRA
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / KEY).exists())
def broker_dir(pki_dir: Path | str, name: str = DEFAULT_BROKER) -> Path:
    """``DIR/broker/<name>``: a broker's TLS key and server certificate."""
    if not valid_name(name):
        raise PkiError(Reason.POLICY_VIOLATION, "invalid broker name")
    return Path(pki_dir) / BROKER_ROLE / name


def enrolled_devices(pki_dir: Path | str) -> list[str]:
    """Device ids with an identity (key and certificate) under ``DIR/devices/``, sorted."""
    root = Path(pki_dir) / ROLE_DIRS[Role.DEVICE]
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "key.pem").exists() and (p / "cert.pem").exists())


CCS = "ccs"
CCS_KEY = "ccs_key.pem"
CCS_CRED = "ccs.cbor"
CCS_REGISTRY = "registry.json"


def ccs_dir(pki_dir: Path | str) -> Path:
    return Path(pki_dir) / CCS


def ccs_registry(pki_dir: Path | str) -> Path:
    return ccs_dir(pki_dir) / CCS_REGISTRY
