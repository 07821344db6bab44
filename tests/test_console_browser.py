"""The console in a real headless browser (Debian's chromium driven by Playwright; no browser download).

One test runs `sealmq demo --serve` as a child process and watches the console fill in: the three
devices, a chart that updates, image thumbnails that load, the broker view with ciphertext beside what
the backend opened, the audit stream. The other feeds the console hostile device strings and checks
that they show as text and run nothing. Screenshots go to ``test-artifacts/console/`` (or
``$SEALMQ_TEST_ARTIFACTS``); CI keeps that folder.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.console_harness import running_console
from tests.e2e import wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (test extra) is not installed")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (bash scripts/setup --test)"),
    pytest.mark.slow,
]
ARTIFACTS = Path(os.environ.get("SEALMQ_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts")) / "console"
HOSTILE = '<img src=x onerror="window.__pwned=1">'


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where chromium's sandbox cannot start
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _sign_in(page: Any, url: str, password: str) -> None:
    page.goto(url)
    assert page.url.endswith("/login")
    page.fill("#password", password)
    page.click("#signin")
    page.wait_for_url(url)


class _Demo:
    """`sealmq demo --serve` in a child process; its output read on a thread."""

    def __init__(self, root: Path) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "demo", "--dir", str(root), "--port", "0", "--console",
             "127.0.0.1:0", "--duration", "4", "--serve"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parents[1],
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def url(self) -> str | None:
        for line in self.lines:
            m = re.search(r"console: (http://127\.0\.0\.1:\d+/)", line)
            if m:
                return m.group(1)
        return None

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def test_console_shows_the_demo_live(browser: Any, tmp_path: Path) -> None:
    demo = _Demo(tmp_path / "demo")
    try:
        assert wait_for(lambda: demo.url() is not None, 60), "\n".join(demo.lines)
        url = demo.url()
        assert url is not None
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        _sign_in(page, url, (tmp_path / "demo" / "console.password").read_text().strip())

        page.wait_for_function("() => document.querySelectorAll('#devices tbody tr').length === 3", timeout=30_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#devices tbody tr td:nth-child(3)')]"
            ".every(td => td.textContent === 'established')",
            timeout=30_000)
        ids = page.locator("#devices tbody tr td:first-child").all_text_contents()
        assert ids == ["dev-001", "dev-002", "dev-003"]
        credentials = page.locator("#devices tbody tr td:nth-child(2)").all_text_contents()
        assert all(c.startswith("CN=dev-") for c in credentials)

        # the chart updates: live telemetry events arrive and are drawn
        page.wait_for_function("() => Number(document.getElementById('telemetry-section').dataset.updates || 0) >= 6",
                               timeout=30_000)
        assert page.locator("#charts .chart canvas").count() == 3
        assert "temperature_c" in page.locator("#charts .latest").first.text_content()

        # thumbnails of the received images load (decoded by the browser, served with an image type)
        page.wait_for_function("() => document.querySelectorAll('#gallery img.thumb').length >= 12", timeout=30_000)
        page.wait_for_function("() => [...document.querySelectorAll('#gallery img.thumb')].every(i => i.complete && "
                               "i.naturalWidth > 0)", timeout=30_000)
        assert page.locator("#gallery").get_by_text("signature verified").count() >= 12

        # the broker view: ciphertext as the monitor sees it, beside what the backend opened
        page.wait_for_function("() => [...document.querySelectorAll('#broker tbody td.opened')].some("
                               "td => td.textContent.includes('temperature_c'))", timeout=30_000)
        wire = page.locator("#broker tbody tr td.wire").first.text_content()
        topic, _, hex_ = wire.partition(" ")
        assert re.fullmatch(r"sealmq/v1/dev-\d{3}/(data|media|hs)/(up|down)", topic)
        assert re.fullmatch(r"[0-9a-f]+(… \(\d+ bytes\))?", hex_)
        assert "temperature" not in wire

        assert page.locator("#audit tbody tr").count() > 0
        page.fill("#audit-filter", "handshake_completed")
        visible = page.locator("#audit tbody tr:not([hidden])")
        assert visible.count() >= 3 and all("handshake_completed" in t for t in visible.all_text_contents())
        page.fill("#audit-filter", "")
        page.screenshot(path=str(ARTIFACTS / "console-demo.png"), full_page=True)
        assert not errors, errors
        page.close()
    finally:
        code = demo.stop()
    assert code in (0, 130), "\n".join(demo.lines)


def test_hostile_device_strings_stay_inert_in_the_page(browser: Any, tmp_path: Path) -> None:
    with running_console(tmp_path / "dep", ["dev-001"]) as cut:
        agent = cut.system.agent("dev-001")
        image = tmp_path / f"{HOSTILE}.png"
        image.write_bytes((Path(__file__).parents[1] / "img" / "checker.png").read_bytes())
        agent.send_file(image)
        assert agent.wait_transfers(20)
        page = browser.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        _sign_in(page, cut.console.url, cut.password)
        page.wait_for_selector("#devices tbody tr")
        agent.send_telemetry({"temperature_c": 1.5, "note": HOSTILE, HOSTILE: 2})
        page.wait_for_function("() => document.querySelector('#charts .latest').textContent.includes('onerror')",
                               timeout=20_000)
        page.wait_for_function("() => document.querySelectorAll('#gallery figure').length === 1", timeout=20_000)
        latest = page.locator("#charts .latest").text_content()
        assert HOSTILE in latest  # shown literally, as text
        assert page.locator("#gallery figcaption a").text_content() == f"{HOSTILE}.png"
        # nothing the device sent became an element or ran
        assert page.evaluate("() => window.__pwned") is None
        assert page.locator("img[src='x']").count() == 0
        assert not dialogs
        page.screenshot(path=str(ARTIFACTS / "console-hostile.png"), full_page=True)
        page.close()
