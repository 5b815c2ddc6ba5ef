"""What every stage does around its computation: key, reuse, MLflow child run, manifest,
Prefect progress and summary artifacts, and its Prefect task. Stage modules supply only the
computation, `compute(run)`; the stage registry (smpo_core.settings.STAGES) says the rest."""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from smpo_core.settings import STAGES, Settings, shared_sections
from smpo_core.store import MANIFEST, Store, disk_error, read_manifest, stage_key
from smpo_core.worlds import builtins
from stages import resync, tracking


@dataclass
class RunContext:
    """Everything a stage task needs; small and picklable, passed by Prefect to each task."""

    settings: Settings
    store_root: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None = None
    flow_id: str = "untracked"  # names this flow run's records of tracking not done

    @property
    def store(self) -> Store:
        return Store(self.store_root)

    def resolve(self, ref: str | None) -> str | None:
        """A setting that may name a builtin tiny model or dataset, as a usable path or id."""
        return builtins.resolve(ref, self.store.root)


@dataclass
class StageResult:
    stage: str
    key: str
    path: str
    reused: bool
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task, a plain logger elsewhere (tests, scripts)."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # no active Prefect run context
        return logging.getLogger("smpo")


class Progress:
    """A terminal progress bar plus a Prefect progress artifact, updated at most every 2 s."""

    def __init__(self, stage: str, total: int | None, unit: str):
        self.stage, self.total, self.done = stage, total or None, 0
        self.bar = tqdm(total=self.total, desc=stage, unit=unit, file=sys.stderr, leave=False,
                        dynamic_ncols=True)
        self._artifact = _progress_artifact(stage)
        self._last = 0.0

    def update(self, amount: int = 1) -> None:
        self.done += amount
        self.bar.update(amount)
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if now - self._last < 2.0 and not finished:
            return
        self._last = now
        if self.total is None:  # unknown length: say how far, not what fraction
            logger().info("%s: %d done", self.stage, self.done)
            return
        percent = min(100.0, 100.0 * self.done / self.total)
        if self._artifact:
            _update_progress(self._artifact, percent)
        logger().info("%s: %d/%d (%.0f%%)", self.stage, self.done, self.total, percent)

    def close(self) -> None:
        self.bar.close()


def in_prefect_run() -> bool:
    """Inside a flow or task run; outside one, artifacts would start a temporary server."""
    try:
        from prefect.context import get_run_context

        get_run_context()
    except Exception:  # MissingContextError, or Prefect not set up
        return False
    return True


def _progress_artifact(stage: str):
    if not in_prefect_run():
        return None
    try:
        from prefect.artifacts import create_progress_artifact

        return create_progress_artifact(progress=0.0, description=f"{stage} progress")
    except Exception:  # outside a Prefect run there is nowhere to show it
        return None


def _update_progress(artifact_id, percent: float) -> None:
    try:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(artifact_id, percent)
    except Exception as exc:  # progress display must never fail a stage
        logging.getLogger("smpo").debug("progress artifact update failed: %s", exc)


@dataclass
class StageRun:
    """Handed to a stage's computation: where to write, its settings, inputs and tracker."""

    ctx: RunContext
    stage: str
    out_dir: Path
    inputs: dict[str, StageResult]
    tracker: tracking.Tracker
    artifacts: list[Path] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    def input_dir(self, stage: str) -> Path:
        return Path(self.inputs[stage].path)

    def progress(self, total: int | None, unit: str = "it") -> Progress:
        return Progress(self.stage, total, unit)

    def log(self, message: str, *args: Any) -> None:
        logger().info(f"{self.stage}: {message}", *args)


def settings_for_key(settings: Settings, stage: str) -> dict[str, Any]:
    key = {name: settings.section(name).result_settings() for name in shared_sections(stage)}
    return key | settings.section(stage).borrowed_settings(settings)


def stage_key_for(settings: Settings, stage: str, input_keys: dict[str, str]) -> str:
    """The key of a stage's output: its result settings, its inputs' keys, its version."""
    return stage_key(stage, settings_for_key(settings, stage), input_keys,
                     STAGES[stage].version)


def run_stage(
    ctx: RunContext,
    stage: str,
    inputs: dict[str, StageResult],
    compute: Callable[[StageRun], dict[str, Any]],
    force: bool = False,
    key_inputs: Callable[[RunContext], dict[str, str]] | None = None,
) -> StageResult:
    """Reuse the stage's output if its manifest exists, else compute it; track either way.
    `key_inputs` (a stage module's `key_inputs(ctx)`) names inputs outside the store, such as
    a local source's content, that enter the key beside the upstream stages' keys."""
    started = time.perf_counter()
    input_keys = {name: result.key for name, result in inputs.items()}
    if key_inputs:
        input_keys |= key_inputs(ctx)
    key = stage_key_for(ctx.settings, stage, input_keys)
    store = ctx.store
    out_dir = store.stage_dir(stage, key)
    try:
        # One process at a time per stage output: a second run waits, then reuses the result.
        with store.lock(f"{stage}-{key}", on_wait=lambda: logger().info(
                "%s: another run is computing %s; waiting for it to finish", stage, out_dir)):
            result = _run_locked(ctx, stage, key, inputs, input_keys, compute, force)
    except OSError as exc:
        if error := disk_error(exc, f"{stage} stage, store {store.root}"):
            raise error from exc
        raise
    result.seconds = time.perf_counter() - started
    _summary_artifact(result)
    return result


def _run_locked(ctx: RunContext, stage: str, key: str, inputs: dict[str, StageResult],
                input_keys: dict[str, str], compute: Callable[[StageRun], dict[str, Any]],
                force: bool) -> StageResult:
    store = ctx.store
    out_dir = store.stage_dir(stage, key)
    if force:
        store.clear(stage, key)
    reused = store.is_complete(stage, key)
    client = MlflowClient(ctx.tracking_uri)
    tags = {"smpo.stage": stage, "smpo.key": key, "smpo.reused": str(reused).lower(),
            "smpo.output": str(out_dir), "smpo.profile": ctx.settings.profile}
    with tracking.run(client, ctx.experiment_id, stage, tags, ctx.parent_run_id) as tracker:
        tracker.params(settings_for_key(ctx.settings, stage)
                       | {stage: ctx.settings.section(stage).model_dump()})
        if reused:
            logger().info("%s: reusing %s", stage, out_dir)
            manifest = read_manifest(out_dir)
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            run = StageRun(ctx, stage, out_dir, inputs, tracker)
            compute_started = time.perf_counter()
            try:
                manifest = compute(run)
            except BaseException:
                _remove_if_empty(out_dir)  # a stage that wrote nothing leaves nothing behind
                raise
            manifest |= {
                "stage": stage, "key": key, "version": STAGES[stage].version,
                "inputs": input_keys,
                "settings": settings_for_key(ctx.settings, stage),
                "seconds": round(time.perf_counter() - compute_started, 3),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            store.complete(stage, key, manifest)
            for path in run.artifacts:
                tracker.artifact(path)
        tracker.metrics({f"manifest.{k}": v for k, v in tracking.flatten(
            {k: v for k, v in manifest.items() if k != "settings"}).items()})
        tracker.artifact(out_dir / MANIFEST)
    if tracker.lost:  # the work is done and kept; its tracking is logged later
        resync.record(store.root, "stage", ctx.flow_id, {
            "stage": stage, "path": str(out_dir), "tags": tags,
            "parent_run_id": ctx.parent_run_id})
    return StageResult(stage, key, str(out_dir), reused, 0.0,
                       {k: v for k, v in manifest.items() if k not in ("settings", "inputs")})


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def _summary_artifact(result: StageResult) -> None:
    """A markdown table of the manifest in the Prefect UI."""
    if not in_prefect_run():
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        lines = [f"### {result.stage} ({'reused' if result.reused else 'ran'})",
                 f"`{result.path}`", "", "| field | value |", "|---|---|"]
        for name, value in tracking.flatten(result.summary).items():
            lines.append(f"| {name} | {value} |")
        create_markdown_artifact("\n".join(lines), key=f"{result.stage}-summary",
                                 description=f"{result.stage} manifest")
    except Exception as exc:  # outside a Prefect run there is nowhere to show it
        logging.getLogger("smpo").debug("summary artifact skipped: %s", exc)


_TASKS: dict[tuple[str, str], Task] = {}


def stage_task(name: str) -> Task:
    """The Prefect task of a registered stage: `run_stage` around `compute` of its module,
    with the module's TASK_OPTIONS (e.g. retries). Called as task(ctx, inputs, force)."""
    stage = STAGES[name]
    if (name, stage.implementation) not in _TASKS:
        module = importlib.import_module(stage.implementation)

        def run(ctx: RunContext, inputs: dict[str, StageResult] | None = None,
                force: bool = False) -> StageResult:
            return run_stage(ctx, name, inputs or {}, module.compute, force,
                             getattr(module, "key_inputs", None))

        # Prefect keys a task by its function's name: one per stage.
        run.__name__ = run.__qualname__ = f"{name}_stage"
        options = {"name": name, "cache_policy": NO_CACHE,
                   **getattr(module, "TASK_OPTIONS", {})}
        _TASKS[name, stage.implementation] = task(**options)(run)
    return _TASKS[name, stage.implementation]
