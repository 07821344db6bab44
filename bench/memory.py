"""Memory per idle established session on the backend (issue #11): N devices, one real EDHOC
handshake each (in memory, no broker), all sessions held by one ``BackendEndpoint``.

Two measures, because neither sees everything:

* ``tracemalloc``: Python-heap bytes still allocated after the handshakes (the devices' own objects
  are dropped), per session, with the largest allocation sites; it does not see memory OpenSSL
  allocates itself (AEAD contexts, EC public keys, parsed certificates);
* RSS: the process's resident set before and after (run without tracemalloc, which adds its own
  overhead), per session; includes OpenSSL's memory and allocator slack.

Each device has its own certificate (issued in memory by one CA, the anchor of the backend's
``TrustStore`` with its CRL), so the backend holds one peer certificate per session as in a
deployment. Run alone: ``python3 -m bench.memory [--quick] [--sessions N]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from bench.stats import fmt, table
from pki import issue, keys, layout, store
from pki.store import load_identity, load_trust_store
from sealmq import topics
from sealmq.edhoc import X509Credential
from sealmq.endpoint import BackendEndpoint, DeviceEndpoint, Publish
from sealmq.endpoint.backend import BackendConfig
from sealmq.errors import Reason
from sealmq.identity import Role


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Fleet:
    """A CA on disk (for the trust store), a backend credential, and device credentials made on demand."""

    def __init__(self, pki_dir: Path) -> None:
        store.init_ca(pki_dir)
        store.enroll(pki_dir, "backend", "backend")
        self.trust_store = load_trust_store(pki_dir)
        self.ca = store.load_ca(pki_dir)
        ident = load_identity(layout.identity_dir(pki_dir, "backend", "backend"))
        self.backend = X509Credential(private_key=ident.private_key,
                                      chain_der=[c.public_bytes(Encoding.DER) for c in ident.chain])

    def device(self, name: str) -> X509Credential:
        key = keys.generate(keys.KeyType.P256)
        checked = issue.check_csr(issue.make_csr(key, Role.DEVICE, name), Role.DEVICE)
        leaf = issue.issue_leaf(checked, self.ca.issuer, self.ca.issuer_key, datetime.now(UTC), days=30)
        chain = [leaf, *self.ca.intermediates]
        return X509Credential(private_key=key, chain_der=[c.public_bytes(Encoding.DER) for c in chain])


def _handshake(fleet: _Fleet, backend: BackendEndpoint, device_id: str) -> None:
    device = DeviceEndpoint(device_id=device_id, credential=fleet.device(device_id), trust_store=fleet.trust_store)
    now = time.time()
    queue = list(device.start_handshake(now, os.urandom))
    while queue:
        out = queue.pop(0)
        if isinstance(out, Publish):
            up = topics.parse(out.topic).direction is topics.Direction.UP
            queue.extend((backend if up else device).handle(out.topic, out.payload, now, os.urandom))
    if not device.established or device_id not in backend.sessions:
        raise AssertionError(f"handshake of {device_id} failed")


def _names(n: int, tag: str) -> Iterator[str]:
    return (f"mem-{tag}-{i:05d}" for i in range(n))


def measure(n: int, pki_dir: Path, traced: bool) -> tuple[float, list[tuple[str, float]], float]:
    """(bytes per session, [(site, bytes per session)], seconds): ``n`` sessions in one endpoint."""
    fleet = _Fleet(pki_dir)
    backend = BackendEndpoint(credentials=fleet.backend, trust_store=fleet.trust_store,
                              config=BackendConfig(max_half_open=n + 8, message_1_per_device=n + 8))
    _handshake(fleet, backend, "warm-up")  # lazily built module state is not a session's cost
    backend.close_session("warm-up", Reason.UNKNOWN_SESSION)
    gc.collect()
    t0 = time.monotonic()
    if traced:
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        base = tracemalloc.get_traced_memory()[0]
    else:
        base = _rss()
    for name in _names(n, "t" if traced else "r"):
        _handshake(fleet, backend, name)
    gc.collect()
    sites: list[tuple[str, float]] = []
    if traced:
        used = tracemalloc.get_traced_memory()[0] - base
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        for stat in after.compare_to(before, "lineno")[:6]:
            frame = stat.traceback[0]
            where = f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno}"
            sites.append((where, stat.size_diff / n))
    else:
        used = _rss() - base
    if len(backend.sessions) != n:
        raise AssertionError("not every session is held")
    return used / n, sites, time.monotonic() - t0


def run(*, quick: bool = False, sessions: int | None = None) -> str:
    n = sessions or (20 if quick else 10_000)
    with tempfile.TemporaryDirectory(prefix="sealmq-bench-mem-") as tmp:
        rss_per, _, rss_s = measure(n, Path(tmp) / "pki-rss", traced=False)
        traced_per, sites, traced_s = measure(n, Path(tmp) / "pki-traced", traced=True)
    rows = [["tracemalloc (Python heap)", fmt(traced_per / 1024, 2), fmt(traced_s, 1)],
            ["RSS (everything, incl. OpenSSL)", fmt(rss_per / 1024, 2), fmt(rss_s, 1)]]
    site_rows = [[where, fmt(per, 0)] for where, per in sites]
    return (f"### Memory per idle established session on the backend ({n:,} sessions held)\n\n"
            f"{table(['measure', 'KiB per session', 'seconds (handshakes included)'], rows)}\n\n"
            f"Largest Python allocation sites per session (bytes):\n\n"
            f"{table(['allocated at', 'bytes per session'], site_rows)}\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="backend memory per established session")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sessions", type=int)
    args = ap.parse_args(argv)
    print(run(quick=args.quick, sessions=args.sessions))


if __name__ == "__main__":
    main()
