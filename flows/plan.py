"""Every check of a run's parameters, in one place: the `smpo` flow runs them first (so a
deployment run fails as `smpo run` does), and `smpo run` runs them before it starts Prefect.

Cheap to import (no Prefect, MLflow or torch): bad input is reported in a fraction of a second.
"""

from __future__ import annotations

import json
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from smpo_core.environment import environment
from smpo_core.errors import SmpoError
from smpo_core.pickapic import describe_source, iter_source
from smpo_core.refs import CHECKPOINT_SUFFIXES, is_hub_file, looks_local
from smpo_core.settings import STAGES, Settings, check_stages, load_settings, with_upstream
from smpo_core.store import Store, disk_error
from smpo_core.worlds import builtins


@dataclass(frozen=True)
class RunPlan:
    """A checked request: the settings, the stages in order and where it all goes."""

    settings: Settings
    stages: list[str]
    forced: frozenset[str]
    store: Path
    tracking_uri: str


def plan_run(stages: list[str] | None, profile: str, overrides: list[str] | None,
             store: str | None, force: list[str] | None, build: bool = True) -> RunPlan:
    """The checked plan of a run, or an SmpoError naming the bad input. Writes nothing but
    what a builtin source needs to be read; with `build=False` (a dry run) not that either,
    and builtin inputs go unchecked."""
    settings = load_settings(profile, overrides or [])
    plan = with_upstream(stages)
    forced = frozenset(check_stages(force or [], "--force"))
    root = Path(store or environment().store).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise SmpoError(f"store {str(root)!r}: is a file; expected a folder (or none yet)")
    check_writable(root)
    uri = tracking_uri(root)
    check_reachable(uri)
    preflight(settings, root, plan, build)
    return RunPlan(settings, plan, forced, root, uri)


def check_writable(root: Path) -> None:
    """A store that cannot take a file (read-only, not ours, full) fails here, in one line,
    before any stage runs."""
    existing = root
    while not existing.exists():  # a new store is made where its nearest folder is
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):  # unnamed, gone when closed
            pass
    except OSError as exc:
        raise disk_error(exc, f"store {root}", existing) or SmpoError(
            f"store {root}: cannot write there ({exc.strerror or exc}); choose another "
            f"--store") from None
def run_name(profile: str, stages: Sequence[str] | None = None,
             overrides: Sequence[str] | None = None, force: Sequence[str] | None = None) -> str:
    """What sets a run apart, as the name of its MLflow parent run and Prefect flow run:
    the profile, the stages asked for (none: all), the overrides and forced stages, e.g.
    `sd15 train.beta=5000` or `tiny train,evaluate train.lora_rank=4 --force train`."""
    parts = [Path(profile).stem if profile.endswith((".yaml", ".yml")) else profile]
    if stages:
        parts.append(",".join(stages))
    parts += list(overrides or [])
    if force:
        parts.append(f"--force {','.join(force)}")
    return " ".join(parts)


def tracking_uri(store_root: Path) -> str:
    """Where a run into this store is tracked: MLFLOW_TRACKING_URI if set, else the store's
    own SQLite database."""
    return environment().tracking_uri or Store(store_root).tracking_uri


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail before any stage runs when an MLflow server is configured but not answering."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return
    except OSError as exc:
        raise SmpoError(
            f"MLFLOW_TRACKING_URI {uri!r}: no MLflow server answers there ({exc.strerror or exc}); "
            f"start it (make serve) or unset MLFLOW_TRACKING_URI to track into the store"
        ) from None


def preflight(settings: Settings, store: Path, plan: list[str], build: bool = True) -> None:
    """Check local inputs before any stage runs, so bad input fails with nothing written:
    that local model and checkpoint paths exist, and the first rows of a local Pick-a-Pic
    source (column names and types)."""
    paths = {"model.base": settings.model.base, "model.vae": settings.model.vae}
    if "score" in plan:
        paths |= {"score.checkpoint": settings.score.checkpoint,
                  "score.processor": settings.score.processor}
    if "evaluate" in plan:
        paths |= {f"evaluate.metrics.{k}": v for k, v in settings.evaluate.metrics.items()}
        paths |= {f"evaluate.metric_processors.{k}": v
                  for k, v in settings.evaluate.metric_processors.items()}
    for name, ref in paths.items():
        if not ref or builtins.is_builtin(ref) or Path(ref).expanduser().exists():
            continue
        if looks_local(ref):
            raise SmpoError(f"{name} {ref!r}: no such file or folder")
        # A bare checkpoint file name is neither a local file nor `owner/repo/file` on the hub.
        if ref.endswith(CHECKPOINT_SUFFIXES) and not is_hub_file(ref):
            raise SmpoError(f"{name} {ref!r}: no such file; download the published checkpoint "
                            f"and give its path (or owner/repo/file on the hub)")
    if "evaluate" in plan and (build or not builtins.is_builtin(settings.evaluate.prompts)):
        from stages.evaluate import check_inputs  # brings torch: only when evaluate runs

        check_inputs(settings, store)
    if "download" in plan and (build or not builtins.is_builtin(settings.download.source)):
        source = builtins.resolve(settings.download.source, store)
        if describe_source(source) != "hub":
            next(iter(iter_source(source, settings.download.split)), None)


@dataclass(frozen=True)
class PlannedStage:
    """What a run would do with one stage, and why."""

    stage: str
    key: str
    reuse: bool
    reason: str
    path: Path


def dry_run(plan: RunPlan) -> list[PlannedStage]:
    """Which stages of a checked plan would be reused and which would run, and why; reads
    the store, writes nothing."""
    import importlib

    # brings Prefect and MLflow
    from stages.common import RunContext, settings_for_key, stage_key_for

    store, settings = Store(plan.store), plan.settings
    ctx = RunContext(settings, str(plan.store), plan.tracking_uri, "")
    keys: dict[str, str] = {}
    planned = []
    for stage in plan.stages:
        inputs = {name: keys[name] for name in STAGES[stage].upstream}
        module = importlib.import_module(STAGES[stage].implementation)
        key_inputs = getattr(module, "key_inputs", None)
        # Inputs outside the store (a local source's content) enter the key as in a run; an
        # empty store has nothing to reuse, and reading them could build a builtin there.
        if key_inputs and plan.store.is_dir() and any(plan.store.iterdir()):
            inputs |= key_inputs(ctx)
        key = keys[stage] = stage_key_for(settings, stage, inputs)
        path = store.stage_dir(stage, key)
        if stage in plan.forced:
            reuse, reason = False, "--force: recomputed under the same key"
        elif store.is_complete(stage, key):
            reuse, reason = True, "its output for these settings and inputs exists"
        elif path.is_dir():
            reuse, reason = False, "an interrupted run of it left this folder: resumes it"
        else:
            reuse = False
            reason = _why_new(store.outputs(stage), settings_for_key(settings, stage), inputs,
                              STAGES[stage].version)
        planned.append(PlannedStage(stage, key, reuse, reason, path))
    return planned


def _why_new(outputs: list[tuple[Path, dict]], settings: dict, inputs: dict[str, str],
             version: str) -> str:
    """Why no existing output fits: what differs from the stage's latest output."""
    from stages.tracking import flatten

    if not outputs:
        return "no output of this stage in the store yet"
    folder, latest = outputs[-1]
    now = flatten(json.loads(json.dumps(settings, default=str)))
    then = flatten(latest.get("settings", {}))
    changed = [f"{k} {then.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}"
               for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
    changed += [f"new {name} output {key}" for name, key in inputs.items()
                if latest.get("inputs", {}).get(name) != key]
    if latest.get("version") != version:
        changed.append(f"stage version {latest.get('version')} -> {version}")
    return f"changed since {folder.name}: {'; '.join(changed) or 'no output with this key'}"

