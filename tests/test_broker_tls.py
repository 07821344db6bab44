"""mqtts on both brokers: the broker certificate from `sealmq pki issue-broker`, client certificates as logins.

Real brokers (embedded amqtt, a mosquitto child process), real certificates from a fresh test PKI,
and `openssl s_client` as an independent check of the listener's chain and protocol versions.
"""

from __future__ import annotations

import io
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.inspect import run_inspect
from broker.mosquitto_config import OPENSSL_CNF
from broker.tls import TlsFiles
from pki import layout, store
from sealmq import cbor
from tests.brokers import BrokerHandle, Creds, needs_mosquitto, running_amqtt, running_mosquitto
from tests.pki_fixtures import make_pki

OPENSSL = shutil.which("openssl")


class Pkis:
    def __init__(self, root: Path) -> None:
        self.main = make_pki(root / "pki", ["dev0", "dev1", "dev2"], key_types={"dev1": "ed25519"})
        store.enroll_broker(self.main.path, "broker", ["localhost", "127.0.0.1"])
        store.enroll(self.main.path, "device", "monitor")  # a device named like the monitor account
        store.revoke(self.main.path, cert_path=layout.device_dir(self.main.path, "dev2") / "cert.pem")
        self.foreign = make_pki(root / "foreign", ["dev0"])
        self.tls = TlsFiles.from_pki(self.main.path)

    @property
    def ca(self) -> Path:
        return layout.anchor(self.main.path)

    def context(self, chain: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if chain is not None:
            ctx.load_cert_chain(str(chain), str(key))
        return ctx

    def device(self, name: str, pki: Path | None = None) -> ssl.SSLContext:
        d = layout.device_dir(pki or self.main.path, name)
        return self.context(d / "chain.pem", d / "key.pem")

    def backend(self) -> ssl.SSLContext:
        d = layout.backend_dir(self.main.path)
        return self.context(d / "chain.pem", d / "key.pem")


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> Pkis:
    return Pkis(tmp_path_factory.mktemp("tls-pki"))


@pytest.fixture(params=["amqtt", pytest.param("mosquitto", marks=[pytest.mark.mosquitto, needs_mosquitto])])
def tls_broker(request: pytest.FixtureRequest, tmp_path: Path, pkis: Pkis) -> Iterator[BrokerHandle]:
    runner = running_amqtt if request.param == "amqtt" else running_mosquitto
    with runner(tmp_path, n_devices=3, tls=pkis.tls) as handle:
        yield handle


def _topic(dev: str, ch: str = "data", direction: str = "up") -> str:
    return f"sealmq/v1/{dev}/{ch}/{direction}"


def test_certificate_login_relays_between_device_and_backend(tls_broker: BrokerHandle, pkis: Pkis) -> None:
    backend, got = tls_broker.connect(None, tls=pkis.backend())
    assert tls_broker.subscribe(backend, "sealmq/v1/+/+/up") == [1]
    device, dev_got = tls_broker.connect(None, tls=pkis.device("dev0"))
    assert tls_broker.subscribe(device, _topic("dev0", direction="down")) == [1]
    device.publish(_topic("dev0"), b"\x01sealed", qos=1)
    msg = got.get()
    assert (msg.topic, msg.payload) == (_topic("dev0"), b"\x01sealed")
    backend.publish(_topic("dev0", direction="down"), b"\x02cmd", qos=1)
    assert dev_got.get().payload == b"\x02cmd"


def test_ed25519_client_certificate_logs_in(tls_broker: BrokerHandle, pkis: Pkis) -> None:
    client, _ = tls_broker.connect(None, tls=pkis.device("dev1"))
    assert tls_broker.subscribe(client, _topic("dev1", direction="down")) == [1]


def test_password_still_works_on_the_plain_listener(tls_broker: BrokerHandle) -> None:
    client, _ = tls_broker.connect(tls_broker.monitor)
    assert tls_broker.subscribe(client, "sealmq/#") == [1]


def _tls_refused(handle: BrokerHandle, ctx: ssl.SSLContext, creds: Creds | None = None) -> None:
    """The broker refuses the TLS handshake, or closes / refuses the CONNECT that follows it."""
    def field(b: bytes) -> bytes:
        return len(b).to_bytes(2, "big") + b

    flags = 0x02 | (0xC0 if creds else 0)
    body = field(b"MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big") + field(b"")
    if creds:
        body += field(creds.username.encode()) + field(creds.password.encode())
    try:
        with socket.create_connection((handle.host, handle.tls_port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=handle.host) as tls:
            tls.sendall(bytes([0x10, len(body)]) + body)
            reply = tls.recv(4)
    except (ssl.SSLError, ConnectionError, OSError):
        return  # refused in the handshake (TLS 1.2) or right after it (TLS 1.3 alert, reset)
    assert reply == b"" or (reply[:2] == b"\x20\x02" and reply[3] != 0), f"not refused: {reply!r}"


def test_the_refusal_check_fails_on_an_accepted_login(tls_broker: BrokerHandle, pkis: Pkis) -> None:
    with pytest.raises(AssertionError, match="not refused"):
        _tls_refused(tls_broker, pkis.device("dev0"))


def test_revoked_certificate_refused(tls_broker: BrokerHandle, pkis: Pkis) -> None:
    _tls_refused(tls_broker, pkis.device("dev2"))


def test_foreign_ca_certificate_refused(tls_broker: BrokerHandle, pkis: Pkis) -> None:
    _tls_refused(tls_broker, pkis.device("dev0", pkis.foreign.path))


def test_broker_certificate_as_client_refused(tls_broker: BrokerHandle, pkis: Pkis) -> None:
    d = layout.broker_dir(pkis.main.path)
    _tls_refused(tls_broker, pkis.context(d / "chain.pem", d / "key.pem"))  # serverAuth only: wrong role


def test_no_certificate_refused_on_the_tls_listener(tls_broker: BrokerHandle, pkis: Pkis) -> None:
    _tls_refused(tls_broker, pkis.context(), tls_broker.devices[0])  # even with the right password


def test_another_devices_certificate_cannot_reach_its_topics(tls_broker: BrokerHandle, pkis: Pkis) -> None:
    backend, got = tls_broker.connect(None, tls=pkis.backend())
    assert tls_broker.subscribe(backend, "sealmq/v1/+/+/up") == [1]
    if tls_broker.kind == "amqtt":  # a user name other than the certificate's is refused outright
        tls_broker.connect(tls_broker.devices[0], tls=pkis.device("dev1"), expect_refused=True)
    # mosquitto ignores the user name: the certificate's CN (dev1) is the login
    attacker, stolen = tls_broker.connect(None, tls=pkis.device("dev1"))
    # amqtt refuses the SUBSCRIBE; mosquitto 2.0 grants it but its ACL never delivers
    refused = [128] if tls_broker.kind == "amqtt" else [1]
    assert tls_broker.subscribe(attacker, _topic("dev0", direction="down")) == refused
    assert tls_broker.subscribe(attacker, "sealmq/v1/+/+/up") == refused
    attacker.publish(_topic("dev0"), b"forged", qos=1).wait_for_publish(5)
    attacker.publish(_topic("dev1"), b"own", qos=1).wait_for_publish(5)
    assert [m.payload for m in got.drain(0.5)] == [b"own"]
    victim, victim_got = tls_broker.connect(None, tls=pkis.device("dev0"))
    assert tls_broker.subscribe(victim, _topic("dev0", direction="down")) == [1]
    backend.publish(_topic("dev0", direction="down"), b"for dev0", qos=1).wait_for_publish(5)
    assert victim_got.get().payload == b"for dev0"
    assert stolen.drain(0.5) == []


def test_device_certificate_never_logs_in_as_the_monitor(tmp_path: Path, pkis: Pkis) -> None:
    """amqtt checks the certificate's role against the account's; mosquitto only sees the CN
    (docs/broker.md: the PKI must not issue device names that are broker-only accounts)."""
    with running_amqtt(tmp_path, n_devices=1, tls=pkis.tls) as handle:
        d = layout.device_dir(pkis.main.path, "monitor")
        handle.connect(None, tls=pkis.context(d / "chain.pem", d / "key.pem"), expect_refused=True)


@pytest.mark.parametrize("kind", ["amqtt", pytest.param("mosquitto", marks=[pytest.mark.mosquitto, needs_mosquitto])])
def test_tls_password_listener_for_monitors(tmp_path: Path, pkis: Pkis, kind: str) -> None:
    """The second TLS listener takes passwords (the monitor has no certificate); the plain one is off."""
    from tests.brokers import free_port

    runner = running_amqtt if kind == "amqtt" else running_mosquitto
    port = 0 if kind == "amqtt" else free_port()
    # mosquitto keeps the plain listener here: tests/brokers.py waits for it to know mosquitto is up
    with runner(tmp_path, tls=pkis.tls, tls_password_port=port, plain=kind == "mosquitto") as handle:
        password_port = handle.broker.tls_password_port if kind == "amqtt" else port
        cert_port, handle.tls_port = handle.tls_port, password_port
        client, _ = handle.connect(handle.monitor, tls=pkis.context())
        assert handle.subscribe(client, "sealmq/#") == [1]
        handle.connect(Creds("monitor", "wrong"), tls=pkis.context(), expect_refused=True)
        # `sealmq inspect` over TLS with the monitor's password sees a device's (certificate-login) traffic
        out = io.StringIO()
        result: list[int] = []
        mon = handle.monitor
        t = threading.Thread(target=lambda: result.append(run_inspect(
            "127.0.0.1", password_port, mon.username, mon.password, count=1, timeout=10, out=out,
            tls_ca=pkis.ca)))
        t.start()
        deadline = time.monotonic() + 5
        while "# subscribed" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
        handle.tls_port = cert_port
        dev, _ = handle.connect(None, tls=pkis.device("dev0"))
        dev.publish(_topic("dev0"), cbor.dumps([1, b"\x07", 2, 9, b"\xee" * 30]), qos=1).wait_for_publish(5)
        t.join(15)
        assert result == [0]
        assert "record kind=TELEMETRY kid=07 epoch=2 piv=9 ct_len=30" in out.getvalue()


def test_amqtt_sees_a_revocation_without_restart(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ["dev0"])
    store.enroll_broker(pki.path, "broker", ["127.0.0.1"])
    files = TlsFiles.from_pki(pki.path)
    d = layout.device_dir(pki.path, "dev0")
    with running_amqtt(tmp_path / "b", n_devices=1, tls=files) as handle:
        ctx = ssl.create_default_context(cafile=str(files.cafile))
        ctx.load_cert_chain(str(d / "chain.pem"), str(d / "key.pem"))
        handle.connect(None, tls=ctx)
        handle.close_clients()
        store.revoke(pki.path, cert_path=d / "cert.pem")
        _tls_refused(handle, ctx)
        assert handle.broker.stats.refused_connect >= 1


def test_amqtt_tls_layer_takes_a_reissued_crl(tmp_path: Path) -> None:
    """Started with a CRL past its nextUpdate, the TLS layer refuses every client certificate
    (hard fail); once the CA re-issues the CRL, the broker picks it up without a restart."""
    from datetime import UTC, datetime, timedelta

    pki = make_pki(tmp_path / "pki", ["dev0"])
    store.enroll_broker(pki.path, "broker", ["127.0.0.1"])
    store.issue_crl(pki.path, now=datetime.now(UTC) - timedelta(days=40), days=30)
    files = TlsFiles.from_pki(pki.path)
    d = layout.device_dir(pki.path, "dev0")
    ctx = ssl.create_default_context(cafile=str(files.cafile))
    ctx.load_cert_chain(str(d / "chain.pem"), str(d / "key.pem"))
    with running_amqtt(tmp_path / "b", n_devices=1, tls=files, crl_refresh_interval=0.1) as handle:
        _tls_refused(handle, ctx)
        assert handle.broker.stats.refused_connect == 0  # refused by the TLS layer, not by our gate
        store.issue_crl(pki.path)
        deadline = time.monotonic() + 10
        while True:
            try:
                handle.connect(None, tls=ctx, timeout=2)
                break
            except (AssertionError, ssl.SSLError, OSError):
                assert time.monotonic() < deadline, "the re-issued CRL was not picked up"
                time.sleep(0.2)


@needs_mosquitto
@pytest.mark.mosquitto
def test_mosquitto_refuses_everyone_with_a_stale_crl(tmp_path: Path) -> None:
    """Why docs/broker.md says to restart Mosquitto after every `sealmq pki crl`."""
    from datetime import UTC, datetime, timedelta

    pki = make_pki(tmp_path / "pki", ["dev0"])
    store.enroll_broker(pki.path, "broker", ["127.0.0.1"])
    store.issue_crl(pki.path, now=datetime.now(UTC) - timedelta(days=40), days=30)
    d = layout.device_dir(pki.path, "dev0")
    ctx = ssl.create_default_context(cafile=str(layout.anchor(pki.path)))
    ctx.load_cert_chain(str(d / "chain.pem"), str(d / "key.pem"))
    with running_mosquitto(tmp_path / "b", n_devices=1, tls=TlsFiles.from_pki(pki.path)) as handle:
        _tls_refused(handle, ctx)
        deadline = time.monotonic() + 5  # mosquitto logs the refusal after the client saw it
        while "certificate verify failed" not in handle.broker.log():
            assert time.monotonic() < deadline, handle.broker.log()
            time.sleep(0.05)
        # control: the same certificate passes once the CRL is re-issued and mosquitto restarted
        store.issue_crl(pki.path)
        shutil.copyfile(layout.crl(pki.path), handle.broker.conf.parent / "tls" / "crl.pem")
        handle.broker.restart()
        handle.connect(None, tls=ctx)


# --- no TLS session tickets ----------------------------------------------------------------------
def _login_brings_a_ticket(handle: BrokerHandle, ctx: ssl.SSLContext) -> bool:
    """A certificate login over TLS 1.3, accepted; whether the broker sent a session ticket with it
    (TLS 1.3 tickets follow the handshake: the client takes them in with its first read, the CONNACK)."""
    body = len(b"MQTT").to_bytes(2, "big") + b"MQTT" + bytes([4, 0x02]) + (30).to_bytes(2, "big") + b"\0\0"
    with socket.create_connection((handle.host, handle.tls_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=handle.host) as tls:
        assert tls.version() == "TLSv1.3"
        tls.sendall(bytes([0x10, len(body)]) + body)
        assert tls.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
        return tls.session is not None and tls.session.has_ticket


def test_no_tls_session_tickets(tls_broker: BrokerHandle, pkis: Pkis) -> None:
    """Our clients (paho, libmosquitto) never resume a TLS session, so the brokers send no tickets:
    making them cost mosquitto 0.3-0.5 ms of CPU per login (docs/benchmarks.md, stop 31)."""
    assert not _login_brings_a_ticket(tls_broker, pkis.device("dev0"))


@needs_mosquitto
@pytest.mark.mosquitto
def test_mosquitto_sends_tickets_unless_started_with_the_generated_openssl_cnf(tmp_path: Path, pkis: Pkis) -> None:
    """The control for the test above: mosquitto.conf cannot turn tickets off; the generated
    openssl.cnf does, when OPENSSL_CONF names it (as docs/broker.md and the compose file start it)."""
    with running_mosquitto(tmp_path, n_devices=1, tls=pkis.tls) as handle:
        ctx = pkis.device("dev0")
        assert not _login_brings_a_ticket(handle, ctx)
        (handle.broker.conf.parent / OPENSSL_CNF).unlink()  # tests/brokers.py then sets no OPENSSL_CONF
        handle.broker.restart()
        assert _login_brings_a_ticket(handle, ctx)


# --- openssl s_client: the listener, checked by another TLS implementation ------------------------
def _s_client(port: int, pkis: Pkis, *args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    d = layout.device_dir(pkis.main.path, "dev0")
    cmd = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(pkis.ca), "-verify_return_error",
           "-verify_ip", "127.0.0.1", "-cert", str(d / "cert.pem"), "-key", str(d / "key.pem"), "-brief", *args]
    return subprocess.run(cmd, input="", capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
def test_openssl_checks_chain_and_versions(tls_broker: BrokerHandle, pkis: Pkis) -> None:
    for flag, version in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
        out = _s_client(tls_broker.tls_port, pkis, flag)
        assert out.returncode == 0, out.stderr
        assert f"Protocol version: {version}" in out.stderr
        assert "Verification: OK" in out.stderr
    # TLS 1.1 allowed on the client side (seclevel 0): the broker must be the one refusing
    old = _s_client(tls_broker.tls_port, pkis, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert old.returncode != 0
    assert "Protocol version: TLSv1.1" not in old.stderr
    # mosquitto answers with an alert, Python's asyncio (amqtt) just closes the connection
    assert any(why in old.stderr for why in ("alert protocol version", "unsupported protocol", "unexpected eof")), \
        old.stderr
    # the broker's chain does not verify against a foreign CA
    foreign = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{tls_broker.tls_port}", "-CAfile",
         str(layout.anchor(pkis.foreign.path)), "-verify_return_error", "-brief"],
        input="", capture_output=True, text=True, timeout=30, check=False)
    assert foreign.returncode != 0
    assert "verify" in foreign.stderr.lower()


# --- the whole system over mqtts ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["amqtt", pytest.param("mosquitto", marks=[pytest.mark.mosquitto, needs_mosquitto])])
def test_sealed_telemetry_and_image_over_tls_with_certificate_logins(tmp_path: Path, kind: str) -> None:
    """Device agent and backend service reach the broker only over TLS, logged in by certificate
    (no password in their settings); the monitor still sees ciphertext only."""
    import hashlib

    from backend.media import list_media
    from backend.storage import db_path
    from tests.e2e import Recorder, System, wait_for

    system = System(tmp_path, ["cam-1"], broker=kind, tls=True)
    try:
        assert system.mqtt("device", "cam-1").password is None
        recorder = Recorder(system)
        backend = system.start_backend()
        agent = system.agent("cam-1")
        agent.send_telemetry({"n": 0, "temperature_c": 21.5})
        image = Path(__file__).resolve().parents[1] / "img" / "gradient.png"
        agent.send_file(image)
        assert agent.wait_transfers(60), agent.outbox.transfers
        assert wait_for(lambda: len(backend.storage.messages("cam-1")) == 1)
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        stored = [r for r in list_media(db_path(system.dep.backend_data)) if r.sha256 == digest]
        assert stored and stored[0].signature_verified and stored[0].device_id == "cam-1"
        relayed = recorder.snapshot()
        assert {t for t, _ in relayed} >= {"sealmq/v1/cam-1/hs/up", "sealmq/v1/cam-1/data/up",
                                           "sealmq/v1/cam-1/media/up"}
        everything = b"".join(p for _, p in relayed)
        assert b"temperature_c" not in everything and image.read_bytes()[100:132] not in everything
        if kind == "mosquitto":  # the logins came in on the TLS listener, by certificate CN
            log = system._broker.log()
            assert f"on port {system.tls_port}" in log
            assert "as cam-1 (" in log and "u'cam-1'" in log and "u'backend'" in log
    finally:
        system.close()
