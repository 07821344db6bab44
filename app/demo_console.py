"""The console's part of ``sealmq demo``: start it beside the demo's backend, keep traffic going."""

from __future__ import annotations

import signal
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


def stop_on_signals(stop: threading.Event) -> dict[int, Any]:
    """SIGINT and SIGTERM set ``stop`` from now on (main thread only; elsewhere nothing changes), as
    the backend and device services do. A process started with SIGINT ignored (a background job of
    a non-interactive shell) stops on it too. Returns the previous handlers, for
    :func:`restore_signals`."""
    handlers: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda *_: stop.set())
    return handlers


def restore_signals(handlers: dict[int, Any]) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def serve_demo(agents: Sequence[Any], step: int, say: Callable[[str], object], interval: float = 1.0,
               stop: threading.Event | None = None) -> None:
    """Telemetry from every device until ``stop`` is set, so that the console has something live to
    show. Without a ``stop`` of the caller's, SIGINT (Ctrl-C) and SIGTERM set one here
    (:func:`stop_on_signals`). The event is checked between rounds, so no KeyboardInterrupt lands in
    the middle of ``send_telemetry`` (an outbox transaction, a lock held) before the shutdown."""
    handlers = {}
    if stop is None:
        stop = threading.Event()
        handlers = stop_on_signals(stop)
    say("      the demo keeps running for the console; Ctrl-C to stop")
    try:
        while not stop.is_set():
            for agent in agents:
                agent.send_telemetry(telemetry_for(agent.config.device_id, step))
            step += 1
            stop.wait(interval)
    finally:
        restore_signals(handlers)
