"""The MLflow UI shows what the pipeline tracked: Debian's Chromium, headless and driven over
the Chrome DevTools Protocol, opens the UI served by `make serve` after the smpo/full
deployment run. Screenshots are kept in test-artifacts/."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.browser import NO_CHROMIUM, Browser
from tests.conftest import tags

pytestmark = [pytest.mark.integration, NO_CHROMIUM]


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
