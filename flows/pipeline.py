"""The DAG: one Prefect flow named `smpo`; its parameters say which stages to run.

The graph is the stage registry (smpo_core.settings.STAGES). A requested stage brings its
upstream stages with it; they are reused when their outputs exist, so `smpo run train
evaluate` recomputes only what changed.

Every check of the parameters is `plan_run` (flows/plan.py), which the flow runs first, so a
deployment run and `smpo run` fail alike, before anything is written. `smpo run` checks before
it starts Prefect (a temporary server takes seconds) and hands its plan to the flow
(`run_checked`), which then does not check again.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, runtime

from flows.plan import RunPlan, plan_run
from flows.plan import run_name as describe_run
from smpo_core.evaluation import result_rows
from smpo_core.settings import STAGES
from smpo_core.store import Store, disk_error_within
from stages import resync, tracking
from stages.common import (
    RunContext,
    StageResult,
    in_prefect_run,
    quiet_libraries,
    stage_result,
    stage_task,
)


def code_version() -> str:
    """The git commit of the checkout, for the parent run's tags."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


_CHECKED: dict[tuple, RunPlan] = {}  # plans `run_checked` made, for the flow run it starts


def _request(stages: list[str] | None, profile: str, overrides: list[str] | None,
             store: str | None, force: list[str] | None) -> tuple:
    return (tuple(stages or ()), profile, tuple(overrides or ()), store, tuple(force or ()))


def run_checked(plan: RunPlan, stages: list[str] | None = None, profile: str = "tiny",
                overrides: list[str] | None = None, store: str | None = None,
                force: list[str] | None = None) -> list[dict[str, Any]]:
    """The flow on a request `plan_run` checked into `plan`: it does not check it again."""
    request = _request(stages, profile, overrides, store, force)
    _CHECKED[request] = plan
    try:
        return smpo(stages=stages, profile=profile, overrides=overrides, store=store,
                    force=force)
    finally:
        _CHECKED.pop(request, None)


def _flow_run_name() -> str:
    """The Prefect flow run's name: what sets it apart, as its MLflow parent run says."""
    parameters = runtime.flow_run.parameters
    return parameters.get("run_name") or describe_run(
        parameters.get("profile") or "tiny", parameters.get("stages"),
        parameters.get("overrides"), parameters.get("force"))


@flow(name="smpo", log_prints=True, flow_run_name=_flow_run_name)
def smpo(
    stages: list[str] | None = None,
    profile: str = "tiny",
    overrides: list[str] | None = None,
    store: str | None = None,
    force: list[str] | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
) -> list[dict[str, Any]]:
    """Run the SmPO pipeline: `stages` (default all, upstream included) of `profile`, with
    `section.key=value` overrides, into the stage store `store` (default $SMPO_STORE);
    `force`: stages to recompute although their outputs exist. `parent_run_id` nests this
    run's MLflow run under another (a sweep's), `run_name` names it."""
    run = (_CHECKED.pop(_request(stages, profile, overrides, store, force), None)
           or plan_run(stages, profile, overrides, store, force))
    quiet_libraries()
    settings = run.settings
    run.store.mkdir(parents=True, exist_ok=True)
    client, experiment = open_tracking(run.store, run.tracking_uri)
    tags = {"prefect.flow_run_id": runtime.flow_run.id or "", "smpo.profile": settings.profile,
            "smpo.code_version": code_version(), "smpo.stages": ",".join(run.stages),
            "smpo.overrides": " ".join(overrides or []), "smpo.store": str(run.store)}
    if runtime.flow_run.ui_url:
        tags["prefect.flow_run_url"] = runtime.flow_run.ui_url
    # A sweep names its variants; otherwise the name says what sets this run apart.
    name = run_name or describe_run(settings.profile, stages, overrides, force)
    with tracking.run(client, experiment, name, tags, parent_run_id) as parent:
        # Every resolved setting, so that the runs table can show what differs between runs.
        parent.params({"stages": ",".join(run.stages)} | settings.model_dump(mode="json"))
        ctx = RunContext(settings, str(run.store), run.tracking_uri, experiment, parent.run_id,
                         flow_id=uuid.uuid4().hex[:12])
        results: dict[str, StageResult] = {}
        for stage in run.stages:
            inputs = {name: results[name] for name in STAGES[stage].upstream}
            results[stage] = stage_result(stage_task(stage)(ctx, inputs,
                                                            force=stage in run.forced))
        parent.metrics(headline_metrics(results))
        parent.tags({"smpo.ran": ",".join(s for s, r in results.items() if not r.reused)})
    if parent.lost:
        nested = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
        resync.record(run.store, "flow", ctx.flow_id, {
            "run_id": parent.run_id, "name": name, "tags": tags | nested, "status": "FINISHED"})
    if "evaluate" in results:
        _results_artifact(results["evaluate"], report_link(run.tracking_uri, experiment,
                                                           results["evaluate"]))
    return [result.as_dict() for result in results.values()]


def open_tracking(store: Path, uri: str) -> tuple[MlflowClient, str]:
    """The MLflow client and experiment id of a run on `store`; runs that dead processes left
    RUNNING are closed and tracking that runs missed is logged. A full or read-only disk
    under the MLflow database is one line."""
    # The first client of a fresh SQLite database creates its tables (in MlflowClient()):
    # one process at a time, or two runs started together race in MLflow's migrations.
    with Store(store).lock("mlflow"):
        try:
            _create_database(uri)
            client = MlflowClient(uri)
            experiment = tracking.experiment_id(client, uri, store)
            resync.recover(client, experiment, store)
        except Exception as exc:
            if error := disk_error_within(exc, f"store {store}", store):
                raise error from exc
            raise
    return client, experiment


def _create_database(uri: str) -> None:
    """A fresh store's SQLite database is built (all of MLflow's migrations) under another
    name and renamed into place: a disk that fills up half-way leaves no half-migrated
    database, which MLflow cannot complete ("table _alembic_tmp_... already exists")."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists():
        return
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        MlflowClient(f"sqlite:///{partial}")  # creates and migrates the tables
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def headline_metrics(results: dict[str, StageResult]) -> dict[str, float]:
    """What a flow run's parent run shows for its results: the training's final loss and
    implicit accuracy, and per metric the base and tuned means, the difference and the win
    rate; named as the stage runs name them."""
    metrics: dict[str, float] = {}
    if "train" in results:
        summary = results["train"].summary
        metrics |= {f"train.{k}": summary[k] for k in ("final_loss", "final_implicit_accuracy")
                    if summary.get(k) is not None}
    if "evaluate" in results:
        for row in result_rows(results["evaluate"].summary.get("results", {})):
            metric = f"eval.{row['metric']}"
            metrics |= {f"{metric}.base.mean": row["base"], f"{metric}.tuned.mean": row["tuned"],
                        f"{metric}.tuned.diff_mean": row["difference"],
                        f"{metric}.tuned.win_rate": row["win_rate"]}
    return metrics


def report_link(uri: str, experiment: str, evaluate: StageResult) -> str:
    """Where a person opens the evaluation report: the evaluate run's artifact page on an
    MLflow server, else the file in the store."""
    if uri.startswith(("http://", "https://")) and evaluate.run_id:
        return (f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{evaluate.run_id}"
                f"/artifacts/report.html")
    return (Path(evaluate.path) / "report.html").as_uri()


def _results_artifact(evaluate: StageResult, link: str) -> None:
    """The results table in the Prefect UI: per metric base and tuned mean, difference, win
    rate; with a link to the report."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_table_artifact

    rows = [{"metric": row["metric"], "base": f"{row['base']:.4f}",
             "tuned": f"{row['tuned']:.4f}", "difference": f"{row['difference']:+.4f}",
             "win rate [95% CI]": f"{row['win_rate']:.3f} [{row['win_rate_ci'][0]:.3f}, "
                                  f"{row['win_rate_ci'][1]:.3f}]"}
            for row in result_rows(evaluate.summary.get("results", {}))]
    reused = " (reused)" if evaluate.reused else ""
    create_table_artifact(rows, key="smpo-results",
                          description=f"Tuned against base, evaluate `{evaluate.key}`{reused}: "
                                      f"[report]({link})")
