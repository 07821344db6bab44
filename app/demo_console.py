"""The console's part of ``sealmq demo``: start it beside the demo's backend, keep traffic going."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from backend.console.auth import CONSOLE_MONITOR
from backend.console.server import Console, ConsoleSettings, parse_http
from device.simulator import telemetry_for
from runtime.mqtt import MqttSettings


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (the demo's broker and console fall back to any port)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def start_demo_console(backend: Any, dep: Any, broker_port: int, where: str, say: Callable[[str], object]) -> Any:
    """The console on ``where`` (HOST:PORT, or 'off'), with the broker view as the monitor account."""
    if where == "off":
        return None
    host, port = parse_http(where)
    if port and not port_free(host, port):
        say(f"      console port {port} is busy; using a free port instead")
        port = 0
    monitor = MqttSettings(port=broker_port, username=CONSOLE_MONITOR,
                           password=dep.password("monitor", CONSOLE_MONITOR), clean_session=True)
    console = Console(backend, ConsoleSettings(host=host, port=port, auth_file=dep.console_auth,
                                               monitor=monitor)).start()
    say(f"      console: {console.url}  (password: {dep.console_password_file.resolve()}; "
        f"metrics: {console.url}metrics)")
    return console


def serve_demo(agents: Sequence[Any], step: int, say: Callable[[str], object], stop: threading.Event,
               interval: float = 1.0) -> None:
    """Telemetry from every device until ``stop`` is set (the demo sets it on Ctrl-C and SIGTERM,
    ``runtime.exits.stop_on_signals``), so that the console has something live to show. The event
    is checked between rounds: nothing interrupts ``send_telemetry`` (an outbox transaction, a lock
    held) before the shutdown."""
    say("      the demo keeps running for the console; Ctrl-C to stop")
    while not stop.is_set():
        for agent in agents:
            agent.send_telemetry(telemetry_for(agent.config.device_id, step))
        step += 1
        stop.wait(interval)
