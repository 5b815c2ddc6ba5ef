"""`smpo compare` as a user runs it: a train output of the store, LoRA weights and the base on
the HPDv2 prompt set (a local copy in its published format); one table, grid, HTML report and
MLflow run; a second comparison reuses what the first drew; bad input fails in one line before
any image. The report is looked at in headless Chromium."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from smpo_core.prompts import HPDV2_STYLES
from smpo_core.worlds import builtins as builtin
from tests.browser import NO_CHROMIUM, Browser
from tests.conftest import BIN

pytestmark = pytest.mark.integration

FAST = ["evaluate.num_inference_steps=2", "evaluate.bootstrap_resamples=500",
        "evaluate.metrics={pickscore: builtin:tiny-clip, hpsv2: builtin:tiny-hpsv2}"]


def _environ() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    return env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def smpo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "smpo"), *args], env=_environ(), capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store holding a train stage output (a UNet tuned from the tiny base: here perturbed),
    LoRA weights for the same base, and the HPS v2 benchmark files, two prompts per style."""
    from diffusers import UNet2DConditionModel

    from smpo_core.models import add_lora, save_lora

    root = tmp_path_factory.mktemp("compare-store")
    base = builtin.resolve("builtin:tiny-sd", root)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.05 * torch.randn_like(param))
    train = root / "train" / "5eed0000cafe0000"
    unet.save_pretrained(train / "unet")
    (train / "manifest.json").write_text(json.dumps(
        {"stage": "train", "weights": "unet", "weights_path": str(train / "unet"),
         "settings": {"model": {"base": "builtin:tiny-sd", "revision": None, "vae": None}}}))
    add_lora(unet, rank=2)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    save_lora(unet, root / "lora")
    benchmark = root / "HPDv2" / "benchmark"
    benchmark.mkdir(parents=True)
    for style in HPDV2_STYLES:
        (benchmark / f"{style}.json").write_text(json.dumps(
            [f"a red circle, {style}", f"a blue square above a green diamond, {style}"]))
    return root


def _overrides(store: Path, *extra: str) -> list[str]:
    return [*FAST, f"evaluate.prompts=hpdv2-test:{store / 'HPDv2'}", *extra]


def _args(store: Path, *models: str) -> list[str]:
    sets = _overrides(store)
    return ["compare", *models, "--store", str(store), *(a for s in sets for a in ("--set", s))]


def _pngs(store: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (store / "generations").rglob("*.png")}


@pytest.fixture(scope="module")
def runs(store):
    """`smpo compare base tuned=train:latest`, then (the flow's function, in this process) a
    second comparison that adds LoRA weights."""
    from flows.compare import compare

    first = smpo(*_args(store, "base", "tuned=train:latest"))
    assert first.returncode == 0, first.stderr[-3000:]
    drawn = _pngs(store)
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        second = compare.fn(models=["base", "smpo=train:5eed", f"lora=lora:{store / 'lora'}"],
                            profile="tiny", overrides=_overrides(store), store=str(store))
    return {"first": first, "second": second, "drawn_by_first": drawn}


def _output(run: subprocess.CompletedProcess | dict) -> Path:
    if isinstance(run, dict):
        return Path(run["path"])
    line = next(x for x in run.stdout.splitlines() if x.startswith("report: "))
    return Path(line.removeprefix("report: ")).parent


def test_one_command_writes_a_table_a_grid_and_a_report(runs):
    out = _output(runs["first"])
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == ["base", "tuned"] and summary["reference"] == "base"
    assert summary["generation"]["drawn"] == {"base": 8, "tuned": 8}
    assert summary["prompts"]["styles"] == dict.fromkeys(HPDV2_STYLES, 2)
    assert summary["metrics"]["hpsv2"]["scale"].startswith("100 x cosine")
    table = (out / "table.csv").read_text().splitlines()
    assert table[0].startswith("metric,group,model,reference,mean,median,diff_mean")
    assert len(table) == 1 + 2 * 5 * 2  # metrics x (all + 4 styles) x models
    for name in ("grid.png", "win_rates.png", "report.html", "manifest.json"):
        assert (out / name).is_file(), name
    # The terminal shows the results: each metric, each model, intervals against the base.
    lines = runs["first"].stdout.splitlines()
    tuned = next(x for x in lines if x.startswith("hpsv2") and " tuned " in x)
    paired = summary["metrics"]["hpsv2"]["groups"]["all"]["vs_reference"]["tuned"]
    assert f"{paired['diff_mean']:+.4f} [{paired['diff_ci'][0]:+.4f}" in tuned
    assert f"{paired['win_rate']:.3f} [{paired['win_rate_ci'][0]:.3f}" in tuned


def test_the_comparison_is_one_mlflow_run(store, runs):
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smpo")
    found = client.search_runs([experiment.experiment_id],
                               filter_string="tags.`smpo.kind` = 'comparison'",
                               order_by=["attributes.start_time ASC"])
    assert len(found) == 2
    first = found[0]
    assert first.info.status == "FINISHED"
    assert first.data.tags["smpo.output"] == str(_output(runs["first"]))
    assert first.data.params["models.tuned"] == "train:latest"
    summary = json.loads((_output(runs["first"]) / "summary.json").read_text())
    paired = summary["metrics"]["pickscore"]["groups"]["all"]["vs_reference"]["tuned"]
    assert first.data.metrics["pickscore.tuned.win_rate"] == pytest.approx(paired["win_rate"])
    assert first.data.metrics["pickscore.tuned.diff_ci_low"] == pytest.approx(
        paired["diff_ci"][0])
    artifacts = {a.path for a in client.list_artifacts(first.info.run_id)}
    assert {"report.html", "table.csv", "grid.png", "summary.json"} <= artifacts


def test_a_second_comparison_reuses_the_images_the_first_drew(store, runs):
    summary = json.loads((_output(runs["second"]) / "summary.json").read_text())
    # `smpo` is the train output the first comparison called `tuned`: labels do not matter.
    assert summary["generation"]["drawn"] == {"base": 0, "smpo": 0, "lora": 8}
    assert summary["generation"]["reused"] == {"base": 8, "smpo": 8, "lora": 0}
    now = _pngs(store)
    assert {p: now[p] for p in runs["drawn_by_first"]} == runs["drawn_by_first"]
    assert len(now) == 24
    first = json.loads((_output(runs["first"]) / "summary.json").read_text())
    for metric in ("pickscore", "hpsv2"):
        assert summary["metrics"][metric]["groups"]["all"]["models"]["smpo"] == \
            first["metrics"][metric]["groups"]["all"]["models"]["tuned"]


def test_weights_that_do_not_fit_the_base_are_one_line_before_any_image(store, runs, tmp_path):
    from diffusers import UNet2DConditionModel

    from smpo_core.models import add_lora, save_lora

    other = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8)
    add_lora(other, rank=2)
    save_lora(other, tmp_path / "lora")
    before = _pngs(store)
    done = smpo(*_args(store, "base", f"bad=lora:{tmp_path / 'lora'}"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"smpo: error: model 'bad': the LoRA in {tmp_path / 'lora'}/"
        f"pytorch_lora_weights.safetensors does not fit base model"), done.stderr[-2000:]
    assert _pngs(store) == before


@pytest.mark.parametrize("case", ["unknown metric", "empty prompts"])
def test_bad_settings_are_one_line_before_any_image(store, runs, tmp_path, case):
    from flows.compare import compare
    from smpo_core.errors import SmpoError

    if case == "unknown metric":
        extra = "evaluate.metrics={pickscor: builtin:tiny-clip}"
        expected = "evaluate.metrics: unknown reward model kind 'pickscor'; expected one of"
    else:
        (tmp_path / "empty.txt").write_text("\n")
        extra = f"evaluate.prompts={tmp_path / 'empty.txt'}"
        expected = f"evaluate.prompts '{tmp_path / 'empty.txt'}': no prompts found"
    before = _pngs(store)
    with pytest.raises(SmpoError) as error:
        compare.fn(models=["base", "tuned=train:latest"], profile="tiny",
                   overrides=_overrides(store, extra), store=str(store))
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)
    assert _pngs(store) == before


@NO_CHROMIUM
def test_report_shows_intervals_styles_win_rate_bars_and_the_grid(runs, tmp_path):
    report = _output(runs["second"]) / "report.html"
    page = Browser(tmp_path / "chromium-profile")
    try:
        page.call("Page.enable")
        page.goto(report.as_uri())
        page.wait_for("document.readyState === 'complete' && "
                      "Array.from(document.images).every(i => i.complete)",
                      "the report with its figures", "compare-report-timeout.png")
        rows = page.evaluate("document.querySelectorAll('#results-table tr').length")
        assert rows == 1 + 2 * 3  # header, then each metric for base, tuned and lora
        cells = page.evaluate("Array.from(document.querySelectorAll('#results-table td'))"
                              ".map(c => c.innerText)")
        assert sum("[" in c and "]" in c for c in cells) == 2 * 2 * 2  # diff and win CIs
        styles = page.evaluate("Array.from(document.querySelectorAll('table.style')).map("
                               "t => Array.from(t.rows).slice(1).map(r => r.cells[0].innerText))")
        assert styles == [[*HPDV2_STYLES, "overall"]] * 2
        figures = page.evaluate("Object.fromEntries(Array.from(document.querySelectorAll("
                                "'h2[id]')).map(h => [h.id, h.nextElementSibling?.tagName === "
                                "'IMG' ? h.nextElementSibling.naturalWidth : 0]))")
        assert figures["win-rates"] > 300 and figures["grid"] > 600
        assert {"results", "per-style", "generation", "models"} <= set(figures)
        page.screenshot("compare-report.png", full_page=True)
    finally:
        page.close()


def test_a_train_output_is_named_by_its_mlflow_run(store, runs):
    from flows.compare import plan_comparison
    from smpo_core.errors import SmpoError

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smpo").experiment_id
    train = store / "train" / "5eed0000cafe0000"
    parent = client.create_run(experiment, run_name="smpo tiny")
    child = client.create_run(experiment, run_name="train", tags={
        "mlflow.parentRunId": parent.info.run_id, "smpo.stage": "train",
        "smpo.output": str(train)})
    plan = plan_comparison(["base", f"run:{parent.info.run_id}",
                            f"again=run:{child.info.run_id}"],
                           overrides=_overrides(store), store=str(store))
    flow_run, stage_run = plan.models[1:]
    assert flow_run.label == f"run-{parent.info.run_id[:8]}"
    assert flow_run.weights == stage_run.weights == str(train / "unet")
    assert flow_run.identity() == stage_run.identity()
    with pytest.raises(SmpoError, match="model run:0123: no such MLflow run"):
        plan_comparison(["base", "run:0123"], overrides=_overrides(store), store=str(store))
