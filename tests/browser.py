"""One headless page of Debian's Chromium, driven over the Chrome DevTools Protocol: what the
browser tests use to look at the MLflow UI and the evaluation report as a user would.
Screenshots are kept in test-artifacts/."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.conftest import ARTIFACTS

CHROMIUM = Path("/usr/bin/chromium")
NO_CHROMIUM = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: the "
                                 "browser tests drive Debian's chromium (apt-get install "
                                 "chromium)")
# Headless flags that render the MLflow UI here with no network and no GPU (PLATFORM.md).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--window-size=1400,1000", "--remote-debugging-port=0"]

class Browser:
    """One headless Chromium page, driven by DevTools protocol calls over its websocket."""

    def __init__(self, profile: Path):
        self.process = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = profile / "DevToolsActivePort"  # Chromium writes its chosen port here
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert self.process.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium wrote no DevToolsActivePort"
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.calls = 0

    def call(self, method: str, **params: Any) -> dict:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # skip events until the answer to this call
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.calls:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, what: str, screenshot: str, timeout: float = 60) -> Any:
        """Poll a JavaScript expression until it is truthy; on timeout keep a screenshot."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                self.screenshot(screenshot)
                text = self.evaluate("document.body.innerText")[:1500]
                pytest.fail(f"the page did not show {what} within {timeout:.0f} s "
                            f"(screenshot {ARTIFACTS / screenshot}); page text:\n{text}")
            time.sleep(0.5)
        return value

    def screenshot(self, name: str, full_page: bool = False) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        extra: dict[str, Any] = {}
        if full_page:  # the whole document, not only what the window shows
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            extra = {"captureBeyondViewport": True,
                     "clip": {"x": 0, "y": 0, "width": size["width"],
                              "height": size["height"], "scale": 1}}
        data = self.call("Page.captureScreenshot", format="png", **extra)["data"]
        path = ARTIFACTS / name
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
