"""The embedded, hardened amqtt broker: run from code, tests or ``sealmq broker run``.

``EmbeddedBroker(config).start()`` runs amqtt 0.12.1 on its own asyncio loop in a background
thread; ``.port`` is the bound port (port 0 picks a free one), ``.stop()`` shuts it down, and it
is a context manager. What is hardened, against the measured amqtt behaviour
(docs/broker.md has the full list):

- binds 127.0.0.1 unless told otherwise (amqtt's default listener binds 0.0.0.0);
- our plugins only (authentication against the user file, exact-wildcard topic ACL);
- CONNECTs are checked before amqtt creates or takes over a session (:mod:`broker.framing`);
- payloads over ``max_message_size`` are dropped, other packets bounded, retain flags cleared;
- at most ``max_connections`` sockets, counted here with try/finally (amqtt's own semaphore
  leaks slots on refused CONNECTs and makes new clients queue instead of being refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from amqtt.adapters import StreamWriterAdapter
from amqtt.broker import Broker

from broker.framing import BrokerStats, FramedReader, FramingLimits
from broker.plugins import SealmqAclPlugin, SealmqAuthPlugin
from broker.policy import BrokerPolicy
from sealmq.errors import ConfigError, Reason, TransportError

log = logging.getLogger("sealmq.broker")

DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024
DEFAULT_MAX_CONNECTIONS = 1000
_LISTENER = "default"


@dataclass
class EmbeddedBrokerConfig:
    passwd: str | Path  # user file (broker.passwd format)
    host: str = "127.0.0.1"
    port: int = 0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    connect_timeout: float = 10.0
    extra_amqtt: dict[str, Any] = field(default_factory=dict)  # merged into amqtt's config (advanced)

    def validate(self) -> None:
        if self.max_message_size < 1 or self.max_message_size > 256 * 1024 * 1024:
            raise ConfigError(Reason.CONFIG_INVALID, "max_message_size must be in 1..256 MiB")
        if self.max_connections < 1:
            raise ConfigError(Reason.CONFIG_INVALID, "max_connections must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ConfigError(Reason.CONFIG_INVALID, "port must be in 0..65535")
        if self.connect_timeout <= 0:
            raise ConfigError(Reason.CONFIG_INVALID, "connect_timeout must be > 0")

    def amqtt_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "listeners": {
                _LISTENER: {
                    "type": "tcp",
                    "bind": f"{self.host}:{self.port}",
                    "max_connections": -1,  # counted by HardenedBroker instead (no slot leak)
                }
            },
            "plugins": {
                f"{SealmqAuthPlugin.__module__}.{SealmqAuthPlugin.__name__}": {},
                f"{SealmqAclPlugin.__module__}.{SealmqAclPlugin.__name__}": {},
            },
        }
        cfg.update(self.extra_amqtt)
        return cfg


class HardenedBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's Broker with our framing, connection bound and policy wired into the plugins."""

    def __init__(self, config: EmbeddedBrokerConfig, policy: BrokerPolicy, stats: BrokerStats) -> None:
        super().__init__(config.amqtt_config())
        self.sealmq_policy = policy
        self.sealmq_stats = stats
        self._limits = FramingLimits(
            max_message_size=config.max_message_size,
            # a CONNECT may carry a will message, a SUBSCRIBE many filters: generous but bounded
            max_packet_size=config.max_message_size + 65536,
            connect_timeout=config.connect_timeout,
        )
        self._max_connections = config.max_connections
        wired = 0
        for plugin in self.plugins_manager.plugins:
            if isinstance(plugin, (SealmqAuthPlugin, SealmqAclPlugin)):
                plugin.policy = policy
                wired += 1
        if wired != 2:
            raise ConfigError(Reason.CONFIG_INVALID, "sealmq plugins not loaded")

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        stats = self.sealmq_stats
        if stats.active_connections >= self._max_connections:
            stats.refused_limit += 1
            log.warning("connection limit %d reached: refusing a client", self._max_connections)
            writer.close()
            return
        stats.active_connections += 1
        try:
            peer = writer.get_extra_info("peername")
            name = f"{peer[0]}:{peer[1]}" if peer else "?"
            framed = FramedReader(reader, writer, self._limits, self.sealmq_policy.gate, stats, peer=name)
            await self._client_connected(listener_name, framed, StreamWriterAdapter(writer))
        finally:
            stats.active_connections -= 1
            writer.close()

    @property
    def bound_port(self) -> int:
        server = self._servers[_LISTENER].instance
        sockets = getattr(server, "sockets", None)
        if not sockets:
            raise TransportError(Reason.TRANSPORT_FAILED, "listener has no socket")
        return int(sockets[0].getsockname()[1])

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        server = self._servers[_LISTENER].instance
        return [tuple(s.getsockname()[:2]) for s in getattr(server, "sockets", ())]


class EmbeddedBroker:
    """The hardened amqtt broker on a private loop in a daemon thread."""

    def __init__(self, config: EmbeddedBrokerConfig) -> None:
        config.validate()
        self.config = config
        self.policy = BrokerPolicy.from_file(config.passwd)
        self.stats = BrokerStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: HardenedBroker | None = None
        self._stopped: asyncio.Event | None = None
        self.port = 0
        self.host = config.host

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self._broker.bound_addresses if self._broker else []

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        if self._thread is not None:
            raise TransportError(Reason.TRANSPORT_FAILED, "broker already started")
        started = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._stopped = asyncio.Event()
            try:
                # amqtt's Broker must be created inside the running loop
                self._broker = HardenedBroker(self.config, self.policy, self.stats)
                await self._broker.start()
                self.port = self._broker.bound_port
            except BaseException as exc:
                failure.append(exc)
                started.set()
                return
            started.set()
            await self._stopped.wait()
            await self._shutdown()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(main())
            finally:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_default_executor())
                loop.close()

        self._thread = threading.Thread(target=run, name="sealmq-amqtt", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TransportError(Reason.TRANSPORT_FAILED, "embedded broker did not start in time")
        if failure:
            self._thread.join(timeout)
            self._thread = None
            raise TransportError(Reason.TRANSPORT_FAILED, f"embedded broker failed to start: {failure[0]}")
        log.info("embedded broker listening on %s:%d", self.host, self.port)
        return self

    async def _shutdown(self) -> None:
        """Release the port first, then let amqtt shut down (bounded), then drop what is left.

        amqtt's own shutdown can take long (or hang) with busy clients; a restarted broker must
        be able to bind the same port at once, so listeners close before anything else.
        """
        broker = self._broker
        if broker is None:
            return
        for server in list(getattr(broker, "_servers", {}).values()):
            instance = getattr(server, "instance", None)
            if instance is not None:
                instance.close()
        try:
            await asyncio.wait_for(broker.shutdown(), timeout=10)
        except (TimeoutError, Exception) as exc:
            log.warning("amqtt shutdown did not finish cleanly: %s", type(exc).__name__)
        current = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not current:
                task.cancel()

    def stop(self, timeout: float = 15.0) -> None:
        thread, loop, stopped = self._thread, self._loop, self._stopped
        if thread is None or loop is None or stopped is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(stopped.set)
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self._thread is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
