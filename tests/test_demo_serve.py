"""``sealmq demo --serve``: Ctrl-C and SIGTERM stop the telemetry loop between rounds.

The loop used to end by a KeyboardInterrupt raised wherever the main thread was, possibly inside
a device's ``send_telemetry`` (an outbox transaction, a lock held). One fresh-clone CI run saw the
demo not finish its shutdown within 20 s of a SIGINT (tests/test_console_browser.py); it did not
happen again in 13 tries here, and this was the one place that could leave a lock held. The
signal now only sets an event.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from app.demo_console import serve_demo


@dataclass
class _Config:
    device_id: str


@dataclass
class _Agent:
    """Stands in for a DeviceAgent: what serve_demo calls, and whether a call was cut short."""

    config: _Config
    calls: list[dict[str, Any]] = field(default_factory=list)
    inside: bool = False

    def send_telemetry(self, values: dict[str, Any]) -> None:
        self.inside = True
        time.sleep(0.02)  # long enough for a signal to land inside, as in an outbox write
        self.calls.append(values)
        self.inside = False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_loop_between_rounds_and_restores_the_handlers(sig: signal.Signals) -> None:
    agents = [_Agent(_Config("dev-001")), _Agent(_Config("dev-002"))]
    before = signal.getsignal(sig)
    killer = threading.Timer(0.25, lambda: os.kill(os.getpid(), sig))
    killer.start()
    t0 = time.monotonic()
    serve_demo(agents, 0, lambda _: None, interval=0.01)  # returns: no KeyboardInterrupt, no exit
    killer.join()
    assert time.monotonic() - t0 < 5
    assert all(a.calls for a in agents)
    assert not any(a.inside for a in agents)  # no call was cut short
    assert len(agents[0].calls) == len(agents[1].calls)  # each round completed for every device
    assert signal.getsignal(sig) == before


def test_the_stop_event_ends_the_loop_from_another_thread() -> None:
    agent = _Agent(_Config("dev-001"))
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    serve_demo([agent], 5, lambda _: None, interval=0.01, stop=stop)
    assert agent.calls  # at least one round ran, and the loop returned
