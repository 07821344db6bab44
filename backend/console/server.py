"""Runs the console beside a backend service: uvicorn in a thread, the feed, metrics, broker monitor."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import uvicorn

from backend.console.app import ConsoleContext, create_app
from backend.console.auth import ConsoleAuth, load_hash
from backend.console.feed import ConsoleFeed
from backend.metrics import BackendMetrics
from backend.observer import attach
from runtime.mqtt import MqttLink, MqttSettings
from sealmq.errors import ConfigError, Reason

log = logging.getLogger("sealmq.console")


@dataclass(frozen=True)
class ConsoleSettings:
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port (see Console.port)
    auth_file: Path | None = None  # the salted hash; default <data>/console.auth
    monitor: MqttSettings | None = None  # the broker view's read-only account; None: no broker view
    tls_cert: Path | None = None
    tls_key: Path | None = None


def audit_tail(path: Path, max_bytes: int = 256 * 1024) -> list[dict[str, Any]]:
    """The last entries of an audit log (its current file), skipping a line cut by the tail."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    entries = []
    for line in data.splitlines()[1 if size > max_bytes else 0:]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def parse_http(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or just ``PORT``, on 127.0.0.1) of ``--http``."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(Reason.CONFIG_INVALID, f"--http wants HOST:PORT, not {text!r}") from None
    if not 0 <= number < 65536:
        raise ConfigError(Reason.CONFIG_INVALID, "console port out of range")
    return (host.strip("[]") or "127.0.0.1"), number


class Console:
    def __init__(self, service: Any, settings: ConsoleSettings) -> None:
        self.service = service
        self.settings = settings
        auth_file = settings.auth_file or Path(service.settings.data_dir) / "console.auth"
        self.feed = ConsoleFeed()
        audit_path = getattr(service.audit, "path", None)
        if audit_path is not None:
            self.feed.preload_audit(audit_tail(Path(audit_path)))
        self.metrics = BackendMetrics(service)
        attach(service, self.feed)
        attach(service, self.metrics)
        why_off = "" if settings.monitor is not None else "no monitor account configured (--monitor-password-file)"
        self.context = ConsoleContext(service=service, feed=self.feed, metrics=self.metrics,
                                      auth=ConsoleAuth(load_hash(auth_file)),
                                      secure_cookie=settings.tls_cert is not None, broker_view=why_off)
        self.app = create_app(self.context)
        self._monitor: MqttLink | None = None
        if settings.monitor is not None:
            monitor = settings.monitor
            if not monitor.client_id:
                monitor = replace(monitor, client_id=f"{monitor.username or 'monitor'}:console", clean_session=True)
            self._monitor = MqttLink(monitor, lambda t, p: self.feed.on_broker(t, p, time.time()), ["sealmq/#"])
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1] if self._socket is not None else self.settings.port

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.tls_cert else "http"
        host = self.settings.host if ":" not in self.settings.host else f"[{self.settings.host}]"
        return f"{scheme}://{host}:{self.port}/"

    def start(self) -> Console:
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.host, self.settings.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(Reason.CONFIG_INVALID,
                              f"console cannot listen on {self.settings.host}:{self.settings.port}: {exc}") from None
        sock.listen(64)
        self._socket = sock
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off", server_header=False,
                                timeout_graceful_shutdown=2, ssl_certfile=self.settings.tls_cert,
                                ssl_keyfile=self.settings.tls_key)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="console",
                                        daemon=True)
        self._thread.start()
        if self._monitor is not None:
            self._monitor.start(wait=None)  # the broker view fills in once connected
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        log.info("console on %s", self.url)
        return self

    def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.stop()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)
        if self._socket is not None:
            self._socket.close()
