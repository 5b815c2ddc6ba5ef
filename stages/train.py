"""train: SmPO fine-tuning of the UNet from the cached trajectories and the soft labels."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler, UNet2DConditionModel
from prefect import task
from prefect.cache_policies import NO_CACHE

from smpo_core.inversion import inversion_levels
from smpo_core.models import add_lora, resolve_device, resolve_dtype, save_lora
from smpo_core.report import training_curves
from smpo_core.scoring import preference_targets
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
from stages.common import RunContext, StageResult, StageRun, run_stage
from stages.score import LABELS

VERSION = "1"
STATE = "train_state.pt"


def compute(run: StageRun) -> dict[str, Any]:
    cfg, model_cfg = run.settings.train, run.settings.model
    device = resolve_device(model_cfg.device)
    base = run.ctx.resolve(model_cfg.base)
    cache = TrajectoryCache(run.input_dir("invert"))
    levels = inversion_levels(run.settings.invert.num_levels)
    cache.check_compatible({"base_model": model_cfg.base, "resolution": model_cfg.resolution,
                            "levels": levels})
    weight, winner = preference_targets(run.input_dir("score") / LABELS, cache.pair_ids,
                                        cfg.labels)
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

    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision if device.type == "cuda" else "no",
        gradient_accumulation_steps=cfg.grad_accum, cpu=device.type == "cpu",
    )
    optimizer = make_optimizer(cfg.optimizer, [p for p in policy.parameters() if p.requires_grad],
                               cfg.learning_rate, cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(cfg.warmup_steps))
    policy, optimizer, schedule = accelerator.prepare(policy, optimizer, schedule)

    state_file = run.out_dir / STATE
    start_step, history = load_train_state(state_file, accelerator.unwrap_model(policy),
                                           optimizer, schedule)
    if start_step:
        run.log("resuming from step %d", start_step)

    data = CachedPairs(cache, weight, winner, cfg.batch_size, cfg.seed, cfg.empty_caption_prob,
                       load_levels=cfg.trajectory == "inversion"
                       and cfg.trajectory_source == "cache", device=device)
    step_cfg = StepConfig(cfg.method, cfg.trajectory, cfg.trajectory_source,
                          cfg.timestep_sampling, cfg.beta, levels,
                          run.settings.invert.renoise_steps, run.settings.invert.average)
    loop = LoopConfig(cfg.max_steps, cfg.grad_accum, cfg.max_grad_norm, cfg.checkpoint_every,
                      cfg.log_every)
    progress = run.progress(total=cfg.max_steps, unit="steps")
    progress.update(start_step)

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        history.append({"step": step, **metrics})
        run.tracker.metrics({f"train.{k}": v for k, v in metrics.items()}, step=step)
        progress.update(step - progress.done)

    def on_checkpoint(step: int) -> None:
        save_train_state(state_file, accelerator.unwrap_model(policy), optimizer, schedule,
                         step, history)

    train_loop(policy, reference, data, alphas_cumprod, step_cfg, loop, optimizer, schedule,
               accelerator, start_step, on_metrics, on_checkpoint)
    progress.close()
    weights = "lora" if cfg.lora_rank else "unet"
    with atomic_dir(run.out_dir / weights) as tmp:
        if cfg.lora_rank:
            save_lora(accelerator.unwrap_model(policy), tmp)
        else:
            accelerator.unwrap_model(policy).save_pretrained(tmp)
    _write_history(run, history)
    first, last = (history[0], history[-1]) if history else ({}, {})
    return {
        "steps": cfg.max_steps, "resumed_from_step": start_step, "cached_pairs": len(cache),
        "pairs_seen": cfg.max_steps * cfg.grad_accum * cfg.batch_size,
        "first_loss": first.get("loss"), "final_loss": last.get("loss"),
        "final_implicit_accuracy": last.get("implicit_accuracy"),
        "mean_step_seconds": float(np.mean([h["step_seconds"] for h in history]))
        if history else None,
        "method": cfg.method, "labels": cfg.labels, "trajectory": cfg.trajectory,
        "weights": weights, "trainable_parameters": trainable,
        "weights_path": str(run.out_dir / weights),
    }


def _write_history(run: StageRun, history: list[dict[str, float]]) -> None:
    with atomic_path(run.out_dir / "history.json") as tmp:
        tmp.write_text(json.dumps(history, indent=1))
    if history:
        keys = [k for k in history[0] if k != "step"]
        run.artifacts.append(training_curves(run.out_dir / "training.png",
                                             {k: [h.get(k, np.nan) for h in history]
                                              for k in keys}))
    run.artifacts.append(run.out_dir / "history.json")


@task(name="train", cache_policy=NO_CACHE)
def train_stage(ctx: RunContext, invert: StageResult, score: StageResult,
                force: bool = False) -> StageResult:
    return run_stage(ctx, "train", VERSION, {"invert": invert, "score": score}, compute, force)
