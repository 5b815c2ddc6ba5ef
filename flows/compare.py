"""Compare models: one Prefect flow, `smpo-compare`, behind `smpo compare` and the deployment
`smpo-compare/compare`.

Every model draws from the same prompts and seeds (images already drawn by an evaluate stage
or an earlier comparison are reused, as are their scores), every metric scores them, and the
comparison writes one table, one side-by-side grid and one HTML report into
`<store>/compare/<key>/`, logged to MLflow as one run tagged `smpo.kind=comparison`.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, runtime

from flows.plan import check_reachable, tracking_uri
from smpo_core.environment import environment
from smpo_core.evaluation import (
    EvaluationConfig,
    MetricSpec,
    check_evaluation,
    compare_models,
    headline,
    write_outputs,
    write_report,
)
from smpo_core.generation import ModelSpec
from smpo_core.model_refs import resolve_model
from smpo_core.models import resolve_device, resolve_dtype
from smpo_core.prompts import PromptSet, load_prompt_set
from smpo_core.settings import Settings, load_settings
from smpo_core.store import Store, stage_key
from stages import tracking
from stages.common import RunContext, in_prefect_run, logger, quiet_libraries
from stages.evaluate import GENERATIONS, evaluation_config, metric_specs, reporter

VERSION = "1"


@dataclass
class ComparisonPlan:
    """A checked comparison: settings, models, prompts and metrics, and where it goes."""

    settings: Settings
    ctx: RunContext
    models: list[ModelSpec]
    prompts: PromptSet
    metrics: list[MetricSpec]
    config: EvaluationConfig
    out_dir: Path


def plan_comparison(models: list[str], profile: str = "tiny",
                    overrides: list[str] | None = None,
                    store: str | None = None) -> ComparisonPlan:
    """Read and check everything a comparison needs, drawing nothing: a bad model, prompt
    set or metric is one SmpoError line here."""
    settings = load_settings(profile, overrides or [])
    root = Path(store or environment().store).expanduser().resolve()
    uri = tracking_uri(root)
    check_reachable(uri)
    root.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    with Store(root).lock("mlflow"):  # a fresh database is set up by one process at a time
        experiment = tracking.experiment_id(client, uri, root)
    ctx = RunContext(settings, str(root), uri, experiment)
    find_run = functools.partial(tracking.train_output_of_run, client)
    specs = [resolve_model(text, settings, root, find_run) for text in models]
    metrics = metric_specs(ctx)
    config = evaluation_config(settings)
    check_evaluation(specs, metrics, config)
    prompts = load_prompt_set(ctx.resolve(settings.evaluate.prompts),
                              settings.evaluate.num_prompts)
    key = stage_key("compare", {"models": [m.describe() for m in specs],
                                "evaluate": settings.evaluate.result_settings(),
                                "sampling": config.sampling.key()}, {}, VERSION)
    return ComparisonPlan(settings, ctx, specs, prompts, metrics, config,
                          Store(root).stage_dir("compare", key))


def _run_name(plan: ComparisonPlan) -> str:
    labels = " vs ".join(m.label for m in plan.models)
    return f"compare {labels} ({plan.prompts.spec}, {len(plan.prompts)} prompts)"


def _results_markdown(summary: dict[str, Any], report: Path) -> str:
    """The overall table as Markdown, for the Prefect UI."""
    reference = summary["reference"]
    lines = [f"### {', '.join(m for m in summary['models'] if m != reference)} vs {reference}",
             f"report: `{report}`", "",
             "| metric | model | mean | median | difference [95% CI] | win rate [95% CI] |",
             "|---|---|---|---|---|---|"]
    for kind, metric in summary["metrics"].items():
        result = metric["groups"]["all"]
        for label, stats in result["models"].items():
            paired = result["vs_reference"].get(label)
            diff = (f"{paired['diff_mean']:.4f} [{paired['diff_ci'][0]:.4f}, "
                    f"{paired['diff_ci'][1]:.4f}]") if paired else "reference"
            win = (f"{paired['win_rate']:.3f} [{paired['win_rate_ci'][0]:.3f}, "
                   f"{paired['win_rate_ci'][1]:.3f}]") if paired else ""
            lines.append(f"| {kind} | {label} | {stats['mean']:.4f} | {stats['median']:.4f} | "
                         f"{diff} | {win} |")
    return "\n".join(lines)


def _prefect_table(summary: dict[str, Any], report: Path) -> None:
    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(_results_markdown(summary, report), key="comparison",
                             description="model comparison")


@flow(name="smpo-compare", log_prints=True)
def compare(models: list[str], profile: str = "tiny", overrides: list[str] | None = None,
            store: str | None = None, parent_run_id: str | None = None) -> dict[str, Any]:
    """Evaluate `models` (the first is the reference) on the same prompts and seeds: one
    table, one grid, one HTML report, one MLflow run (nested under `parent_run_id`, e.g. a
    sweep's, if given)."""
    plan = plan_comparison(models, profile, overrides, store)
    quiet_libraries()
    settings, ctx = plan.settings, plan.ctx
    device = resolve_device(settings.model.device)
    client = MlflowClient(ctx.tracking_uri)
    tags = {"smpo.kind": "comparison", "smpo.models": " ".join(models),
            "smpo.profile": settings.profile, "smpo.output": str(plan.out_dir),
            "smpo.prompts": plan.prompts.spec, "prefect.flow_run_id": runtime.flow_run.id or ""}
    if runtime.flow_run.ui_url:
        tags["prefect.flow_run_url"] = runtime.flow_run.ui_url
    with tracking.run(client, ctx.experiment_id, _run_name(plan), tags,
                      parent_run_id) as tracker:
        tracker.params({"models": {m.label: m.ref or m.base for m in plan.models},
                        "evaluate": settings.evaluate.model_dump(),
                        "model": settings.model.result_settings()})
        started = time.perf_counter()
        comparison = compare_models(
            plan.models, plan.prompts, plan.metrics, plan.config,
            ctx.store.root / GENERATIONS, device, resolve_dtype(settings.model.dtype, device),
            reporter("compare"), metric_cache_dir=ctx.store.root / "converted")
        summary = write_outputs(comparison, plan.out_dir)
        labels = ", ".join(m.label for m in plan.models)
        artifacts = write_report(comparison, summary, plan.out_dir,
                                 title=f"smpo comparison: {labels}")
        results = headline(summary)
        tracker.metrics({f"{name}.{stat}": value for name, values in results.items()
                         for stat, value in values.items()})
        for path in artifacts:
            tracker.artifact(path)
        Store(ctx.store_root).complete("compare", plan.out_dir.name, {
            "models": [m.describe() for m in plan.models], "generation": summary["generation"],
            "results": results, "mlflow_run_id": tracker.run_id,
            "seconds": round(time.perf_counter() - started, 3)})
        tracker.artifact(plan.out_dir / "manifest.json")
        _prefect_table(summary, plan.out_dir / "report.html")
        logger().info("compare: report %s", plan.out_dir / "report.html")
    return {"path": str(plan.out_dir), "run_id": tracker.run_id, "summary": summary}
