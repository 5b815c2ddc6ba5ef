"""evaluate: the base and the tuned model draw from the same prompts and seeds, every metric
scores both on its published scale; per-image scores, a summary with intervals, a table, a
side-by-side grid and an HTML report. Images and scores are kept in the store's generation
cache (`<store>/generations/`), so a later comparison reuses them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smpo_core.acceleration import FastPaths
from smpo_core.evaluation import (
    EvaluationConfig,
    MetricSpec,
    Reporter,
    compare_models,
    headline,
    write_outputs,
    write_report,
)
from smpo_core.generation import Sampling
from smpo_core.model_refs import base_spec, train_output_spec
from smpo_core.models import resolve_device, resolve_dtype
from smpo_core.prompts import is_local, load_prompt_set
from smpo_core.rewards import check_kinds
from smpo_core.settings import Settings
from smpo_core.worlds import builtins
from stages.common import Progress, RunContext, StageRun, logger

GENERATIONS = "generations"  # <store>/generations: images and scores, shared by evaluations


def evaluation_config(settings: Settings) -> EvaluationConfig:
    cfg, model = settings.evaluate, settings.model
    dtype = resolve_dtype(model.dtype, resolve_device(model.device))
    sampling = Sampling(cfg.num_inference_steps, cfg.guidance_scale, model.resolution,
                        str(dtype).removeprefix("torch."))
    return EvaluationConfig(sampling, cfg.seed, cfg.images_per_prompt, cfg.bootstrap_resamples,
                            cfg.bootstrap_seed, cfg.batch_size, cfg.metric_batch_size,
                            cfg.chunk_prompts, FastPaths.from_settings(model))


def metric_specs(ctx: RunContext) -> list[MetricSpec]:
    cfg = ctx.settings.evaluate
    return [MetricSpec(kind, ctx.resolve(checkpoint),
                       ctx.resolve(cfg.metric_processors.get(kind)))
            for kind, checkpoint in cfg.metrics.items()]


def check_inputs(settings: Settings, store: Path) -> None:
    """What a pipeline run checks before its first stage: the metric kinds, and a prompt set
    that can be read without the network (it must hold prompts)."""
    check_kinds(settings.evaluate.metrics, "evaluate.metrics")
    if is_local(settings.evaluate.prompts):
        load_prompt_set(builtins.resolve(settings.evaluate.prompts, store),
                        settings.evaluate.num_prompts)


def reporter(stage: str) -> Reporter:
    """Progress bars (terminal and Prefect) and log lines for an evaluation."""
    return Reporter(progress=lambda what, total: Progress(f"{stage} {what}", total, "images"),
                    log=lambda message: logger().info("%s: %s", stage, message))


def compute(run: StageRun) -> dict[str, Any]:
    settings, store = run.settings, run.ctx.store.root
    prompts = load_prompt_set(run.ctx.resolve(settings.evaluate.prompts),
                              settings.evaluate.num_prompts)
    models = [base_spec(settings, store, "base"),
              train_output_spec(run.input_dir("train"), store, "tuned", "train")]
    device = resolve_device(settings.model.device)
    comparison = compare_models(
        models, prompts, metric_specs(run.ctx), evaluation_config(settings),
        store / GENERATIONS, device, resolve_dtype(settings.model.dtype, device),
        reporter("evaluate"), metric_cache_dir=store / "converted")
    summary = write_outputs(comparison, run.out_dir)
    curves = run.input_dir("train") / "training.png"
    extra = {"Training (loss, implicit accuracy, MSEs per step)": curves} \
        if curves.is_file() else {}
    run.artifacts += write_report(comparison, summary, run.out_dir, extra,
                                  title="smpo evaluation: tuned against base")
    results = headline(summary)
    run.tracker.metrics({f"eval.{name}.{stat}": value for name, values in results.items()
                         for stat, value in values.items()})
    return {"prompts": len(prompts), "generation": summary["generation"], "results": results,
            "report": str(Path(run.out_dir) / "report.html")}
