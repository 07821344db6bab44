"""The short chaos run (bench/chaos.py) on both brokers: broker, backend and devices killed with
SIGKILL at random moments (a fixed seed), and nothing lost, nothing duplicated, every file
verified. The long run is ``python3 -m bench.chaos`` (results in docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import run_chaos
from tests.brokers import needs_mosquitto

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("broker", ["amqtt", pytest.param("mosquitto", marks=[pytest.mark.mosquitto, needs_mosquitto])])
def test_short_chaos_run_loses_and_duplicates_nothing(tmp_path: Path, broker: str) -> None:
    result = run_chaos(tmp_path, broker=broker, seconds=12, devices=2, rate=15, files=1, seed=7, mean_gap=1.5,
                       settle_timeout=40, say=lambda _: None)
    assert sum(result.kills.values()) >= 3, result.line()  # the run did kill things
    assert result.settled, result.line()
    assert (result.lost, result.duplicated, result.logged_not_sent) == (0, 0, 0), result.line()
    assert result.sent > 100 and result.stored == result.sent, result.line()
    assert result.files_verified == result.files_sent == 2, result.line()


@pytest.mark.mosquitto
@needs_mosquitto
def test_three_workers_one_killed_at_a_time_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    # Issue 14: three backend workers in one MQTT 5 share group on mosquitto, sessions in a real
    # redis-server, one SQLite database; workers (only) are SIGKILLed mid-stream and restarted.
    from tests.redis_server import REDIS_SERVER

    if REDIS_SERVER is None:
        pytest.skip("redis-server (Debian redis-server) not installed")
    result = run_chaos(tmp_path, broker="mosquitto", workers=3, victims=("backend",), seconds=14, devices=3,
                       rate=15, files=1, seed=11, mean_gap=2.5, settle_timeout=60, say=lambda _: None)
    assert result.kills["backend"] >= 2, result.line()  # workers did die mid-stream
    assert result.backends_storing >= 3, result.line()  # the stream was spread over several processes
    assert result.settled, result.line()
    assert (result.lost, result.duplicated, result.logged_not_sent) == (0, 0, 0), result.line()
    assert result.sent > 150 and result.stored == result.sent, result.line()
    assert result.files_verified == result.files_sent == 3, result.line()
