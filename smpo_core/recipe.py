"""The training recipe (METHOD.md §4), callable from Python without Prefect or MLflow.

    trainer = setup(job)                   # models, reference, optimiser, schedule, data, plan
    train(trainer, on_metrics)             # the loop, with accelerate checkpoints
    summary = cleanup(trainer)             # weights, history.json

or `run_training(job, on_metrics)` for all three. The train stage wires settings, store and
tracking around it; with `train.num_processes` > 1 each process of `accelerate launch` runs
this module (`python -m smpo_core.recipe --spec launch.json`) and sends its metrics back as
JSON lines (`MetricsEvents`), never as printed text to parse.

Outputs in `job.out_dir`: `unet/` (or `lora/`), `history.json`, and `checkpoint/`, accelerate's
own state (weights, optimiser, schedule, gradient scaler, RNG, progress), from which a killed
run resumes exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from diffusers import DDIMScheduler, UNet2DConditionModel

from smpo_core import faults
from smpo_core.acceleration import FastPaths, prepare_module, set_tf32
from smpo_core.errors import SmpoError
from smpo_core.inversion import inversion_levels
from smpo_core.models import (
    AdaptersDisabled,
    add_lora,
    check_scheduler,
    load_unet,
    resolve_device,
    resolve_dtype,
    save_lora,
)
from smpo_core.scoring import preference_targets
from smpo_core.settings import Settings, settings_model
from smpo_core.store import atomic_dir, atomic_path
from smpo_core.training import (
    CachedPairs,
    LoopConfig,
    StepConfig,
    TrainingPlan,
    levels_read,
    make_optimizer,
    train_loop,
    warmup_constant,
)
from smpo_core.trajectories import TrajectoryCache

HISTORY = "history.json"
CHECKPOINT = "checkpoint"
# A checkpoint being written; one fixed name, as every process writes its part into it.
CHECKPOINT_PARTIAL = ".checkpoint.partial"
ERROR_LINE = "error in training process"  # a launched process's one-line failure

Metrics = dict[str, float]


@dataclass
class TrainJob:
    """What one training run reads and where it writes. `base` and `unet` are loadable
    references (folders or hub ids), already resolved from the settings by the caller."""

    settings: Settings
    base: str
    cache_dir: Path
    labels_file: Path
    out_dir: Path
    unet: str | None = None  # the starting UNet, when not the base's own (model.unet)


@dataclass
class TrainProgress:
    """The optimiser step reached and the metrics of every step so far; saved and restored
    with accelerate's state (`register_for_checkpointing`)."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.history = int(state["step"]), list(state["history"])


@dataclass
class Trainer:
    """Everything `setup` built; `train` and `cleanup` work on it."""

    job: TrainJob
    accelerator: Accelerator
    policy: torch.nn.Module
    # A frozen UNet, the policy without its adapters (LoRA), or None (SFT, or the reference's
    # errors read from the cache: train.reference_errors=cached).
    reference: Any
    optimizer: torch.optim.Optimizer
    schedule: Any
    plan: TrainingPlan
    data: CachedPairs
    alphas_cumprod: torch.Tensor
    step_cfg: StepConfig
    loop: LoopConfig
    progress: TrainProgress
    trainable_parameters: int
    resumed_from_step: int = 0

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def weights(self) -> str:
        return "lora" if self.job.settings.train.lora_rank else "unet"


def make_accelerator(settings: Settings) -> Accelerator:
    cfg = settings.train
    requested = resolve_device(settings.model.device)
    return Accelerator(
        mixed_precision=cfg.mixed_precision if requested.type == "cuda" else "no",
        gradient_accumulation_steps=settings.train.grad_accum, cpu=requested.type == "cpu",
        # The processes split each optimiser step's micro-batches (train_loop), so the
        # learning-rate schedule advances once per step, not once per process and step.
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def setup_models(job: TrainJob, device: torch.device) -> tuple[UNet2DConditionModel, Any, int]:
    """The policy (trainable: the whole UNet, or LoRA adapters on it) and its reference (none
    where the invert stage computed the reference's errors: train.reference_errors=cached)."""
    cfg, model_cfg = job.settings.train, job.settings.model
    start = job.unet or job.base
    policy = load_unet(start, revision=None if job.unet else model_cfg.revision).to(device)
    trainable = add_lora(policy, cfg.lora_rank) if cfg.lora_rank else sum(
        p.numel() for p in policy.parameters())
    if cfg.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    policy.train()
    reference = None
    if cfg.method == "preference" and not cfg.lora_rank and cfg.reference_errors == "compute":
        reference = load_unet(start, resolve_dtype(model_cfg.dtype, device),
                              None if job.unet else model_cfg.revision)
        reference.requires_grad_(False).eval().to(device)
    return policy, reference, trainable


def setup(job: TrainJob) -> Trainer:
    """Models, reference, optimiser, schedule, data and plan; resumed from `checkpoint/`
    when a killed run left one."""
    settings = job.settings
    cfg, model_cfg = settings.train, settings.model
    accelerator = make_accelerator(settings)
    # Under DDP each process owns the device accelerate gave it; alone, the setting decides.
    device = (accelerator.device if accelerator.num_processes > 1
              else resolve_device(model_cfg.device))
    scheduler = DDIMScheduler.from_pretrained(job.base, subfolder="scheduler",
                                              revision=model_cfg.revision)
    check_scheduler(scheduler, model_cfg.base)
    levels = inversion_levels(settings.invert.num_levels, scheduler.config.num_train_timesteps)
    cache = TrajectoryCache(job.cache_dir)
    cache.check_compatible({"base_model": model_cfg.base, "unet": model_cfg.unet,
                            "resolution": model_cfg.resolution, "levels": levels})
    weight, winner = preference_targets(job.labels_file, cache.pair_ids, cfg.labels)
    policy, reference, trainable = setup_models(job, device)
    if device.type == "cuda":  # the fast paths; the frozen reference only runs inference
        paths = FastPaths.from_settings(model_cfg)
        set_tf32(paths.tf32, device)
        policy = prepare_module(policy, paths, device, "unet", inference=False)
        if reference is not None:
            reference = prepare_module(reference, paths, device, "unet", inference=True)

    optimizer = make_optimizer(cfg.optimizer, [p for p in policy.parameters() if p.requires_grad],
                               cfg.learning_rate, cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(cfg.warmup_steps))
    policy, optimizer, schedule = accelerator.prepare(policy, optimizer, schedule)
    if cfg.lora_rank and cfg.method == "preference" and cfg.reference_errors == "compute":
        reference = AdaptersDisabled(accelerator.unwrap_model(policy))
    progress = TrainProgress()
    accelerator.register_for_checkpointing(progress)
    if (job.out_dir / CHECKPOINT).is_dir():
        accelerator.load_state(str(job.out_dir / CHECKPOINT))

    plan = TrainingPlan.of_run(cfg, levels, len(cache), scheduler.config.num_train_timesteps)
    if cfg.trajectory == "inversion" and cfg.trajectory_source == "cache":
        check_levels_cached(cache, plan, cfg.max_steps)
    # Refused here, before the first step, if the cache has none or for other draws.
    ref_err = (cache.reference_errors(plan.draws(cfg.max_steps))
               if cfg.reference_errors == "cached" else None)
    data = CachedPairs(cache, weight, winner, device=device, load_levels=(
        cfg.trajectory == "inversion" and cfg.trajectory_source == "cache"),
        prefetch=cfg.prefetch, ref_err=ref_err)
    step_cfg = StepConfig(cfg.method, cfg.trajectory, cfg.trajectory_source, cfg.beta, levels,
                          settings.invert.renoise_steps, settings.invert.average,
                          scheduler.config.prediction_type)
    loop = LoopConfig(cfg.max_steps, cfg.batch_size, cfg.max_grad_norm, cfg.checkpoint_every,
                      cfg.log_every)
    return Trainer(job, accelerator, policy, reference, optimizer, schedule, plan, data,
                   scheduler.alphas_cumprod.float(), step_cfg, loop, progress, trainable,
                   resumed_from_step=progress.step)


def check_levels_cached(cache: TrajectoryCache, plan: TrainingPlan, max_steps: int) -> None:
    """Refuse, before the first step, a planned cache that lacks a level this run reads."""
    missing = cache.missing_levels(levels_read(plan, max_steps))
    if missing:
        position, k = missing[0]
        raise SmpoError(
            f"trajectory cache {str(cache.folder)!r} was planned for another training run "
            f"(invert.levels=planned, {cache.meta.get('plan')}): it lacks {len(missing)} "
            f"(pair, level) latents this run reads, e.g. level {cache.levels[k]} of pair "
            f"{cache.pair_ids[position]}; rerun invert with this run's train settings "
            f"(train.seed, effective_batch, max_steps, timestep_sampling) or invert.levels=all")


def save_checkpoint(trainer: Trainer, step: int) -> None:
    """accelerate's state of every process into `checkpoint/`, replacing the last one only
    once the new one is whole."""
    accelerator, out_dir = trainer.accelerator, trainer.job.out_dir
    partial, final = out_dir / CHECKPOINT_PARTIAL, out_dir / CHECKPOINT
    if trainer.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    trainer.progress.step = step
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if trainer.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        faults.reached("train.checkpoint")
    accelerator.wait_for_everyone()


def train(trainer: Trainer, on_metrics: Callable[[int, Metrics], None] | None = None) -> None:
    """The optimiser steps from where the run stands to `train.max_steps`; `on_metrics(step,
    metrics)` on the main process after each logged step."""
    progress = trainer.progress

    def record(step: int, metrics: Metrics) -> None:
        progress.history.append({"step": step, **metrics})
        if trainer.is_main and on_metrics:
            on_metrics(step, metrics)

    train_loop(trainer.policy, trainer.reference, trainer.plan, trainer.data,
               trainer.alphas_cumprod, trainer.step_cfg, trainer.loop, trainer.optimizer,
               trainer.schedule, trainer.accelerator, progress.step, record,
               lambda step: save_checkpoint(trainer, step))
    progress.step = trainer.loop.max_steps


def cleanup(trainer: Trainer) -> dict[str, Any]:
    """Write the trained weights (diffusers layout) and `history.json`; the run's summary."""
    accelerator, out_dir, cfg = trainer.accelerator, trainer.job.out_dir, trainer.job.settings.train
    history = trainer.progress.history
    if trainer.is_main:
        policy = accelerator.unwrap_model(trainer.policy)
        with atomic_dir(out_dir / trainer.weights) as tmp:
            if cfg.lora_rank:
                save_lora(policy, tmp)
            else:
                policy.save_pretrained(tmp)
        with atomic_path(out_dir / HISTORY) as tmp:
            tmp.write_text(json.dumps(history, indent=1))
    accelerator.wait_for_everyone()
    first, last = (history[0], history[-1]) if history else ({}, {})
    return {
        "steps": cfg.max_steps, "resumed_from_step": trainer.resumed_from_step,
        "cached_pairs": trainer.plan.num_pairs, "effective_batch": cfg.effective_batch,
        "pairs_seen": cfg.max_steps * cfg.effective_batch,
        "micro_batch": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "num_processes": accelerator.num_processes,
        "timestep_sampling": cfg.timestep_sampling,
        "prediction_type": trainer.step_cfg.prediction_type,
        "first_loss": first.get("loss"), "final_loss": last.get("loss"),
        "final_implicit_accuracy": last.get("implicit_accuracy"),
        "mean_step_seconds": float(np.mean([h["step_seconds"] for h in history]))
        if history else None,
        "method": cfg.method, "labels": cfg.labels, "trajectory": cfg.trajectory,
        "weights": trainer.weights, "trainable_parameters": trainer.trainable_parameters,
        "weights_path": str(out_dir / trainer.weights),
    }


def run_training(job: TrainJob, on_metrics: Callable[[int, Metrics], None] | None = None
                 ) -> dict[str, Any]:
    """setup, train, cleanup: a whole training run (resumed if a checkpoint exists)."""
    trainer = setup(job)
    train(trainer, on_metrics)
    return cleanup(trainer)


class MetricsEvents:
    """Metrics as JSON lines, one event per logged step: written by a launched process,
    read back (as far as written) by the stage that launched it."""

    def __init__(self, path: Path):
        self.path, self._offset = Path(path), 0

    def write(self, step: int, metrics: Metrics) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps({"step": step, "metrics": metrics}) + "\n")

    def read_new(self) -> list[tuple[int, Metrics]]:
        """Events written since the last call; a line still being written waits."""
        if not self.path.is_file():
            return []
        with self.path.open("rb") as file:
            file.seek(self._offset)
            chunk = file.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        events = [json.loads(line) for line in complete.decode().splitlines() if line]
        return [(event["step"], event["metrics"]) for event in events]


def launch_spec(job: TrainJob, result: Path, events: Path) -> dict[str, Any]:
    """What a launched process needs to rebuild the job: plain JSON."""
    return {"settings": job.settings.model_dump(mode="json"), "base": job.base,
            "unet": job.unet, "cache_dir": str(job.cache_dir),
            "labels_file": str(job.labels_file), "out_dir": str(job.out_dir),
            "result": str(result), "events": str(events)}


def job_of_spec(spec: dict[str, Any]) -> TrainJob:
    """The job a `launch_spec` describes."""
    settings = settings_model().model_validate(spec["settings"])
    return TrainJob(settings, spec["base"], Path(spec["cache_dir"]), Path(spec["labels_file"]),
                    Path(spec["out_dir"]), spec["unet"])


def main(argv: list[str] | None = None) -> None:
    """Entry point of each process `accelerate launch` starts for the train stage."""
    parser = argparse.ArgumentParser(description="One training process under `accelerate "
                                     "launch`; started by the train stage.")
    parser.add_argument("--spec", type=Path, required=True, help="the stage's launch.json")
    spec = json.loads(parser.parse_args(argv).spec.read_text())
    job = job_of_spec(spec)
    settings = job.settings
    events = MetricsEvents(Path(spec["events"]))

    def report(step: int, metrics: Metrics) -> None:
        events.write(step, metrics)
        print(f"step {step}/{settings.train.max_steps}: "
              + " ".join(f"{k} {v:.5g}" for k, v in metrics.items()), flush=True)

    try:
        summary = run_training(job, report)
    except Exception as exc:  # the stage shows this line; the traceback follows in the log
        print(f"{ERROR_LINE} {PartialState().process_index}: {type(exc).__name__}: {exc}",
              flush=True)
        raise
    if PartialState().is_main_process:
        with atomic_path(Path(spec["result"])) as tmp:
            tmp.write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
