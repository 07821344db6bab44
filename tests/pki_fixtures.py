"""Test PKIs made fresh by the tests (no key material is committed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from pki import store
from pki.store import Identity, load_identity, load_trust_store
from pki.verify import TrustStore
from sealmq.edhoc import X509Credential


@dataclass
class TestPki:
    __test__ = False
    path: Path
    devices: list[str]
    backends: list[str]

    def trust_store(self) -> TrustStore:
        return load_trust_store(self.path)

    def identity(self, role: str, name: str) -> Identity:
        from pki import layout

        d = layout.device_dir(self.path, name) if role == "device" else layout.backend_dir(self.path, name)
        return load_identity(d)

    def credential(self, role: str, name: str, *, by_reference: bool = False) -> X509Credential:
        ident = self.identity(role, name)
        return X509Credential(
            private_key=ident.private_key,
            chain_der=[c.public_bytes(Encoding.DER) for c in ident.chain],
            by_reference=by_reference,
        )


def make_pki(path: Path, devices: list[str], *, key_types: dict[str, str] | None = None,
             backend_key: str = "p256", extra_backends: dict[str, str] | None = None) -> TestPki:
    store.init_ca(path)
    store.enroll(path, "backend", "backend", key_type=backend_key)
    for name, key_type in (extra_backends or {}).items():
        store.enroll(path, "backend", name, key_type=key_type)
    for device_id in devices:
        store.enroll(path, "device", device_id, key_type=(key_types or {}).get(device_id, "p256"))
    return TestPki(path, devices, ["backend", *(extra_backends or {})])
