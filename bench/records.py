"""Seal/open cost per record (issue #3): ``Session.seal``/``open`` vs the raw AEAD underneath.

Three rows per plaintext size, same plaintext, same AAD bytes:

* ``Session.seal`` / ``Session.open``: the whole sealmq record path (topic, CBOR record, OSCORE
  nonce and AAD with the topic binding, the AEAD, replay window, key-usage counters), once with
  suite 6's application AEAD (A128GCM, what the endpoints negotiate by default) and once with suite
  2's (AES-CCM-16-64-128);
* the same (suite 2) with the reference record path (``Session._fast = False``: ``record.seal``/``open_``/
  ``decode``, what every record went through before the fast path of :class:`record.EpochCodec`);
* ``DeviceEndpoint.seal`` / ``BackendEndpoint.handle``: the same plus the endpoints' MQTT
  framing and dispatch (what the device agent and backend service call per message), on a session
  made by a real in-memory EDHOC handshake (which negotiates suite 6);
* the endpoints and the suite-6 session again with the compiled framing (``sealmq/_speedups.c``)
  switched off: what an install without a C compiler runs;
* raw ``AESCCM`` (16-byte key, 8-byte tag, 13-byte nonce) encrypt/decrypt: the AEAD alone, so the
  difference is the cost of our framing;
* raw ``AESGCM`` (AES-128-GCM, 12-byte nonce, 16-byte tag): the standard alternative AEAD.

Figures are CPU microseconds per operation (``time.thread_time`` over a batch, median of the
batches): the machine is shared, and CPU time does not count time spent descheduled.
The largest size is 65,000 bytes: AES-CCM's 13-byte nonce caps a plaintext below 65,536.

Run alone: ``python3 -m bench.records [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM
from cryptography.hazmat.primitives.serialization import Encoding

from bench.stats import fmt, median, table, use_python_framing
from pki import layout, store
from pki.store import load_identity, load_trust_store
from sealmq import record, topics
from sealmq.edhoc import X509Credential
from sealmq.endpoint import BackendEndpoint, DeviceEndpoint, Publish, Received
from sealmq.session import Session, SessionConfig
from sealmq.topics import RecordKind

SIZES = (64, 1024, 65_000)
DEVICE = "bench-dev"
C_I, C_R = b"\x0e", b"\x27"


def session_pair(now: float = 1_700_000_000.0, *, fast: bool = True, app_aead: int = 10) -> tuple[Session, Session]:
    """A device and a backend session over the same (random) PRK_out, as after EDHOC.

    ``fast=False``: both use the reference record path (what every record went through before
    the fast path), for the before/after row."""
    prk_out = os.urandom(32)
    config = SessionConfig(auto_key_update=False)
    device = Session.from_edhoc(prk_out=prk_out, c_i=C_I, c_r=C_R, is_initiator=True, device_id=DEVICE,
                                now=now, config=config, app_aead=app_aead)
    backend = Session.from_edhoc(prk_out=prk_out, c_i=C_I, c_r=C_R, is_initiator=False, device_id=DEVICE,
                                 now=now, config=config, app_aead=app_aead)
    device._fast = backend._fast = fast
    return device, backend


@dataclass
class Result:
    seal_us: list[float]
    open_us: list[float]


def _per_op(fn: Callable[[], None], ops: int) -> float:
    t0 = time.thread_time()
    fn()
    return (time.thread_time() - t0) / ops * 1e6


def bench_session(size: int, ops: int, repeats: int, *, fast: bool = True, app_aead: int = 10) -> Result:
    plaintext = os.urandom(size)
    now = 1_700_000_000.0
    out = Result([], [])
    for _ in range(repeats):
        device, backend = session_pair(now, fast=fast, app_aead=app_aead)
        sealed: list[tuple[str, bytes]] = []

        def seal_all(device: Session = device, sealed: list[tuple[str, bytes]] = sealed) -> None:
            for _ in range(ops):
                sealed.append(device.seal(RecordKind.TELEMETRY, plaintext, now))

        def open_all(backend: Session = backend, sealed: list[tuple[str, bytes]] = sealed) -> None:
            for topic, data in sealed:
                backend.open(topic, data, now)

        out.seal_us.append(_per_op(seal_all, ops))
        # check outside the timed region that what we time really opens
        check_dev, check_be = session_pair(now, fast=fast, app_aead=app_aead)
        events = check_be.open(*check_dev.seal(RecordKind.TELEMETRY, plaintext, now), now)
        if not (len(events) == 1 and isinstance(events[0], Received) and events[0].plaintext == plaintext):
            raise AssertionError("session round trip failed")
        out.open_us.append(_per_op(open_all, ops))
    return out


def endpoint_pair(pki_dir: Path) -> tuple[DeviceEndpoint, BackendEndpoint]:
    """A device and the backend endpoint with a session, after a real EDHOC handshake in memory."""
    store.init_ca(pki_dir)
    store.enroll(pki_dir, "backend", "backend")
    store.enroll(pki_dir, "device", DEVICE)
    ts = load_trust_store(pki_dir)

    def cred(role: str, name: str) -> X509Credential:
        ident = load_identity(layout.identity_dir(pki_dir, role, name))
        chain = [c.public_bytes(Encoding.DER) for c in ident.chain]
        return X509Credential(private_key=ident.private_key, chain_der=chain, by_reference=False)

    backend = BackendEndpoint(credentials=cred("backend", "backend"), trust_store=ts)
    device = DeviceEndpoint(device_id=DEVICE, credential=cred("device", DEVICE), trust_store=ts)
    now = time.time()
    queue = list(device.start_handshake(now, os.urandom))
    while queue:
        out = queue.pop(0)
        if isinstance(out, Publish):
            up = topics.parse(out.topic).direction is topics.Direction.UP
            queue.extend((backend if up else device).handle(out.topic, out.payload, now, os.urandom))
    if not device.established:
        raise AssertionError("in-memory handshake failed")
    return device, backend


def bench_endpoint(device: DeviceEndpoint, backend: BackendEndpoint, size: int, ops: int, repeats: int) -> Result:
    plaintext = os.urandom(size)
    out = Result([], [])
    for _ in range(repeats):
        now = time.time()
        pubs: list[Publish] = []

        def seal_all(pubs: list[Publish] = pubs, now: float = now) -> None:
            for _ in range(ops):
                pubs.extend(o for o in device.seal(RecordKind.TELEMETRY, plaintext, now) if isinstance(o, Publish))

        got: list[int] = []

        def handle_all(pubs: list[Publish] = pubs, now: float = now, got: list[int] = got) -> None:
            for p in pubs:
                got.extend(1 for o in backend.handle(p.topic, p.payload, now, os.urandom) if isinstance(o, Received))

        out.seal_us.append(_per_op(seal_all, ops))
        out.open_us.append(_per_op(handle_all, ops))
        if len(got) != ops:
            raise AssertionError(f"backend opened {len(got)} of {ops} records")
    return out


def bench_raw(size: int, ops: int, repeats: int, *, gcm: bool) -> Result:
    plaintext = os.urandom(size)
    key = os.urandom(16)
    aead: AESCCM | AESGCM = AESGCM(key) if gcm else AESCCM(key, tag_length=8)
    nonce_len = 12 if gcm else 13
    topic = f"sealmq/v1/{DEVICE}/up/data"
    # The exact AAD bytes a record of this session carries (kid 1 byte, piv of 2 bytes).
    aad = record.record_aad(10, kid=b"\x27", piv=1000, epoch=0, kind=RecordKind.TELEMETRY, topic=topic)
    out = Result([], [])
    for _ in range(repeats):
        nonces = [os.urandom(nonce_len) for _ in range(ops)]  # drawn outside the timed loop
        cts: list[bytes] = []

        def enc(nonces: list[bytes] = nonces, cts: list[bytes] = cts) -> None:
            for n in nonces:
                cts.append(aead.encrypt(n, plaintext, aad))

        def dec(nonces: list[bytes] = nonces, cts: list[bytes] = cts) -> None:
            for n, ct in zip(nonces, cts, strict=True):
                aead.decrypt(n, ct, aad)

        out.seal_us.append(_per_op(enc, ops))
        out.open_us.append(_per_op(dec, ops))
    return out


@contextmanager
def python_framing() -> Iterator[None]:
    """Run the record path's Python framing instead of the compiled one (sealmq/_speedups.c)."""
    saved = use_python_framing()
    try:
        yield
    finally:
        record.speedups = saved


def ops_for(size: int, quick: bool) -> int:
    if quick:
        return 20 if size < 4096 else 4
    return 3000 if size < 4096 else 300


def run(*, quick: bool = False, repeats: int = 9) -> str:
    reps = 2 if quick else repeats
    rows: list[list[object]] = []
    results: dict[tuple[int, str], Result] = {}

    def add(key: tuple[int, str], r: Result) -> None:
        acc = results.setdefault(key, Result([], []))
        acc.seal_us += r.seal_us
        acc.open_us += r.open_us

    with tempfile.TemporaryDirectory(prefix="sealmq-bench-rec-") as tmp:
        device, backend = endpoint_pair(Path(tmp) / "pki")
        # Interleaved batches: one batch of each variant per round, so load drift hits all alike.
        for _ in range(reps):
            for size in SIZES:
                ops = ops_for(size, quick)
                add((size, "endpoint"), bench_endpoint(device, backend, size, ops, 1))
                add((size, "session"), bench_session(size, ops, 1))
                add((size, "session-gcm"), bench_session(size, ops, 1, app_aead=1))
                with python_framing():
                    add((size, "endpoint-py"), bench_endpoint(device, backend, size, ops, 1))
                    add((size, "session-gcm-py"), bench_session(size, ops, 1, app_aead=1))
                add((size, "reference"), bench_session(size, ops, 1, fast=False))
                add((size, "ccm"), bench_raw(size, ops, 1, gcm=False))
                add((size, "gcm"), bench_raw(size, ops, 1, gcm=True))
    for size in SIZES:
        ep, ref = results[(size, "endpoint")], results[(size, "reference")]
        sess, sess_gcm = results[(size, "session")], results[(size, "session-gcm")]
        r_seal, r_open = median(ref.seal_us), median(ref.open_us)
        ccm, gcm = results[(size, "ccm")], results[(size, "gcm")]
        s_seal, s_open = median(sess.seal_us), median(sess.open_us)
        sg_seal, sg_open = median(sess_gcm.seal_us), median(sess_gcm.open_us)
        c_seal, c_open = median(ccm.seal_us), median(ccm.open_us)
        g_seal, g_open = median(gcm.seal_us), median(gcm.open_us)
        e_seal, e_open = median(ep.seal_us), median(ep.open_us)
        ccm_pair, gcm_pair = c_seal + c_open, g_seal + g_open

        def ratios(total: float, own: float, ccm_pair: float = ccm_pair) -> list[str]:
            return [f"{total / ccm_pair:.2f}x", f"{total / own:.2f}x"]

        rows.append([f"{size:,} B", "DeviceEndpoint.seal / BackendEndpoint.handle (suite 6)", fmt(e_seal),
                     fmt(e_open), *ratios(e_seal + e_open, gcm_pair)])
        ep_py, sg_py = results[(size, "endpoint-py")], results[(size, "session-gcm-py")]
        rows.append(["", "the same, Python framing (no C compiler)", fmt(median(ep_py.seal_us)),
                     fmt(median(ep_py.open_us)), *ratios(median(ep_py.seal_us) + median(ep_py.open_us), gcm_pair)])
        rows.append(["", "Session.seal / open, suite 6 (A128GCM, the default)", fmt(sg_seal), fmt(sg_open),
                     *ratios(sg_seal + sg_open, gcm_pair)])
        rows.append(["", "the same, Python framing (no C compiler)", fmt(median(sg_py.seal_us)),
                     fmt(median(sg_py.open_us)), *ratios(median(sg_py.seal_us) + median(sg_py.open_us), gcm_pair)])
        rows.append(["", "Session.seal / open, suite 2 (AES-CCM-16-64-128)", fmt(s_seal), fmt(s_open),
                     *ratios(s_seal + s_open, ccm_pair)])
        rows.append(["", "Session.seal / open, suite 2, reference record path (before)", fmt(r_seal), fmt(r_open),
                     *ratios(r_seal + r_open, ccm_pair)])
        rows.append(["", "raw AES-128-CCM-8 encrypt / decrypt", fmt(c_seal), fmt(c_open), "1.00x", "1.00x"])
        rows.append(["", "raw AES-128-GCM encrypt / decrypt", fmt(g_seal), fmt(g_open), *ratios(gcm_pair, gcm_pair)])
        rows.append(["", "framing overhead per record, suite 6 (Session - raw GCM)", fmt(sg_seal - g_seal),
                     fmt(sg_open - g_open), "", ""])
        rows.append(["", "framing overhead per record, suite 2 (Session - raw CCM)", fmt(s_seal - c_seal),
                     fmt(s_open - c_open), "", ""])
    header = ["plaintext", "operation", "seal/encrypt (us)", "open/decrypt (us)", "seal+open vs raw CCM",
              "vs its own raw AEAD"]
    return (f"### Seal/open CPU per record (median of {reps} batches; "
            f"{ops_for(64, quick)} ops per batch below 4 KiB, {ops_for(65_000, quick)} at 65,000 B)\n\n"
            f"{table(header, rows)}\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="sealmq record seal/open cost vs raw AEADs")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    print(run(quick=args.quick, repeats=args.repeats))


if __name__ == "__main__":
    main()
