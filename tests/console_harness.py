"""A running console for tests: the end-to-end System (real broker, backend, devices) plus the console
on an ephemeral loopback port with its broker view, and an HTTP client for it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from backend.console.auth import CONSOLE_MONITOR
from backend.console.server import Console, ConsoleSettings
from tests.e2e import System


class ConsoleUnderTest:
    def __init__(self, system: System) -> None:
        self.system = system
        backend = system.backend or system.start_backend()
        monitor = system.mqtt("monitor", CONSOLE_MONITOR, clean_session=True)
        self.console = Console(backend, ConsoleSettings(host="127.0.0.1", port=0, auth_file=system.dep.console_auth,
                                                        monitor=monitor)).start()
        self.password = system.dep.console_password_file.read_text().strip()
        self.base = self.console.url.rstrip("/")

    def client(self, *, authenticated: bool = True) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.password}"} if authenticated else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=10, follow_redirects=False)

    def stop(self) -> None:
        self.console.stop()


@contextmanager
def running_console(root: Path, device_ids: list[str]) -> Iterator[ConsoleUnderTest]:
    system = System(root, device_ids)
    try:
        system.start_backend()
        cut = ConsoleUnderTest(system)
        try:
            yield cut
        finally:
            cut.stop()
    finally:
        system.close()
