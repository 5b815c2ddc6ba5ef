"""train: SmPO fine-tuning of the UNet from the cached trajectories and the soft labels.

`fit` is the training; it runs in the stage's process, or, with `train.num_processes` > 1, in
each process `accelerate launch` starts (DDP), with this module as their entry point.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from diffusers import DDIMScheduler, UNet2DConditionModel

from smpo_core.inversion import inversion_levels
from smpo_core.models import add_lora, resolve_device, resolve_dtype, save_lora
from smpo_core.report import training_curves
from smpo_core.scoring import preference_targets
from smpo_core.settings import Settings, settings_model
from smpo_core.store import atomic_dir, atomic_path
from smpo_core.training import (
    CachedPairs,
    LoopConfig,
    StepConfig,
    load_train_state,
    make_optimizer,
    save_train_state,
    train_loop,
    warmup_constant,
)
from smpo_core.trajectories import TrajectoryCache
from stages.common import Progress, StageRun
from stages.launch import launch, process_main, say
from stages.score import LABELS

STATE = "train_state.pt"
HISTORY = "history.json"
STEP_LINE = re.compile(r"step (\d+)/\d+:")


def compute(run: StageRun) -> dict[str, Any]:
    cfg = run.settings.train
    base = run.ctx.resolve(run.settings.model.base)
    progress = run.progress(total=cfg.max_steps, unit="steps")
    if cfg.num_processes > 1:
        summary = _launch(run, base, progress)
        history = json.loads((run.out_dir / HISTORY).read_text())
        for entry in history:
            if entry["step"] > summary["resumed_from_step"]:
                run.tracker.metrics({f"train.{k}": v for k, v in entry.items() if k != "step"},
                                    step=entry["step"])
    else:
        def on_metrics(step: int, metrics: dict[str, float]) -> None:
            run.tracker.metrics({f"train.{k}": v for k, v in metrics.items()}, step=step)
            progress.update(step - progress.done)

        summary = fit(run.settings, base, run.input_dir("invert"), run.input_dir("score"),
                      run.out_dir, on_metrics, run.log)
    progress.close()
    history = json.loads((run.out_dir / HISTORY).read_text())
    if history:
        keys = [k for k in history[0] if k != "step"]
        run.artifacts.append(training_curves(run.out_dir / "training.png",
                                             {k: [h.get(k, np.nan) for h in history]
                                              for k in keys}))
    run.artifacts.append(run.out_dir / HISTORY)
    return summary


def fit(
    settings: Settings, base: str, invert_dir: Path, score_dir: Path, out_dir: Path,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    log: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Train the policy; write its weights, `history.json` and resumable state into out_dir.

    Alone, or as one of the processes of `accelerate launch`: those split each step's
    micro-batches between them (`train_loop`), and only the main process writes files, logs
    and calls `on_metrics(step, metrics)`. Returns the stage's summary.
    """
    cfg, model_cfg = settings.train, settings.model
    requested = resolve_device(model_cfg.device)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision if requested.type == "cuda" else "no",
        gradient_accumulation_steps=cfg.grad_accum, cpu=requested.type == "cpu",
        # The processes split each optimiser step's micro-batches (train_loop), so the
        # learning-rate schedule advances once per step, not once per process and step.
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    # Under DDP each process owns the device accelerate gave it; alone, the setting decides.
    device = accelerator.device if accelerator.num_processes > 1 else requested
    main = accelerator.is_main_process
    cache = TrajectoryCache(invert_dir)
    levels = inversion_levels(settings.invert.num_levels)
    cache.check_compatible({"base_model": model_cfg.base, "resolution": model_cfg.resolution,
                            "levels": levels})
    weight, winner = preference_targets(score_dir / LABELS, cache.pair_ids, cfg.labels)
    policy = UNet2DConditionModel.from_pretrained(base, subfolder="unet",
                                                  revision=model_cfg.revision).to(device)
    trainable = add_lora(policy, cfg.lora_rank) if cfg.lora_rank else sum(
        p.numel() for p in policy.parameters())
    if cfg.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    policy.train()
    reference = None
    if cfg.method == "preference":
        reference = UNet2DConditionModel.from_pretrained(
            base, subfolder="unet", revision=model_cfg.revision,
            dtype=resolve_dtype(model_cfg.dtype, device))
        reference.requires_grad_(False).eval().to(device)
    alphas_cumprod = DDIMScheduler.from_pretrained(
        base, subfolder="scheduler", revision=model_cfg.revision).alphas_cumprod.float()

    optimizer = make_optimizer(cfg.optimizer, [p for p in policy.parameters() if p.requires_grad],
                               cfg.learning_rate, cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(cfg.warmup_steps))
    policy, optimizer, schedule = accelerator.prepare(policy, optimizer, schedule)

    state_file = out_dir / STATE
    start_step, history = load_train_state(state_file, accelerator.unwrap_model(policy),
                                           optimizer, schedule)
    if start_step and main and log:
        log("resuming from step %d", start_step)

    data = CachedPairs(cache, weight, winner, cfg.batch_size, cfg.seed, cfg.empty_caption_prob,
                       load_levels=cfg.trajectory == "inversion"
                       and cfg.trajectory_source == "cache", device=device)
    step_cfg = StepConfig(cfg.method, cfg.trajectory, cfg.trajectory_source,
                          cfg.timestep_sampling, cfg.beta, levels,
                          settings.invert.renoise_steps, settings.invert.average)
    loop = LoopConfig(cfg.max_steps, cfg.grad_accum, cfg.max_grad_norm, cfg.checkpoint_every,
                      cfg.log_every)

    def record(step: int, metrics: dict[str, float]) -> None:
        history.append({"step": step, **metrics})
        if main and on_metrics:
            on_metrics(step, metrics)

    def checkpoint(step: int) -> None:
        if main:
            save_train_state(state_file, accelerator.unwrap_model(policy), optimizer, schedule,
                             step, history)
        accelerator.wait_for_everyone()

    train_loop(policy, reference, data, alphas_cumprod, step_cfg, loop, optimizer, schedule,
               accelerator, start_step, record, checkpoint)
    weights = "lora" if cfg.lora_rank else "unet"
    if main:
        with atomic_dir(out_dir / weights) as tmp:
            if cfg.lora_rank:
                save_lora(accelerator.unwrap_model(policy), tmp)
            else:
                accelerator.unwrap_model(policy).save_pretrained(tmp)
        with atomic_path(out_dir / HISTORY) as tmp:
            tmp.write_text(json.dumps(history, indent=1))
    accelerator.wait_for_everyone()
    first, last = (history[0], history[-1]) if history else ({}, {})
    return {
        "steps": cfg.max_steps, "resumed_from_step": start_step, "cached_pairs": len(cache),
        "pairs_seen": cfg.max_steps * cfg.grad_accum * cfg.batch_size * accelerator.num_processes,
        "num_processes": accelerator.num_processes,
        "first_loss": first.get("loss"), "final_loss": last.get("loss"),
        "final_implicit_accuracy": last.get("implicit_accuracy"),
        "mean_step_seconds": float(np.mean([h["step_seconds"] for h in history]))
        if history else None,
        "method": cfg.method, "labels": cfg.labels, "trajectory": cfg.trajectory,
        "weights": weights, "trainable_parameters": trainable,
        "weights_path": str(out_dir / weights),
    }


def _launch(run: StageRun, base: str, progress: Progress) -> dict[str, Any]:
    """Run `fit` under `accelerate launch`, its output streamed into the stage log."""
    def on_line(line: str) -> None:
        if step := STEP_LINE.match(line):
            progress.update(int(step[1]) - progress.done)

    cfg = run.settings.train
    return launch(run, "stages.train", cfg.num_processes, {
        "settings": run.settings.model_dump(mode="json"), "base": base,
        "invert": str(run.input_dir("invert")), "score": str(run.input_dir("score")),
        "out_dir": str(run.out_dir)}, on_line,
        cuda=resolve_device(run.settings.model.device).type == "cuda",
        mixed_precision=cfg.mixed_precision)


def _process(spec: dict[str, Any]) -> dict[str, Any]:
    """One train-stage process under `accelerate launch`."""
    settings = settings_model().model_validate(spec["settings"])

    def report(step: int, metrics: dict[str, float]) -> None:
        say("step %d/%d: %s", step, settings.train.max_steps,
            " ".join(f"{k} {v:.5g}" for k, v in metrics.items()))

    return fit(settings, spec["base"], Path(spec["invert"]), Path(spec["score"]),
               Path(spec["out_dir"]), report, say)


def main(argv: list[str] | None = None) -> None:
    """Entry point of each process `accelerate launch` starts for the train stage."""
    process_main(argv, "One train-stage process under `accelerate launch`; started by the "
                 "train stage.", _process)


if __name__ == "__main__":
    main()
