"""train: SmPO fine-tuning of the UNet from the cached trajectories and the soft labels.

The training is `smpo_core.recipe`; this stage resolves the settings into a `TrainJob`, runs
it in its own process (or, with `train.num_processes` > 1, under `accelerate launch`) and
sends its metrics, progress and curves to MLflow and Prefect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from smpo_core.errors import SmpoError
from smpo_core.model_refs import start_unet
from smpo_core.models import resolve_device
from smpo_core.recipe import (
    ERROR_LINE,
    HISTORY,
    MetricsEvents,
    TrainJob,
    launch_spec,
    run_training,
)
from smpo_core.report import training_curves
from smpo_core.settings import Settings
from stages.common import StageRun
from stages.score import LABELS
from stages.tracking import log_tuned_model, training_metrics

LAUNCH_SPEC = "launch.json"  # what the launched processes train: settings and folders
LAUNCH_RESULT = "launch-result.json"  # the main process's summary, read back by the stage
LAUNCH_EVENTS = "metrics.jsonl"  # the main process's metrics, one JSON line per step
ROOT = Path(__file__).resolve().parents[1]


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


def launch_command(settings: Settings, spec: Path) -> list[str]:
    """`accelerate launch` of the recipe on `train.num_processes` processes of this machine.

    `--multi_gpu` selects torch.distributed.run, which starts the processes, on the CPU too
    (`--cpu` would start a single one); there the workers' `Accelerator(cpu=True)` uses gloo.
    Port 0: a free port, so two trainings on one machine do not collide.
    """
    cuda = resolve_device(settings.model.device).type == "cuda"
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(settings.train.num_processes), "--num_machines", "1",
            "--mixed_precision", settings.train.mixed_precision if cuda else "no",
            "--dynamo_backend", "no", "--main_process_port", "0",
            "-m", "smpo_core.recipe", "--spec", str(spec)]


def _launch(run: StageRun, job: TrainJob, on_metrics) -> dict[str, Any]:
    """Run the recipe under `accelerate launch`: its output streamed into the stage log, its
    metrics read from the JSON lines the main process writes."""
    spec, result = run.out_dir / LAUNCH_SPEC, run.out_dir / LAUNCH_RESULT
    events = MetricsEvents(run.out_dir / LAUNCH_EVENTS)
    result.unlink(missing_ok=True)
    events.path.unlink(missing_ok=True)
    spec.write_text(json.dumps(launch_spec(job, result, events.path), indent=1))
    command = launch_command(run.settings, spec)
    run.log("launching %s", " ".join(command))
    env = os.environ | {"PYTHONUNBUFFERED": "1",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                    os.environ.get("PYTHONPATH")]))}
    tail: deque[str] = deque(maxlen=25)
    errors: list[str] = []

    def forward_metrics() -> None:
        for step, metrics in events.read_new():
            on_metrics(step, metrics)

    # Same session as this worker: cancelling the flow run must take the training down too.
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        try:
            for line in process.stdout:
                line = line.rstrip()
                tail.append(line)
                if line.startswith(ERROR_LINE):
                    errors.append(line)
                run.log("%s", line)
                forward_metrics()
        except BaseException:
            process.terminate()  # torch.distributed.run passes it on to the processes
            raise
    forward_metrics()
    if process.returncode != 0 or not result.is_file():
        raise SmpoError(
            f"train: `accelerate launch` of {run.settings.train.num_processes} processes failed "
            f"(exit status {process.returncode}): "
            + ("\n".join(errors) if errors else "its last lines:\n" + "\n".join(tail))
            + "\n(the whole output is in the stage log); fix the cause, or set "
            "train.num_processes=1 to train in the stage's process")
    return json.loads(result.read_text())
