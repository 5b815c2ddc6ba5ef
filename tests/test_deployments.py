"""smpo as its users run it: `make serve`, the deployments of prefect.yaml picked up by the
worker, runs tracked on the MLflow server; and the failures they must be able to read."""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from PIL import Image

from flows.pipeline import smpo
from flows.serve import DEFAULT_POOL, Config, deployments_file
from smpo_core.settings import STAGES, load_settings, with_upstream
from tests.conftest import (
    BIN,
    FAST,
    REPO,
    SERVICES,
    DeploymentRun,
    Served,
    free_ports,
    make,
    serve_env,
    tags,
)


def _deployments(store: Path, pool: str = DEFAULT_POOL) -> list[dict]:
    """The deployments `make serve` registers for a work pool."""
    cfg = Config(store, 4200, 5000, pool)
    return yaml.safe_load(deployments_file(cfg).read_text())["deployments"]


COMPARE = "compare"  # smpo-compare/compare: flows/compare.py
SWEEP = "sweep"  # smpo-sweep/sweep: flows/sweep.py


def test_every_stage_has_a_deployment_that_runs_it_and_full_runs_all(tmp_path):
    flow_parameters = inspect.signature(smpo.fn).parameters
    assert smpo.name == "smpo"  # so the addresses are smpo/full, smpo/train, ...
    deployments = {d["name"]: d for d in _deployments(tmp_path)}
    assert set(deployments) == {"full", *STAGES, COMPARE, SWEEP}
    for name, deployment in deployments.items():
        if name in (COMPARE, SWEEP):
            continue
        preset = deployment["parameters"]
        assert deployment["entrypoint"] == "flows/pipeline.py:smpo"
        assert deployment["work_pool"]["name"] == DEFAULT_POOL
        assert set(preset) <= set(flow_parameters), name
        # What the worker runs: the preset over the flow's defaults, checked as the flow does.
        run = {k: v.default for k, v in flow_parameters.items()} | preset
        load_settings(run["profile"], run["overrides"] or [])
        planned = with_upstream(run["stages"])
        if name == "full":
            assert planned == list(STAGES)
        else:
            assert run["stages"][0] == name and name in planned
    assert deployments["train"]["parameters"]["stages"] == ["train", "evaluate"]


def test_the_compare_deployment_is_a_run_of_the_compare_flow(tmp_path):
    from flows.compare import compare

    deployment = next(d for d in _deployments(tmp_path) if d["name"] == COMPARE)
    assert compare.name == "smpo-compare"  # so the address is smpo-compare/compare
    assert deployment["entrypoint"] == "flows/compare.py:compare"
    assert set(deployment["parameters"]) <= set(inspect.signature(compare.fn).parameters)
    assert deployment["parameters"]["models"] == ["base", "tuned=train:latest"]


def test_the_sweep_deployment_is_a_run_of_the_sweep_flow_with_one_variant_at_a_time(tmp_path):
    from flows.sweep import DEFAULT_GRID, expand_grid, sweep

    deployment = next(d for d in _deployments(tmp_path) if d["name"] == SWEEP)
    assert sweep.name == "smpo-sweep"  # so the address is smpo-sweep/sweep
    assert deployment["entrypoint"] == "flows/sweep.py:sweep"
    parameters = inspect.signature(sweep.fn).parameters
    assert set(deployment["parameters"]) <= set(parameters)
    assert deployment["parameters"]["concurrency"] == 1
    # The default grid: the beta x labels example, 3 x 2 variants.
    assert parameters["grid"].default is None
    assert len(expand_grid(DEFAULT_GRID)) == 6


def test_another_work_pool_changes_only_the_pool(tmp_path):
    default, other = _deployments(tmp_path / "a"), _deployments(tmp_path / "b", "gpu-pool")
    assert [d["work_pool"]["name"] for d in other] == ["gpu-pool"] * len(default)
    for original, changed in zip(default, other, strict=True):
        assert {k: v for k, v in changed.items() if k != "work_pool"} == \
               {k: v for k, v in original.items() if k != "work_pool"}
    assert deployments_file(Config(tmp_path, 1, 2, "gpu-pool")) == tmp_path / ".serve" / \
        "prefect.yaml"


def test_serve_refuses_a_port_another_program_listens_on(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = make("serve", serve_env(tmp_path / "store", free_ports(1)[0], port), timeout=120)
    assert done.returncode != 0
    assert (f"serve: error: mlflow-server: port {port} on 127.0.0.1 is taken by another "
            f"program") in done.stderr, done.stderr
    assert list((tmp_path / "store" / ".serve").glob("*.pid")) == []  # nothing was started


@pytest.mark.integration
def test_serve_twice_starts_nothing_new_and_registers_every_deployment(served: Served):
    assert set(served.pids) == set(SERVICES)
    assert served.pids_after_second_serve == served.pids
    assert served.second_serve_output.count("already running") == len(SERVICES)
    deployments = served.prefect_api("/deployments/filter", {})
    assert sorted(d["name"] for d in deployments) == sorted(["full", *STAGES, COMPARE, SWEEP])
    assert {d["work_pool_name"] for d in deployments} == {DEFAULT_POOL}
    assert served.prefect_api(f"/work_pools/{DEFAULT_POOL}")["type"] == "process"
    assert urllib.request.urlopen(f"{served.mlflow_url}/health").read() == b"OK"


@pytest.mark.integration
def test_deploy_registers_the_deployments_on_the_server_it_is_given(served: Served, full_run):
    """What the docker worker runs against its compose Prefect server."""
    done = subprocess.run([sys.executable, "-m", "flows.serve", "deploy"], env=served.env,
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    deployments = served.prefect_api("/deployments/filter", {})
    assert sorted(d["name"] for d in deployments) == sorted(["full", *STAGES, COMPARE, SWEEP])
    assert {d["work_pool_name"] for d in deployments} == {DEFAULT_POOL}


@pytest.mark.integration
def test_full_deployment_runs_every_stage_tracked_on_the_servers(served: Served, full_run):
    flow_run = served.prefect_api(f"/flow_runs/{full_run.run.flow_run_id}")
    assert flow_run["state"]["type"] == "COMPLETED"
    assert flow_run["parameters"]["store"] == str(served.store)

    # MLflow lists the parent run and one nested run per stage, all computed this time.
    assert full_run.parent["info"]["status"] == "FINISHED"
    assert tags(full_run.parent)["smpo.ran"] == ",".join(STAGES)
    assert set(full_run.stages) == set(STAGES)
    for stage, run in full_run.stages.items():
        assert run["info"]["status"] == "FINISHED", stage
        assert tags(run)["smpo.reused"] == "false", stage
        assert (Path(tags(run)["smpo.output"]) / "manifest.json").is_file()

    # The worker logged through the server: the server gave the experiment its artifact root.
    experiment = served.mlflow_api("/experiments/get-by-name?experiment_name=smpo")["experiment"]
    assert experiment["artifact_location"] == \
        f"{(served.store / 'mlflow-artifacts').as_uri()}/{full_run.experiment_id}"

    # The evaluation grid is logged and the server hands out the same bytes the store holds.
    evaluate = full_run.stages["evaluate"]
    run_id = evaluate["info"]["run_id"]
    listed = served.mlflow_api(f"/artifacts/list?run_id={run_id}")
    assert "grid.png" in {f["path"] for f in listed["files"]}
    served_grid = urllib.request.urlopen(
        f"{served.mlflow_url}/get-artifact?path=grid.png&run_uuid={run_id}").read()
    assert served_grid == (Path(tags(evaluate)["smpo.output"]) / "grid.png").read_bytes()

    # Prefect shows each stage's summary (markdown) and progress artifacts for the flow run.
    artifacts = served.prefect_api("/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [full_run.run.flow_run_id]}}})
    markdown = {a["key"] for a in artifacts if a["type"] == "markdown"}
    assert markdown == {f"{stage}-summary" for stage in STAGES}
    progress = [a for a in artifacts if a["type"] == "progress"]
    assert progress and all(a["data"] == 100.0 for a in progress)


@pytest.mark.integration
def test_compare_deployment_reuses_the_images_the_evaluate_stage_drew(served: Served, full_run):
    run = served.run_deployment(COMPARE, FAST, flow="smpo-compare",
                                models=["base", "tuned=train:latest"])
    assert run.returncode == 0, run.output[-3000:]
    comparison, _ = served.mlflow_runs(run.flow_run_id)
    assert tags(comparison)["smpo.kind"] == "comparison"
    assert comparison["info"]["status"] == "FINISHED"
    summary = json.loads((Path(tags(comparison)["smpo.output"]) / "summary.json").read_text())
    evaluated = json.loads((Path(tags(full_run.stages["evaluate"])["smpo.output"]) /
                            "summary.json").read_text())
    # Same models, prompts and seeds as the evaluate stage of smpo/full: nothing drawn again.
    assert {m: s["id"] for m, s in summary["models"].items()} == \
        {m: s["id"] for m, s in evaluated["models"].items()}
    assert summary["generation"]["drawn"] == {"base": 0, "tuned": 0}
    assert summary["generation"]["reused"] == {"base": 4, "tuned": 4}
    metrics = {m["key"]: m["value"] for m in comparison["data"]["metrics"]}
    paired = summary["metrics"]["pickscore"]["groups"]["all"]["vs_reference"]["tuned"]
    assert metrics["pickscore.tuned.win_rate"] == pytest.approx(paired["win_rate"])
    listed = {f["path"] for f in served.mlflow_api(
        f"/artifacts/list?run_id={comparison['info']['run_id']}")["files"]}
    assert {"report.html", "table.csv", "grid.png"} <= listed
    artifacts = served.prefect_api("/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [run.flow_run_id]}}})
    table = next(a for a in artifacts if a["key"] == "comparison")
    assert "| pickscore | tuned |" in table["data"]


@pytest.mark.integration
def test_runs_logged_straight_into_the_store_are_served_too(served: Served, tmp_path):
    """`smpo run` without a server writes the store's SQLite database and a file:// artifact
    folder; the MLflow server of `make serve` shows those runs and their artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{served.store / 'mlflow.db'}")
    experiment = client.create_experiment(
        "logged-without-server", artifact_location=(served.store / "mlflow-artifacts").as_uri())
    run = client.create_run(experiment, run_name="direct")
    image = tmp_path / "grid.png"
    Image.new("RGB", (24, 16), "orange").save(image)
    client.log_artifact(run.info.run_id, str(image))
    client.set_terminated(run.info.run_id)

    listed = served.mlflow_api(f"/artifacts/list?run_id={run.info.run_id}")
    assert [f["path"] for f in listed["files"]] == ["grid.png"]
    fetched = urllib.request.urlopen(
        f"{served.mlflow_url}/get-artifact?path=grid.png&run_uuid={run.info.run_id}").read()
    assert fetched == image.read_bytes()


@pytest.fixture(scope="module")
def failed_runs(served: Served, full_run) -> dict[str, DeploymentRun]:
    """Three failing runs after smpo/full, started together (the worker runs them side by
    side): bad input found before any stage, and a stage failing with and without a
    SmpoError."""
    started = {
        # A learning rate that passes validation but makes training diverge at run time.
        "diverging_train": served.run_deployment(
            "train", [*FAST, "train.beta=3000", "train.learning_rate=1e30"], watch=False),
        # A metric checkpoint that exists but is no model: found when the metric loads.
        "bad_metric": served.run_deployment(
            "evaluate", [*FAST, f"evaluate.metrics={{pickscore: {REPO / 'README.md'}}}"],
            watch=False),
        "missing_source": served.run_deployment(
            "download", ["download.source=/nonexistent/pickapic"], watch=False),
        # A misspelt stage to recompute: refused by the flow before anything runs.
        "misspelt_force": served.run_deployment("full", FAST, watch=False, force=["trian"]),
    }
    for run in started.values():
        run.state = served.final_state(run.flow_run_id)
    return started


def _error_lines(served: Served, run: DeploymentRun, text: str) -> list[str]:
    """The ERROR lines of `prefect flow-run logs` that contain `text`."""
    logs = served.prefect("flow-run", "logs", run.flow_run_id)
    assert logs.returncode == 0, logs.stderr
    lines = [line for line in logs.stdout.splitlines() if "ERROR" in line and text in line]
    assert lines, f"no ERROR line with {text!r}:\n{logs.stdout[-3000:]}"
    return lines


def _failed_with(served: Served, run: DeploymentRun, text: str) -> None:
    """The flow run failed, and its Prefect log has the SmpoError line saying `text`."""
    assert run.state == "FAILED"
    lines = _error_lines(served, run, text)
    assert any("SmpoError" in line for line in lines), lines


@pytest.mark.integration
def test_a_stage_error_is_one_readable_line_in_the_prefect_logs(served, failed_runs):
    run = failed_runs["bad_metric"]
    _failed_with(served, run, f"reward model pickscore: could not load '{REPO / 'README.md'}'")
    _, stages = served.mlflow_runs(run.flow_run_id)
    assert stages["evaluate"]["info"]["status"] == "FAILED"
    assert tags(stages["evaluate"])["smpo.error"].startswith(
        "SmpoError: reward model pickscore: could not load")
    assert all(tags(stages[s])["smpo.reused"] == "true" for s in STAGES if s != "evaluate")


@pytest.mark.integration
def test_a_bad_source_fails_the_flow_run_with_its_message(served, failed_runs):
    _failed_with(served, failed_runs["missing_source"], "download.source '/nonexistent/pickapic'")


@pytest.mark.integration
def test_a_deployment_run_gets_the_checks_of_smpo_run(served, failed_runs):
    run = failed_runs["misspelt_force"]
    _failed_with(served, run, "--force 'trian': unknown (did you mean 'train'?); expected some "
                 "of download")
    assert served.search_runs(f"tags.`prefect.flow_run_id` = '{run.flow_run_id}'") == []


@pytest.mark.integration
def test_train_after_a_failed_train_reuses_upstream_and_reruns_train_and_evaluate(
        served: Served, full_run, failed_runs):
    failed = failed_runs["diverging_train"]
    assert failed.state == "FAILED"
    parent, stages = served.mlflow_runs(failed.flow_run_id)
    assert parent["info"]["status"] == "FAILED"
    assert {s: tags(r)["smpo.reused"] for s, r in stages.items() if s != "train"} == {
        "download": "true", "score": "true", "invert": "true"}
    assert stages["train"]["info"]["status"] == "FAILED"
    assert tags(stages["train"])["smpo.error"].startswith("SmpoError: train: the loss diverged")
    assert not (Path(tags(stages["train"])["smpo.output"]) / "manifest.json").exists()

    # With a nested override: one evaluation metric's checkpoint, the others as they were.
    clip = served.store / "builtin" / "tiny-clip"
    rerun = served.run_deployment("train", [*FAST, "train.beta=3000",
                                            f"evaluate.metrics.clipscore={clip}"])
    assert rerun.returncode == 0, rerun.output[-3000:]
    parent, stages = served.mlflow_runs(rerun.flow_run_id)
    assert {s: tags(r)["smpo.reused"] for s, r in stages.items()} == {
        "download": "true", "score": "true", "invert": "true", "train": "false",
        "evaluate": "false"}
    assert tags(parent)["smpo.ran"] == "train,evaluate"
    params = {p["key"]: p["value"] for p in stages["train"]["data"]["params"]}
    assert float(params["train.beta"]) == 3000.0
    params = {p["key"]: p["value"] for p in stages["evaluate"]["data"]["params"]}
    assert params["evaluate.metrics.clipscore"] == str(clip)
    assert params["evaluate.metrics.hpsv2"] == "builtin:tiny-hpsv2"
    assert tags(stages["train"])["smpo.key"] != tags(full_run.stages["train"])["smpo.key"]


@pytest.mark.integration
def test_unreachable_mlflow_server_fails_before_any_stage(tmp_path):
    port = free_ports(1)[0]
    store = tmp_path / "store"
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    done = subprocess.run([str(BIN / "smpo"), "run", "--store", str(store)],
                          env=_environ() | env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"smpo: error: MLFLOW_TRACKING_URI 'http://127.0.0.1:{port}': "
                           f"no MLflow server answers there"), last
    assert "make serve" in last
    assert [name for name in (*STAGES, "builtin") if (store / name).exists()] == []


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}


@pytest.mark.integration
def test_prefect_names_runs_marks_reused_stages_and_shows_the_results(served: Served,
                                                                      beta_run):
    from flows.plan import run_name

    flow_run_id = beta_run.run.flow_run_id
    flow_run = served.prefect_api(f"/flow_runs/{flow_run_id}")
    name = run_name("tiny", ["train", "evaluate"], [*FAST, "train.beta=5000"])
    assert flow_run["name"] == name == tags(beta_run.parent)["mlflow.runName"]
    task_runs = served.prefect_api("/task_runs/filter", {
        "flow_runs": {"id": {"any_": [flow_run_id]}}})
    states = {run["name"].rsplit("-", 1)[0]: run["state"] for run in task_runs}
    assert {stage: state["name"] for stage, state in states.items()} == {
        "download": "Reused", "score": "Reused", "invert": "Reused", "train": "Completed",
        "evaluate": "Completed"}
    assert {state["type"] for state in states.values()} == {"COMPLETED"}

    # The results table: per metric base, tuned, difference and win rate, as evaluate wrote.
    artifacts = served.prefect_api("/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    table = next(a for a in artifacts if a["key"] == "smpo-results")
    assert table["type"] == "table"
    rows = {row["metric"]: row for row in (json.loads(table["data"])
                                           if isinstance(table["data"], str) else table["data"])}
    evaluate = Path(tags(beta_run.stages["evaluate"])["smpo.output"])
    summary = json.loads((evaluate / "summary.json").read_text())
    assert set(rows) == set(summary["metrics"])
    for kind, metric in summary["metrics"].items():
        overall = metric["groups"]["all"]
        assert rows[kind]["tuned"] == f"{overall['models']['tuned']['mean']:.4f}"
        assert rows[kind]["win rate [95% CI]"].startswith(
            f"{overall['vs_reference']['tuned']['win_rate']:.3f} [")
    run_id = beta_run.stages["evaluate"]["info"]["run_id"]
    assert f"/runs/{run_id}/artifacts/report.html)" in table["description"]
    # --watch printed progress, not a flood of progress-artifact events: at most the end of
    # each of the 7 progress bars (train; evaluate's drawing and five metrics) and quarters.
    assert beta_run.run.output.count("prefect.artifact.updated") <= 7 * 4
