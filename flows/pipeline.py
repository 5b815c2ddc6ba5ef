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

import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, runtime

from flows.plan import RunPlan, plan_run
from smpo_core.settings import STAGES
from stages import tracking
from stages.common import RunContext, StageResult, stage_task


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


@flow(name="smpo", log_prints=True)
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
    settings = run.settings
    run.store.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(run.tracking_uri)
    experiment = tracking.experiment_id(client, run.tracking_uri, run.store)
    tags = {"prefect.flow_run_id": runtime.flow_run.id or "", "smpo.profile": settings.profile,
            "smpo.code_version": code_version(), "smpo.stages": ",".join(run.stages),
            "smpo.overrides": " ".join(overrides or [])}
    if runtime.flow_run.ui_url:
        tags["prefect.flow_run_url"] = runtime.flow_run.ui_url
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    name = run_name or f"smpo {settings.profile} {started}"
    with tracking.run(client, experiment, name, tags, parent_run_id) as parent:
        parent.params({"profile": settings.profile, "stages": ",".join(run.stages),
                       "store": str(run.store)})
        ctx = RunContext(settings, str(run.store), run.tracking_uri, experiment, parent.run_id)
        results: dict[str, StageResult] = {}
        for stage in run.stages:
            inputs = {name: results[name] for name in STAGES[stage].upstream}
            results[stage] = stage_task(stage)(ctx, inputs, force=stage in run.forced)
        parent.tags({"smpo.ran": ",".join(s for s, r in results.items() if not r.reused)})
    return [result.as_dict() for result in results.values()]
