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
  leaks slots on refused CONNECTs and makes new clients queue instead of being refused);
- per-user bounds, so one device login cannot exhaust the broker: connections and persistent
  sessions per user, sockets still waiting for their CONNECT, QoS 2 messages awaiting PUBREL,
  session expiry; ``reserved_backend_connections`` slots only a backend user can take;
- optional TLS listeners (``tls``, :mod:`broker.tls`), TLS 1.2+: on ``tls_port`` a client
  certificate from the operator's CA is required and checked against the CRL (re-read when it
  changes), and its ``urn:sealmq:<role>:<name>`` is the login (no password); on
  ``tls_password_port`` (optional, for monitors) passwords; the plain listener can be turned off;
- amqtt's broadcast iterates over a live dict of subscriptions and raises (and skips
  subscribers) when one changes meanwhile, and tests every filter in the broker against every
  message: :class:`broker.subscriptions.SubscriptionMap` hands it snapshots of only the filters
  that match, found in an index by topic level.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from amqtt.adapters import StreamWriterAdapter
from amqtt.broker import Broker

from broker.framing import CONNACK_UNAVAILABLE, BrokerStats, ConnectInfo, FramedReader, FramingLimits
from broker.passwd import AccountRole
from broker.plugins import SealmqAclPlugin, SealmqAuthPlugin
from broker.policy import CLIENT_ID_SEPARATOR, BrokerPolicy
from broker.subscriptions import BroadcastQueue, SubscriptionMap
from broker.tls import DEFAULT_TLS_PORT, RevokedSerials, TlsFiles, certificate_identity
from sealmq.errors import ConfigError, Reason, TransportError

log = logging.getLogger("sealmq.broker")

DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_SESSION_EXPIRY = 7 * 24 * 3600  # as mosquitto's persistent_client_expiration in our config
_LISTENER = "default"
_TLS_LISTENER = "tls"
_TLS_PASSWORD_LISTENER = "tls-password"  # noqa: S105 - a listener name


@dataclass
class EmbeddedBrokerConfig:
    passwd: str | Path  # user file (broker.passwd format)
    host: str = "127.0.0.1"
    port: int = 0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    connect_timeout: float = 10.0
    # per-user bounds (devices and monitors; the backend account is bounded only by max_connections)
    max_connections_per_user: int = 4
    max_sessions_per_user: int = 4  # persistent (clean_session=false) sessions
    # of max_connections, only for backend users; None: min(32, max_connections // 10)
    reserved_backend_connections: int | None = None
    # sockets that have not sent an accepted CONNECT yet; None: min(64, max(1, max_connections // 10))
    max_pending_connects: int | None = None
    max_qos2_pending: int = 64  # per connection, QoS 2 PUBLISHes awaiting PUBREL
    session_expiry: int = DEFAULT_SESSION_EXPIRY  # seconds a disconnected persistent session is kept
    # messages queued for one disconnected persistent session; beyond it they are dropped (logged).
    # The backend's bound is mosquitto's in our config: generous, because its messages must not be lost.
    max_offline_queue: int = 1000
    max_offline_queue_backend: int = 1_000_000
    extra_amqtt: dict[str, Any] = field(default_factory=dict)  # merged into amqtt's config (advanced)
    plain: bool = True  # the plain-TCP listener on host:port (passwords only)
    tls: TlsFiles | None = None  # a TLS listener on host:tls_port
    tls_port: int = DEFAULT_TLS_PORT
    tls_password_port: int | None = None  # a second TLS listener taking passwords (monitors)
    crl_refresh_interval: float = 30.0  # seconds between checks of the CRL file for changes

    def validate(self) -> None:
        if not self.plain and self.tls is None:
            raise ConfigError(Reason.CONFIG_INVALID, "no listener: enable the plain or the TLS listener")
        if not 0 <= self.tls_port <= 65535 or not 0 <= (self.tls_password_port or 0) <= 65535:
            raise ConfigError(Reason.CONFIG_INVALID, "TLS ports must be in 0..65535")
        if self.crl_refresh_interval <= 0:
            raise ConfigError(Reason.CONFIG_INVALID, "crl_refresh_interval must be > 0")
        if self.tls is None and self.tls_password_port is not None:
            raise ConfigError(Reason.CONFIG_INVALID, "tls_password_port needs the TLS files")
        if self.tls is not None:
            self.tls.check()
        if self.max_message_size < 1 or self.max_message_size > 256 * 1024 * 1024:
            raise ConfigError(Reason.CONFIG_INVALID, "max_message_size must be in 1..256 MiB")
        if self.max_connections < 1:
            raise ConfigError(Reason.CONFIG_INVALID, "max_connections must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ConfigError(Reason.CONFIG_INVALID, "port must be in 0..65535")
        if self.connect_timeout <= 0:
            raise ConfigError(Reason.CONFIG_INVALID, "connect_timeout must be > 0")
        bounds = (self.max_connections_per_user, self.max_sessions_per_user, self.pending_limit,
                  self.max_qos2_pending, self.session_expiry, self.max_offline_queue, self.max_offline_queue_backend)
        if min(bounds) < 1 or self.backend_reserve < 0:
            raise ConfigError(Reason.CONFIG_INVALID, "per-user bounds must be >= 1 (reserve >= 0)")
        if self.backend_reserve + self.pending_limit >= self.max_connections:
            raise ConfigError(Reason.CONFIG_INVALID,
                              "reserved_backend_connections + max_pending_connects must be < max_connections")

    @property
    def backend_reserve(self) -> int:
        r = self.reserved_backend_connections
        return min(32, self.max_connections // 10) if r is None else r

    @property
    def pending_limit(self) -> int:
        p = self.max_pending_connects
        return min(64, max(1, self.max_connections // 10)) if p is None else p

    @property
    def shared_connections(self) -> int:
        """Connections open to non-backend users: the rest is for pending sockets and the backend."""
        return self.max_connections - self.backend_reserve - self.pending_limit

    def amqtt_config(self) -> dict[str, Any]:
        listeners: dict[str, Any] = {
            _LISTENER: {
                "type": "tcp",
                # amqtt requires a "default" listener (and binds 0.0.0.0:1883 unless told): a None
                # bind starts none when the plain listener is off
                "bind": f"{self.host}:{self.port}" if self.plain else None,
                "max_connections": -1,  # counted by HardenedBroker instead (no slot leak)
            }
        }
        if self.tls is not None:
            ports = {_TLS_LISTENER: self.tls_port}
            if self.tls_password_port is not None:
                ports[_TLS_PASSWORD_LISTENER] = self.tls_password_port
            for name, port in ports.items():
                listeners[name] = {
                    "type": "tcp",
                    "bind": f"{self.host}:{port}",
                    "max_connections": -1,
                    "ssl": True,  # the context is HardenedBroker._create_ssl_context's
                    "certfile": str(self.tls.certfile),
                    "keyfile": str(self.tls.keyfile),
                    # marks the listener that takes client certificates (amqtt passes only this config)
                    "cafile": str(self.tls.cafile) if name == _TLS_LISTENER else None,
                }
        cfg: dict[str, Any] = {
            "listeners": listeners,
            "plugins": {
                f"{SealmqAuthPlugin.__module__}.{SealmqAuthPlugin.__name__}": {},
                f"{SealmqAclPlugin.__module__}.{SealmqAclPlugin.__name__}": {},
            },
            "session_expiry_interval": self.session_expiry,
        }
        cfg.update(self.extra_amqtt)
        return cfg


def _owner(client_id: str, username: str) -> bool:
    return client_id == username or client_id.startswith(username + CLIENT_ID_SEPARATOR)


class HardenedBroker(Broker):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's Broker with our framing, connection bounds and policy wired into the plugins."""

    def __init__(self, config: EmbeddedBrokerConfig, policy: BrokerPolicy, stats: BrokerStats) -> None:
        super().__init__(config.amqtt_config())
        self._subscriptions = SubscriptionMap()
        self._broadcast_queue = BroadcastQueue(self._subscriptions)
        self._config = config
        self._per_user: collections.Counter[str] = collections.Counter()
        self._non_backend = 0
        self.sealmq_policy = policy
        self.sealmq_stats = stats
        self._limits = FramingLimits(
            max_message_size=config.max_message_size,
            # a CONNECT may carry a will message, a SUBSCRIBE many filters: generous but bounded
            max_packet_size=config.max_message_size + 65536,
            connect_timeout=config.connect_timeout,
            max_qos2_pending=config.max_qos2_pending,
        )
        self._max_connections = config.max_connections
        tls = config.tls
        self._revoked = (RevokedSerials(tls.crlfile, tls.cafile, tls.certfile)
                         if tls is not None and tls.crlfile is not None else None)
        wired = 0
        for plugin in self.plugins_manager.plugins:
            if isinstance(plugin, (SealmqAuthPlugin, SealmqAclPlugin)):
                plugin.policy = policy
                wired += 1
        if wired != 2:
            raise ConfigError(Reason.CONFIG_INVALID, "sealmq plugins not loaded")

    def _create_ssl_context(self, listener: Any) -> Any:
        """Ours, not amqtt's (which leaves client certificates optional and loads no CRL)."""
        assert self._config.tls is not None
        certificates = listener.get("cafile") is not None
        ctx = self._config.tls.server_context(client_certificates=certificates)
        if certificates and self._revoked is not None:
            self._revoked.contexts.append(ctx)
        return ctx

    async def refresh_crl_periodically(self, interval: float) -> None:
        """Re-read a changed CRL even while nobody connects (a stale one would lock everyone out)."""
        while self._revoked is not None:
            await asyncio.sleep(interval)
            self._revoked.refresh()

    def _certificate_login(self, writer: asyncio.StreamWriter, name: str) -> tuple[AccountRole, str] | bool | None:
        """The (role, account) a client certificate names; None without one; False: refused."""
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return None
        if self._revoked is not None and self._revoked.is_revoked(der):
            log.warning("refused %s: its client certificate is revoked", name)
            return False
        ident = certificate_identity(der)
        if ident is None:
            log.warning("refused %s: its client certificate names no sealmq identity", name)
            return False
        return ident

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        stats = self.sealmq_stats
        if stats.active_connections >= self._max_connections:
            stats.refused_limit += 1
            log.warning("connection limit %d reached: refusing a client", self._max_connections)
            writer.close()
            return
        if stats.pending_connects >= self._config.pending_limit:
            stats.refused_limit += 1
            log.warning("%d sockets already waiting for CONNECT: refusing a client", stats.pending_connects)
            writer.close()
            return
        stats.active_connections += 1
        stats.pending_connects += 1
        pending = True
        user: str | None = None
        try:
            peer = writer.get_extra_info("peername")
            name = f"{peer[0]}:{peer[1]}" if peer else "?"
            login = self._certificate_login(writer, name)
            if login is False:
                stats.refused_connect += 1
                return
            gate = self.sealmq_policy.gate
            connect_as = None
            if isinstance(login, tuple):
                role, cert_name = login
                connect_as = (cert_name, self.sealmq_policy.certificate_token(cert_name))

                async def gate(info: ConnectInfo) -> int:
                    return await self.sealmq_policy.gate_certificate(info, role, cert_name)

            framed = FramedReader(reader, writer, self._limits, gate, stats, peer=name, connect_as=connect_as)
            info = await framed.accept_connect()
            stats.pending_connects -= 1
            pending = False
            if info is None or info.username is None:
                return  # refused (and logged) by the gate, or closed: amqtt never sees it
            why = self._over_user_bound(info)
            if why:
                stats.refused_user_limit += 1
                log.warning("refused CONNECT from %s (user %r): %s", name, info.username, why)
                framed.refuse(CONNACK_UNAVAILABLE)
                return
            user = info.username
            resumed = None if info.clean_session else self._sessions.get(info.client_id)
            if resumed is not None:
                framed.seed_qos2(resumed[0].inflight_in.keys())
            self._per_user[user] += 1
            backend = self.sealmq_policy.role(user) is AccountRole.BACKEND
            self._non_backend += 0 if backend else 1
            try:
                await self._client_connected(listener_name, framed, StreamWriterAdapter(writer))
            finally:
                self._per_user[user] -= 1
                if self._per_user[user] <= 0:
                    del self._per_user[user]
                self._non_backend -= 0 if backend else 1
        finally:
            if pending:
                stats.pending_connects -= 1
            stats.active_connections -= 1
            writer.close()

    async def _retain_broadcast_message(self, broadcast: dict[str, Any], qos: int, target_session: Any) -> None:
        """Queue for a disconnected persistent session, up to its bound (amqtt's queue is unbounded)."""
        backend = self.sealmq_policy.role(target_session.username) is AccountRole.BACKEND
        limit = self._config.max_offline_queue_backend if backend else self._config.max_offline_queue
        if target_session.retained_messages.qsize() >= limit:
            self.sealmq_stats.offline_dropped += 1
            if self.sealmq_stats.offline_dropped % 1000 == 1:  # the first, then every 1000th
                log.warning("offline session %r holds %d messages: dropping (%d dropped so far)",
                            target_session.client_id, limit, self.sealmq_stats.offline_dropped)
            return
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    def _over_user_bound(self, info: ConnectInfo) -> str:
        """Why this (authenticated) CONNECT exceeds a per-user bound; "" if it does not.

        The backend account is exempt from the per-user bounds and has slots reserved, so a device
        login cannot lock the backend out by holding every connection.
        """
        user = info.username or ""
        if self.sealmq_policy.role(user) is AccountRole.BACKEND:
            return ""
        cfg = self._config
        if self._per_user[user] >= cfg.max_connections_per_user:
            return f"already {cfg.max_connections_per_user} connections"
        shared = cfg.shared_connections
        if self._non_backend >= shared:
            return f"the {shared} connections open to non-backend users are taken"
        if not info.clean_session and info.client_id not in self._sessions:
            held = sum(1 for cid, (sess, _) in list(self._sessions.items())
                       if _owner(cid, user) and not sess.clean_session)
            if held >= cfg.max_sessions_per_user:
                return f"already {cfg.max_sessions_per_user} persistent sessions"
        return ""

    def bound_port_of(self, listener: str) -> int:
        server = self._servers[listener].instance
        sockets = getattr(server, "sockets", None)
        if not sockets:
            raise TransportError(Reason.TRANSPORT_FAILED, "listener has no socket")
        return int(sockets[0].getsockname()[1])

    @property
    def bound_port(self) -> int:
        return self.bound_port_of(_LISTENER if self._config.plain else _TLS_LISTENER)

    @property
    def bound_tls_port(self) -> int:
        return self.bound_port_of(_TLS_LISTENER) if self._config.tls is not None else 0

    @property
    def bound_tls_password_port(self) -> int:
        return self.bound_port_of(_TLS_PASSWORD_LISTENER) if self._config.tls_password_port is not None else 0

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        return [tuple(s.getsockname()[:2]) for server in self._servers.values()
                for s in getattr(server.instance, "sockets", ())]


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
        self._crl_task: asyncio.Task[None] | None = None
        self.port = 0  # the plain listener's (the TLS one's without a plain listener)
        self.tls_port = 0
        self.tls_password_port = 0
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
                self._crl_task = asyncio.create_task(
                    self._broker.refresh_crl_periodically(self.config.crl_refresh_interval))
                self.port = self._broker.bound_port
                self.tls_port = self._broker.bound_tls_port
                self.tls_password_port = self._broker.bound_tls_password_port
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
        # debug only: `sealmq broker run` prints the address itself (once)
        log.debug("embedded broker listening on %s:%d", self.host, self.port)
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
