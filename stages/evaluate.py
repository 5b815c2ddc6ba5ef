"""evaluate: the base and the tuned model draw from the same prompts and seeds, every metric
scores both on its published scale; per-image scores, a summary with intervals, a table, a
side-by-side grid and an HTML report. Images and scores are kept in the store's generation
cache (`<store>/generations/`), so a later comparison reuses them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from smpo_core.acceleration import FastPaths
from smpo_core.evaluation import (
    EvaluationConfig,
    MetricSpec,
    Reporter,
    compare_models,
    generate,
    headline,
    write_outputs,
    write_report,
)
from smpo_core.generation import ImageFolder, ModelSpec, Sampling
from smpo_core.model_refs import base_spec, train_output_spec
from smpo_core.models import resolve_device, resolve_dtype
from smpo_core.prompts import PromptSet, is_local, load_prompt_set
from smpo_core.rewards import check_kinds
from smpo_core.settings import Settings, settings_model
from smpo_core.worlds import builtins
from stages.launch import launch, process_main, say

if TYPE_CHECKING:  # launched processes import neither Prefect nor MLflow (stages/launch.py)
    from stages.common import RunContext, StageRun

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
    from stages.common import Progress, logger

    return Reporter(progress=lambda what, total: Progress(f"{stage} {what}", total, "images"),
                    log=lambda message: logger().info("%s: %s", stage, message))


def _models(settings: Settings, store: Path, train_dir: Path) -> list[ModelSpec]:
    return [base_spec(settings, store, "base"),
            train_output_spec(train_dir, store, "tuned", "train")]


def _prompts(settings: Settings, store: Path) -> PromptSet:
    return load_prompt_set(builtins.resolve(settings.evaluate.prompts, store),
                           settings.evaluate.num_prompts)


def compute(run: StageRun) -> dict[str, Any]:
    settings, store = run.settings, run.ctx.store.root
    prompts = _prompts(settings, store)
    models = _models(settings, store, run.input_dir("train"))
    device = resolve_device(settings.model.device)
    drawn = None
    if settings.evaluate.num_processes > 1:
        # The processes draw the images (prompt chunk c on process c mod N); this process
        # then finds them all drawn and scores them.
        drawn = launch(run, "stages.evaluate", settings.evaluate.num_processes, {
            "settings": settings.model_dump(mode="json"), "store": str(store),
            "train": str(run.input_dir("train"))}, cuda=device.type == "cuda")["drawn"]
    comparison = compare_models(
        models, prompts, metric_specs(run.ctx), evaluation_config(settings),
        store / GENERATIONS, device, resolve_dtype(settings.model.dtype, device),
        reporter("evaluate"), metric_cache_dir=store / "converted")
    if drawn is not None:  # drawn in this run, by the launched processes
        total = len(comparison.jobs)
        comparison.counts = {label: {"drawn": drawn[label], "reused": total - drawn[label]}
                             for label in comparison.counts}
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


def _process(spec: dict[str, Any]) -> dict[str, Any]:
    """One evaluate-stage process under `accelerate launch`: it draws the prompt chunks c
    with c mod processes = its index, for both models, on its own device; returns the images
    all processes drew, per model."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    settings = settings_model().model_validate(spec["settings"])
    store = Path(spec["store"])
    state = PartialState()
    requested = resolve_device(settings.model.device)
    device = state.device if requested.type == "cuda" else requested
    cfg = evaluation_config(settings)
    models = _models(settings, store, Path(spec["train"]))
    folders = {m.label: ImageFolder(store / GENERATIONS, m, cfg.sampling) for m in models}
    counts = generate(models, folders, _prompts(settings, store), cfg, device,
                      resolve_dtype(settings.model.dtype, device),
                      Reporter(log=lambda message: say("process %d: %s", state.process_index,
                                                       message)),
                      lambda chunk: chunk % state.num_processes == state.process_index)
    every = gather_object([counts])
    return {"drawn": {m.label: sum(c[m.label]["drawn"] for c in every) for m in models}}


def main(argv: list[str] | None = None) -> None:
    """Entry point of each process `accelerate launch` starts for the evaluate stage."""
    process_main(argv, "One evaluate-stage process under `accelerate launch`; started by "
                 "the evaluate stage.", _process)


if __name__ == "__main__":
    main()
