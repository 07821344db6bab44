"""The generated Mosquitto config under load and across restarts (real mosquitto child process)."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.mosquitto_config import PACKET_OVERHEAD, MosquittoOptions, render
from broker.passwd import load_users
from tests import brokers
from tests.brokers import BrokerHandle, needs_mosquitto, running_mosquitto

pytestmark = [pytest.mark.mosquitto, needs_mosquitto]
BURST = 5000
mosquitto = brokers.mosquitto_broker  # fixture


def _burst_to_slow_backend(b: BrokerHandle, wait: float = 20.0) -> list[int]:
    """Publish BURST QoS 1 messages while the backend's first on_message stalls; return what it got."""
    received: list[int] = []
    done = threading.Event()
    slow = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="backend", protocol=mqtt.MQTTv311)
    slow.username_pw_set(b.backend.username, b.backend.password)

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        if not received:
            time.sleep(1.0)  # stall while the burst piles up in the broker's queue
        received.append(int(msg.payload))
        if len(received) == BURST:
            done.set()

    slow.on_message = on_message
    slow.connect(b.host, b.port)
    slow.subscribe("sealmq/v1/+/data/up", qos=1)
    slow.loop_start()
    try:
        time.sleep(0.3)
        dev, _ = b.connect(b.devices[0])
        infos = [dev.publish(f"sealmq/v1/{b.devices[0].username}/data/up", str(i).encode(), qos=1)
                 for i in range(BURST)]
        for info in infos:
            info.wait_for_publish(30)
        done.wait(wait)
        time.sleep(0.5)  # let stragglers (if any) arrive
    finally:
        slow.disconnect()
        slow.loop_stop()
    return received


def test_no_silent_drop_for_slow_qos1_backend_in_a_burst(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with running_mosquitto(tmp_path) as b:
        received = _burst_to_slow_backend(b)
    assert sorted(set(received)) == list(range(BURST)), f"got {len(set(received))} of {BURST}"


def test_control_mosquitto_default_queue_drops(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The measured fact the config guards against: with the default 1000, messages vanish."""
    with running_mosquitto(tmp_path, max_queued_messages=1000, max_queued_bytes=0) as b:
        received = _burst_to_slow_backend(b, wait=4.0)
    assert len(set(received)) < BURST


def test_restart_same_port_keeps_queued_messages(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with running_mosquitto(tmp_path) as b:
        a = b.devices[0].username
        sub, _ = b.connect(b.devices[0], client_id=a, clean_session=False)
        b.subscribe(sub, f"sealmq/v1/{a}/+/down")
        sub.disconnect()
        sub.loop_stop()
        backend, _ = b.connect(b.backend)
        backend.publish(f"sealmq/v1/{a}/data/down", b"queued", qos=1).wait_for_publish(5)
        backend.disconnect()
        backend.loop_stop()
        b.broker.restart()  # SIGTERM: mosquitto saves its persistence file
        _, got = b.connect(b.devices[0], client_id=a, clean_session=False)
        assert got.get(timeout=5).payload == b"queued"


def test_rendered_config_is_hardened(tmp_path, mosquitto: BrokerHandle) -> None:  # type: ignore[no-untyped-def]
    files = render(tmp_path, load_users(mosquitto.passwd), MosquittoOptions(port=1883))
    conf = files["mosquitto.conf"]
    for line in ("allow_anonymous false", "listener 1883 127.0.0.1", f"max_packet_size {262144 + PACKET_OVERHEAD}",
                 "max_queued_messages 1000000", "retain_available false", "use_username_as_clientid true",
                 "user mosquitto", "persistent_client_expiration 7d"):
        assert line in conf.splitlines(), line
    assert "message_size_limit" not in conf  # deprecated: mosquitto 2 prints a note to replace it
    assert not any(line.startswith("pattern") for line in files["acl"].splitlines())  # applies to every user
    assert "user dev0\ntopic read sealmq/v1/dev0/+/down\ntopic write sealmq/v1/dev0/hs/up" in files["acl"]
    assert "{{" not in conf
    assert "{{" not in files["acl"]
    assert "user backend\ntopic read sealmq/v1/+/+/up" in files["acl"]
    assert "user monitor\ntopic read sealmq/#" in files["acl"]
    # the password file is the user file without roles
    assert all(line.count(":") == 1 and ":$7$" in line for line in files["passwd"].splitlines())

