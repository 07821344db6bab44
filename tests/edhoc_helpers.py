"""Test helpers for EDHOC: the RFC 9529 trace 1 credentials, an in-memory PKI built with
``pki.issue`` (real certificates, real ``pki.verify.TrustStore``), and handshake drivers.

Run as a script to (re)generate ``tests/vectors/sealmq_edhoc_suite2.json``:
``python3 -m tests.edhoc_helpers``. The generated file is then checked in both directions by
tests/test_edhoc_golden.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from pki import issue
from pki.verify import TrustStore
from sealmq import cbor
from sealmq.edhoc import (
    AuthenticatedPeer,
    IdCred,
    Initiator,
    Responder,
    X509Authenticator,
    X509Credential,
)
from sealmq.edhoc.wire import x5t_hash
from sealmq.errors import EdhocError, Reason
from sealmq.identity import Role
from tests.conftest import VECTORS, load_vectors

T1 = load_vectors("rfc9529_trace1.json")["values"]
TRACE1_ROOT_PUBLIC = bytes.fromhex("2b7b3e8057c8642944d06afe7a71d1c9bf961b6292bac4b04f91669bbb713be4")


def h(name: str) -> bytes:
    return bytes.fromhex(T1[name])


class Trace1Authenticator:
    """Resolves x5t among the trace's two certificates and checks the certificate's signature
    against the trace root's raw Ed25519 key (the root certificate itself is not in the RFC)."""

    def __init__(self) -> None:
        self.known = [h("CRED_I"), h("CRED_R")]
        self.root = ed25519.Ed25519PublicKey.from_public_bytes(TRACE1_ROOT_PUBLIC)

    def authenticate(self, id_cred: IdCred) -> AuthenticatedPeer:
        x5t = id_cred.get_x5t()
        if x5t is None:
            raise EdhocError(Reason.UNKNOWN_CREDENTIAL, "trace uses x5t")
        for der in self.known:
            if x5t_hash(x5t[0], der) == x5t[1]:
                cert = x509.load_der_x509_certificate(der)
                try:
                    self.root.verify(cert.signature, cert.tbs_certificate_bytes)
                except InvalidSignature:
                    raise EdhocError(Reason.BAD_SIGNATURE, "not signed by the trace root") from None
                return AuthenticatedPeer(cbor.dumps(der), cert.public_key(), cert.subject.rfc4514_string())
        raise EdhocError(Reason.UNKNOWN_CREDENTIAL, "unknown x5t")


def trace1_credential(role: str) -> X509Credential:
    sk = ed25519.Ed25519PrivateKey.from_private_bytes(h("SK_I" if role == "I" else "SK_R"))
    return X509Credential(sk, [h("CRED_I" if role == "I" else "CRED_R")], by_reference=True)


def trace1_pair(debug: bool = True) -> tuple[Initiator, Responder]:
    ini = Initiator(
        trace1_credential("I"),
        Trace1Authenticator(),
        c_i=h("C_I"),
        suites=[0],
        ephemeral_key=h("X"),
        debug=debug,
    )
    res = Responder(
        trace1_credential("R"),
        Trace1Authenticator(),
        c_r=h("C_R"),
        suites=[0],
        ephemeral_key=h("Y"),
        debug=debug,
    )
    return ini, res


# --- an in-memory PKI with real certificates ----------------------------------------------------

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def counter_random(seed: int) -> Any:
    """Deterministic 'randomness' for reproducible certificates and ephemeral keys in tests."""
    state = {"n": seed}

    def random_bytes(n: int) -> bytes:
        import hashlib

        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(state["n"].to_bytes(8, "big")).digest()
        return out[:n]

    return random_bytes


@dataclass
class PkiFixture:
    root: x509.Certificate
    issuing: x509.Certificate
    issuing_key: Any
    now: datetime

    def leaf(
        self, role: Role, name: str, key: Any, *, now: datetime | None = None, days: int = 365
    ) -> list[bytes]:
        csr = issue.make_csr(key, role, name)
        checked = issue.check_csr(csr, role, name)
        cert = issue.issue_leaf(checked, self.issuing, self.issuing_key, now or self.now, days=days)
        return [der(cert), der(self.issuing)]

    def trust_store(self, crls: list[x509.CertificateRevocationList] | None = None) -> TrustStore:
        return TrustStore([self.root], [self.issuing], crls or [])

    def authenticator(
        self, role: Role, known: list[list[bytes]] | None = None, now: datetime | None = None, **kw: Any
    ) -> X509Authenticator:
        return X509Authenticator(self.trust_store(**kw), role, now or self.now, known or [])


def make_pki(now: datetime = NOW, seed: int = 1) -> PkiFixture:
    rnd = counter_random(seed)
    root_key = ec.derive_private_key(int.from_bytes(rnd(32), "big"), ec.SECP256R1())
    issuing_key = ec.derive_private_key(int.from_bytes(rnd(32), "big"), ec.SECP256R1())
    start = now - timedelta(days=30)
    root = issue.make_root(root_key, start, path_len=1, random_bytes=rnd)
    issuing = issue.make_issuing(issuing_key, root, root_key, start, random_bytes=rnd)
    return PkiFixture(root, issuing, issuing_key, now)


def p256_key(seed: int) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(counter_random(seed)(32), "big"), ec.SECP256R1())


_RSA_CACHE: dict[int, rsa.RSAPrivateKey] = {}


def rsa_key(slot: int) -> rsa.RSAPrivateKey:
    if slot not in _RSA_CACHE:
        _RSA_CACHE[slot] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _RSA_CACHE[slot]


def run_handshake(ini: Initiator, res: Responder, *, message_4: bool = True) -> dict[str, bytes]:
    """Drive both sides to completion in memory; returns the messages."""
    m1 = ini.create_message_1()
    res.process_message_1(m1)
    m2 = res.create_message_2()
    ini.process_message_2(m2)
    m3 = ini.create_message_3()
    res.process_message_3(m3)
    out = {"message_1": m1, "message_2": m2, "message_3": m3}
    if message_4:
        m4 = res.create_message_4()
        ini.process_message_4(m4)
        out["message_4"] = m4
    return out


# --- golden vectors of our own ------------------------------------------------------------------

GOLDEN = VECTORS / "sealmq_edhoc_suite2.json"


def golden_inputs() -> dict[str, str]:
    """Fixed inputs for the suite-2 golden vector (certificates are made once and stored)."""
    pki = make_pki()
    dev_key, be_key = p256_key(101), p256_key(202)
    dev_chain = pki.leaf(Role.DEVICE, "dev-0001", dev_key)
    be_chain = pki.leaf(Role.BACKEND, "backend", be_key)
    pem = serialization.PrivateFormat.PKCS8

    def key_der(k: Any) -> str:
        return str(k.private_bytes(serialization.Encoding.DER, pem, serialization.NoEncryption()).hex())

    return {
        "now": NOW.isoformat(),
        "root_der": der(pki.root).hex(),
        "device_key_pkcs8": key_der(dev_key),
        "backend_key_pkcs8": key_der(be_key),
        "device_chain": ",".join(c.hex() for c in dev_chain),
        "backend_chain": ",".join(c.hex() for c in be_chain),
        "X": counter_random(303)(32).hex(),
        "Y": counter_random(404)(32).hex(),
        "C_I": "0e",
        "C_R": "4711",
        "EAD_1": "1:01020304",
    }


def golden_pair(v: dict[str, str]) -> tuple[Initiator, Responder]:
    root = x509.load_der_x509_certificate(bytes.fromhex(v["root_der"]))
    dev_chain = [bytes.fromhex(c) for c in v["device_chain"].split(",")]
    be_chain = [bytes.fromhex(c) for c in v["backend_chain"].split(",")]
    dev_key = serialization.load_der_private_key(bytes.fromhex(v["device_key_pkcs8"]), None)
    be_key = serialization.load_der_private_key(bytes.fromhex(v["backend_key_pkcs8"]), None)
    issuing = x509.load_der_x509_certificate(dev_chain[1])
    ts = TrustStore([root], [issuing])
    now = datetime.fromisoformat(v["now"])
    ini = Initiator(
        X509Credential(dev_key, dev_chain, by_reference=True),
        X509Authenticator(ts, Role.BACKEND, now),
        c_i=bytes.fromhex(v["C_I"]),
        suites=[2],
        ephemeral_key=bytes.fromhex(v["X"]),
        debug=True,
    )
    res = Responder(
        X509Credential(be_key, be_chain, by_reference=False),
        X509Authenticator(ts, Role.DEVICE, now, known_chains=[dev_chain]),
        c_r=bytes.fromhex(v["C_R"]),
        suites=[2],
        ephemeral_key=bytes.fromhex(v["Y"]),
        known_ead_labels=frozenset({1}),
        debug=True,
    )
    return ini, res


def golden_run(v: dict[str, str]) -> dict[str, str]:
    ini, res = golden_pair(v)
    label, value = v["EAD_1"].split(":")
    m1 = ini.create_message_1([(int(label), bytes.fromhex(value))])
    res.process_message_1(m1)
    m2 = res.create_message_2()
    ini.process_message_2(m2)
    m3 = ini.create_message_3()
    res.process_message_3(m3)
    m4 = res.create_message_4()
    ini.process_message_4(m4)
    result = ini.result()
    out = {"message_1": m1, "message_2": m2, "message_3": m3, "message_4": m4}
    for name in (
        "TH_2",
        "PRK_2e",
        "MAC_2",
        "Signature_or_MAC_2",
        "TH_3",
        "MAC_3",
        "Signature_or_MAC_3",
        "TH_4",
    ):
        out[name] = res.transcript.get(name) or ini.transcript[name]
    out["PRK_out"] = result.prk_out
    out["OSCORE_Master_Secret"] = result.oscore_master_secret()
    out["OSCORE_Master_Salt"] = result.oscore_master_salt()
    return {k: val.hex() for k, val in out.items()}


if __name__ == "__main__":
    inputs = golden_inputs()
    doc = {
        "what": "sealmq EDHOC golden vector: method 0, suite 2 (P-256, ES256 deterministic RFC 6979), "
        "device (initiator) by x5t, backend (responder) by x5chain, EAD_1 = label 1, message_4 sent",
        "generated_by": "python3 -m tests.edhoc_helpers",
        "inputs": inputs,
        "outputs": golden_run(inputs),
    }
    GOLDEN.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
