"""Issue 19, the backend under hostile input from one authenticated device: verified files are
never replaced, a manifest's fields are range-checked before anything touches the disk, and one
device cannot exhaust the audit trail, the storage, the quarantine or the backend's memory."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.console.feed import ConsoleFeed
from backend.media import MediaRejected, MediaStore
from backend.metrics import BackendMetrics
from backend.quotas import DeviceQuotas, QuotaGuard
from backend.service import BackendService, BackendSettings
from backend.storage import Storage
from backend.transfer_state import BLOCK
from runtime.audit import AuditLog, AuditThrottle, read_audit
from runtime.mqtt import MqttLink, MqttSettings
from runtime.ratelimit import TokenBuckets
from sealmq import cbor, cose, topics
from sealmq.bodies import Telemetry
from sealmq.endpoint import BackendEndpoint, Received
from sealmq.errors import Reason, SealmqError
from sealmq.media import (
    MAX_CREATED,
    Control,
    ControlOp,
    Manifest,
    alg_for_key,
    decode_manifest,
    encode_chunk,
    sign_manifest,
    transfer_id,
)
from sealmq.media_receiver import MediaLimits
from sealmq.topics import Channel, Direction, RecordKind
from tests.e2e import System, wait_for
from tests.pki_fixtures import make_pki
from tests.test_media_transfer import (
    DEV,
    KEY,
    PUB,
    Link,
    new_outbox,
    new_store,
    send_all,
    signed_for,
    stored_files,
)


def _send(tmp: Path, store: object, name: str, data: bytes) -> None:
    src = tmp / "src" / name
    src.parent.mkdir(exist_ok=True)
    src.write_bytes(data)
    outbox = new_outbox(tmp)
    outbox.add(src)
    Link(outbox, store).run()  # type: ignore[arg-type]


def test_a_verified_file_is_never_replaced_by_a_later_upload(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    first, victim, late = b"first" * 100, b"victim" * 100, b"late" * 100
    _send(tmp_path, store, "a.bin", first)
    # the clash name of a later "a.bin" is predictable: <stem>-<transfer id>.<ext>
    late_tid = transfer_id(DEV, hashlib.sha256(late).digest(), len(late), "a.bin")
    _send(tmp_path, store, f"a-{late_tid.hex()}.bin", victim)
    _send(tmp_path, store, "a.bin", late)
    records = store.storage.media()
    assert len(records) == 3
    assert len({r.stored_path for r in records}) == 3
    for r in records:  # every row still names a file holding exactly what was verified
        assert hashlib.sha256((tmp_path / "backend" / r.stored_path).read_bytes()).hexdigest() == r.sha256


def _signed_unchecked(m: Manifest) -> bytes:
    """A manifest signed by the device's real key without the sender's own checks (a hostile device)."""
    alg = alg_for_key(KEY)
    protected = cbor.dumps({1: alg})
    payload = m.to_cbor()
    return cbor.dumps([protected, {}, payload, cose.sign(alg, KEY, cose.sig_structure(protected, b"", payload))])


@pytest.mark.parametrize("created", [2**63, 2**64 - 1, 253_402_300_800])
def test_a_manifest_created_past_year_9999_is_refused_before_any_side_effect(tmp_path: Path, created: int) -> None:
    store = new_store(tmp_path)
    data = b"x" * 1000
    sha = hashlib.sha256(data).digest()
    m = Manifest(transfer_id(DEV, sha, len(data), "t.bin"), DEV, "t.bin", "image/jpeg", len(data), sha,
                 created, 1024, 1)
    with pytest.raises(SealmqError):
        store.handle(DEV, PUB, RecordKind.MEDIA_MANIFEST, _signed_unchecked(m), 1000.0)
    with pytest.raises(SealmqError):  # no transfer was opened: the chunk finds nothing
        store.handle(DEV, PUB, RecordKind.MEDIA_CHUNK, encode_chunk(m.transfer_id, 0, data), 1000.0)
    assert [p for p in (tmp_path / "backend").rglob("*") if p.is_file()] == []
    assert store.storage.media() == []


def test_the_largest_creation_time_is_stored_and_read_back(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    src = tmp_path / "last.bin"
    src.write_bytes(b"y" * 10)
    outbox = new_outbox(tmp_path)
    outbox.add(src, created=253_402_300_799)
    Link(outbox, store).run()
    [rec] = Storage(tmp_path / "backend.db").media()
    assert rec.created == 253_402_300_799


# --- per-device state in the protocol core is pruned ------------------------------------------
def test_per_device_rate_and_notice_times_are_forgotten_once_they_no_longer_limit(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", [])
    backend = BackendEndpoint(credentials=[pki.credential("backend", "backend")], trust_store=pki.trust_store())
    now = 1000.0
    for i in range(300):
        dev = f"ghost-{i}"
        # a message_1 that is garbage still counts against its device's rate...
        backend.handle(topics.topic(dev, Channel.HANDSHAKE, Direction.UP), b"\xf5\x00", now, os.urandom)
        # ...and a record without a session leaves a notice time
        backend.handle(topics.topic(dev, Channel.DATA, Direction.UP), b"\x00" * 20, now, os.urandom)
    assert len(backend._m1_times) == len(backend._last_notice) == 300
    backend.poll(now + 1, os.urandom)  # still limiting: kept
    assert len(backend._m1_times) == 300
    backend.poll(now + backend.config.message_1_window, os.urandom)
    assert backend._m1_times == {} and backend._last_notice == {}


# --- the audit trail: throttled per (event, device, reason), honestly summarised ---------------
def test_one_devices_rejections_cannot_rotate_the_audit_trail_away(tmp_path: Path) -> None:
    clock = [1000.0]
    path = tmp_path / "audit" / "server_log.jsonl"
    audit = AuditLog(path, component="backend", clock=lambda: clock[0])
    audit.event("handshake_completed", device="good")
    for _ in range(10_000):
        audit.event("message_rejected", device="evil", reason=Reason.REPLAY, stage="record", size=70)
    audit.event("message_rejected", device="good", reason=Reason.REPLAY, stage="record", size=70)
    entries = read_audit(path)
    burst = AuditThrottle().burst
    assert len([e for e in entries if e.get("device") == "evil"]) == burst
    assert [e["event"] for e in entries if e.get("device") == "good"] == ["handshake_completed", "message_rejected"]
    assert audit.counts["message_rejected"] == 10_001  # counters count everything
    assert path.stat().st_size < 10_000

    clock[0] += 1  # within the summary interval: nothing yet
    audit.flush_suppressed()
    assert not [e for e in read_audit(path) if e["event"] == "audit_suppressed"]
    clock[0] += AuditThrottle().summary_interval
    audit.flush_suppressed()
    [summary] = [e for e in read_audit(path) if e["event"] == "audit_suppressed"]
    assert (summary["suppressed_event"], summary["device"], summary["reason"], summary["suppressed"]) == (
        "message_rejected", "evil", "replay", 10_000 - burst)
    # the bucket refilled meanwhile: the device's rejections are written again
    audit.event("message_rejected", device="evil", reason=Reason.REPLAY, stage="record", size=70)
    assert read_audit(path)[-1]["event"] == "message_rejected"
    for _ in range(100):
        audit.event("message_rejected", device="evil", reason=Reason.REPLAY, stage="record", size=70)
    audit.close()  # what was suppressed since the last summary is summarised on close
    last = read_audit(path)[-1]
    assert (last["event"], last["suppressed"]) == ("audit_suppressed", 100 - (burst - 1))


def test_token_buckets_bound_their_keys_and_forget_full_ones() -> None:
    buckets: TokenBuckets[str] = TokenBuckets(rate=1.0, burst=2, max_keys=3)
    assert [buckets.take("a", 0.0) for _ in range(3)] == [True, True, False]
    assert buckets.take("a", 1.0) and not buckets.take("a", 1.0)
    for key in "bcdefg":  # past max_keys new keys share one bucket: memory stays bounded
        buckets.take(key, 1.0)
    assert len(buckets) == 4
    buckets.prune(10.0)
    assert len(buckets) == 0


# --- per-device quotas: records per second, stored bytes --------------------------------------
def _service(tmp: Path, quotas: DeviceQuotas) -> BackendService:
    pki = tmp / "pki"
    if not pki.exists():
        make_pki(pki, ["dev-1", "dev-2"])
    return BackendService(BackendSettings(pki_dir=pki, data_dir=tmp / "data", mqtt=MqttSettings(port=1),
                                          quotas=quotas))


def _telemetry(device_id: str, size: int, seq: int = 0) -> Received:
    """A valid telemetry record whose body is exactly ``size`` bytes."""
    body = next(b for b in (Telemetry(1, {"x": "t" * k}, seq + 1).encode() for k in range(size)) if len(b) == size)
    return Received(device_id, RecordKind.TELEMETRY, body, 0, seq)


def _close(svc: BackendService) -> None:
    svc.audit.close()
    svc.storage.close()


def test_a_device_past_its_record_rate_is_dropped_and_audited_not_others(tmp_path: Path) -> None:
    svc = _service(tmp_path, DeviceQuotas(records_per_second=10, records_burst=10))
    for i in range(100):  # all at the same instant: only the burst passes
        svc._on_record(_telemetry("dev-1", 20, i), 1000.0)
    svc._on_record(_telemetry("dev-2", 20), 1000.0)
    svc.ingest.flush()
    assert svc.storage.count_messages("dev-1") == 10
    assert svc.storage.count_messages("dev-2") == 1
    assert svc.audit.counts["quota_exceeded"] == 90
    svc._on_record(_telemetry("dev-1", 20, 100), 1001.0)  # a second later: ten more tokens
    svc.ingest.flush()
    assert svc.storage.count_messages("dev-1") == 11
    _close(svc)
    entries = read_audit(tmp_path / "data" / "audit" / "server_log.jsonl")
    refused = [e for e in entries if e["event"] == "quota_exceeded"]
    assert refused and {(e["device"], e["reason"]) for e in refused} == {("dev-1", "rate_limited")}


def test_a_device_past_its_stored_bytes_is_refused_also_after_a_restart(tmp_path: Path) -> None:
    quotas = DeviceQuotas(stored_bytes=1000)
    svc = _service(tmp_path, quotas)
    for i in range(5):
        svc._on_record(_telemetry("dev-1", 300, i), 1000.0 + i)
    svc.ingest.flush()
    assert svc.storage.count_messages("dev-1") == 3
    assert svc.audit.counts["quota_exceeded"] == 2
    svc._on_record(_telemetry("dev-2", 300), 1000.0)  # another device's quota is its own
    svc.ingest.flush()
    assert svc.storage.count_messages("dev-2") == 1
    _close(svc)
    svc = _service(tmp_path, quotas)  # the count comes back from the database
    svc._on_record(_telemetry("dev-1", 200, 10), 2000.0)  # 900 + 200 > 1000: refused
    svc._on_record(_telemetry("dev-1", 50, 11), 2001.0)  # 900 + 50: fits
    svc.ingest.flush()
    assert svc.storage.count_messages("dev-1") == 4
    _close(svc)


def test_a_transfer_past_the_stored_bytes_quota_is_refused_at_its_manifest(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "backend.db")
    guard = QuotaGuard(DeviceQuotas(stored_bytes=10_000), storage)
    store = MediaStore(tmp_path / "backend", storage, durable=False, quota=guard)
    _send(tmp_path, store, "small.bin", b"s" * 6000)
    assert guard.stored(DEV) == 6000
    outbox = new_outbox(tmp_path)
    src = tmp_path / "big.bin"
    src.write_bytes(b"b" * 6000)
    outbox.add(src)
    link = Link(outbox, store)
    link.run()
    assert [e.reason for e in link.errors] == [Reason.QUOTA_EXCEEDED]
    assert len(storage.media()) == 1
    assert [p for p in (tmp_path / "backend" / "incoming").rglob("*") if p.is_file()] == []


# --- the quarantine is bounded in count and in time -------------------------------------------
def _fail_verification(store: MediaStore, data: bytes, name: str, now: float) -> None:
    m, signed = signed_for(data, name=name, sha=hashlib.sha256(b"not " + data).digest())
    store.handle(DEV, PUB, RecordKind.MEDIA_MANIFEST, signed, now)
    with pytest.raises(MediaRejected):
        send_all(store, m, data, now)


def test_the_quarantine_keeps_few_files_per_device_and_not_for_ever(tmp_path: Path) -> None:
    store = MediaStore(tmp_path / "backend", Storage(tmp_path / "backend.db"), durable=False,
                       quarantine_keep=3, quarantine_ttl=3600.0)
    now = time.time()
    for i in range(10):  # one device failing verification on purpose, again and again
        _fail_verification(store, bytes([i]) * 5000, f"f{i}.bin", now + i)
    quarantined = stored_files(tmp_path, "quarantine")
    assert len(quarantined) == 3
    assert {p.stat().st_mtime for p in quarantined} == {now + 7, now + 8, now + 9}  # the newest
    store.expire(now + 100)
    assert len(stored_files(tmp_path, "quarantine")) == 3
    store.expire(now + 100 + 3600)  # the next sweep (hourly) finds them all past their time
    assert stored_files(tmp_path, "quarantine") == []
    assert list((tmp_path / "backend" / "quarantine").iterdir()) == []


# --- transfer state: written incrementally, never rewritten whole ------------------------------
def test_acks_and_status_requests_rewrite_only_what_changed_in_the_transfer_state(tmp_path: Path) -> None:
    chunks = 1_048_576  # a 1 GiB file of 1 KiB chunks: a 128 KiB bitmap
    store = MediaStore(tmp_path / "backend", Storage(tmp_path / "backend.db"), limits=MediaLimits(max_size=1 << 31))
    m = Manifest.create(device_id=DEV, name="big.bin", content_type="video/mp4", size=chunks * 1024,
                        sha256=os.urandom(32), created=1, chunk_size=1024)
    store.handle(DEV, PUB, RecordKind.MEDIA_MANIFEST, sign_manifest(KEY, m), 1000.0)
    state = tmp_path / "backend" / "incoming" / DEV / f"{m.transfer_id.hex()}.state"
    bits = state.with_suffix(".bits")
    manifest_state = state.read_bytes()
    state_before = (state.stat().st_ino, state.stat().st_mtime_ns)
    status = Control(ControlOp.STATUS, m.transfer_id).encode()
    for _ in range(20):  # a status request changes nothing: nothing is written
        store.handle(DEV, PUB, RecordKind.MEDIA_CONTROL, status, 1001.0)
    assert (state.stat().st_ino, state.stat().st_mtime_ns) == state_before
    before = (state.stat().st_ino, bits.stat().st_ino, bits.stat().st_mtime_ns)
    for _ in range(20):
        store.handle(DEV, PUB, RecordKind.MEDIA_CONTROL, status, 1001.5)
    assert (state.stat().st_ino, bits.stat().st_ino, bits.stat().st_mtime_ns) == before
    every = store.limits.ack_every
    for i in range(every):  # chunks far into the file: one ack, one block of the bitmap written
        store.handle(DEV, PUB, RecordKind.MEDIA_CHUNK, encode_chunk(m.transfer_id, 900_000 + i, b"z" * 1024), 1002.0)
    assert state.read_bytes() == manifest_state and state.stat().st_ino == before[0]
    assert bits.stat().st_ino == before[1] and bits.stat().st_size == chunks // 8
    assert bits.stat().st_blocks * 512 <= 16 * BLOCK  # sparse: only the touched block holds data
    # a restart resumes from exactly these files
    again = MediaStore(tmp_path / "backend", Storage(tmp_path / "backend.db"), limits=MediaLimits(max_size=1 << 31))
    [(device, manifest, received)] = again.open_transfers()
    assert (device, manifest, received) == (DEV, m, every)


def test_a_transfer_state_of_the_previous_layout_is_resumed(tmp_path: Path) -> None:
    data = os.urandom(40_000)
    m, signed = signed_for(data)
    store = new_store(tmp_path)
    store.handle(DEV, PUB, RecordKind.MEDIA_MANIFEST, signed, 1.0)
    incoming = tmp_path / "backend" / "incoming" / DEV
    bitmap = bytearray((m.chunk_count + 7) // 8)
    bitmap[0] = 0xC0  # chunks 0 and 1
    for i in (0, 1):
        chunk = encode_chunk(m.transfer_id, i, data[i * 4096:(i + 1) * 4096])
        store.handle(DEV, PUB, RecordKind.MEDIA_CHUNK, chunk, 1.0)
    (incoming / f"{m.transfer_id.hex()}.state").write_bytes(cbor.dumps({1: signed, 2: bytes(bitmap)}))
    (incoming / f"{m.transfer_id.hex()}.bits").unlink()
    again = new_store(tmp_path)
    assert [t[2] for t in again.open_transfers()] == [2]
    assert (incoming / f"{m.transfer_id.hex()}.bits").read_bytes() == bytes(bitmap)


@settings(max_examples=200, deadline=None)
@given(created=st.integers(min_value=0, max_value=2**64 - 1))
def test_a_decoded_creation_time_always_fits_a_datetime_and_sqlite(created: int) -> None:
    data = b"d"
    sha = hashlib.sha256(data).digest()
    m = Manifest(transfer_id(DEV, sha, 1, "d.bin"), DEV, "d.bin", "image/png", 1, sha, created, 1024, 1)
    try:
        decoded = decode_manifest(m.to_cbor())
    except SealmqError:
        assert created > MAX_CREATED
        return
    assert decoded.created == created <= MAX_CREATED
    datetime.fromtimestamp(decoded.created, UTC)
    assert decoded.created < 2**63


def test_a_device_flooding_garbage_through_a_real_broker_leaves_a_bounded_honest_trail(tmp_path: Path) -> None:
    system = System(tmp_path, ["cam-1", "cam-2"])
    try:
        backend = system.start_backend()
        system.agent("cam-2")  # a well-behaved neighbour with a session
        flood = MqttLink(system.mqtt("device", "cam-1", client_id="cam-1:flood"), lambda t, p: None, [])
        flood.start()
        system.closers.append(flood.stop)
        topic = topics.topic("cam-1", Channel.DATA, Direction.UP)
        sent = 500
        for i in range(sent):  # what one device login can publish: garbage on its own topic
            flood.publish(topic, i.to_bytes(4, "big") * 10)
        assert wait_for(lambda: backend.counters["rejected"] >= sent, 30)
        system.stop_backend()  # closing the audit log summarises what was not written
        entries = system.audit()
        written = [e for e in entries if e["event"] == "message_rejected" and e.get("device") == "cam-1"]
        summaries = [e for e in entries if e["event"] == "audit_suppressed" and e.get("device") == "cam-1"]
        assert len(written) <= AuditThrottle().burst + 5
        assert len(written) + sum(e["suppressed"] for e in summaries) == sent
        assert any(e["event"] == "handshake_completed" and e.get("device") == "cam-2" for e in entries)
    finally:
        system.close()


def test_metrics_and_the_console_count_what_the_throttled_trail_summarised(tmp_path: Path) -> None:
    clock = [1000.0]
    audit = AuditLog(tmp_path / "log.jsonl", component="backend", clock=lambda: clock[0])
    metrics, feed = BackendMetrics(), ConsoleFeed()
    audit.listeners += [metrics.on_audit, feed.on_audit]
    for _ in range(500):
        audit.event("message_rejected", device="evil", reason=Reason.REPLAY, stage="record")
    audit.close()  # the summary reaches the listeners like any written entry
    assert b'sealmq_backend_rejections_total{event="message_rejected",reason="replay"} 500.0' in metrics.exposition()
    assert feed.device_stats()["evil"].rejections == 500
    assert len(feed.audit_entries(limit=1000)) == AuditThrottle().burst + 1  # the written ones and one summary
