"""What every stage does around its computation: key, reuse, MLflow child run, manifest,
Prefect progress and summary artifacts, and its Prefect task. Stage modules supply only the
computation, `compute(run)`; the stage registry (smpo_core.settings.STAGES) says the rest."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State
from tqdm import tqdm

from smpo_core.environment import environment
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
    run_id: str = ""  # the stage's MLflow run

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
    """How far a stage is, on one channel at a time: a terminal bar when a person watches
    stderr, else a log line at every tenth (the worker's log, a captured run). A Prefect
    progress artifact moves at every quarter. Both at most every 15 s, and at the end: each
    line and each move is an event `prefect deployment run --watch` prints."""

    LOG_EVERY = 10  # percent between log lines when no terminal bar is shown
    ARTIFACT_EVERY = 25  # percent between moves of the Prefect progress artifact
    MIN_SECONDS = 15.0  # between two lines, and between two moves, before the end
    UNSIZED_LOG_SECONDS = 30.0  # unknown totals: a "N done" line this often

    def __init__(self, stage: str, total: int | None, unit: str):
        self.stage, self.total, self.done = stage, total or None, 0
        self.bar = tqdm(total=self.total, desc=stage, unit=unit, file=sys.stderr, leave=False,
                        dynamic_ncols=True) if _terminal() else None
        self._artifact = _progress_artifact(stage)
        started = time.monotonic()
        # (the last tenth logged, when) and (the last quarter shown, when)
        self._logged, self._shown = [0, started], [0, started]

    def update(self, amount: int = 1) -> None:
        self.done += amount
        if self.bar is not None:
            self.bar.update(amount)
        now = time.monotonic()
        if self.total is None:  # unknown length: say how far, not what fraction
            if self.bar is None and now - self._logged[1] >= self.UNSIZED_LOG_SECONDS:
                self._logged[1] = now
                logger().info("%s: %d done", self.stage, self.done)
            return
        percent = min(100.0, 100.0 * self.done / self.total)
        if self._artifact and self._due(self._shown, percent, self.ARTIFACT_EVERY, now):
            _update_progress(self._artifact, percent)
        if self.bar is None and self._due(self._logged, percent, self.LOG_EVERY, now):
            logger().info("%s: %d/%d (%.0f%%)", self.stage, self.done, self.total, percent)

    def _due(self, last: list, percent: float, every: int, now: float) -> bool:
        """A new step of `every` percent is reached, and it is the end or MIN_SECONDS have
        passed since the last; records it."""
        step = int(percent // every)
        if step <= last[0] or (percent < 100.0 and now - last[1] < self.MIN_SECONDS):
            return False
        last[:] = [step, now]
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _terminal() -> bool:
    """A person watches stderr (not a worker's log file or a test's capture)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class _DropNotices(logging.Filter):
    """Drops library notices that say nothing to a user of smpo."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


def quiet_libraries() -> None:
    """Silence the libraries' loading and download bars and known notices: each stage reports
    its own progress, on one channel (Progress)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # Without torchvision (PLATFORM.md) transformers falls back to the PIL image processors,
    # the ones the reward models were checked against: nothing to act on.
    notices = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropNotices) for f in notices.filters):
        notices.addFilter(_DropNotices("requires torchvision (not installed)"))


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


def lineage(stage: str) -> list[str]:
    """The stage and every stage upstream of it, in registry order."""
    needed = {stage}
    for name in reversed(STAGES):
        if name in needed:
            needed.update(STAGES[name].upstream)
    return [name for name in STAGES if name in needed]


def tracked_settings(settings: Settings, stage: str) -> dict[str, Any]:
    """A stage run's params: the result settings of it and of every stage upstream (they
    all determine its output, so evaluate runs of two betas differ in `train.beta`), and
    its own runtime settings."""
    tracked: dict[str, Any] = {}
    for name in lineage(stage):
        tracked |= settings_for_key(settings, name)
    return tracked | {stage: settings.section(stage).model_dump(mode="json")}


def stage_key_for(settings: Settings, stage: str, input_keys: dict[str, str]) -> str:
    """The key of a stage's output: its result settings, its inputs' keys, its version."""
    return stage_key(stage, settings_for_key(settings, stage), input_keys,
                     STAGES[stage].version)


def lock_name(settings: Settings, stage: str, key: str) -> str:
    """The store lock a run holds while it computes a stage output. A stage launched on
    several machines runs on all of them at once, each machine's processes taking their own
    shards and meeting in accelerate's rendezvous: there each machine holds a lock of its own
    rank (with one lock for all, machine 0 would wait in the rendezvous for a machine 1 that
    waits for the lock)."""
    machines = environment()
    launched = getattr(settings.section(stage), "num_processes", 1) > 1
    if launched and machines.num_machines > 1:
        return f"{stage}-{key}-machine{machines.machine_rank}"
    return f"{stage}-{key}"


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
        with store.lock(lock_name(ctx.settings, stage, key), on_wait=lambda: logger().info(
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
        tracker.params(tracked_settings(ctx.settings, stage))
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
        # The manifest is a record, not a measurement: an artifact, never metrics.
        tracker.artifact(out_dir / MANIFEST)
    if tracker.lost:  # the work is done and kept; its tracking is logged later
        resync.record(store.root, "stage", ctx.flow_id, {
            "stage": stage, "path": str(out_dir), "tags": tags,
            "parent_run_id": ctx.parent_run_id})
    return StageResult(stage, key, str(out_dir), reused, 0.0,
                       {k: v for k, v in manifest.items() if k not in ("settings", "inputs")},
                       tracker.run_id)


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
        # Evaluation results have a table artifact of their own (flows/pipeline.py).
        shown = {k: v for k, v in result.summary.items() if k != "results"}
        for name, value in tracking.flatten(shown).items():
            lines.append(f"| {name} | {value} |")
        create_markdown_artifact("\n".join(lines), key=f"{result.stage}-summary",
                                 description=f"{result.stage} manifest")
    except Exception as exc:  # outside a Prefect run there is nowhere to show it
        logging.getLogger("smpo").debug("summary artifact skipped: %s", exc)


def stage_result(outcome: StageResult | State) -> StageResult:
    """What a stage task returned: its StageResult, which a reused stage's state carries."""
    return outcome.result() if isinstance(outcome, State) else outcome


_TASKS: dict[tuple[str, str], Task] = {}
REUSED = "Reused"  # the state name of a stage task whose output existed


def stage_task(name: str) -> Task:
    """The Prefect task of a registered stage: `run_stage` around `compute` of its module,
    with the module's TASK_OPTIONS (e.g. retries). Called as task(ctx, inputs, force)."""
    stage = STAGES[name]
    if (name, stage.implementation) not in _TASKS:
        module = importlib.import_module(stage.implementation)

        def run(ctx: RunContext, inputs: dict[str, StageResult] | None = None,
                force: bool = False) -> StageResult:
            result = run_stage(ctx, name, inputs or {}, module.compute, force,
                               getattr(module, "key_inputs", None))
            # A reused stage ends in a Completed state named "Reused": the Prefect UI then
            # tells it from a stage that ran.
            return Completed(name=REUSED, data=result) if result.reused else result

        # Prefect keys a task by its function's name: one per stage.
        run.__name__ = run.__qualname__ = f"{name}_stage"
        options = {"name": name, "cache_policy": NO_CACHE,
                   **getattr(module, "TASK_OPTIONS", {})}
        _TASKS[name, stage.implementation] = task(**options)(run)
    return _TASKS[name, stage.implementation]
