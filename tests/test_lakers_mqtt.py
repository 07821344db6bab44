"""A device driven by lakers (an independent EDHOC implementation in Rust) completes a method-3
handshake with our BackendEndpoint through a real broker (the embedded amqtt, with its ACLs),
then exchanges sealed records and runs a key update with our Session: the handshake keys agree.

The device side speaks the hs-topic framing of ``sealmq/endpoint/framing.py`` by hand
(``true || message_1``, ``C_R || message_3``; it receives ``C_I || message_2/4``)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pki import ccs as pki_ccs
from sealmq import cbor, oscore, topics
from sealmq.edhoc import CcsAuthenticator, CcsCredential, CcsIdentity
from sealmq.edhoc.wire import encode_identifier
from sealmq.endpoint import BackendConfig, BackendEndpoint, HandshakeCompleted, Output, Publish, Received
from sealmq.events import KeyUpdateDone
from sealmq.identity import Role
from sealmq.session import Session
from sealmq.topics import Channel, Direction, RecordKind
from tests.brokers import BrokerHandle, running_amqtt

lakers = pytest.importorskip("lakers", reason="lakers-python (pip install lakers-python) is not installed")

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerHandle]:
    with running_amqtt(tmp_path / "broker", n_devices=1) as handle:
        yield handle


def split(payload: bytes) -> tuple[Any, bytes]:
    prefix = cbor.loads_seq(payload)[0]
    return prefix, payload[len(cbor.dumps(prefix)):]


def raw_key(cred: CcsCredential) -> bytes:
    return cred._private_key.private_numbers().private_value.to_bytes(32, "big")


class BackendPump:
    """Our backend on its own MQTT client: handle one message, publish what it says."""

    def __init__(self, broker: BrokerHandle, endpoint: BackendEndpoint) -> None:
        self.endpoint = endpoint
        self.client, self.got = broker.connect(broker.backend, client_id="backend:lakers-test")
        for flt in endpoint.subscriptions:
            assert broker.subscribe(self.client, flt) == [1]

    def step(self) -> list[Output]:
        msg = self.got.get(timeout=10)
        outs = self.endpoint.handle(msg.topic, msg.payload, time.time(), os.urandom)
        for o in outs:
            if isinstance(o, Publish):
                self.client.publish(o.topic, o.payload, qos=1)
        return outs


def test_lakers_device_through_amqtt(broker: BrokerHandle, tmp_path: Path) -> None:
    device_id = broker.devices[0].username  # the broker's ACL confines dev0 to sealmq/v1/dev0/...
    pki = tmp_path / "pki"
    pki_ccs.issue_ccs(pki, "device", device_id, days=None)  # minimal CCS: lakers parses no iat/exp
    pki_ccs.issue_ccs(pki, "backend", "backend", days=None)
    dev_cred = pki_ccs.load_credential(pki, "device", device_id)
    be_cred = pki_ccs.load_credential(pki, "backend", "backend")
    registry = pki_ccs.load_registry(pki)
    backend = BackendPump(broker, BackendEndpoint(
        credentials=[be_cred], trust_store=None, config=BackendConfig(suites=(2,), methods=(0, 3)),
        authenticator=lambda now: CcsAuthenticator(registry, Role.DEVICE, now),
    ))

    dev, dev_got = broker.connect(broker.devices[0], client_id=f"{device_id}:lakers")
    for ch in (Channel.HANDSHAKE, Channel.DATA):
        assert broker.subscribe(dev, topics.topic(device_id, ch, Direction.DOWN)) == [1]
    hs_up = topics.topic(device_id, Channel.HANDSHAKE, Direction.UP)

    # --- the handshake, lakers on the device --------------------------------------------------
    ini = lakers.EdhocInitiator()
    c_i = b"\x05"
    dev.publish(hs_up, cbor.dumps(True) + bytes(ini.prepare_message_1(c_i, None)), qos=1)
    backend.step()
    prefix, message_2 = split(dev_got.get(timeout=10).payload)
    assert cbor.dumps(prefix) == c_i
    c_r, id_cred_r, _ = ini.parse_message_2(message_2)
    c_r = bytes(c_r)
    ini.verify_message_2(raw_key(dev_cred), dev_cred.cred, lakers.credential_check_or_fetch(id_cred_r, be_cred.cred))
    message_3, prk_out = ini.prepare_message_3(lakers.CredentialTransfer.ByReference, None)
    dev.publish(hs_up, cbor.dumps(encode_identifier(c_r)) + bytes(message_3), qos=1)
    outs = backend.step()
    done = [o for o in outs if isinstance(o, HandshakeCompleted)]
    assert [(d.device_id, d.suite) for d in done] == [(device_id, 2)]
    assert isinstance(done[0].identity, CcsIdentity) and done[0].identity.name == device_id
    prefix, message_4 = split(dev_got.get(timeout=10).payload)
    assert cbor.dumps(prefix) == c_i
    ini.process_message_4(message_4)

    # the lakers exporter gives exactly the OSCORE master secret/salt our Session derives from PRK_out
    assert oscore.master_from_edhoc(bytes(prk_out)) == (
        bytes(ini.edhoc_exporter(0, b"", 16)), bytes(ini.edhoc_exporter(1, b"", 8)))

    # --- sealed records with our Session on the lakers device -------------------------------------
    now = time.time()
    session = Session.from_edhoc(prk_out=bytes(prk_out), c_i=c_i, c_r=c_r, is_initiator=True,
                                 device_id=device_id, now=now, random_bytes=os.urandom)
    topic, record = session.seal(RecordKind.TELEMETRY, b"temp=21.5", now)
    dev.publish(topic, record, qos=1)
    got = [o for o in backend.step() if isinstance(o, Received)]
    assert [(g.device_id, g.plaintext, g.epoch) for g in got] == [(device_id, b"temp=21.5", 0)]

    for o in backend.endpoint.seal(device_id, RecordKind.COMMAND, b"reboot-at-3", time.time()):
        assert isinstance(o, Publish)
        backend.client.publish(o.topic, o.payload, qos=1)
    msg = dev_got.get(timeout=10)
    events = session.open(msg.topic, msg.payload, time.time(), os.urandom)
    assert [(e.kind, e.plaintext) for e in events if isinstance(e, Received)] == [(RecordKind.COMMAND, b"reboot-at-3")]

    # --- key update (EDHOC_KeyUpdate on PRK_out from lakers) through the broker --------------------
    topic, record = session.start_key_update(os.urandom(16), time.time())
    dev.publish(topic, record, qos=1)
    backend.step()  # answers under epoch 0
    msg = dev_got.get(timeout=10)
    events = session.open(msg.topic, msg.payload, time.time(), os.urandom)
    assert [e.epoch for e in events if isinstance(e, KeyUpdateDone)] == [1]
    assert not [e for e in events if isinstance(e, Publish)]
    topic, record = session.seal(RecordKind.TELEMETRY, b"temp=21.6", time.time())
    dev.publish(topic, record, qos=1)
    got = [o for o in backend.step() if isinstance(o, Received)]
    assert [(g.plaintext, g.epoch) for g in got] == [(b"temp=21.6", 1)]
