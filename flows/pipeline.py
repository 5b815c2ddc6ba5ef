"""The DAG: one Prefect flow named `smpo`; its parameters say which stages to run.

    download ──► score ──────────────┐
        └──────► invert ──► train ◄──┘ ──► evaluate

A requested stage brings its upstream stages with it; they are reused when their outputs
exist, so `smpo run train evaluate` recomputes only what changed.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, runtime

from smpo_core import builtin
from smpo_core.errors import SmpoError
from smpo_core.pickapic import describe_source, iter_source
from smpo_core.settings import STAGES, Settings, load_settings
from smpo_core.store import default_store
from stages import tracking
from stages.common import RunContext, StageResult
from stages.download import download_stage
from stages.evaluate import check_inputs as check_evaluate_inputs
from stages.evaluate import evaluate_stage
from stages.invert import invert_stage
from stages.score import score_stage
from stages.train import train_stage

UPSTREAM = {
    "download": (),
    "score": ("download",),
    "invert": ("download",),
    "train": ("invert", "score"),
    "evaluate": ("train",),
}
TASKS = {"download": download_stage, "score": score_stage, "invert": invert_stage,
         "train": train_stage, "evaluate": evaluate_stage}
def with_upstream(stages: list[str] | None) -> list[str]:
    """The requested stages and everything they need, in DAG order."""
    requested = list(stages or STAGES)
    unknown = [s for s in requested if s not in STAGES]
    if unknown:
        raise SmpoError(f"stage {unknown[0]!r}: unknown; expected some of {', '.join(STAGES)}")
    needed: set[str] = set()

    def add(stage: str) -> None:
        if stage not in needed:
            needed.add(stage)
            for parent in UPSTREAM[stage]:
                add(parent)

    for stage in requested:
        add(stage)
    return [s for s in STAGES if s in needed]


def code_version() -> str:
    """The git commit of the checkout, for the parent run's tags."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def prepare(settings: Settings, store: str) -> tuple[str, str, MlflowClient]:
    """Tracking URI, experiment id and client; fails early when the server is unreachable."""
    Path(store).mkdir(parents=True, exist_ok=True)
    uri = tracking.tracking_uri(Path(store).resolve())
    tracking.check_reachable(uri)
    client = MlflowClient(uri)
    return uri, tracking.experiment_id(client, uri, Path(store).resolve()), client


def preflight(settings: Settings, store: str, plan: list[str]) -> None:
    """Check local inputs before any stage runs, so bad input fails with nothing written:
    the first rows of a local Pick-a-Pic source (column names and types), and that local
    model and checkpoint paths exist."""
    paths = {"model.base": settings.model.base, "model.vae": settings.model.vae}
    if "score" in plan:
        paths |= {"score.checkpoint": settings.score.checkpoint,
                  "score.processor": settings.score.processor}
    if "evaluate" in plan:
        check_evaluate_inputs(settings)
        paths |= {f"evaluate.metrics.{k}": v for k, v in settings.evaluate.metrics.items()}
        paths |= {f"evaluate.metric_processors.{k}": v
                  for k, v in settings.evaluate.metric_processors.items()}
    for name, ref in paths.items():
        if not ref or ref.startswith(builtin.PREFIX) or Path(ref).expanduser().exists():
            continue
        if ref.startswith((".", "/", "~")):
            raise SmpoError(f"{name} {ref!r}: no such file or folder")
        # A bare checkpoint file name is neither a local file nor `owner/repo/file` on the hub.
        if ref.endswith((".pt", ".pth", ".bin", ".safetensors")) and ref.count("/") < 2:
            raise SmpoError(f"{name} {ref!r}: no such file; download the published checkpoint "
                            f"and give its path (or owner/repo/file on the hub)")
    if "download" in plan:
        source = builtin.resolve(settings.download.source, Path(store).resolve())
        if describe_source(source) != "hub":
            next(iter(iter_source(source, settings.download.split)), None)


@flow(name="smpo", log_prints=True)
def smpo(
    stages: list[str] | None = None,
    profile: str = "tiny",
    overrides: list[str] | None = None,
    store: str | None = None,
    force: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run the SmPO pipeline: `stages` (default all, upstream included) of `profile`, with
    `section.key=value` overrides, into the stage store `store`."""
    settings = load_settings(profile, overrides or [])
    store = store or default_store()
    plan = with_upstream(stages)
    forced = set(force or [])
    uri, experiment, client = prepare(settings, store)
    preflight(settings, store, plan)
    tags = {"prefect.flow_run_id": runtime.flow_run.id or "", "smpo.profile": settings.profile,
            "smpo.code_version": code_version(), "smpo.stages": ",".join(plan),
            "smpo.overrides": " ".join(overrides or [])}
    if runtime.flow_run.ui_url:
        tags["prefect.flow_run_url"] = runtime.flow_run.ui_url
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    with tracking.run(client, experiment, f"smpo {settings.profile} {started}", tags) as parent:
        parent.params({"profile": settings.profile, "stages": ",".join(plan),
                       "store": str(Path(store).resolve())})
        ctx = RunContext(settings, str(Path(store).resolve()), uri, experiment, parent.run_id)
        results: dict[str, StageResult] = {}
        for stage in plan:
            inputs = {name: results[name] for name in UPSTREAM[stage]}
            results[stage] = TASKS[stage](ctx, **inputs, force=stage in forced)
        parent.tags({"smpo.ran": ",".join(s for s, r in results.items() if not r.reused)})
    return [result.as_dict() for result in results.values()]
