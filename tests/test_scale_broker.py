"""Scale-out on the broker (issue 14): MQTT 5 shared subscriptions on a real mosquitto, and their limits.

What is checked here is the broker-level behaviour the workers rely on (docs/scaling.md, "Brokers"):

- two workers in one share group split a stream of QoS 1 messages, none lost, none doubled;
- a worker killed mid-stream (SIGKILL, unacknowledged messages in flight) with a persistent MQTT 5
  session: mosquitto 2.0 neither hands its in-flight messages to the survivor nor stops routing new
  ones to its session; everything arrives once the worker is back under its own login (measured);
- the same with a session that ends with the connection (expiry 0): new messages go to the survivor
  at once, the dead worker's in-flight and queued messages are gone (a control test: measured loss);
- manual acknowledgement (``defer_ack``) under MQTT 5;
- the embedded amqtt broker (MQTT 3.1.1) and a refused SUBACK give clear errors.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from runtime.mqtt import MQTT_5, MQTT_311, MqttLink, MqttSettings
from sealmq.errors import ConfigError, Reason, TransportError
from tests import brokers
from tests.brokers import BrokerHandle, Creds
from tests.e2e import wait_for


def _on_mosquitto(test: Callable[..., None]) -> Callable[..., None]:
    return pytest.mark.mosquitto(brokers.needs_mosquitto(test))

REPO = Path(__file__).resolve().parent.parent
GROUP = "0123456789abcdef0123456789abcdef"
UPLINK = "sealmq/v1/+/+/up"


_links: list[MqttLink] = []


@pytest.fixture
def mosq(tmp_path: Path) -> Iterator[BrokerHandle]:
    with brokers.running_mosquitto(tmp_path, n_devices=1, workers=2) as b:
        try:
            yield b
        finally:
            while _links:
                _links.pop().stop()


def _settings(b: BrokerHandle, creds: Creds, *, expiry: int = 600, group: str | None = GROUP) -> MqttSettings:
    return MqttSettings(host=b.host, port=b.port, username=creds.username, password=creds.password,
                        client_id=creds.username, protocol=MQTT_5, share_group=group, session_expiry=expiry)


def _worker(b: BrokerHandle, creds: Creds, got: list[int], **kw: object) -> MqttLink:
    link = MqttLink(_settings(b, creds, **kw), lambda t, p: got.append(int(p)), [UPLINK])  # type: ignore[arg-type]
    _links.append(link)
    link.start(wait=10)
    assert link.subscribed.wait(10), link.error
    return link


def _publish(b: BrokerHandle, numbers: range) -> None:
    dev, _ = b.connect(b.devices[0])
    for i in numbers:
        dev.publish(f"sealmq/v1/{b.devices[0].username}/data/up", str(i).encode(), qos=1).wait_for_publish(5)
    dev.disconnect()
    dev.loop_stop()


class ChildWorker:
    """``tests/share_worker.py`` in its own process (so that it can be SIGKILLed mid-stream)."""

    def __init__(self, b: BrokerHandle, creds: Creds, tmp: Path, *, expiry: int, ack_first: int,
                 cleanup: list[ChildWorker]) -> None:
        pw = tmp / f"{creds.username}.password"
        pw.write_text(creds.password)
        pw.chmod(0o600)
        self.got: list[int] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.share_worker", b.host, str(b.port), creds.username, str(pw), GROUP,
             str(expiry), str(ack_first)],
            stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        cleanup.append(self)  # killed after the test, whatever happens below
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self.ready.wait(20), "the worker did not subscribe"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("READY"):
                self.ready.set()
            elif line.startswith("MSG "):
                self.got.append(int(line.split()[1]))

    def kill(self) -> None:
        """SIGKILL; on return ``got`` holds everything it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(10)


@pytest.fixture
def children() -> Iterator[list[ChildWorker]]:
    made: list[ChildWorker] = []
    yield made
    for c in made:
        c.kill()


@_on_mosquitto
def test_two_workers_in_a_share_group_split_a_qos1_stream_none_lost_none_doubled(mosq: BrokerHandle) -> None:
    a: list[int] = []
    b: list[int] = []
    _worker(mosq, mosq.workers[0], a)
    _worker(mosq, mosq.workers[1], b)
    n = 400
    _publish(mosq, range(n))
    assert wait_for(lambda: len(a) + len(b) >= n, 20)
    assert sorted(a + b) == list(range(n))  # every message once: none lost, none doubled
    assert a and b  # both workers took a share (mosquitto: round robin)
    assert mosq.broker.log().count("(p5,") == 2  # both connected with MQTT 5


@_on_mosquitto
def test_killed_worker_with_a_persistent_session_gets_its_messages_when_it_returns(
        mosq: BrokerHandle, tmp_path: Path, children: list[ChildWorker]) -> None:
    """Measured on mosquitto 2.0: a shared subscriber that disconnects abruptly keeps its in-flight and
    queued messages in its session, and the broker keeps routing its share of new messages there; the
    survivor gets none of them. A worker that comes back with its own login gets them all (in-flight
    ones again); nothing is lost and no message reaches both workers."""
    survivor: list[int] = []
    _worker(mosq, mosq.workers[0], survivor)
    dying = ChildWorker(mosq, mosq.workers[1], tmp_path, expiry=600, ack_first=5, cleanup=children)
    _publish(mosq, range(100))  # acknowledged by the broker: each one is assigned to a member's session
    assert wait_for(lambda: len(dying.got) > 5, 20)  # it holds unacknowledged messages now
    dying.kill()
    unacked = dying.got[5:]
    mosq.broker.wait_log(f"Client {mosq.workers[1].username} closed its connection")
    _publish(mosq, range(100, 200))
    assert wait_for(lambda: len([m for m in survivor if m >= 100]) >= 1, 10)
    back = ChildWorker(mosq, mosq.workers[1], tmp_path, expiry=600, ack_first=-1, cleanup=children)
    assert wait_for(lambda: set(survivor) | set(dying.got[:5]) | set(back.got) >= set(range(200)), 20)
    assert set(survivor) | set(dying.got[:5]) | set(back.got) == set(range(200))  # none lost
    assert not set(survivor) & (set(dying.got) | set(back.got))  # no message reached both workers
    assert set(unacked) <= set(back.got)  # in flight when it died: delivered again to the same session
    assert not set(dying.got[:5]) & set(back.got)  # acknowledged ones are not
    # what the survivor did not get: mosquitto kept routing to the dead worker's session
    assert [m for m in back.got if m >= 100], "mosquitto handed the dead worker's share to the survivor"
    assert len(survivor) == len(set(survivor))


@_on_mosquitto
def test_control_killed_worker_without_a_session_loses_its_in_flight_messages(
        mosq: BrokerHandle, tmp_path: Path, children: list[ChildWorker]) -> None:
    """Control (measured on mosquitto 2.0.11): with Session Expiry 0 the session ends with the connection;
    new messages go to the survivor at once, but the dead worker's in-flight and queued messages are
    dropped, not handed to the survivor (the MQTT 5 spec says SHOULD; eclipse-mosquitto issue 2662).
    This is why workers keep a session (``--session-expiry``) and the devices' outbox re-sends."""
    survivor: list[int] = []
    _worker(mosq, mosq.workers[0], survivor, expiry=0)
    dying = ChildWorker(mosq, mosq.workers[1], tmp_path, expiry=0, ack_first=5, cleanup=children)
    _publish(mosq, range(100))
    assert wait_for(lambda: len(dying.got) > 5, 20)
    dying.kill()
    unacked = set(dying.got[5:])
    mosq.broker.wait_log(f"Client {mosq.workers[1].username} closed its connection")
    _publish(mosq, range(100, 200))
    assert wait_for(lambda: set(range(100, 200)) <= set(survivor), 20)  # failover of new messages: at once
    back = ChildWorker(mosq, mosq.workers[1], tmp_path, expiry=0, ack_first=-1, cleanup=children)
    _publish(mosq, range(200, 210))
    assert wait_for(lambda: set(range(200, 210)) <= set(survivor) | set(back.got), 20)
    lost = set(range(200)) - set(survivor) - set(dying.got[:5]) - set(back.got)
    assert unacked <= lost  # in flight at the dead worker: gone
    assert not set(back.got) & set(range(200))


@_on_mosquitto
def test_defer_ack_under_mqtt5_redelivers_until_acknowledged(mosq: BrokerHandle) -> None:
    got: queue.Queue[tuple[int, Callable[[], None] | None]] = queue.Queue()
    current: list[MqttLink] = []

    def handler(topic: str, payload: bytes) -> None:
        got.put((int(payload), current[-1].defer_ack()))

    link = MqttLink(_settings(mosq, mosq.workers[0], group=None), handler, [UPLINK], manual_ack=True)
    current.append(link)
    link.start(wait=10)
    assert link.subscribed.wait(10)
    _publish(mosq, range(1))
    first, stale_ack = got.get(timeout=10)
    assert first == 0 and stale_ack is not None
    # the connection breaks before the acknowledgement: the broker keeps the message in the session
    sock = link.client.socket()
    assert sock is not None
    sock.shutdown(2)
    again, ack = got.get(timeout=20)  # paho reconnects (Clean Start off) and the message comes again
    assert again == 0 and ack is not None
    stale_ack()  # an acknowledgement from the old connection must not acknowledge anything now
    ack()
    link.stop()
    # a new connection to the same session: the acknowledged message does not come again
    link2 = MqttLink(_settings(mosq, mosq.workers[0], group=None), handler, [UPLINK], manual_ack=True)
    current.append(link2)
    link2.start(wait=10)
    assert link2.subscribed.wait(10)
    _publish(mosq, range(1, 2))
    nxt, ack2 = got.get(timeout=10)
    assert nxt == 1
    assert ack2 is not None
    ack2()
    link2.stop()


def test_share_group_is_refused_by_the_embedded_broker_with_a_clear_error(tmp_path: Path) -> None:
    with brokers.running_amqtt(tmp_path) as b:
        link = MqttLink(_settings(b, Creds(b.backend.username, b.backend.password)), lambda t, p: None, [UPLINK])
        with pytest.raises(TransportError) as err:
            link.start(wait=10)
    assert err.value.reason is Reason.UNSUPPORTED
    assert "does not speak MQTT 5" in err.value.detail
    assert GROUP not in str(err.value)


def test_refused_shared_subscription_stops_the_link_with_the_reason() -> None:
    link = MqttLink(MqttSettings(protocol=MQTT_5, share_group=GROUP, client_id="w"), lambda t, p: None, [UPLINK])
    link._pending_subacks[7] = f"$share/{GROUP}/{UPLINK}"
    link._on_subscribe(link.client, None, 7, [ReasonCode(PacketTypes.SUBACK, identifier=158)], None)
    assert link.error is not None and link.error.reason is Reason.UNSUPPORTED
    assert "Shared subscription not supported" in link.error.detail
    assert GROUP not in link.error.detail  # the group name is a secret: never logged
    denied = MqttLink(MqttSettings(protocol=MQTT_5, share_group=GROUP, client_id="w"), lambda t, p: None, [UPLINK])
    denied._on_subscribe(denied.client, None, 1, [ReasonCode(PacketTypes.SUBACK, identifier=135)], None)
    assert denied.error is not None and denied.error.reason is Reason.NOT_AUTHORIZED
    # without a share group a refused filter is logged, as before MQTT 5: the link goes on
    plain = MqttLink(MqttSettings(), lambda t, p: None, [UPLINK])
    plain._on_subscribe(plain.client, None, 1, [ReasonCode(PacketTypes.SUBACK, identifier=128)], None)
    assert plain.error is None


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x" * 257, "tab\there"])
def test_share_group_names_follow_mqtt5(bad: str) -> None:
    with pytest.raises(ConfigError):
        MqttSettings(protocol=MQTT_5, share_group=bad)


def test_share_group_needs_mqtt5_and_3_1_1_stays_the_default() -> None:
    assert MqttSettings().protocol == MQTT_311 and MqttSettings().share_group is None
    with pytest.raises(ConfigError):
        MqttSettings(share_group=GROUP)
    assert MqttSettings(protocol=MQTT_5, share_group="g").subscription(UPLINK) == f"$share/g/{UPLINK}"
    assert MqttSettings().subscription(UPLINK) == UPLINK
