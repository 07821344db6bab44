"""Media end to end through real brokers: signed, chunked, resumable transfers from the device
agent to the backend service, with an eavesdropper, and with the broker, the backend or the
device restarted in the middle of a transfer."""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.media import MediaRecord, list_media
from backend.storage import db_path
from sealmq.media_receiver import DEFAULT_ACK_EVERY
from tests.brokers import needs_mosquitto
from tests.e2e import Recorder, System, wait_for

pytestmark = pytest.mark.slow

BROKERS = ["amqtt", pytest.param("mosquitto", marks=[pytest.mark.mosquitto, needs_mosquitto])]
IMG = Path(__file__).resolve().parents[1] / "img"


@pytest.fixture(params=BROKERS)
def system(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[System]:
    sys_ = System(tmp_path, ["cam-1", "cam-2"], broker=request.param)
    try:
        yield sys_
    finally:
        sys_.close()


def random_file(path: Path, size: int) -> Path:
    rnd = random.Random(size)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rnd.randbytes(n))
            left -= n
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def received(system: System) -> dict[str, MediaRecord]:
    return {r.sha256: r for r in list_media(db_path(system.dep.backend_data))}


def assert_stored(system: System, path: Path, device_id: str = "cam-1") -> MediaRecord:
    digest = sha256_file(path)
    rec = received(system)[digest]
    assert rec.device_id == device_id
    assert rec.signature_verified
    assert rec.size == path.stat().st_size
    stored = system.dep.backend_data / rec.stored_path
    assert sha256_file(stored) == digest  # byte-identical on disk
    return rec


def test_images_and_a_50mb_video_arrive_identical_and_unseen(system: System, tmp_path: Path) -> None:
    recorder = Recorder(system)
    system.start_backend()
    agent = system.agent("cam-1")
    images = sorted(p for p in IMG.iterdir() if p.suffix in {".png", ".apng"})
    assert len(images) >= 3
    video = random_file(tmp_path / "secret-name-holiday-video.mp4", 50 * 1024 * 1024)
    for p in images:
        agent.send_file(p)
    agent.send_file(video, "video/mp4")
    assert agent.wait_transfers(240), agent.outbox.transfers
    for p in [*images, video]:
        assert_stored(system, p)
    time.sleep(0.3)
    captured = recorder.snapshot()
    recorder.stop()
    blob = b"\x00".join(p for _, p in captured)
    assert len(blob) > 50 * 1024 * 1024  # the whole video did cross the broker
    rnd = random.Random(1)
    data = video.read_bytes()
    for _ in range(300):  # no 24-byte window of the video appears in anything relayed
        off = rnd.randrange(0, len(data) - 24)
        assert data[off:off + 24] not in blob
    for p in images:  # nor of the images (their PNG signatures and chunk bytes)
        img = p.read_bytes()
        assert img[8:40] not in blob
    for name in [video.name, *(p.name for p in images)]:
        assert name.encode() not in blob
    events = [e for e in system.audit() if e["event"] == "transfer_completed"]
    assert len(events) == len(images) + 1
    assert all(video.name not in str(e) for e in system.audit())  # no file names in the audit log


def test_broker_restart_mid_transfer(system: System, tmp_path: Path) -> None:
    backend = system.start_backend()
    agent = system.agent("cam-1")
    f = random_file(tmp_path / "clip.bin", 12 * 1024 * 1024)
    agent.send_file(f)
    assert wait_for(lambda: any(n > 20 for _, _, n in backend.media.open_transfers()), 30)
    system.restart_broker(downtime=1.0)
    assert agent.wait_transfers(120)
    assert_stored(system, f)


def test_backend_restart_mid_transfer(system: System, tmp_path: Path) -> None:
    backend = system.start_backend()
    agent = system.agent("cam-1")
    f = random_file(tmp_path / "clip.bin", 12 * 1024 * 1024)
    agent.send_file(f)
    # past the first ack: the backend writes its bitmap at every ack (DEFAULT_ACK_EVERY chunks)
    assert wait_for(lambda: any(n > DEFAULT_ACK_EVERY for _, _, n in backend.media.open_transfers()), 30)
    system.stop_backend()
    backend = system.start_backend()
    assert any(n > 0 for _, _, n in backend.media.open_transfers())  # resumes from persisted state
    assert agent.wait_transfers(120)
    assert_stored(system, f)
    assert len(received(system)) == 1


def test_device_restart_mid_transfer(system: System, tmp_path: Path) -> None:
    backend = system.start_backend()
    agent = system.agent("cam-1")
    f = random_file(tmp_path / "clip.bin", 12 * 1024 * 1024)
    agent.send_file(f)
    assert wait_for(lambda: any(n > 20 for _, _, n in backend.media.open_transfers()), 30)
    agent.stop()  # the device dies mid-transfer; its outbox state is on disk
    agent2 = system.agent("cam-1")
    assert agent2.pending_transfers() == 1  # picked up from the persisted outbox, not re-added
    assert agent2.wait_transfers(120)
    rec = assert_stored(system, f)
    assert rec.name == "clip.bin"
    assert len(received(system)) == 1


def test_an_interrupted_transfer_resumes_with_the_new_session_not_at_a_timer_tick(system: System,
                                                                                 tmp_path: Path) -> None:
    """The restarted device's timer never ticks here (one hour): the new session itself resumes the
    transfer from the persisted outbox, as it re-sends the message outbox."""
    backend = system.start_backend()
    agent = system.agent("cam-1")
    # large enough that the device is stopped mid-transfer: at mosquitto's 100+ MB/s a 4 MiB file
    # could finish between two polls, and then there was nothing to resume (a flaky failure)
    f = random_file(tmp_path / "clip.bin", 48 * 1024 * 1024)
    agent.send_file(f)
    assert wait_for(lambda: any(n > 5 for _, _, n in backend.media.open_transfers()), 30, interval=0.002)
    agent.stop()
    agent2 = system.agent("cam-1", poll_interval=3600.0)
    assert agent2.pending_transfers() == 1
    assert agent2.wait_transfers(60)
    assert_stored(system, f)


def test_two_devices_in_parallel_and_a_finished_transfer_resent(system: System, tmp_path: Path) -> None:
    system.start_backend()
    a = system.agent("cam-1")
    b = system.agent("cam-2")
    fa = random_file(tmp_path / "a.bin", 3 * 1024 * 1024)
    fb = random_file(tmp_path / "b.bin", 3 * 1024 * 1024 + 17)
    a.send_file(fa)
    b.send_file(fb)
    assert a.wait_transfers(60)
    assert b.wait_transfers(60)
    assert_stored(system, fa, "cam-1")
    assert_stored(system, fb, "cam-2")
    a.send_file(fa)  # the same file again: recognised as finished, nothing re-stored
    assert a.wait_transfers(30)
    assert len(received(system)) == 2
    assert os.path.getsize(fa) == received(system)[sha256_file(fa)].size
