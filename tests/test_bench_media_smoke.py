"""Smoke test for bench/bench_media.py: the media benchmark runs end to end with tiny files, so it
does not rot. It checks what the benchmark relies on (the baseline's receiver, the per-process
peak-RSS reading, every transfer verified, the tables' rows), never a timing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bench_media
from bench._media_proc import vmhwm_kib
from tests.brokers import needs_mosquitto

REPO = Path(__file__).resolve().parents[1]


def test_baseline_uses_the_products_chunk_window_and_ack_scheme() -> None:
    assert bench_media.product_defaults() == (bench_media.CHUNK, bench_media.WINDOW, bench_media.ACK_EVERY)


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_plain_receiver_acks_like_the_product_hashes_and_tolerates_reorder_and_duplicates(tmp_path: Path) -> None:
    chunk = 1000
    data = os.urandom(20 * chunk + 123)  # 21 chunks, the last one short
    parts = _chunks(data, chunk)
    rx = bench_media.PlainReceiver(tmp_path / "out.bin")
    assert rx.handle(bench_media.plain_manifest(len(data), chunk, hashlib.sha256(data).digest())) == b"A" + bytes(8)
    order = [1, 0, *range(2, 21)]  # 0 and 1 swapped: the in-order hasher must catch up from disk
    replies = []
    for n, i in enumerate(order):
        replies.append(rx.handle(bench_media.plain_chunk(i, parts[i])))
        if n == 3:
            assert rx.handle(bench_media.plain_chunk(i, parts[i])) is None  # a QoS 1 duplicate
    acks = [r for r in replies if r is not None]
    every = bench_media.ACK_EVERY
    assert acks == [b"A" + k.to_bytes(8, "big") for k in range(every, 21, every)] + [b"D\x01"]
    assert (tmp_path / "out.bin").read_bytes() == data


def test_plain_receiver_reports_a_corrupted_file(tmp_path: Path) -> None:
    data = os.urandom(3000)
    rx = bench_media.PlainReceiver(tmp_path / "out.bin")
    rx.handle(bench_media.plain_manifest(len(data), 1000, hashlib.sha256(data).digest()))
    rx.handle(bench_media.plain_chunk(0, data[:1000]))
    rx.handle(bench_media.plain_chunk(1, b"\x00" * 1000))
    assert rx.handle(bench_media.plain_chunk(2, data[2000:])) == b"D\x00"
    assert rx.ok is False


def test_peak_rss_is_the_childs_own_not_the_parents(tmp_path: Path) -> None:
    ballast = b"\x01" * (120 << 20)  # this process: > 120 MiB resident
    assert vmhwm_kib() > 120 * 1024
    code = ("import sys; from bench._media_proc import vmhwm_kib; b = bytearray(int(sys.argv[1]) << 20); "
            "b[::4096] = b'x' * len(b[::4096]); print(vmhwm_kib())")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    small = int(subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True, env=env,
                               check=True).stdout)
    big = int(subprocess.run([sys.executable, "-c", code, "64"], capture_output=True, text=True, env=env,
                             check=True).stdout)
    assert small < 64 * 1024  # not inherited from this 120 MiB parent
    assert big > small + 60 * 1024  # and it does see the child's own 64 MiB
    # the CLI wrapper writes the figure even when the command fails (no subcommand: exit 2)
    out = tmp_path / "hwm"
    done = subprocess.run([sys.executable, "-m", "bench._media_proc", str(out)], capture_output=True, env=env,
                          cwd=REPO, check=False)
    assert done.returncode == 2
    assert 1024 < int(out.read_text()) < 100 * 1024
    del ballast


def _rows(markdown: str, prefix: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith(f"| {prefix} |")]


def test_fixed_and_per_mb_is_the_line_through_two_transfers() -> None:
    mb = bench_media.MB
    # 10 ms per transfer plus 6 ms per MB: 310 ms for 50 MB, 70 ms for 10 MB
    fixed, per_mb = bench_media.fixed_and_per_mb(0.310, 0.070, 50 * mb, 10 * mb)
    assert (round(fixed, 9), round(per_mb, 9)) == (10.0, 6.0)
    large = {m: [0.310, 0.300] for m in bench_media.MODES}
    small = {m: [0.070, 0.068] for m in bench_media.MODES}
    # sealed: 20 ms per transfer and 7 ms per MB; its second round failed: left out, not zero
    large["sealed"], small["sealed"] = [0.370, None], [0.090, 0.091]
    by_mode = {r[1]: r for r in bench_media.split_rows("b", large, small, 50 * mb, 10 * mb)}
    # plaintext: 6.0 and 5.8 ms per MB in its two rounds, 10 ms per transfer in both
    assert by_mode["plaintext"][2:] == ["5.90", "169", "1.00x", "10.0", "0.0"]
    assert by_mode["sealed"][2:] == ["7.00", "143", "0.86x", "20.0", "10.0"]


def _check(out: str, kind: str, also: int = 0) -> None:
    rows = _rows(out, kind)
    by_mode = [r for r in rows if r[1] in bench_media.MODES]
    n = len(bench_media.MODES)
    # the main size's table, one table per other size, then the fixed / per-MB split
    throughput, split = by_mode[:n], by_mode[(1 + also) * n:]
    others = [by_mode[(1 + k) * n:(2 + k) * n] for k in range(also)]
    assert len(by_mode) == (2 + also) * n
    assert [r[1] for r in split] == list(bench_media.MODES)  # the fixed / per-MB split of each path
    assert split[0][6] == "0.0"  # plaintext against itself
    memory = [r for r in rows if len(r) == 7 and r not in by_mode]
    growth = [r for r in rows if len(r) == 4]
    for table in (throughput, *others):
        assert [r[1] for r in table] == list(bench_media.MODES)
        for r in table:
            assert len(r) == 7 and r[6] == "1/1", r  # the transfer completed and the stored bytes hash to the source
            assert float(r[3]) > 0
            assert r[4].endswith("x") and r[5] == r[4][:-1]  # one round: its ratio is the median
        assert table[0][4] == "1.00x"  # plaintext against itself
    assert [r[1] for r in memory] == ["100 kB", "600 kB"]
    for r in memory:
        assert r[6] == "yes", r
        device, backend, broker = (float(x) for x in r[2:5])
        assert device > 10 and backend > 10 and broker > 1  # a real figure from each process
    assert len(growth) == 1 and all(c.endswith("x") for c in growth[0][1:])


@pytest.mark.slow
def test_media_bench_tiny_amqtt() -> None:
    out = bench_media.run(brokers=("amqtt",), size=300_000, repeats=1, memory_sizes=(100_000, 600_000),
                          also=(200_000,))
    _check(out, "amqtt", also=1)
    assert "### Media throughput: one 200 kB file, the same rounds and scheme" in out


@pytest.mark.slow
@pytest.mark.mosquitto
@needs_mosquitto
def test_media_bench_tiny_mosquitto() -> None:
    out = bench_media.run(brokers=("mosquitto",), size=300_000, repeats=1, memory_sizes=(100_000, 600_000),
                          also=())
    _check(out, "mosquitto")
