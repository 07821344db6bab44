"""One network thread for many MQTT links: paho-mqtt's external-loop interface behind a selector.

A :class:`~runtime.mqtt.MqttLink` normally runs paho's own loop thread (``loop_start``), and
a device agent adds its timer thread: two threads per device. That is right for one device per
process; a simulator of a hundred devices in one process then has two hundred threads, and in a
handshake storm they mostly wake each other up (measured: docs/benchmarks.md, "Simulator network
threads"). A :class:`NetworkLoop` serves every link given to it from one thread:

- reads and writes of every connected link (``loop_read`` / ``loop_write``), with a selector
  (epoll) over their sockets; a link asks for writes through paho's socket callbacks;
- keepalive (``loop_misc``, every second);
- connecting: a connect (TCP, then the TLS handshake, both blocking in paho) runs on one of a
  few connector threads, so the loop keeps serving the connected links meanwhile; a connection
  lost or refused is retried after ``reconnect_min_delay``, doubling up to
  ``reconnect_max_delay`` (paho's own loop behaves the same way).

The link's callbacks (``on_connect``, messages, ``on_disconnect``) run on the loop thread.
Nothing here knows MQTT beyond paho's public external-loop calls.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.mqtt import MqttLink

log = logging.getLogger("sealmq.mqtt")

MISC_INTERVAL = 1.0  # seconds between keepalive checks (paho's own loop: at most 1 s too)


class NetworkLoop:
    """The network thread (and connector threads) shared by the links :meth:`add`-ed to it."""

    def __init__(self, *, name: str = "sealmq-net", connectors: int = 4) -> None:
        self._name = name
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()  # registrations (the selector is shared with other threads)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._registered: dict[int, tuple[Any, MqttLink, int]] = {}  # fd -> (socket, link, events)
        self._links: set[MqttLink] = set()
        self._timers: list[tuple[float, int, MqttLink]] = []  # (when, seq, link): connects due
        self._seq = itertools.count()
        self._attempts: dict[MqttLink, int] = {}  # failed connects in a row, for the backoff
        self._connect_q: queue.SimpleQueue[MqttLink | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connectors: list[threading.Thread] = []
        self._n_connectors = max(1, connectors)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        for i in range(self._n_connectors):
            t = threading.Thread(target=self._connector, name=f"{self._name}-connect-{i}", daemon=True)
            t.start()
            self._connectors.append(t)

    def stop(self) -> None:
        """Stop the threads (links still added are left as they are: stop them first)."""
        self._stop.set()
        self._wake()
        for _ in self._connectors:
            self._connect_q.put(None)
        for t in (self._thread, *self._connectors):
            if t is not None and t is not threading.current_thread():
                t.join(5)
        with self._lock:
            self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    # -- the links -----------------------------------------------------------------------------
    def add(self, link: MqttLink) -> None:
        """Serve ``link`` (its client set up for this loop by MqttLink) and connect it now."""
        self.start()
        client = link.client
        client.on_socket_open = lambda c, u, sock: self._register(sock, link)
        client.on_socket_close = lambda c, u, sock: self._unregister(sock)
        client.on_socket_register_write = lambda c, u, sock: self._want_write(sock)
        client.on_socket_unregister_write = lambda c, u, sock: None  # the loop decides, after writing
        with self._lock:
            self._links.add(link)
            self._attempts[link] = 0
        self._connect_q.put(link)

    def remove(self, link: MqttLink) -> None:
        """Stop serving ``link`` (its socket, if any, is closed by the caller or was already)."""
        with self._lock:
            self._forget(link)
            for fd, (_, owner, _) in list(self._registered.items()):
                if owner is link:
                    self._drop_fd(fd)

    def connected_again(self, link: MqttLink) -> None:
        """The link's CONNACK accepted it: its next loss starts the backoff from the beginning."""
        with self._lock:
            if link in self._attempts:
                self._attempts[link] = 0

    # -- paho's socket callbacks (any thread) --------------------------------------------------
    def _register(self, sock: Any, link: MqttLink) -> None:
        with self._lock:
            fd = sock.fileno()
            if fd in self._registered:  # a closed socket's number, reused before we heard of it
                self._drop_fd(fd)
            self._sel.register(fd, selectors.EVENT_READ, link)
            self._registered[fd] = (sock, link, selectors.EVENT_READ)
        self._wake()

    def _unregister(self, sock: Any) -> None:
        with self._lock:
            fd = sock.fileno()
            entry = self._registered.get(fd)
            if entry is not None and entry[0] is sock:
                self._drop_fd(fd)
            link = entry[1] if entry is not None else None
            if link is not None and not link.wants_connection():
                self._forget(link)  # stopped (or refused for good): done with it
        if link is not None:
            self._lost(link)

    def _forget(self, link: MqttLink) -> None:  # with the lock held
        self._links.discard(link)
        self._attempts.pop(link, None)

    def _drop_fd(self, fd: int) -> None:  # with the lock held
        self._registered.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(fd)

    def _want_write(self, sock: Any) -> None:
        with self._lock:
            self._set_events(sock, True)
        self._wake()

    def _set_events(self, sock: Any, write: bool) -> None:  # with the lock held
        fd = sock.fileno()
        entry = self._registered.get(fd)
        if entry is None or entry[0] is not sock:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        if entry[2] != events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.modify(fd, events, entry[1])
                self._registered[fd] = (sock, entry[1], events)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- connecting (connector threads) -------------------------------------------------------
    def _lost(self, link: MqttLink) -> None:
        """A socket of ``link`` closed: connect again later, unless the link is being stopped."""
        if not link.wants_connection():
            return
        with self._lock:
            if link not in self._links:
                return
            n = self._attempts.get(link, 0)
            self._attempts[link] = n + 1
            settings = link.settings
            delay = min(settings.reconnect_max_delay, settings.reconnect_min_delay * (2 ** min(n, 16)))
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), link))
        self._wake()

    def _connector(self) -> None:
        while True:
            link = self._connect_q.get()
            if link is None or self._stop.is_set():
                return
            if not link.wants_connection():
                continue
            try:
                link.client.reconnect()  # blocking: TCP connect and the TLS handshake
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                log.debug("connect failed: %s", exc)
                link.connect_failed()
                self._lost(link)
                continue
            if not link.wants_connection():  # stopped while it connected
                with contextlib.suppress(Exception):
                    link.client.disconnect()

    # -- the network thread --------------------------------------------------------------------
    def _run(self) -> None:
        next_misc = time.monotonic() + MISC_INTERVAL
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                due: list[MqttLink] = []
                while self._timers and self._timers[0][0] <= now:
                    due.append(heapq.heappop(self._timers)[2])
                wait = min(next_misc, self._timers[0][0] if self._timers else next_misc) - now
            for link in due:
                self._connect_q.put(link)
            try:
                events = self._sel.select(max(0.0, wait))
            except (OSError, ValueError):
                if self._stop.is_set():
                    return
                raise
            for key, mask in events:
                link = key.data
                if link is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                try:
                    self._serve(link, mask)
                except Exception:  # one link's failure must not stop the others
                    log.exception("network loop: a link failed")
            if time.monotonic() >= next_misc:
                next_misc = time.monotonic() + MISC_INTERVAL
                with self._lock:
                    links = list(self._links)
                for link in links:
                    if link.client.socket() is not None:
                        with contextlib.suppress(Exception):
                            link.client.loop_misc()

    def _serve(self, link: MqttLink, mask: int) -> None:
        client = link.client
        if mask & selectors.EVENT_READ:
            client.loop_read()
            sock = client.socket()
            # TLS: records already decrypted stay in the SSL object, where epoll cannot see them
            while isinstance(sock, ssl.SSLSocket) and sock.pending() > 0 and client.socket() is sock:
                client.loop_read()
        if client.socket() is not None and (mask & selectors.EVENT_WRITE or client.want_write()):
            client.loop_write()
        sock = client.socket()
        if sock is not None:
            with self._lock:
                # Another thread may queue a packet at any time and ask for writes while paho
                # still thinks it asked already: decide from the queue itself, after a recheck.
                self._set_events(sock, client.want_write())
                if client.want_write():
                    self._set_events(sock, True)
