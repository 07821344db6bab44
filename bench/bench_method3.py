"""Handshake sizes and CPU: EDHOC method 3 (static DH, CCS) vs method 0 (signatures, X.509),
cipher suite 2 (P-256, AES-CCM-16-64-128, SHA-256), one command, same run, side by side.

Cases (each a full handshake, message_1..message_4, fresh ephemeral keys, in memory):

* method 0, x5t: certificates by reference (each side already holds the other's chain);
* method 0, x5chain: the certificate chain (leaf + CA) by value;
* method 3, kid: CCS credentials by reference (``{4: kid}``, 4-byte kids as ``pki.ccs`` issues them);
* method 3, kccs: the CCS by value (``{14: CCS}``);
* method 3, kid, device = lakers: the initiator is lakers (Rust) and the responder ours (only
  with ``lakers-python`` installed; its CPU column is lakers' own cost).

Both sides authenticate the other exactly as the product does: X.509 chains against the real
``pki.verify.TrustStore`` (anchor + CRL), CCS credentials against the ``pki.ccs`` registry. CPU is
per side (``time.thread_time`` around that side's calls only). Sizes are the EDHOC messages; on the
MQTT hs topics each carries a 1-byte prefix more (``true``, C_I or C_R).

Run: ``python3 -m bench.bench_method3 [--runs N] [--quick]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from bench.handshake import timed_handshake
from bench.stats import fmt, machine, median, percentile, table
from pki import ccs as pki_ccs
from pki import layout, store
from pki.store import load_identity, load_trust_store
from sealmq.edhoc import (
    CcsAuthenticator,
    LocalCredential,
    PeerAuthenticator,
    Responder,
    X509Authenticator,
    X509Credential,
)
from sealmq.identity import Role

DEVICE, BACKEND = "bench-dev", "backend"


@dataclass
class Sample:
    initiator_cpu: float
    responder_cpu: float
    sizes: tuple[int, int, int, int]


@dataclass(frozen=True)
class Setup:
    label: str
    method: int
    device: LocalCredential
    backend: LocalCredential
    device_auth: Callable[[], PeerAuthenticator]
    backend_auth: Callable[[], PeerAuthenticator]


def build(path: Path) -> tuple[list[Setup], Any]:
    store.init_ca(path)
    store.enroll(path, "backend", BACKEND)
    store.enroll(path, "device", DEVICE)
    pki_ccs.issue_ccs(path, "backend", BACKEND)
    pki_ccs.issue_ccs(path, "device", DEVICE)
    trust, now, registry = load_trust_store(path), datetime.now(UTC), pki_ccs.load_registry(path)

    def x509(role: str, name: str, by_reference: bool) -> X509Credential:
        ident = load_identity(layout.identity_dir(path, role, name))
        return X509Credential(ident.private_key, [c.public_bytes(Encoding.DER) for c in ident.chain],
                              by_reference=by_reference)

    setups = []
    for by_ref, label in ((True, "x5t"), (False, "x5chain")):
        dev, be = x509("device", DEVICE, by_ref), x509("backend", BACKEND, by_ref)
        setups.append(Setup(
            f"method 0 (ES256 signatures), {label}", 0, dev, be,
            functools.partial(X509Authenticator, trust, Role.BACKEND, now, [be.chain_der]),
            functools.partial(X509Authenticator, trust, Role.DEVICE, now, [dev.chain_der]),
        ))
    for by_value, label in ((False, "kid"), (True, "kccs (CCS by value)")):
        setups.append(Setup(
            f"method 3 (static DH, CCS), {label}", 3,
            pki_ccs.load_credential(path, "device", DEVICE, by_value=by_value),
            pki_ccs.load_credential(path, "backend", BACKEND, by_value=by_value),
            lambda: CcsAuthenticator(registry, Role.BACKEND, time.time()),
            lambda: CcsAuthenticator(registry, Role.DEVICE, time.time()),
        ))
    return setups, registry


def run_once(s: Setup) -> Sample:
    got = timed_handshake(s.device, s.device_auth(), s.backend, s.backend_auth(), suite=2, method=s.method)
    return Sample(got.initiator_cpu, got.responder_cpu, got.sizes)


def lakers_once(path: Path, registry: Any) -> Sample | None:
    """lakers initiator (minimal CCS: all lakers 0.6.2 parses) against our responder."""
    try:
        import lakers
    except ImportError:
        return None
    dev = pki_ccs.load_credential(path, "device", "bench-lakers")
    be = pki_ccs.load_credential(path, "backend", "backend-min")
    raw = dev._private_key.private_numbers().private_value.to_bytes(32, "big")
    clock = time.thread_time
    t0 = clock()
    ini = lakers.EdhocInitiator()
    m1 = bytes(ini.prepare_message_1(b"\x0e", None))
    t1 = clock()
    res = Responder(be, CcsAuthenticator(registry, Role.DEVICE, time.time()), c_r=b"\x27", suites=[2],
                    methods=[3], random_bytes=os.urandom)
    res.process_message_1(m1)
    m2 = res.create_message_2()
    t2 = clock()
    _, id_cred_r, _ = ini.parse_message_2(m2)
    ini.verify_message_2(raw, dev.cred, lakers.credential_check_or_fetch(id_cred_r, be.cred))
    m3, prk_out = ini.prepare_message_3(lakers.CredentialTransfer.ByReference, None)
    t3 = clock()
    res.process_message_3(bytes(m3))
    m4 = res.create_message_4()
    t4 = clock()
    ini.process_message_4(m4)
    t5 = clock()
    if bytes(prk_out) != res.result().prk_out:
        raise AssertionError("lakers and sealmq disagree on PRK_out")
    return Sample((t1 - t0) + (t3 - t2) + (t5 - t4), (t2 - t1) + (t4 - t3), (len(m1), len(m2), len(m3), len(m4)))


def row(label: str, samples: list[Sample]) -> list[object]:
    sizes = samples[0].sizes
    ini = [s.initiator_cpu * 1e6 for s in samples]
    res = [s.responder_cpu * 1e6 for s in samples]
    return [label, *sizes, sum(sizes), fmt(median(ini)), fmt(percentile(ini, 90)),
            fmt(median(res)), fmt(percentile(res, 90))]


def run(runs: int = 300) -> str:
    """Every case interleaved, ``runs`` handshakes each; returns the markdown table."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pki"
        setups, _ = build(path)
        pki_ccs.issue_ccs(path, "device", "bench-lakers", days=None)
        pki_ccs.issue_ccs(path, "backend", "backend-min", days=None)
        registry = pki_ccs.load_registry(path)
        results: dict[str, list[Sample]] = {s.label: [] for s in setups}
        lakers_label = "method 3, kid, device = lakers 0.6.2 (Rust)"
        lakers_samples: list[Sample] = []
        for _ in range(3):  # warm-up
            for s in setups:
                run_once(s)
        for _ in range(runs):  # interleaved, so drift hits every case alike
            for s in setups:
                results[s.label].append(run_once(s))
            got = lakers_once(path, registry)
            if got is not None:
                lakers_samples.append(got)
    rows = [row(label, samples) for label, samples in results.items()]
    if lakers_samples:
        rows.append(row(lakers_label, lakers_samples))
    head = f"### EDHOC method 3 vs method 0 (suite 2, {runs} handshakes per case, CPU us per side)\n\n"
    return head + table(["case", "m1", "m2", "m3", "m4", "total B", "device med", "device p90",
                         "backend med", "backend p90"], rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="20 runs per case")
    args = parser.parse_args(argv)
    print(run(20 if args.quick else args.runs))
    print(f"\n{machine()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
