"""Handshake cost (issue #3): EDHOC method 0 per side vs a TLS 1.3 mutual-auth handshake.

Every EDHOC run is a full handshake (message_1..message_4) between an ``Initiator`` and a
``Responder`` with fresh ephemeral keys, and each side validates the other's certificate chain
with the real ``pki.verify.TrustStore`` (anchor + CRL, so revocation is checked too). The
certificates come from ``pki.store.init_ca``/``enroll`` into a temporary directory: the same CA
issues the P-256 certificates the TLS 1.3 yardstick uses.

CPU time is per side (``time.thread_time`` around that side's calls only), so the figures say
what one device and the backend each spend per handshake. TLS runs over ``socket.socketpair()``
in one thread with non-blocking sockets; its per-side CPU therefore includes the socket system
calls, which the in-memory EDHOC runs do not have (a few microseconds per flight).

Run alone: ``python3 -m bench.handshake [--quick] [--runs N]``.
"""

from __future__ import annotations

import argparse
import hmac
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from bench.stats import balanced_order, fmt, median, percentile, table
from pki import layout, store
from pki.store import load_identity, load_trust_store
from pki.verify import TrustStore
from sealmq.edhoc import (
    Initiator,
    KnownChains,
    LocalCredential,
    PeerAuthenticator,
    Responder,
    X509Authenticator,
    X509Credential,
)
from sealmq.edhoc.wire import X5T_SHA256_64, x5t_hash
from sealmq.identity import Role

# Sizes the EDHOC authors publish for method 0 (signatures), X.509 by reference (x5t), P-256,
# ECDSA, AES-CCM 8-byte tag, 1-byte connection identifiers: draft-ietf-iotops-security-protocol-
# comparison (J. Preuss Mattsson, F. Palombini, M. Vucinic), figure "Comparison of message sizes in
# bytes with CCM_8, P-256, and ECDSA and with Connection ID", row "EDHOC - Signature X.509s, x5t,
# ECDHE"; source https://github.com/lwig-wg/protocol-comparison. Same figure family: TLS 1.3 with
# raw public keys, ECDHE, secp256r1 = 162 / 394 / 233 bytes (without certificates).
PUBLISHED_EDHOC_X5T = (37, 115, 90)
PUBLISHED_TLS13_RPK = (162, 394, 233)


@dataclass(frozen=True)
class Case:
    label: str
    suite: int
    device: str  # enrolled device name (its key type fixes the signature algorithm)
    backend: str
    by_reference: bool  # True: x5t both ways; False: x5chain both ways
    cold: bool = False  # True: both trust stores forget validated chains before every handshake


KEY_TYPES = {"bench-p256": "p256", "bench-ed": "ed25519", "bench-rsa": "rsa2048"}
BACKENDS = {"backend": "p256", "backend-ed": "ed25519", "backend-rsa": "rsa2048"}

CASES = [
    Case("suite 6 (X25519, ES256, A128GCM; the default), x5t", 6, "bench-p256", "backend", True),
    Case("suite 6 (X25519, ES256, A128GCM; the default), x5chain", 6, "bench-p256", "backend", False),
    Case("suite 2 (P-256, ES256), x5t", 2, "bench-p256", "backend", True),
    Case("suite 2 (P-256, ES256), x5chain", 2, "bench-p256", "backend", False),
    Case("suite 2 (P-256, ES256), x5t, chain cache cold", 2, "bench-p256", "backend", True, cold=True),
    Case("suite 2 (P-256, ES256), x5chain, chain cache cold", 2, "bench-p256", "backend", False, cold=True),
    Case("suite 0 (X25519, Ed25519), x5t", 0, "bench-ed", "backend-ed", True),
    Case("suite 0 (X25519, Ed25519), x5chain", 0, "bench-ed", "backend-ed", False),
    Case("suite -24 (P-256, RSA-2048 PS256), x5t", -24, "bench-rsa", "backend-rsa", True),
    Case("suite -24 (P-256, RSA-2048 PS256), x5chain", -24, "bench-rsa", "backend-rsa", False),
]


class BenchPki:
    """A CA and the enrolled identities, on disk exactly as the product keeps them."""

    def __init__(self, path: Path, *, two_level: bool = False) -> None:
        self.path = path
        store.init_ca(path, two_level=two_level)
        for name, kt in BACKENDS.items():
            store.enroll(path, "backend", name, key_type=kt)
        for name, kt in KEY_TYPES.items():
            store.enroll(path, "device", name, key_type=kt)
        self.trust_store: TrustStore = load_trust_store(path)
        # Cleared before each "cold" handshake, so a store of its own: load_trust_store hands every
        # caller of the process that loads the same files the same store (pki.store), and clearing
        # that one would make the warm cases after a cold one validate in full too (stops 28-29's
        # tables: suite 0 and suite -24 "x5t" were such cold runs).
        issuing = layout.issuing_cert(path)
        self.cold_store: TrustStore = TrustStore.from_pem(
            layout.anchor(path).read_bytes(), layout.crl(path).read_bytes(),
            issuing.read_bytes() if issuing.exists() else None,
        )
        self.now = datetime.now(UTC)

    def identity_dir(self, role: str, name: str) -> Path:
        return layout.identity_dir(self.path, role, name)

    def credential(self, role: str, name: str, by_reference: bool) -> X509Credential:
        ident = load_identity(self.identity_dir(role, name))
        return X509Credential(
            private_key=ident.private_key,
            chain_der=[c.public_bytes(Encoding.DER) for c in ident.chain],
            by_reference=by_reference,
        )


@dataclass
class EdhocSample:
    initiator_cpu: float
    responder_cpu: float
    wall: float
    sizes: tuple[int, int, int, int]


def timed_handshake(device: LocalCredential, device_auth: PeerAuthenticator, backend: LocalCredential,
                    backend_auth: PeerAuthenticator, *,
                    suite: int = 2, method: int = 0) -> EdhocSample:
    """One full EDHOC handshake between our two roles, CPU time split by side, message sizes."""
    clock = time.thread_time
    wall0 = time.perf_counter()
    t0 = clock()
    ini = Initiator(device, device_auth, c_i=b"\x0e", suites=[suite], method=method, random_bytes=os.urandom)
    m1 = ini.create_message_1()
    t1 = clock()
    res = Responder(backend, backend_auth, c_r=b"\x27", suites=[suite], methods=[method], random_bytes=os.urandom)
    res.process_message_1(m1)
    m2 = res.create_message_2()
    t2 = clock()
    ini.process_message_2(m2)
    m3 = ini.create_message_3()
    t3 = clock()
    res.process_message_3(m3)
    m4 = res.create_message_4()
    t4 = clock()
    ini.process_message_4(m4)
    t5 = clock()
    wall = time.perf_counter() - wall0
    if ini.result().prk_out != res.result().prk_out:
        raise AssertionError("EDHOC sides disagree on PRK_out")
    return EdhocSample(
        initiator_cpu=(t1 - t0) + (t3 - t2) + (t5 - t4),
        responder_cpu=(t2 - t1) + (t4 - t3),
        wall=wall,
        sizes=(len(m1), len(m2), len(m3), len(m4)),
    )


def edhoc_runner(pki: BenchPki, case: Case) -> Callable[[], EdhocSample]:
    """A closure running one full handshake of ``case``; credentials are loaded once, outside."""
    dev = pki.credential("device", case.device, case.by_reference)
    be = pki.credential("backend", case.backend, case.by_reference)
    ts, now = (pki.cold_store if case.cold else pki.trust_store), pki.now

    def once() -> EdhocSample:
        if case.cold:
            ts.clear_cache()  # a device's first handshake (or the first after a CRL reload)
        return timed_handshake(
            dev, X509Authenticator(ts, Role.BACKEND, now, [be.chain_der]),
            be, X509Authenticator(ts, Role.DEVICE, now, [dev.chain_der]),
            suite=case.suite,
        )

    return once


# --- TLS 1.3 yardstick -------------------------------------------------------------------------

def tls_contexts(pki: BenchPki, device: str = "bench-p256", backend: str = "backend",
                 ) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Client (device) and server (backend) contexts: TLS 1.3 only, P-256 key exchange, both sides
    verify the peer's chain against the same anchor and CRL, the server requires a client cert."""
    anchor = str(layout.anchor(pki.path))
    crl = str(layout.crl(pki.path))

    def common(ctx: ssl.SSLContext, role: str, name: str) -> ssl.SSLContext:
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        d = pki.identity_dir(role, name)
        ctx.load_cert_chain(str(d / layout.CHAIN), str(d / layout.KEY))
        ctx.load_verify_locations(cafile=anchor)
        ctx.load_verify_locations(cafile=crl)  # revocation checked, as on the EDHOC side
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        ctx.verify_mode = ssl.CERT_REQUIRED
        # Same curve as EDHOC suite 2 (Python 3.11 has no set_groups; this sets the one group).
        ctx.set_ecdh_curve("prime256v1")
        return ctx

    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False  # identities are checked by role/name in the application, as in EDHOC
    client = common(client, "device", device)
    server = common(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "backend", backend)
    server.num_tickets = 0  # no resumption tickets: EDHOC has none either, and they would add a flight
    return client, server


@dataclass
class TlsSample:
    client_cpu: float
    server_cpu: float
    wall: float


def tls_once(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> TlsSample:
    """One full TLS 1.3 handshake over a socketpair, both ends driven from this thread."""
    a, b = socket.socketpair()
    try:
        wall0 = time.perf_counter()
        cs = client_ctx.wrap_socket(a, do_handshake_on_connect=False)
        ss = server_ctx.wrap_socket(b, server_side=True, do_handshake_on_connect=False)
        cs.setblocking(False)
        ss.setblocking(False)
        cpu = {"c": 0.0, "s": 0.0}
        done = {"c": False, "s": False}
        for _ in range(100):
            for side, sock in (("c", cs), ("s", ss)):
                if done[side]:
                    continue
                t0 = time.thread_time()
                try:
                    sock.do_handshake()
                    done[side] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                cpu[side] += time.thread_time() - t0
            if done["c"] and done["s"]:
                break
        else:
            raise RuntimeError("TLS handshake did not complete")
        wall = time.perf_counter() - wall0
        if cs.version() != "TLSv1.3" or ss.getpeercert() is None:
            raise AssertionError("not a mutually authenticated TLS 1.3 handshake")
        cs.close()
        ss.close()
        return TlsSample(cpu["c"], cpu["s"], wall)
    finally:
        a.close()
        b.close()


def tls_flight_sizes(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> tuple[int, int, int]:
    """Bytes of TLS records per flight (ClientHello / server flight / client certificate flight),
    counted through memory BIOs with the same contexts (TCP/IP headers not included)."""
    cin, cout, sin, sout = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client_ctx.wrap_bio(cin, cout)
    s = server_ctx.wrap_bio(sin, sout, server_side=True)
    flights: list[int] = []

    def step(obj: ssl.SSLObject, out: ssl.MemoryBIO, to: ssl.MemoryBIO) -> bool:
        try:
            obj.do_handshake()
            finished = True
        except ssl.SSLWantReadError:
            finished = False
        data = out.read()
        if data:
            flights.append(len(data))
            to.write(data)
        return finished

    step(c, cout, sin)  # ClientHello
    step(s, sout, cin)  # ServerHello .. Finished
    step(c, cout, sin)  # Certificate, CertificateVerify, Finished
    if not step(s, sout, cin):
        raise AssertionError("TLS server did not finish")
    if len(flights) != 3:
        raise AssertionError(f"expected 3 TLS flights, saw {flights}")
    return flights[0], flights[1], flights[2]


# --- where an EDHOC handshake's CPU goes ----------------------------------------------------------

def component_costs(pki: BenchPki, runs: int) -> list[list[object]]:
    """CPU microseconds of the pieces one side of a suite-2 handshake does once each."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    dev = pki.credential("device", "bench-p256", False)
    ts, now = pki.trust_store, pki.now
    key = load_identity(pki.identity_dir("device", "bench-p256")).private_key
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("bench-p256 must hold a P-256 key")
    msg = os.urandom(200)
    sig = key.sign(msg, ec.ECDSA(hashes.SHA256()))
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()

    cold = pki.cold_store

    def chain() -> None:
        cold.clear_cache()
        cold.verify(dev.chain_der, role=Role.DEVICE, now=now)

    def chain_cached() -> None:
        ts.verify(dev.chain_der, role=Role.DEVICE, now=now)

    # x5t in the backend service: the device's certificate among every certificate the CA issued.
    fleet = [[os.urandom(480)] for _ in range(9_999)] + [list(dev.chain_der)]
    thumb = x5t_hash(X5T_SHA256_64, dev.chain_der[0])
    index = KnownChains(fleet)
    index.find(X5T_SHA256_64, thumb)  # built once, when ca/issued changes

    def x5t_scan() -> None:  # what every handshake did before KnownChains
        next(c for c in fleet if hmac.compare_digest(x5t_hash(X5T_SHA256_64, c[0]), thumb))

    def x5t_index() -> None:
        index.find(X5T_SHA256_64, thumb)

    def sign() -> None:
        key.sign(msg, ec.ECDSA(hashes.SHA256()))

    def verify() -> None:
        key.public_key().verify(sig, msg, ec.ECDSA(hashes.SHA256()))

    def ecdh() -> None:
        ec.generate_private_key(ec.SECP256R1()).exchange(ec.ECDH(), peer)

    rows: list[list[object]] = []
    for label, fn, times in (
        ("TrustStore.verify (chain + role/name + CRL), once per side, first time", chain, 1),
        ("TrustStore.verify, the same chain again (cached)", chain_cached, 1),
        ("x5t lookup among 10,000 issued certificates: hash each (before)", x5t_scan, 1),
        ("x5t lookup among 10,000 issued certificates: KnownChains index", x5t_index, 1),
        ("ECDSA P-256 sign, once per side", sign, 1),
        ("ECDSA P-256 verify, once per side", verify, 1),
        ("P-256 ephemeral keygen + ECDH, once per side", ecdh, 1),
    ):
        samples = []
        for _ in range(runs):
            t0 = time.thread_time()
            fn()
            samples.append(time.thread_time() - t0)
        rows.append([label, fmt(median(samples) * 1e6 * times)])
    return rows


# --- running and reporting ---------------------------------------------------------------------

@dataclass
class Row:
    label: str
    side_a: list[float]  # initiator / client CPU seconds
    side_b: list[float]  # responder / server CPU seconds
    wall: list[float]


def _summary(row: Row) -> list[str]:
    def us(v: float) -> str:
        return fmt(v * 1e6)

    total = [a + b for a, b in zip(row.side_a, row.side_b, strict=True)]
    return [
        row.label,
        us(median(row.side_a)), us(percentile(row.side_a, 90)),
        us(median(row.side_b)), us(percentile(row.side_b, 90)),
        us(median(total)), us(median(row.wall)), str(len(total)),
    ]


def run(runs: int = 200, warmup: int = 5, *, two_level: bool = False) -> str:
    with tempfile.TemporaryDirectory(prefix="sealmq-bench-pki-") as tmp:
        pki = BenchPki(Path(tmp) / "pki", two_level=two_level)
        sizes: dict[str, tuple[int, ...]] = {}
        runners = [(case, edhoc_runner(pki, case), Row(f"EDHOC {case.label}", [], [], [])) for case in CASES]
        client_ctx, server_ctx = tls_contexts(pki)
        tls_row = Row("TLS 1.3 mutual auth (P-256 ECDHE, ECDSA P-256 certs)", [], [], [])
        for i in range(warmup + runs):
            # Interleaved: every case gets one handshake per round, so drift in the shared
            # machine's load spreads over all of them instead of favouring whichever ran first;
            # in a balanced order (each case after each other one equally often), so that what one
            # case leaves in the caches (TLS runs OpenSSL 3.0, EDHOC `cryptography`'s) does not
            # always fall on the same next case.
            for k in balanced_order(range(len(runners) + 1), i):
                if k == len(runners):
                    t = tls_once(client_ctx, server_ctx)
                    if i >= warmup:
                        tls_row.side_a.append(t.client_cpu)
                        tls_row.side_b.append(t.server_cpu)
                        tls_row.wall.append(t.wall)
                    continue
                case, once, row = runners[k]
                s = once()
                if i >= warmup:
                    row.side_a.append(s.initiator_cpu)
                    row.side_b.append(s.responder_cpu)
                    row.wall.append(s.wall)
                    sizes[case.label] = s.sizes
        rows = [row for _, _, row in runners] + [tls_row]
        tls_sizes = tls_flight_sizes(client_ctx, server_ctx)
        components = component_costs(pki, runs)
        chain_len = len(load_identity(pki.identity_dir("device", "bench-p256")).chain)

    cpu = table(
        ["handshake", "device/client CPU median (us)", "p90", "backend/server CPU median (us)", "p90",
         "both sides median (us)", "wall median (us)", "runs"],
        [_summary(r) for r in rows],
    )
    size_rows: list[list[object]] = []
    for case in CASES:
        if case.suite in (6, 2) and not case.cold:
            m = sizes[case.label]
            size_rows.append([f"EDHOC {case.label} (measured)", *m, sum(m[:3]), sum(m)])
    size_rows.append(["EDHOC signature, x5t, P-256 (published)", *PUBLISHED_EDHOC_X5T, "-",
                      sum(PUBLISHED_EDHOC_X5T), "-"])
    size_rows.append(["TLS 1.3 mutual auth, X.509 chains, P-256 (measured)", *tls_sizes, "-",
                      sum(tls_sizes), "-"])
    size_rows.append(["TLS 1.3 raw public keys, secp256r1 (published)", *PUBLISHED_TLS13_RPK, "-",
                      sum(PUBLISHED_TLS13_RPK), "-"])
    bytes_table = table(["handshake", "message_1 / flight 1", "message_2 / flight 2",
                         "message_3 / flight 3", "message_4", "total 3 flights", "total with message_4"],
                        size_rows)
    return (
        f"### Handshake CPU per side ({runs} runs each; x5chain carries {chain_len} certificate(s), the "
        f"anchor is not sent; chain validated and CRL checked on both sides)\n\n{cpu}\n\n"
        f"### Handshake bytes on the wire\n\n{bytes_table}\n\n"
        f"### Where one side's suite-2 handshake CPU goes (median CPU us, {runs} runs each)\n\n"
        f"{table(['piece', 'us'], components)}\n"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="a few runs only (smoke test)")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--two-level", action="store_true", help="root -> issuing CA -> leaf")
    args = ap.parse_args(argv)
    runs, warmup = (5, 1) if args.quick else (args.runs, 5)
    print(run(runs, warmup, two_level=args.two_level))


if __name__ == "__main__":
    main()
