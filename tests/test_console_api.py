"""The operator console's HTTP API against a real system: authentication, every view, hostile device
strings kept as data, media served safely, the broker view, server-sent events and /metrics."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.bootstrap import bootstrap
from backend.console.app import CSP, STATIC
from backend.console.auth import ConsoleAuth, load_hash
from backend.console.feed import ConsoleFeed
from backend.console.server import audit_tail
from backend.metrics import BackendMetrics
from pki import layout, store
from sealmq.endpoint import Received
from sealmq.topics import RecordKind
from tests.console_harness import ConsoleUnderTest, running_console
from tests.e2e import Recorder, wait_for
from tests.test_e2e import raw_client

HOSTILE = '<img src=x onerror="window.__pwned=1">'
VIEWS = ["/api/devices", "/api/telemetry", "/api/telemetry?device=dev-001", "/api/media", "/api/audit",
         "/api/broker", "/api/events", "/metrics", "/media/dev-001/00ff"]


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleUnderTest]:
    root = tmp_path_factory.mktemp("console")
    with running_console(root / "dep", ["dev-001", "dev-002"]) as cut:
        system = cut.system
        a = system.agent("dev-001")
        system.agent("dev-002")
        hostile_png = root / f"{HOSTILE}.png"
        hostile_png.write_bytes((Path(__file__).parents[1] / "img" / "checker.png").read_bytes())
        page = root / "page.png"
        page.write_bytes(b"<html><script>window.__pwned=1</script></html>")
        a.send_file(hostile_png)
        a.send_file(page, content_type="text/html")  # a device claiming a dangerous type
        clip = root / "clip.mp4"
        clip.write_bytes(os.urandom(3000))
        a.send_file(clip)
        for step in range(3):
            a.send_telemetry({"temperature_c": 20.5 + step, "note": HOSTILE, HOSTILE: step})
        assert a.wait_transfers(20)
        assert wait_for(lambda: system.backend is not None and system.backend.storage.count_messages("dev-001") == 3)
        yield cut


def _get(cut: ConsoleUnderTest, path: str) -> httpx.Response:
    with cut.client() as c:
        return c.get(path)


def test_unauthenticated_requests_are_refused(console: ConsoleUnderTest) -> None:
    with console.client(authenticated=False) as c:
        for path in VIEWS:
            r = c.get(path)
            assert r.status_code == 401, path
            assert "temperature" not in r.text and "dev-001" not in r.text
            assert r.headers["content-security-policy"] == CSP
            assert r.headers["x-content-type-options"] == "nosniff"
        page = c.get("/")
        assert page.status_code == 303 and page.headers["location"] == "/login"
        assert c.get("/api/devices", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with httpx.Client(base_url=console.base, cookies={"sealmq_console": "forged"}) as forged:
        assert forged.get("/api/devices").status_code == 401
    with console.client(authenticated=False) as c:
        # the login page and static assets are public, and hold no data
        assert c.get("/login").status_code == 200
        assert c.get("/static/console.js").status_code == 200


def test_login_sets_a_strict_httponly_session_cookie_and_logout_ends_it(console: ConsoleUnderTest) -> None:
    with console.client(authenticated=False) as c:
        bad = c.post("/login", data={"password": "not-it"})
        assert bad.status_code == 303 and bad.headers["location"] == "/login?failed=1"
        assert "set-cookie" not in bad.headers
        ok = c.post("/login", data={"password": console.password})
        assert ok.status_code == 303 and ok.headers["location"] == "/"
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Path=/" in cookie
        assert console.password not in cookie
        assert c.get("/api/devices").status_code == 200
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert c.post("/logout").status_code == 303
        assert c.get("/api/devices").status_code == 401


def test_devices_view(console: ConsoleUnderTest) -> None:
    rows = {d["id"]: d for d in _get(console, "/api/devices").json()["devices"]}
    assert set(rows) == {"dev-001", "dev-002"}
    cert = store.load_identity(layout.device_dir(console.system.dep.pki, "dev-001")).chain[0]
    d1 = rows["dev-001"]
    assert d1["credential"] == {"type": "x509", "subject": "CN=dev-001", "serial": f"{cert.serial_number:x}",
                                "not_after": cert.not_valid_after_utc.isoformat()}
    assert d1["session"] == "established" and d1["epoch"] == 0 and not d1["revoked"]
    assert d1["records_in"] >= 3 and d1["records_out"] >= 1  # media acks go back sealed
    assert d1["last_seen"] is not None


def test_telemetry_view_returns_device_strings_as_data(console: ConsoleUnderTest) -> None:
    r = _get(console, "/api/telemetry?device=dev-001")
    assert r.headers["content-type"] == "application/json"
    points = r.json()["points"]
    assert [p["values"]["temperature_c"] for p in points] == [20.5, 21.5, 22.5]
    assert points[0]["values"]["note"] == HOSTILE and points[2]["values"][HOSTILE] == 2
    latest = _get(console, "/api/telemetry").json()["latest"]
    assert latest["dev-001"]["values"]["temperature_c"] == 22.5
    assert _get(console, "/api/telemetry?device=../etc").status_code == 400


def test_media_view_and_files_are_served_safely(console: ConsoleUnderTest) -> None:
    media = {m["name"]: m for m in _get(console, "/api/media").json()["media"]}
    png, page = media[f"{HOSTILE}.png"], media["page.png"]
    assert png["signature_verified"] and png["device"] == "dev-001" and png["inline"]
    data = (Path(__file__).parents[1] / "img" / "checker.png").read_bytes()
    assert png["size"] == len(data) and re.fullmatch(r"[0-9a-f]{64}", png["sha256"])
    r = _get(console, png["url"])
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-type"] == "image/png"
    assert r.headers["content-security-policy"] == "default-src 'none'; sandbox"
    disposition = r.headers["content-disposition"]
    assert disposition.startswith("inline;") and "<" not in disposition and '"' not in disposition.split('"')[1]
    # a device's "text/html" is never served as such
    assert not page["inline"]
    r = _get(console, page["url"])
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"].startswith("attachment;")
    video = media["clip.mp4"]
    assert video["inline"] and video["content_type"] == "video/mp4"
    r = _get(console, video["url"])
    assert r.headers["content-type"] == "video/mp4" and len(r.content) == video["size"] == 3000
    for bad in ("/media/dev-001/" + "0" * 65, "/media/dev-001/zz", "/media/..%2f..%2fetc/00",
                f"/media/dev-002/{png['transfer']}"):
        assert _get(console, bad).status_code == 404, bad


def test_audit_view_filters_and_shows_rejections_with_reasons(console: ConsoleUnderTest) -> None:
    system = console.system
    raw_client(system, "dev-002", "dev-002:raw").publish("sealmq/v1/dev-002/data/up", b"\x85garbage", qos=1)
    assert wait_for(lambda: any(e["event"] == "message_rejected"
                                for e in _get(console, "/api/audit?device=dev-002").json()["audit"]))
    rejected = _get(console, "/api/audit?event=message_rejected").json()["audit"]
    assert rejected and all(e["event"] == "message_rejected" for e in rejected)
    assert rejected[-1]["device"] == "dev-002" and rejected[-1]["reason"]
    hs = _get(console, "/api/audit?event=handshake_completed").json()["audit"]
    assert {e["device"] for e in hs} == {"dev-001", "dev-002"}
    rows = {d["id"]: d for d in _get(console, "/api/devices").json()["devices"]}
    assert rows["dev-002"]["rejections"] >= 1
    metrics = _get(console, "/metrics").text
    assert re.search(r'sealmq_backend_rejections_total\{event="message_rejected",reason="[a-z_]+"\} [1-9]', metrics)


def test_broker_view_is_what_the_monitor_sees_beside_what_the_backend_opened(console: ConsoleUnderTest) -> None:
    system = console.system
    recorder = Recorder(system)
    try:
        agent = next(a for k, a in system.agents.items() if k.startswith("dev-002/"))

        def recorder_sees_data() -> bool:  # the recorder's SUBACK may come after its CONNACK
            agent.send_telemetry({"warm_up": 1})
            return wait_for(lambda: any(t.endswith("dev-002/data/up") for t, _ in recorder.snapshot()), 1)

        assert wait_for(recorder_sees_data, 10)
        agent.send_telemetry({"temperature_c": 7.25})

        def opened() -> list[dict]:  # type: ignore[type-arg]
            entries = _get(console, "/api/broker?limit=300").json()["broker"]
            return [e for e in entries if e["backend"] and "7.25" in e["backend"]["text"]]

        assert wait_for(lambda: bool(opened()))
        entry = opened()[0]
        assert entry["topic"] == "sealmq/v1/dev-002/data/up" and entry["backend"]["status"] == "opened"
        # exactly what `mosquitto_sub -F '%t %x'` prints for that message: topic, space, payload hex
        assert wait_for(lambda: (entry["topic"], bytes.fromhex(entry["hex"])) in recorder.snapshot())
        assert not entry["truncated"] and b"7.25" not in bytes.fromhex(entry["hex"])
    finally:
        recorder.stop()


def test_server_sent_events_carry_live_telemetry(console: ConsoleUnderTest) -> None:
    agent = next(a for k, a in console.system.agents.items() if k.startswith("dev-001/"))
    with console.client() as c, c.stream("GET", "/api/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == "event: hello"
        agent.send_telemetry({"temperature_c": 99.5})
        event = None
        for line in lines:
            if line == "event: telemetry":
                event = json.loads(next(lines).removeprefix("data: "))
                break
        assert event is not None and event["device"] == "dev-001" and event["values"] == {"temperature_c": 99.5}


def test_signing_out_ends_the_live_stream(console: ConsoleUnderTest) -> None:
    with console.client(authenticated=False) as c:
        assert c.post("/login", data={"password": console.password}).status_code == 303
        with c.stream("GET", "/api/events") as r:
            lines = r.iter_lines()
            assert next(lines) == "event: hello"
            with httpx.Client(base_url=console.base, cookies=dict(c.cookies)) as other_tab:
                assert other_tab.post("/logout").status_code == 303
            assert all(not line.startswith("event: ") for line in lines)  # the stream ends, nothing more


def test_metrics_move(console: ConsoleUnderTest) -> None:
    def value(text: str, name: str) -> float:
        m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    before = _get(console, "/metrics")
    assert before.headers["content-type"].startswith("text/plain")
    opened = 'sealmq_backend_records_opened_total{kind="telemetry"}'
    assert value(before.text, "sealmq_backend_handshakes_total") == 2
    assert value(before.text, "sealmq_backend_handshake_seconds_count") == 2
    assert value(before.text, "sealmq_backend_sessions") == 2
    assert value(before.text, 'sealmq_backend_media_transfers_total{outcome="completed"}') == 3
    assert value(before.text, "sealmq_backend_media_bytes_total") > 0
    agent = next(a for k, a in console.system.agents.items() if k.startswith("dev-001/"))
    agent.send_telemetry({"x": 1})
    assert wait_for(lambda: value(_get(console, "/metrics").text, opened) == value(before.text, opened) + 1)
    agent.key_update()
    assert wait_for(lambda: value(_get(console, "/metrics").text, "sealmq_backend_key_updates_total") >= 1)
    agent.send_telemetry({"x": 2})  # under the new keys
    assert wait_for(lambda: {d["id"]: d for d in _get(console, "/api/devices").json()["devices"]}["dev-001"]["epoch"]
                    == 1)


def test_a_revoked_device_is_shown_as_revoked(tmp_path: Path) -> None:
    with running_console(tmp_path / "dep", ["dev-001"]) as cut:
        cut.system.agent("dev-001")
        store.revoke(cut.system.dep.pki, cert_path=layout.device_dir(cut.system.dep.pki, "dev-001") / "cert.pem")

        def row() -> dict:  # type: ignore[type-arg]
            return _get(cut, "/api/devices").json()["devices"][0]

        assert wait_for(lambda: row()["revoked"] and row()["session"] == "none", 10)


def test_bootstrap_writes_the_console_password_and_only_a_hash_for_the_backend(tmp_path: Path) -> None:
    dep, created = bootstrap(tmp_path / "d", [], iterations=1000)
    assert "console password" in created
    password = dep.console_password_file.read_text().strip()
    for path in (dep.console_password_file, dep.console_auth):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    pw_hash = load_hash(dep.console_auth)
    assert password not in pw_hash and pw_hash.startswith("scrypt$16384$8$1$")
    auth = ConsoleAuth(pw_hash)
    assert auth.check_password(password) and auth.check_password(password)  # second time from the cache
    assert not auth.check_password(password + "x") and not auth.check_password("")
    for broken in ("", "scrypt$3$8$1$AAAA$AAAA", "scrypt$16384$8$1$!!$AAAA", pw_hash.rsplit("$", 1)[0] + "$AAAA"):
        assert not ConsoleAuth(broken).check_password(password)
    _, again = bootstrap(tmp_path / "d", [], iterations=1000)
    assert "console password" not in again and dep.console_password_file.read_text().strip() == password


def test_the_console_starts_with_the_audit_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "server_log.jsonl"
    entries = [{"ts": i, "event": "message_rejected", "device": "dev-001", "reason": "replay"} for i in range(400)]
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))
    tail = audit_tail(log, max_bytes=1000)
    assert tail and tail == entries[-len(tail):]  # whole entries only: the cut line is skipped
    feed = ConsoleFeed()
    feed.preload_audit(tail)
    assert feed.audit_entries(limit=1000) == tail and feed.device_stats()["dev-001"].rejections == len(tail)
    assert feed.events_since(0) == (0, [])  # history, not live events
    assert audit_tail(tmp_path / "missing.jsonl") == []


def test_sessions_expire() -> None:
    now = [1000.0]
    auth = ConsoleAuth("scrypt$16384$8$1$AAAA$AAAA", clock=lambda: now[0])
    token = auth.new_session()
    assert auth.check_session(token) and not auth.check_session(token + "x") and not auth.check_session(None)
    now[0] += 13 * 3600
    assert not auth.check_session(token)


def test_metrics_registries_are_per_service() -> None:
    a, b = BackendMetrics(), BackendMetrics()
    a.on_audit({"event": "key_updated"})
    assert b"sealmq_backend_key_updates_total 1.0" in a.exposition()
    assert b"sealmq_backend_key_updates_total 0.0" in b.exposition()


def test_broker_entry_is_paired_when_the_backend_opens_it_later() -> None:
    feed = ConsoleFeed()
    topic, payload = "sealmq/v1/dev-001/data/up", b"\x01\x02"
    feed.on_broker(topic, payload, 1.0)
    assert feed.broker_entries()[0]["backend"] is None
    feed.on_message(topic, payload, [Received("dev-001", RecordKind.REPLY, b"\xa0", 0, 5)], 2.0)
    _, events = feed.events_since(0)
    paired = [data for _, kind, data in events if kind == "paired"]
    assert paired and paired[0]["backend"]["text"].startswith("reply epoch 0 seq 5")
    assert feed.broker_entries()[0]["backend"] == paired[0]["backend"]


def test_the_page_script_never_turns_data_into_markup() -> None:
    """The page's own script is the only code that touches device strings: it uses textContent only."""
    for name in ("console.js", "login.js"):
        source = (STATIC / name).read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in source, (name, sink)
    for name in ("index.html", "login.html"):
        html = (STATIC / name).read_text()
        assert re.findall(r"<script[^>]*>", html) in ([], ['<script src="/static/login.js">'],
                                                       ['<script src="/static/uPlot.iife.min.js">',
                                                        '<script src="/static/console.js">'])
        assert not re.search(r"\son[a-z]+=", html) and "style=" not in html  # the CSP forbids inline code
        assert "http://" not in html and "https://" not in html  # nothing from elsewhere


def _self_signed(directory: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "console test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "console.crt", directory / "console.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_over_tls_the_session_cookie_is_secure(tmp_path: Path) -> None:
    import ssl

    from backend.console.server import Console, ConsoleSettings
    from tests.e2e import System

    system = System(tmp_path / "dep", ["dev-001"])
    try:
        backend = system.start_backend()
        cert, key = _self_signed(tmp_path)
        console = Console(backend, ConsoleSettings(port=0, auth_file=system.dep.console_auth, tls_cert=cert,
                                                   tls_key=key)).start()
        try:
            assert console.url.startswith("https://127.0.0.1:")
            password = system.dep.console_password_file.read_text().strip()
            trust = ssl.create_default_context(cafile=str(cert))
            with httpx.Client(base_url=console.url, verify=trust, timeout=10) as c:
                cookie = c.post("/login", data={"password": password}).headers["set-cookie"]
                assert "Secure" in cookie and "HttpOnly" in cookie
                assert c.get("/api/devices").status_code == 200
        finally:
            console.stop()
    finally:
        system.close()
