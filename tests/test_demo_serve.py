"""``sealmq demo``: Ctrl-C and SIGTERM stop it at the next check, however it was started.

The demo used to end its ``--serve`` loop by a KeyboardInterrupt, and so depended on Python's
default SIGINT handler. A process started with SIGINT ignored (a background job of a
non-interactive shell, as a CI runner may start the tests) has no such handler: a fresh-clone
``.ci/run`` started that way failed tests/test_console_browser.py, whose SIGINT the demo ignored
until it was killed. The demo now sets its own handlers (as ``sealmq backend run`` and ``sealmq
device simulate`` do) for its whole run; the signal only sets an event, checked between rounds, so
it never lands in the middle of ``send_telemetry`` (an outbox transaction, a lock held).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.demo_console import serve_demo
from runtime import exits


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
    stop = threading.Event()
    handlers = exits.stop_on_signals(stop)  # as run_demo does
    try:
        serve_demo(agents, 0, lambda _: None, stop, interval=0.01)  # returns: no KeyboardInterrupt
    finally:
        exits.restore_signals(handlers)
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
    serve_demo([agent], 5, lambda _: None, stop, interval=0.01)
    assert agent.calls  # at least one round ran, and the loop returned


def test_the_demo_stops_on_sigint_even_when_started_with_sigint_ignored(tmp_path: Path) -> None:
    """The CI failure itself: the demo started with SIGINT ignored, and SIGINT sent during its main
    run (before the --serve loop): it ends with 130 within seconds, after its cleanup."""
    demo = [sys.executable, "-m", "app.cli", "demo", "--dir", str(tmp_path / "demo"), "--port", "0",
            "--console", "off", "--duration", "30", "--serve"]
    proc = subprocess.Popen(  # `trap '' INT`: SIGINT ignored, and still ignored after exec
        ["bash", "-c", 'trap "" INT; exec "$@"', "demo", *demo],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parents[1],
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[4/5]"):
            break
    proc.send_signal(signal.SIGINT)  # in the 30 s main run, long before the serve loop
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the demo ignored SIGINT:\n" + "".join(lines)) from None
    rest = proc.stdout.read()
    assert code == 130, "".join(lines) + rest
    assert "interrupted" in rest
