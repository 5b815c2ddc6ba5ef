"""The MLflow UI shows what the pipeline tracked: Debian's Chromium, headless and driven over
the Chrome DevTools Protocol, opens the UI served by `make serve` after the smpo/full
deployment run. Screenshots are kept in test-artifacts/."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from websockets.sync.client import connect

from tests.conftest import ARTIFACTS, tags

CHROMIUM = Path("/usr/bin/chromium")
# Headless flags that render the MLflow UI here with no network and no GPU (PLATFORM.md).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--window-size=1400,1000", "--remote-debugging-port=0"]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: the browser tests "
                       "drive Debian's chromium (apt-get install chromium)"),
]


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
                pytest.fail(f"the MLflow UI did not show {what} within {timeout:.0f} s "
                            f"(screenshot {ARTIFACTS / screenshot}); page text:\n{text}")
            time.sleep(0.5)
        return value

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        data = self.call("Page.captureScreenshot", format="png")["data"]
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


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    page = Browser(tmp_path_factory.mktemp("chromium-profile"))  # fresh profile per session
    page.call("Page.enable")
    yield page
    page.close()


def _link(run_id: str) -> str:
    """JavaScript: the runs table's link to a run."""
    return f'document.querySelector(\'a[href$="/runs/{run_id}"]\')'


def test_runs_table_nests_every_stage_run_under_the_flow_run(served, full_run, browser):
    browser.goto(f"{served.mlflow_url}/#/experiments/{full_run.experiment_id}/runs")
    parent = full_run.parent["info"]["run_id"]
    name = browser.wait_for(f"{_link(parent)}?.innerText", "the flow run's parent run",
                            "mlflow-runs.png")
    assert name == tags(full_run.parent)["mlflow.runName"]
    children = {stage: run["info"]["run_id"] for stage, run in full_run.stages.items()}
    # Parent rows start collapsed; the first button in the run-name cell expands one.
    assert not any(browser.evaluate(f"!!{_link(child)}") for child in children.values())
    browser.screenshot("mlflow-runs-collapsed.png")
    browser.evaluate(f"{_link(parent)}.closest('[role=gridcell]').querySelector('button')"
                     ".click()")
    shown = " && ".join(f"!!{_link(child)}" for child in children.values())
    browser.wait_for(shown, "the nested stage runs", "mlflow-runs-expanded.png")
    browser.screenshot("mlflow-runs-expanded.png")
    names = {stage: browser.evaluate(f"{_link(child)}.innerText")
             for stage, child in children.items()}
    assert names == {stage: stage for stage in children}


def test_evaluate_run_shows_its_image_grid(served, full_run, browser):
    evaluate = full_run.stages["evaluate"]
    grid = Path(tags(evaluate)["smpo.output"]) / "grid.png"
    width, height = Image.open(grid).size
    browser.goto(f"{served.mlflow_url}/#/experiments/{full_run.experiment_id}/runs/"
                 f"{evaluate['info']['run_id']}/artifacts/grid.png")
    # The artifact viewer loads the PNG from the server; the grid is the image of its size.
    shown = (f"Array.from(document.images).some(i => i.complete && "
             f"i.naturalWidth === {width} && i.naturalHeight === {height})")
    browser.wait_for(shown, f"grid.png ({width}x{height})", "mlflow-evaluate-grid.png")
    assert "grid.png" in browser.evaluate("document.body.innerText")
    browser.screenshot("mlflow-evaluate-grid.png")
