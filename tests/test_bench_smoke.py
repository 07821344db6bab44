"""Smoke test for bench/: each benchmark runs end to end with tiny parameters, so none of them rots.

It asserts structure and correctness of what the benchmarks measure (every handshake completes,
every message is delivered, the tables have their rows), never a timing.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from bench import broker, handshake, ingest, memory, records, run
from bench.stats import balanced_order, median_cell, median_interval, percentile, ratio_cell, table
from tests.brokers import needs_mosquitto


def test_stats_helpers() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 90) == 5.0
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert table(["a", "b"], [["x", "1,234"]]).splitlines() == ["| a | b |", "|---|---:|", "| x | 1,234 |"]


def test_median_interval_order_statistics() -> None:
    # the k-th smallest and largest of n samples, k from the binomial: n = 5 -> 1st and 5th
    # (coverage 1 - 2/32 = 0.94); n = 11 -> 3rd and 9th (0.93; the 4th and 8th give only 0.77)
    assert median_interval([5.0, 1.0, 4.0, 2.0, 3.0]) == (1.0, 5.0)
    assert median_interval([float(x) for x in range(11, 0, -1)]) == (3.0, 9.0)
    assert median_interval([float(x) for x in range(40)], 0.95) == (13.0, 26.0)
    assert median_interval([1.0, 2.0, 3.0, 4.0]) is None  # 1 - 2/16 < 0.90
    assert median_interval([]) is None
    assert median_cell([0.47, 0.41, 0.37, 0.54, 0.49]) == "0.47 [0.37-0.54]"
    assert median_cell([1.0, 2.0]) == "1.50"  # too few runs for an interval
    assert ratio_cell([0.9, 1.1, 1.0, 0.8, 1.2]) == "1.00x [0.80-1.20]"
    assert ratio_cell([0.9]) == "0.90x" and ratio_cell([]) == "-"


@pytest.mark.parametrize("n", [5, 11, 16])
def test_median_interval_covers_the_median_as_often_as_it_says(n: int) -> None:
    # skewed samples (exponential, true median ln 2): the 90 % interval must hold it in at least
    # 90 % of 4,000 draws, and not in (nearly) all of them, which a too-wide interval would
    rng = random.Random(n)
    true_median = 0.6931471805599453
    hits = 0
    for _ in range(4000):
        lo_hi = median_interval([rng.expovariate(1.0) for _ in range(n)])
        assert lo_hi is not None
        hits += lo_hi[0] <= true_median <= lo_hi[1]
    assert 0.89 <= hits / 4000 <= 0.99


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_balanced_order_runs_each_path_once_per_round_after_each_other_equally_often(n: int) -> None:
    items = [f"path-{i}" for i in range(n)]
    cycle = n if n % 2 == 0 else 2 * n
    rounds = [balanced_order(items, k) for k in range(cycle)]
    assert all(sorted(r) == items for r in rounds)
    for position in range(n):  # each path once in each position (twice for an odd n)
        assert sorted(r[position] for r in rounds) == sorted(items * (cycle // n))
    follows = Counter((a, b) for r in rounds for a, b in itertools.pairwise(r))
    if n > 1:
        assert len(follows) == n * (n - 1) and len(set(follows.values())) == 1
    assert balanced_order(items, cycle) == rounds[0]


def test_handshake_bench_quick() -> None:
    out = handshake.run(runs=2, warmup=0)
    for case in handshake.CASES:
        assert f"EDHOC {case.label} |" in out
    assert "TLS 1.3 mutual auth" in out
    # suite 2 with x5t reproduces the sizes the EDHOC authors publish for message_1 and message_3;
    # suite 6's message_3 is 8 bytes longer: A128GCM's 16-byte tag instead of CCM's 8
    for suite, m3 in ((2, "90"), (6, "98")):
        row = next(line for line in out.splitlines() if f"suite {suite} (" in line and "x5t (measured)" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "37"
        assert cells[3] == m3


def test_edhoc_runner_agrees_and_tls_handshakes(tmp_path: Path) -> None:
    pki = handshake.BenchPki(tmp_path / "pki")
    sample = handshake.edhoc_runner(pki, handshake.CASES[1])()  # raises if the sides disagree
    assert sample.sizes[1] > 300  # x5chain carries the backend's certificate
    client, server = handshake.tls_contexts(pki)
    t = handshake.tls_once(client, server)
    assert t.client_cpu > 0 and t.server_cpu > 0
    flights = handshake.tls_flight_sizes(client, server)
    assert len(flights) == 3 and min(flights) > 0


def test_cold_handshakes_leave_the_warm_cases_warm(tmp_path: Path) -> None:
    """A cold case clears its own store's cache, not the shared store the warm cases use."""
    pki = handshake.BenchPki(tmp_path / "pki")
    warm = next(c for c in handshake.CASES if c.suite == 0 and not c.cold)
    cold = next(c for c in handshake.CASES if c.cold)
    handshake.edhoc_runner(pki, warm)()
    cached = set(pki.trust_store._verified)
    assert len(cached) == 2  # the device's chain and the backend's
    handshake.edhoc_runner(pki, cold)()
    assert cached <= set(pki.trust_store._verified)


def test_records_bench_quick() -> None:
    out = records.run(quick=True)
    assert out.count("Session.seal / open, suite 6 (A128GCM, the default)") == len(records.SIZES)
    assert out.count("Session.seal / open, suite 2 (AES-CCM-16-64-128)") == len(records.SIZES)
    assert out.count("reference record path (before)") == len(records.SIZES)
    assert out.count("the same, Python framing (no C compiler)") == 2 * len(records.SIZES)
    assert "65,000 B" in out


def test_ingest_bench_quick_stores_nothing_twice() -> None:
    out = ingest.run(quick=True)
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith(("| SQLite", "| PostgreSQL"))]
    assert len(rows) >= 2  # SQLite's two cases (PostgreSQL's two when it is installed)
    assert all(cells[-1].strip() == "0" for cells in rows)  # two workers on one device included


@pytest.mark.slow
def test_broker_bench_quick_amqtt() -> None:
    out = broker.run(messages=30, repeats=1, devices=3, brokers=("amqtt",))
    rows = [line for line in out.splitlines() if line.startswith("| amqtt")]
    assert len(rows) == len(broker.MODES) + 2
    # every throughput run delivered every message, and each party's CPU per message was measured
    assert all(re.search(r"\| all \|( [\d.,]+ \|){3}$", r) for r in rows[: len(broker.MODES)])
    # all 3 simulated devices established a session, and the backend counted 3 handshakes, with
    # the simulator's shared network thread and with a paho loop thread per device
    storms = [[c.strip() for c in r.split("|")] for r in rows[-2:]]
    assert [s[2:7] for s in storms] == [["3", "1", "shared: 2 per process", "3", "3"],
                                        ["3", "1", "2 per device", "3", "3"]]


def test_broker_bench_runs_only_the_paths_asked_for_with_plaintext() -> None:
    out = broker.run(messages=30, repeats=5, brokers=("amqtt",), storm=False, paths=("sealed",))
    rows = [[c.strip() for c in line.split("|")] for line in out.splitlines() if line.startswith("| amqtt")]
    assert [r[2] for r in rows] == ["plaintext", "sealed"]  # plaintext is the base of the ratios
    assert all(r[10] == "all" for r in rows)  # every message delivered
    # 5 rounds: the median ratio has its 90 % interval, the smallest and largest round (n = 5)
    each = [float(x) for x in rows[1][7].split(" / ")]
    assert len(each) == 5
    assert rows[1][6] == f"{sorted(each)[2]:.2f}x [{min(each):.2f}-{max(each):.2f}]"


def test_broker_bench_holds_devices_online_during_the_rounds() -> None:
    # 5 devices log in and hold their three filters each (every CONNACK and SUBACK checked in their
    # process, which would stop the run on a refusal) while plaintext and sealed run
    out = broker.run(messages=30, repeats=1, brokers=("amqtt",), storm=False, paths=("sealed",), online=5)
    assert "median of 1 runs, 5 more devices online" in out
    rows = [[c.strip() for c in line.split("|")] for line in out.splitlines() if line.startswith("| amqtt")]
    assert [(r[2], r[10]) for r in rows] == [("plaintext", "all"), ("sealed", "all")]


def test_broker_ratios_pair_runs_of_the_same_round() -> None:
    # round k of a path is divided by round k of plaintext; a round where either delivered nothing
    # (rate 0) is left out rather than counted as 0x or infinite
    assert broker.paired_ratios([900.0, 1800.0, 0.0, 500.0], [1000.0, 2000.0, 1000.0, 0.0]) == [0.9, 0.9]
    assert broker.paired_ratios([1.0], []) == []


def test_ab_trees_compares_two_trees_interleaved() -> None:
    from bench import ab_trees

    repo = Path(__file__).resolve().parents[1]
    out = ab_trees.run(repo, repo, size=64, rounds=2)
    rows = [cells for cells in (line.split("|") for line in out.splitlines()) if len(cells) == 6
            and cells[1].strip() in ab_trees.LABELS]
    assert [r[1].strip() for r in rows] == list(ab_trees.LABELS)
    for r in rows:  # the same tree on both sides: figures measured, and a ratio near 1
        assert float(r[2]) > 0 and float(r[3]) > 0 and 0.2 < float(r[4]) < 5


def test_run_entry_point_parses() -> None:
    assert run.PARTS == ("handshake", "method3", "records", "memory", "broker", "media", "state", "ingest", "workers")


def test_memory_bench_quick() -> None:
    out = memory.run(sessions=3)
    assert "3 sessions held" in out
    assert "| tracemalloc (Python heap) |" in out and "| RSS (everything, incl. OpenSSL) |" in out


def test_shared_state_bench_quick() -> None:
    from bench import shared_state
    from tests.postgres import BINDIR
    from tests.redis_server import REDIS_SERVER

    out = shared_state.run(quick=True)
    assert "| replay gate, in process (1 worker) |" in out and "| store one record, SQLite |" in out
    if REDIS_SERVER is not None:
        assert "| replay gate, Redis Lua script |" in out and "| sender number, Redis INCRBY |" in out
    if BINDIR is not None:
        assert "| store one record, PostgreSQL |" in out


@pytest.mark.slow
@pytest.mark.mosquitto
@needs_mosquitto
def test_broker_storm_quick_mosquitto_password_and_tls() -> None:
    """The storm on mosquitto's password listener and on its TLS listener (certificate logins)."""
    out = broker.run(devices=3, brokers=("mosquitto", "mosquitto-tls"), throughput=False, storm_repeats=2)
    rows = {(c[1], c[4]): c for c in ([x.strip() for x in line.split("|")] for line in out.splitlines()
                                      if line.startswith("| mosquitto"))}
    threads = ("shared: 2 per process", "2 per device")
    assert set(rows) == {(v, t) for v in ("mosquitto", "mosquitto-tls") for t in threads}
    for cells in rows.values():
        # 3 devices, 1 process, all 3 established in both runs, 3 handshakes each time
        assert cells[2:4] == ["3", "1"] and cells[5:7] == ["3", "3"]
        assert len(cells[9].split(" / ")) == 2  # both runs shown
    for t in threads:
        assert "client certificate" in rows["mosquitto-tls", t][15]
        assert "PBKDF2" in rows["mosquitto", t][15]


@pytest.mark.slow
def test_workers_bench_quick() -> None:
    """1, 2 and 4 workers on mosquitto (SQLite): every message stored once, every worker of a share group
    stored some, every simulated device got a session, and the shared-state latency rows are there."""
    from bench import workers
    from bench.broker import mosquitto_available
    from tests.redis_server import HAVE_REDIS_PY, REDIS_SERVER

    if not mosquitto_available() or REDIS_SERVER is None or not HAVE_REDIS_PY:
        pytest.skip("needs mosquitto, redis-server and redis-py")
    out = workers.run(quick=True, postgres=False)
    for case in workers.CASES:
        row = next(line for line in out.splitlines() if line.startswith(f"| {case.label} | SQLite |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[5:] == ["0", "0", str(case.workers)]  # lost, duplicated, workers that stored
        storm = next(line for line in out.splitlines() if line.startswith(f"| {case.label} | 4 |"))
        assert [c.strip() for c in storm.strip("|").split("|")][2:4] == ["4/4", "4"]
    assert out.count("**added per record**") == 3
