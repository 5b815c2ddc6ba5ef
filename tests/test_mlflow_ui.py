"""The MLflow UI shows what the pipeline tracked: Debian's Chromium, headless and driven over
the Chrome DevTools Protocol, opens the UI served by `make serve` after the smpo/full
deployment run. Screenshots are kept in test-artifacts/."""

from __future__ import annotations

import json
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


def test_runs_table_tells_two_betas_apart_by_name_param_diff_and_loss_curve(
        served, full_run, beta_run, browser):
    """The first question a practitioner asks: which setting gave which result."""
    from stages.tracking import runs_table_url

    experiment = full_run.experiment_id
    browser.goto(runs_table_url(served.mlflow_url, experiment))
    parents = {"2000.0": full_run.parent, "5000.0": beta_run.parent}
    names = {}
    for beta, parent in parents.items():
        names[beta] = browser.wait_for(f"{_link(parent['info']['run_id'])}?.innerText",
                                       f"the parent run of beta {beta}", "mlflow-betas.png")
        assert names[beta] == tags(parent)["mlflow.runName"]
    assert "train.beta=5000" in names["5000.0"] and "train.beta" not in names["2000.0"]
    assert "workflowType=machine_learning" in browser.evaluate("location.href")
    browser.screenshot("mlflow-betas.png")

    # Compare the two parents with "Show diff only": train.beta is the differing param.
    ids = json.dumps([parent["info"]["run_id"] for parent in parents.values()])
    browser.goto(f"{served.mlflow_url}/#/compare-runs?runs={ids}&experiments="
                 f"{json.dumps([experiment])}")
    row = ("Array.from(document.querySelectorAll('th[scope=row]'))"
           ".find(th => th.innerText === '{}')")
    browser.wait_for(f"!!{row.format('train.learning_rate')}", "the parameters table",
                     "mlflow-compare.png")
    browser.evaluate("document.querySelector('[aria-label=\"Parameters - Show diff only\"]')"
                     ".click()")
    browser.wait_for(f"!{row.format('train.learning_rate')}", "only the differing params",
                     "mlflow-compare-diff.png")
    values = browser.evaluate(f"Array.from({row.format('train.beta')}.parentElement"
                              ".querySelectorAll('td')).map(td => td.innerText)")
    assert values == list(parents)
    browser.screenshot("mlflow-compare-diff.png", full_page=True)

    # The train run of beta 5000: its loss curve is the first chart.
    train = beta_run.stages["train"]["info"]["run_id"]
    browser.goto(f"{served.mlflow_url}/#/experiments/{experiment}/runs/{train}/model-metrics"
                 f"?workflowType=machine_learning")
    charts = ("(() => { const lines = document.body.innerText.split('\\n');"
              " const at = lines.indexOf('Add chart');"
              " return at >= 0 && lines.includes('train.loss') ? lines.slice(at + 1) : null })()")
    shown = browser.wait_for(charts, "the train run's charts", "mlflow-train-charts.png")
    assert shown[0] == "train.loss"
    browser.screenshot("mlflow-train-charts.png")
