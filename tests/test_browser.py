"""report.html and the Prefect dashboard, opened in a real headless Chromium.

Chromium is Debian's package (installed with apt-get when missing: the tests skip only
where apt itself is unavailable), driven over the Chrome DevTools protocol with the
``websockets`` package that Prefect already brings. Each page must render (a screenshot
that is not blank), hold its key elements and log no error to the console.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from websockets.sync.client import ClientConnection, connect

from cellpipe.orchestration import PrefectServer
from cellpipe.serving.server import free_port
from cellpipe.slides.batch import ModelKey, score_inbox
from cellpipe.slides.cells import CellFinderParams
from cellpipe.slides.scoring import ScoreParams
from slide_fixtures import ColourRuleClassifier, smear_inbox

# End-to-end (a browser, a Prefect server): `make test` and CI run them, test-fast skips them.
pytestmark = [pytest.mark.browser, pytest.mark.slow]

WINDOW = (1280, 900)


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    """Debian's chromium, installed with apt-get when it is missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("no chromium, and no apt-get run as root to install it "
                    "(`apt-get install chromium` enables the browser tests)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium, but it is not on PATH"
    return found


class Browser:
    """One headless Chromium page, driven over the DevTools protocol.

    Every event the page sends is kept, so console errors and uncaught exceptions can be
    checked after the page has been used.
    """

    def __init__(self, binary: str, profile: Path) -> None:
        self.process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-sync",
             "--disable-background-networking", "--disable-component-update",
             "--hide-scrollbars", f"--window-size={WINDOW[0]},{WINDOW[1]}",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        try:
            self.socket = self._connect(profile)
            for domain in ("Page", "Runtime", "Log"):
                self.send(f"{domain}.enable")
            self.send("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1],
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self._stop()
            raise

    def _connect(self, profile: Path, timeout_s: float = 30) -> ClientConnection:
        """The page's DevTools socket; Chromium writes its port to DevToolsActivePort."""
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"chromium exited with code {self.process.returncode}")
            if port_file.is_file() and port_file.read_text().strip():
                port = port_file.read_text().split()[0]
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as answer:
                    pages = [t for t in json.load(answer) if t["type"] == "page"]
                if pages:
                    return connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
            time.sleep(0.1)
        pytest.fail(f"chromium's DevTools did not answer within {timeout_s:.0f} s")

    def send(self, method: str, timeout_s: float = 30, **params: Any) -> dict[str, Any]:
        """Call a DevTools method and return its result (events meanwhile are kept)."""
        self._next_id += 1
        self.socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            message = json.loads(self.socket.recv(timeout=remaining))
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)
        raise TimeoutError(f"no answer to {method} within {timeout_s:.0f} s")

    def open(self, url: str, timeout_s: float = 30) -> None:
        """Navigate to ``url`` and wait for its load event."""
        self.send("Page.navigate", url=url)
        self.wait_for_event("Page.loadEventFired", timeout_s)

    def wait_for_event(self, method: str, timeout_s: float) -> None:
        seen = len(self.events)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(event.get("method") == method for event in self.events[seen:]):
                return
            self.evaluate("0")  # pumps the events that arrived
            time.sleep(0.05)
        pytest.fail(f"no {method} within {timeout_s:.0f} s")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout_s: float = 30) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        pytest.fail(f"{expression} stayed false for {timeout_s:.0f} s:\n"
                    f"{self.evaluate('document.body.innerText')[:2000]}")

    def screenshot(self) -> Image.Image:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def console_errors(self) -> list[str]:
        """Errors the page logged, threw or met loading a resource."""
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append(" ".join(str(arg.get("value", arg.get("description", "")))
                                       for arg in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(f"{params['entry']['text']} {params['entry'].get('url', '')}")
        return errors

    def close(self) -> None:
        self.socket.close()
        self._stop()

    def _stop(self) -> None:
        """Stop Chromium and its helper processes (its own process group)."""
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue


def page_errors(browser: Browser) -> list[str]:
    """The console errors that matter: Prefect's index.html links a /favicon.ico its
    bundle does not have, and the browser logs that 404 like any other."""
    return [error for error in browser.console_errors()
            if not (error.startswith("Failed to load resource") and "/favicon" in error)]


@pytest.fixture
def browser(chromium_binary: str, tmp_path: Path) -> Iterator[Browser]:
    opened = Browser(chromium_binary, tmp_path / "chromium-profile")
    try:
        yield opened
    finally:
        opened.close()


def assert_not_blank(image: Image.Image, path: Path) -> None:
    """A rendered page has contrast; a blank (white, black, one colour) one has none."""
    image.save(path)
    assert image.size == WINDOW
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 10, f"{path} looks blank (pixel std {pixels.std():.1f})"
    assert len(np.unique(pixels)) > 32, f"{path} has almost no distinct grey levels"


# --- the pages --------------------------------------------------------------------------


def test_report_page_renders_its_table_thumbnails_and_sorts(browser: Browser,
                                                            tmp_path: Path) -> None:
    inbox = smear_inbox(tmp_path, 3)
    (inbox / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")
    out = tmp_path / "results"
    run = score_inbox(str(inbox), out, ColourRuleClassifier(),
                      ScoreParams(cells=CellFinderParams(cell_diameter=40)),
                      ModelKey("colour_rules", "1"))

    browser.open((out / "report.html").resolve().as_uri())
    slides = [s for s in run["slides"] if s["status"] != "ignored"]
    assert browser.evaluate("document.querySelectorAll('#slides tbody tr').length") == len(slides)
    assert browser.evaluate("document.querySelectorAll('#not-scored tbody tr').length") == 1
    browser.wait_until("Array.from(document.images).every(i => i.complete)")
    loaded = browser.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
    assert len(loaded) == 3 and all(width > 0 for width in loaded)

    # A click on "Objects" sorts by it, a second click reverses.
    objects = ("Array.from(document.querySelectorAll('#slides tbody tr td:nth-child(3)'))"
               ".map(td => Number(td.dataset.sort))")
    browser.evaluate("document.querySelector('#slides th:nth-child(3) button').click()")
    ascending = browser.evaluate(objects)
    assert ascending == sorted(ascending) and ascending[0] == -1  # the quarantined slide
    browser.evaluate("document.querySelector('#slides th:nth-child(3) button').click()")
    assert browser.evaluate(objects) == sorted(ascending, reverse=True)

    assert_not_blank(browser.screenshot(), tmp_path / "report.png")
    assert browser.console_errors() == []


def test_prefect_dashboard_renders_and_reaches_its_api(browser: Browser,
                                                       tmp_path: Path) -> None:
    with PrefectServer(tmp_path / "prefect", free_port()) as server:
        with urllib.request.urlopen(f"{server.dashboard_url}/ui-settings") as answer:
            assert json.load(answer)["api_url"] == server.api_url  # PREFECT_UI_API_URL

        browser.open(server.dashboard_url)
        # The single-page app mounts into its root element and lists the server's pages.
        browser.wait_until("document.querySelector('#root, #app')"
                           " && document.querySelector('#root, #app').children.length > 0")
        browser.wait_until("document.body.innerText.includes('Deployments')")
        time.sleep(2)  # let its first API calls answer (or fail)
        text = browser.evaluate("document.body.innerText")
        assert "Can't connect" not in text and "Cannot connect" not in text
        assert_not_blank(browser.screenshot(), tmp_path / "dashboard.png")
        assert page_errors(browser) == []
