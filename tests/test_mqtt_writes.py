"""What a message handler publishes goes out at once (runtime/mqtt.py, MqttLink.publish), against
real brokers (the embedded amqtt, a mosquitto child process), with paho's own loop thread and with
the shared NetworkLoop.

paho writes what a callback publishes only after the callback returns; the link writes it while
the callback still runs. Writing from inside the callback must not bring paho's disconnect
handling in there (it would wait for the lock paho holds around the callback: a deadlock): a link
stopped by its own handler, or whose socket broke under it, still returns from the handler.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from runtime.mqtt import MqttLink
from runtime.netloop import NetworkLoop
from tests.test_netloop import BROKERS, Inbox, _broker, _down, _settings, _started, _up

LOOPS = ["paho thread", "network loop"]


def _network(loop: str) -> NetworkLoop | None:
    return NetworkLoop(name="test-net") if loop == "network loop" else None


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", BROKERS)
def test_a_handlers_publishes_are_on_the_wire_before_it_returns(kind: str, loop: str, tmp_path: Path) -> None:
    net = _network(loop)
    with _broker(kind, tmp_path, n_devices=1) as b:  # type: ignore[attr-defined]
        dev = b.devices[0].username
        watcher = Inbox()
        # its own paho thread: a link on the same loop could not read while the handler waits
        backend = MqttLink(_settings(b, b.backend, "be"), watcher, [_up(dev)])
        seen_inside: list[bool] = []
        returned = threading.Event()
        holder: list[MqttLink] = []

        def handler(topic: str, payload: bytes) -> None:
            for k in range(3):  # a burst, as the media pump sends
                holder[0].publish(_up(dev), bytes([k]) * 1000)
            # the broker relays them to the backend while this handler still runs
            try:
                watcher.take(3, timeout=5.0)
                seen_inside.append(True)
            except Exception:
                seen_inside.append(False)
            returned.set()

        device = MqttLink(_settings(b, b.devices[0], "d"), handler, [_down(dev)], network=net)
        holder.append(device)
        _started([backend, device])
        backend.publish(_down(dev), b"go")
        assert returned.wait(15)
        assert seen_inside == [True]
        device.stop()
        backend.stop()
        if net is not None:
            net.stop()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", BROKERS)
def test_a_handler_that_stops_its_link_and_then_publishes_still_returns(kind: str, loop: str, tmp_path: Path) -> None:
    net = _network(loop)
    with _broker(kind, tmp_path, n_devices=1) as b:  # type: ignore[attr-defined]
        dev = b.devices[0].username
        returned = threading.Event()
        holder: list[MqttLink] = []

        def handler(topic: str, payload: bytes) -> None:
            holder[0].stop()  # queues the DISCONNECT; writing it here would run on_disconnect here
            holder[0].publish(_up(dev), b"after the stop")
            returned.set()

        device = MqttLink(_settings(b, b.devices[0], "d"), handler, [_down(dev)], network=net)
        holder.append(device)
        backend = MqttLink(_settings(b, b.backend, "be"), lambda t, p: None, [], network=net)
        _started([device, backend])
        backend.publish(_down(dev), b"stop")
        assert returned.wait(10)  # a deadlock would hold the handler (and the network thread) forever
        deadline = time.monotonic() + 5
        while device.client.socket() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert device.client.socket() is None  # the loop sent the DISCONNECT after the handler
        backend.stop()
        if net is not None:
            net.stop()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("kind", BROKERS)
def test_a_publish_on_a_broken_socket_inside_a_handler_returns_and_the_link_reconnects(
    kind: str, loop: str, tmp_path: Path,
) -> None:
    net = _network(loop)
    with _broker(kind, tmp_path, n_devices=1) as b:  # type: ignore[attr-defined]
        dev = b.devices[0].username
        watcher = Inbox()
        returned = threading.Event()
        holder: list[MqttLink] = []

        def handler(topic: str, payload: bytes) -> None:
            if payload != b"break":
                return
            sock = holder[0].client.socket()
            assert sock is not None
            sock.shutdown(socket.SHUT_RDWR)  # the connection dies under the handler
            holder[0].publish(_up(dev), b"into a dead socket")
            returned.set()

        device = MqttLink(_settings(b, b.devices[0], "d"), handler, [_down(dev)], network=net)
        holder.append(device)
        backend = MqttLink(_settings(b, b.backend, "be"), watcher, [_up(dev)], network=net)
        _started([device, backend])
        backend.publish(_down(dev), b"break")
        assert returned.wait(10)
        # the loop finds the broken socket, reports the loss and connects again (1-2 s backoff)
        deadline = time.monotonic() + 20
        while device.client.socket() is None or not device.connected.is_set() or not device.subscribed.is_set():
            assert time.monotonic() < deadline, "the link did not come back"
            time.sleep(0.05)
        device.publish(_up(dev), b"back")
        got = [p for _, p in watcher.take(1, timeout=10)]
        got += [p for _, p in watcher.quiet(0.5)]
        assert b"back" in got  # (the QoS 1 message from the handler may come again too)
        device.stop()
        backend.stop()
        if net is not None:
            net.stop()
