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
