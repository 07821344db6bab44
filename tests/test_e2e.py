"""End to end against real brokers (embedded amqtt and a mosquitto child process): the real
backend service, real device agents, a real PKI, and an eavesdropper recording what the broker
relays (a paho wildcard subscriber, and ``mosquitto_sub`` with hex output)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from pki import layout, store
from sealmq import cbor
from tests.brokers import MOSQUITTO, needs_mosquitto
from tests.e2e import MosquittoSub, Recorder, System, wait_for

pytestmark = pytest.mark.slow

BROKERS = ["amqtt", pytest.param("mosquitto", marks=[pytest.mark.mosquitto, needs_mosquitto])]


@pytest.fixture(params=BROKERS)
def system(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[System]:
    sys_ = System(tmp_path, ["cam-1", "cam-2", "cam-3"], broker=request.param)
    try:
        yield sys_
    finally:
        sys_.close()


def stored_values(system: System, device_id: str) -> list[object]:
    assert system.backend is not None
    return [cbor.loads(m.payload)["v"].get("n") for m in system.backend.storage.messages(device_id)]


def raw_client(system: System, user: str, client_id: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, system.dep.password("device", user))
    c.connect("127.0.0.1", system.port)
    c.loop_start()
    system.closers.append(lambda: (c.disconnect(), c.loop_stop()))
    assert wait_for(c.is_connected, 5)
    return c


def test_full_session_and_the_broker_sees_no_plaintext(system: System) -> None:
    recorder = Recorder(system)
    sub = MosquittoSub(system) if MOSQUITTO else None
    backend = system.start_backend()
    agent = system.agent("cam-1")
    markers = [f"MARKER-{i}-{os.urandom(4).hex()}" for i in range(12)]
    for i, m in enumerate(markers[:6]):
        agent.send_telemetry({"n": i, "secret": m})
    # a command, answered by the device
    cmd = backend.send_command("cam-1", "status", {"why": markers[6]})
    assert wait_for(lambda: (c := backend.storage.command(cmd)) is not None and c.status == "replied")
    # a key update (on demand), then more telemetry under the new keys
    agent.key_update()
    assert wait_for(lambda: agent.epoch == 1 and backend.counters["key_updates"] >= 1)
    for i, m in enumerate(markers[7:9], start=6):
        agent.send_telemetry({"n": i, "secret": m})
    assert wait_for(lambda: len(stored_values(system, "cam-1")) == 8)
    # disconnect and reconnect: a new agent process for the same device runs a new handshake
    agent.stop()
    agent2 = system.agent("cam-1")
    for i, m in enumerate(markers[9:], start=8):
        agent2.send_telemetry({"n": i, "secret": m})
    assert wait_for(lambda: len(stored_values(system, "cam-1")) == 11)
    assert stored_values(system, "cam-1") == list(range(11))
    time.sleep(0.3)
    recorded = recorder.snapshot()
    recorder.stop()
    assert len(recorded) >= 11 + 6  # records + handshake messages went through the broker
    secrets_ = [m.encode() for m in markers]
    key_pem = (layout.device_dir(system.dep.pki, "cam-1") / "key.pem").read_bytes()
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(key_pem, None)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    captures = [("paho", recorded)]
    if sub is not None:
        captures.append(("mosquitto_sub", sub.stop()))
        assert len(captures[1][1]) >= 11
    for name, capture in captures:
        for topic, payload in capture:
            for s in secrets_:
                assert s not in payload, f"{name}: marker in {topic}"
            assert scalar not in payload and b"PRIVATE KEY" not in payload, f"{name}: key material in {topic}"
    events = [e["event"] for e in system.audit()]
    assert events.count("handshake_completed") == 2
    assert "key_updated" in events and "command_replied" in events


def test_attacks_are_rejected_audited_and_harm_nobody(system: System, tmp_path: Path) -> None:
    backend = system.start_backend()
    recorder = Recorder(system)
    legit = system.agent("cam-1")
    legit.send_telemetry({"n": 0})
    assert wait_for(lambda: len(stored_values(system, "cam-1")) == 1)

    # 1. a device with a certificate from another CA (its broker login is valid)
    other = tmp_path / "other-ca"
    store.init_ca(other)
    store.enroll(other, "device", "cam-2")
    rogue = system.agent("cam-2", pki_dir=other, wait=False)
    # 2. a revoked device
    store.revoke(system.dep.pki, cert_path=layout.device_dir(system.dep.pki, "cam-3") / "cert.pem")
    assert wait_for(lambda: any(e["event"] == "crl_reloaded" for e in system.audit()), 5)
    revoked = system.agent("cam-3", wait=False)
    # 3. device cam-1's certificate on device cam-2's topics (cam-2's broker login)
    impostor = system.agent("cam-2", identity="cam-1", broker_user="cam-2", wait=False)
    assert wait_for(lambda: {"unknown_ca", "revoked", "identity_mismatch"}
                    <= {e.get("reason") for e in system.audit() if e["event"] == "handshake_failed"}, 15)
    assert not rogue.endpoint.established and not revoked.endpoint.established
    assert not impostor.endpoint.established
    assert set(backend.endpoint.sessions) == {"cam-1"}

    # 4. replay, move, flip: an attacker holding cam-1's broker login re-publishes what it saw
    legit.send_telemetry({"n": 1})
    assert wait_for(lambda: len(stored_values(system, "cam-1")) == 2)
    (topic, record) = next((t, p) for t, p in reversed(recorder.snapshot()) if t.endswith("/data/up"))
    attacker = raw_client(system, "cam-1", "cam-1:attacker")
    attacker.publish(topic, record, qos=1)  # replay
    attacker.publish(topic.replace("/data/", "/media/"), record, qos=1)  # moved to another topic
    flipped = bytearray(record)
    flipped[-3] ^= 0x40
    attacker.publish(topic, bytes(flipped), qos=1)  # flipped bit
    # 5. garbage on every topic the backend listens to
    for channel in ("hs", "data", "media"):
        for payload in (b"", b"\x00", os.urandom(64), b"\xf5" + os.urandom(40), cbor.dumps([6, b"", 0, 0, b"x"])):
            attacker.publish(f"sealmq/v1/cam-1/{channel}/up", payload, qos=1)
    # 6. a flood of message_1 (a valid login, its own topic)
    flooder = raw_client(system, "cam-2", "cam-2:flood")
    m1 = next(p for t, p in recorder.snapshot() if t == "sealmq/v1/cam-2/hs/up" and p[:1] == b"\xf5")
    for _ in range(300):
        flooder.publish("sealmq/v1/cam-2/hs/up", m1, qos=0)
    time.sleep(1.0)

    reasons = {e.get("reason") for e in system.audit() if e["event"] == "message_rejected"}
    assert {"replay", "too_many_handshakes"} <= reasons, reasons
    assert reasons & {"decrypt_failed", "wrong_topic"}, reasons
    assert reasons & {"malformed", "wrong_type", "not_deterministic"}, reasons
    assert len(backend.endpoint.half_open) <= backend.endpoint.config.max_half_open
    # the legitimate device's session is unharmed, and nothing forged was stored
    legit.send_telemetry({"n": 2})
    assert wait_for(lambda: len(stored_values(system, "cam-1")) == 3)
    assert stored_values(system, "cam-1") == [0, 1, 2]
    assert stored_values(system, "cam-2") == [] and stored_values(system, "cam-3") == []
    assert legit.epoch == 0 and legit.counters["handshakes"] == 1


def test_broker_restart_mid_session(system: System) -> None:
    backend = system.start_backend()
    agent = system.agent("cam-1")
    agent.send_telemetry({"n": 0})
    assert wait_for(lambda: len(stored_values(system, "cam-1")) == 1)
    system.restart_broker(downtime=1.0)
    assert wait_for(lambda: agent.link.connected.is_set() and backend.link.connected.is_set(), 20)
    time.sleep(0.5)  # the backend's subscriptions are renewed on connect
    for n in (1, 2, 3):
        agent.send_telemetry({"n": n})
    assert wait_for(lambda: len(stored_values(system, "cam-1")) == 4, 15)
    assert stored_values(system, "cam-1") == [0, 1, 2, 3]
    assert agent.counters["handshakes"] == 1  # the session survived the broker


@pytest.mark.mosquitto
@needs_mosquitto
def test_nothing_acknowledged_is_lost_across_a_mosquitto_restart(tmp_path: Path) -> None:
    # mosquitto persists queued QoS 1 messages; records the device sent while the backend was
    # cut off are delivered after the restart.
    system = System(tmp_path, ["cam-1"], broker="mosquitto")
    try:
        backend = system.start_backend()
        agent = system.agent("cam-1")
        backend.link.stop()  # backend away; its persistent session keeps collecting
        for n in range(5):
            agent.send_telemetry({"n": n})
        time.sleep(0.5)
        system.restart_broker(downtime=0.5)
        backend.link.start()
        assert wait_for(lambda: len(stored_values(system, "cam-1")) == 5, 15)
        assert stored_values(system, "cam-1") == list(range(5))
    finally:
        system.close()


def test_backend_restart_devices_recover_data_intact(system: System) -> None:
    system.start_backend()
    a = system.agent("cam-1")
    b = system.agent("cam-2")
    for n in range(3):
        a.send_telemetry({"n": n})
        b.send_telemetry({"n": n})
    assert wait_for(lambda: len(stored_values(system, "cam-1")) == 3 and len(stored_values(system, "cam-2")) == 3)
    system.stop_backend()
    backend = system.start_backend()
    assert stored_values(system, "cam-1") == [0, 1, 2]  # stored data intact
    # the next record reaches a backend without a session: it says so, the device re-handshakes
    # and re-sends it from its outbox under the new session (it is not lost)
    a.send_telemetry({"n": 99})
    b.send_telemetry({"n": 99})
    assert wait_for(lambda: {"cam-1", "cam-2"} <= set(backend.endpoint.sessions), 15)
    a.send_telemetry({"n": 3})
    b.send_telemetry({"n": 3})
    assert a.wait_acknowledged(15) and b.wait_acknowledged(15)
    assert stored_values(system, "cam-1") == [0, 1, 2, 99, 3]
    assert stored_values(system, "cam-2") == [0, 1, 2, 99, 3]
    assert a.counters["handshakes"] == 2 and b.counters["handshakes"] == 2


def test_revoking_an_established_device_ends_its_session(system: System) -> None:
    backend = system.start_backend()
    a = system.agent("cam-1")
    b = system.agent("cam-2")
    a.send_telemetry({"n": 0})
    assert wait_for(lambda: len(stored_values(system, "cam-1")) == 1)
    store.revoke(system.dep.pki, cert_path=layout.device_dir(system.dep.pki, "cam-1") / "cert.pem")
    assert wait_for(lambda: "cam-1" not in backend.endpoint.sessions, 15)

    def lost() -> list[dict]:
        return [e for e in system.audit() if e["event"] == "session_lost" and e.get("device") == "cam-1"]

    # the audit entry is written just after the session goes: wait for it rather than race it
    assert wait_for(lambda: bool(lost()), 10)
    assert lost()[0]["reason"] == "revoked"
    a.send_telemetry({"n": 1})  # no session any more; its re-handshake is refused as revoked
    assert wait_for(lambda: any(e.get("reason") == "revoked" for e in system.audit()
                                if e["event"] == "handshake_failed"), 10)
    assert stored_values(system, "cam-1") == [0]
    b.send_telemetry({"n": 5})  # the other device is unaffected
    assert wait_for(lambda: stored_values(system, "cam-2") == [5])


def test_constrained_method3_device_beside_a_certificate_device(system: System) -> None:
    from dataclasses import replace

    from device.agent import DeviceAgent
    from pki import ccs as pki_ccs

    pki_ccs.issue_ccs(system.dep.pki, "backend", "backend", days=None)
    pki_ccs.issue_ccs(system.dep.pki, "device", "cam-3", days=None)
    backend = system.start_backend()
    assert 3 in backend.endpoint.config.methods
    x509_dev = system.agent("cam-1")
    template = system.agent("cam-3", start=False)
    tiny = DeviceAgent(replace(template.config, method=3))
    tiny.start()
    system.closers.append(tiny.stop)
    assert tiny.wait_established(10)
    assert backend.endpoint.peer("cam-3").kid  # authenticated by its registered CCS (kid), no certificate
    tiny.send_telemetry({"n": 7})
    x509_dev.send_telemetry({"n": 8})
    assert wait_for(lambda: stored_values(system, "cam-3") == [7] and stored_values(system, "cam-1") == [8])
    tiny.send_file(Path(__file__).resolve().parents[1] / "img" / "checker.png")
    assert tiny.wait_transfers(30)  # media signed with the device's CCS key, verified by the backend
    # revoking the CCS ends the live session at once; the certificate device is unaffected
    pki_ccs.revoke_ccs(system.dep.pki, role="device", name="cam-3")
    assert wait_for(lambda: "cam-3" not in backend.endpoint.sessions, 5)
    x509_dev.send_telemetry({"n": 9})
    assert wait_for(lambda: stored_values(system, "cam-1") == [8, 9])


def test_device_certificate_by_reference_x5t(system: System) -> None:
    # The device sends only its certificate's hash (x5t); the backend knows what its CA issued.
    from sealmq.endpoint import EndpointConfig

    recorder = Recorder(system)
    system.start_backend()
    by_value = system.agent("cam-1")
    by_ref = system.agent("cam-2", endpoint=EndpointConfig(by_reference=True, handshake_timeout=3.0))
    by_ref.send_telemetry({"n": 1})
    by_value.send_telemetry({"n": 2})
    assert wait_for(lambda: stored_values(system, "cam-2") == [1] and stored_values(system, "cam-1") == [2])
    up = {t.split("/")[2]: len(p) for t, p in recorder.snapshot() if t.endswith("/hs/up") and p[:1] != b"\xf5"}
    assert up["cam-2"] + 300 < up["cam-1"]  # message_3 without the certificate is far smaller


def test_a_handshake_is_recorded_by_the_ingest_flusher_not_on_the_network_thread(tmp_path: Path) -> None:
    """The devices row of a handshake rides with the next ingest batch: no transaction (and fsync)
    of its own on the MQTT thread, where it held up every other device's handshake in a storm."""
    system = System(tmp_path, ["cam-1"], broker="amqtt")
    try:
        backend = system.start_backend()
        writers: list[str] = []
        backend.storage._db.set_trace_callback(  # type: ignore[attr-defined]
            lambda sql: writers.append(threading.current_thread().name) if "INTO devices" in sql else None)
        system.agent("cam-1")
        assert wait_for(lambda: [d[0] for d in backend.storage.devices()] == ["cam-1"], 5)
        assert writers == ["backend-ingest"]
    finally:
        system.close()
