"""Sweeps: a grid over train and evaluate settings on top of one download, one score and one
cache of inverted trajectories. One Prefect flow, `smpo-sweep`, behind `smpo sweep` and the
deployment `smpo-sweep/sweep`.

    smpo sweep --grid train.beta=1000,2000,5000 --grid train.labels=smoothed,human

The shared stages run once (the `smpo` flow for score and invert, upstream included); every
variant is then its own `smpo` flow run (train, then evaluate) and its own MLflow run, nested
under the sweep's parent run. Variants run concurrently within a Prefect global concurrency
limit of `concurrency` slots (one per GPU; by default one), visible in the Prefect UI; with
`devices` (or SMPO_SWEEP_DEVICES on the worker) each running variant holds one of them as its
`model.device`. A
variant that fails does not stop the others; the sweep ends with one comparison (flows/compare.py)
of every trained variant against the base and a table of each variant's evaluate summary, and
fails if a variant did. Stage keys make a rerun redo only what failed or changed.
"""

from __future__ import annotations

import csv
import itertools
import json
import queue
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, runtime, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture

from flows.plan import check_reachable, preflight, tracking_uri
from smpo_core.environment import environment
from smpo_core.errors import SmpoError, first_line
from smpo_core.models import resolve_device
from smpo_core.settings import STAGES, load_settings, with_upstream
from smpo_core.store import Store, stage_key, write_json
from stages import tracking
from stages.common import in_prefect_run, logger, stage_key_for

VERSION = "1"
SHARED = ("score", "invert")  # computed once; every variant trains on them
VARIANT_STAGES = ("train", "evaluate")
DEFAULT_GRID = {"train.beta": [1000, 2000, 5000], "train.labels": ["smoothed", "human"]}


def swept_sections() -> list[str]:
    """Sections a grid may vary: stages downstream of the shared ones (their outputs would
    differ per variant otherwise, and the point of a sweep is one cache for all)."""
    shared = set(with_upstream(SHARED)) | {"model"}
    return [name for name in STAGES if name not in shared]


@dataclass(frozen=True)
class Variant:
    """One point of the grid: its label (also its model label in the comparison) and its
    overrides on top of the sweep's own."""

    label: str
    values: dict[str, Any]

    @property
    def overrides(self) -> list[str]:
        # JSON is YAML: `--set` reads each value back as the same number, string or list.
        return [f"{key}={json.dumps(value)}" for key, value in self.values.items()]


def expand_grid(grid: dict[str, list[Any]]) -> list[Variant]:
    """Every combination of the grid's values, the last key varying fastest."""
    if not grid:
        raise SmpoError("sweep grid: empty; expected at least one SECTION.KEY=V1,V2,...")
    allowed = swept_sections()
    for key, values in grid.items():
        if key.split(".")[0] not in allowed:
            raise SmpoError(f"sweep grid key {key!r}: only {' and '.join(allowed)} settings can "
                            f"vary in a sweep (the shared {', '.join(with_upstream(SHARED))} "
                            f"outputs serve every variant); set others with --set")
        if not isinstance(values, list) or not values:
            raise SmpoError(f"sweep grid key {key!r}: expected a non-empty list of values, "
                            f"got {values!r}")
    variants = []
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination, strict=True))
        # A label MLflow takes as a parameter name and `smpo compare` as a model label.
        label = " ".join(f"{key.split('.')[-1]} {value}" for key, value in values.items())
        variants.append(Variant(re.sub(r"[^\w .-]", "_", label), values))
    return variants


@dataclass
class SweepPlan:
    """A checked sweep: its variants and where its table goes."""

    variants: list[Variant]
    store: Path
    tracking_uri: str
    key: str
    out_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out_dir = Store(self.store).root / "sweep" / self.key


def plan_sweep(grid: dict[str, list[Any]], profile: str = "tiny",
               overrides: list[str] | None = None, store: str | None = None,
               concurrency: int = 1, devices: list[str] | None = None) -> SweepPlan:
    """Check the whole grid before anything runs: every variant's settings load, the limit
    and the devices make sense. Bad input is one SmpoError line."""
    if concurrency < 1:
        raise SmpoError(f"sweep concurrency {concurrency}: expected 1 or more variants at once")
    devices = devices or sweep_devices()
    if devices is not None and len(devices) < concurrency:
        raise SmpoError(f"sweep devices {devices}: {concurrency} variants run at once, so give "
                        f"at least {concurrency} devices (one each), or lower the concurrency")
    for device in devices or []:  # before the shared stages, not in every variant after them
        try:
            resolve_device(device)
        except (SmpoError, RuntimeError) as exc:
            raise SmpoError(f"sweep device {device!r}: {first_line(exc)}") from None
    variants = expand_grid(grid)
    root = Path(store or environment().store).expanduser().resolve()
    settings = {}
    for variant in variants:  # every variant's settings, then (reading inputs) their inputs
        try:
            settings[variant.label] = load_settings(profile,
                                                    [*(overrides or []), *variant.overrides])
        except SmpoError as exc:
            raise SmpoError(f"sweep variant {variant.label!r}: {exc}") from None
    for variant in variants:
        try:
            preflight(settings[variant.label], root, list(VARIANT_STAGES))
        except SmpoError as exc:
            raise SmpoError(f"sweep variant {variant.label!r}: {exc}") from None
    uri = tracking_uri(root)
    check_reachable(uri)
    key = stage_key("sweep", {"grid": grid, "profile": profile,
                              "overrides": sorted(overrides or [])}, {}, VERSION)
    return SweepPlan(variants, root, uri, key)


def sweep_devices() -> list[str] | None:
    """The worker's devices for variants (SMPO_SWEEP_DEVICES), if it names any."""
    named = environment().sweep_devices
    return [d.strip() for d in named.split(",") if d.strip()] if named else None


def limit_name(plan: SweepPlan) -> str:
    return f"smpo-sweep-{plan.key}"


def set_concurrency_limit(name: str, slots: int) -> None:
    """Create (or resize) the Prefect global concurrency limit the variants hold a slot of."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=slots))
        else:
            client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=slots, active=True))


@contextmanager
def device_slot(devices: queue.Queue | None) -> Iterator[str | None]:
    """One of the sweep's devices for as long as a variant runs. The concurrency limit lets
    at most as many variants run as there are devices, so one is always free."""
    if devices is None:
        yield None
        return
    device = devices.get_nowait()
    try:
        yield device
    finally:
        devices.put(device)


@task(name="variant", cache_policy=NO_CACHE)
def run_variant(variant: Variant, profile: str, overrides: list[str], store: str,
                parent_run_id: str, limit: str, devices: queue.Queue | None) -> dict[str, Any]:
    """Train and evaluate one variant as its own `smpo` flow run, holding a slot of the
    sweep's concurrency limit (and a device) while it runs."""
    from prefect.concurrency.sync import concurrency

    from flows.pipeline import smpo

    with concurrency(limit, occupy=1, strict=True), device_slot(devices) as device:
        placed = [f"model.device={device}"] if device else []
        if device:
            logger().info("variant %s: on %s", variant.label, device)
        named = smpo.with_options(flow_run_name=f"variant {variant.label}")
        rows = named(stages=list(VARIANT_STAGES), profile=profile,
                     overrides=[*overrides, *variant.overrides, *placed], store=store,
                     parent_run_id=parent_run_id, run_name=f"variant {variant.label}")
    return {row["stage"]: row for row in rows}


def _headline(row: dict[str, Any] | None) -> dict[str, float]:
    """The variant's evaluate summary in a line: per metric, the tuned model's mean and its
    difference and win rate against the base."""
    if not row:
        return {}
    results = row["summary"].get("results", {})
    return {f"{name.removesuffix('.tuned')}.{stat}": values[stat]
            for name, values in results.items() if name.endswith(".tuned")
            for stat in ("mean", "diff_mean", "win_rate") if stat in values}


def _write_table(out_dir: Path, rows: list[dict[str, Any]]) -> Path:
    from smpo_core.store import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(out_dir / "variants.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    return out_dir / "variants.csv"


def _markdown(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in
                 (row.get(c, "") for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _wait(futures: dict[str, PrefectFuture]) -> dict[str, Any]:
    """Each variant's stage rows, or the exception it failed with."""
    outcomes: dict[str, Any] = {}
    for label, future in futures.items():
        try:
            outcomes[label] = future.result()
        except Exception as exc:  # a failed variant must not stop the others' bookkeeping
            outcomes[label] = exc
    return outcomes


@flow(name="smpo-sweep", log_prints=True)
def sweep(grid: dict[str, list[Any]] | None = None, profile: str = "tiny",
          overrides: list[str] | None = None, store: str | None = None,
          concurrency: int = 1, devices: list[str] | None = None) -> dict[str, Any]:
    """Train and evaluate every combination of `grid` (`section.key` -> values; train and
    evaluate settings) on one shared download, score and invert; at most `concurrency`
    variants at once (each on one of `devices`, if given); then compare them all."""
    from flows.compare import compare
    from flows.pipeline import smpo

    grid = grid or DEFAULT_GRID
    overrides = list(overrides or [])
    devices = devices or sweep_devices()
    plan = plan_sweep(grid, profile, overrides, store, concurrency, devices)
    root = str(plan.store)
    plan.store.mkdir(parents=True, exist_ok=True)
    (plan.out_dir / "summary.json").unlink(missing_ok=True)  # this run's, once written
    client = MlflowClient(plan.tracking_uri)
    experiment = tracking.experiment_id(client, plan.tracking_uri, plan.store)
    limit = limit_name(plan)
    set_concurrency_limit(limit, concurrency)
    tags = {"smpo.kind": "sweep", "smpo.profile": profile, "smpo.output": str(plan.out_dir),
            "smpo.grid": json.dumps(grid), "smpo.overrides": " ".join(overrides),
            "prefect.flow_run_id": runtime.flow_run.id or ""}
    if runtime.flow_run.ui_url:
        tags["prefect.flow_run_url"] = runtime.flow_run.ui_url
    started = time.perf_counter()
    name = f"sweep {profile}: {len(plan.variants)} variants of {', '.join(grid)}"
    with tracking.run(client, experiment, name, tags) as parent:
        parent.params({"grid": grid, "concurrency": concurrency, "devices": devices,
                       "overrides": overrides, "profile": profile})
        shared = {row["stage"]: row for row in smpo.with_options(flow_run_name="sweep shared")(
            stages=list(SHARED), profile=profile, overrides=overrides, store=root,
            parent_run_id=parent.run_id, run_name="shared stages")}
        slots = None
        if devices:
            slots = queue.Queue()
            for device in devices:
                slots.put(device)
        futures: dict[str, PrefectFuture] = {}
        first_of_key: dict[str, PrefectFuture] = {}
        for variant in plan.variants:
            settings = load_settings(profile, [*overrides, *variant.overrides])
            train_key = stage_key_for(settings, "train", {
                name: shared[name]["key"] for name in STAGES["train"].upstream})
            # Variants that differ only in evaluate settings share one training: it runs once,
            # in the first of them; the others wait for it and reuse its output.
            waits = [first_of_key[train_key]] if train_key in first_of_key else []
            futures[variant.label] = run_variant.with_options(
                task_run_name=f"variant {variant.label}").submit(
                variant, profile, overrides, root, parent.run_id, limit, slots,
                wait_for=waits)
            first_of_key.setdefault(train_key, futures[variant.label])
        outcomes = _wait(futures)

        rows, models = [], ["base"]
        for variant in plan.variants:
            outcome = outcomes[variant.label]
            row: dict[str, Any] = {"variant": variant.label, **variant.values}
            if isinstance(outcome, BaseException):
                row |= {"state": "failed", "error": f"{type(outcome).__name__}: {outcome}"}
            else:
                train = outcome["train"]
                row |= {"state": "completed", "train_key": train["key"],
                        "final_loss": train["summary"].get("final_loss"),
                        **_headline(outcome.get("evaluate"))}
                model = f"{variant.label}=train:{train['key']}"
                if f"train:{train['key']}" not in {m.split("=")[-1] for m in models}:
                    models.append(model)
            rows.append(row)
        failed = [row for row in rows if row["state"] == "failed"]
        comparison = None
        if len(models) > 1:
            comparison = compare.with_options(flow_run_name="sweep comparison")(
                models=models, profile=profile, overrides=overrides, store=root,
                parent_run_id=parent.run_id)
        table = _write_table(plan.out_dir, rows)
        summary = {"grid": grid, "profile": profile, "overrides": overrides,
                   "variants": rows, "comparison": comparison and comparison["path"],
                   "mlflow_run_id": parent.run_id,
                   "seconds": round(time.perf_counter() - started, 3)}
        write_json(plan.out_dir / "summary.json", summary)
        parent.artifact(table)
        parent.artifact(plan.out_dir / "summary.json")
        parent.metrics({"variants": len(rows), "variants_failed": len(failed)})
        parent.tags({"smpo.failed_variants": ", ".join(r["variant"] for r in failed)})
        if in_prefect_run():
            from prefect.artifacts import create_markdown_artifact

            create_markdown_artifact(_markdown(rows), key="sweep", description="sweep variants")
        print(f"sweep: {len(rows) - len(failed)} of {len(rows)} variants completed; "
              f"table {table}" + (f"; comparison {comparison['path']}" if comparison else ""))
    if failed:
        raise SmpoError(
            f"sweep: {len(failed)} of {len(rows)} variants failed ("
            + "; ".join(f"{r['variant']}: {r['error']}" for r in failed)
            + "); the others finished. Fix the cause and rerun the same sweep: only the failed "
            "variants run again")
    return summary
