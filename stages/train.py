"""train: SmPO fine-tuning of the UNet from the cached trajectories and the soft labels.

The training is `smpo_core.recipe`; this stage resolves the settings into a `TrainJob`, runs
it in its own process (or, with `train.num_processes` > 1, under `accelerate launch`) and
sends its metrics, progress and curves to MLflow and Prefect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smpo_core.errors import SmpoError
from smpo_core.model_refs import start_unet
from smpo_core.models import resolve_device
from smpo_core.recipe import (
    HISTORY,
    MetricsEvents,
    TrainJob,
    job_of_spec,
    launch_spec,
    run_training,
)
from stages.launch import LAUNCH_RESULT, launch, process_main, say
from stages.score import LABELS

if TYPE_CHECKING:  # launched processes import neither Prefect nor MLflow (stages/launch.py)
    from stages.common import StageRun

LAUNCH_EVENTS = "metrics.jsonl"  # the main process's metrics, one JSON line per step


def job_for(run: StageRun) -> TrainJob:
    settings = run.settings
    if settings.model.unet and settings.train.lora_rank:
        raise SmpoError(f"train.lora_rank={settings.train.lora_rank} with model.unet="
                        f"{settings.model.unet!r}: LoRA weights apply to the base's UNet "
                        f"when loaded; train the whole UNet (train.lora_rank=0) from another "
                        f"starting UNet")
    return TrainJob(settings, run.ctx.resolve(settings.model.base), run.input_dir("invert"),
                    run.input_dir("score") / LABELS, run.out_dir,
                    start_unet(settings.model.unet, run.ctx.store.root))


def compute(run: StageRun) -> dict[str, Any]:
    from smpo_core.report import training_curves
    from stages.tracking import log_tuned_model, training_metrics

    job = job_for(run)
    progress = run.progress(total=job.settings.train.max_steps, unit="steps")

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        run.tracker.metrics(training_metrics(metrics), step=step)
        progress.update(step - progress.done)

    if job.settings.train.num_processes > 1:
        summary = _launch(run, job, on_metrics)
    else:
        summary = run_training(job, on_metrics)
    if summary["resumed_from_step"]:
        run.log("resumed from the step-%d checkpoint", summary["resumed_from_step"])
    progress.close()
    history = json.loads((run.out_dir / HISTORY).read_text())
    if history:
        keys = [k for k in history[0] if k != "step"]
        run.artifacts.append(training_curves(run.out_dir / "training.png",
                                             {k: [h.get(k, np.nan) for h in history]
                                              for k in keys}))
    run.artifacts.append(run.out_dir / HISTORY)
    model = job.settings.model
    # Tracking is a side channel: a lost server skips the logged model, never the weights.
    run.tracker.call(lambda: log_tuned_model(
        run.tracker, run.out_dir / summary["weights"], summary["weights"],
        {"base": job.base, "revision": model.revision, "vae": run.ctx.resolve(model.vae)}))
    return summary


def _launch(run: StageRun, job: TrainJob, on_metrics) -> dict[str, Any]:
    """Run the recipe under `accelerate launch` (stages/launch.py): its output streamed into
    the stage log, its metrics read from the JSON lines the main process writes."""
    events = MetricsEvents(run.out_dir / LAUNCH_EVENTS)
    events.path.unlink(missing_ok=True)

    def forward_metrics(line: str | None = None) -> None:
        for step, metrics in events.read_new():
            on_metrics(step, metrics)

    cfg = run.settings.train
    summary = launch(run, "stages.train", cfg.num_processes,
                     launch_spec(job, run.out_dir / LAUNCH_RESULT, events.path), forward_metrics,
                     cuda=resolve_device(run.settings.model.device).type == "cuda",
                     mixed_precision=cfg.mixed_precision)
    forward_metrics()
    return summary


def _process(spec: dict[str, Any]) -> dict[str, Any]:
    """One train-stage process under `accelerate launch`: the recipe, its metrics written as
    JSON lines (main process) and printed."""
    job = job_of_spec(spec)
    events = MetricsEvents(Path(spec["events"]))

    def report(step: int, metrics: dict[str, float]) -> None:
        events.write(step, metrics)
        say("step %d/%d: %s", step, job.settings.train.max_steps,
            " ".join(f"{k} {v:.5g}" for k, v in metrics.items()))

    return run_training(job, report)


def main(argv: list[str] | None = None) -> None:
    """Entry point of each process `accelerate launch` starts for the train stage."""
    process_main(argv, "One train-stage process under `accelerate launch`; started by the "
                 "train stage.", _process)


if __name__ == "__main__":
    main()
