"""What the trajectory cache buys: seconds per SmPO step, cached vs online inversion.

    .venv/bin/python bench/cache_vs_online.py [--steps 10] [--batch 4] [--levels 5] [--device auto]
    .venv/bin/python bench/cache_vs_online.py --shape sd15 --device cuda --batch 8

Builds the tiny diffusion model (or loads `--model`, any diffusers folder), inverts a batch of
synthetic pairs once, then times optimiser steps that read the cached trajectory against steps
that re-invert with the policy inside the step (the authors' code). METHOD.md §6 predicts the
online step costs ~2 UNet forwards per level more per image.

`--shape sd15` needs no download: a randomly initialised UNet of SD1.5's size (860M
parameters, 4x64x64 latents, 77x768 text states) with random latents, policy in fp32 under
bf16 autocast and the reference in bf16 on a GPU; it also reports peak GPU memory.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from smpo_core.inversion import inversion_levels
from smpo_core.models import load_diffusion, resolve_device
from smpo_core.training import (
    PairBatch,
    StepConfig,
    TrainingPlan,
    online_trajectory,
    smpo_loss,
)
from smpo_core.trajectories import invert_pair_batch
from smpo_core.worlds.tiny import build_tiny_diffusion, trainable_pairs


def time_steps(policy, reference, batch, alphas, cfg, steps, device) -> list[float]:
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    pairs = batch.z0.shape[0]
    plan = TrainingPlan(pairs, pairs, 0, tuple(cfg.levels), len(alphas), "level")
    times = []
    for step in range(steps + 1):  # the first step warms up kernels and allocators
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss, _ = smpo_loss(policy, reference, batch, plan.step(step), alphas, cfg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="diffusers folder (default: tiny)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--levels", type=int, default=5)
    parser.add_argument("--renoise-steps", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shape", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--latent", type=int, default=64, help="latent side for --shape sd15")
    args = parser.parse_args()

    device = resolve_device(args.device)
    if args.shape == "sd15":
        run_sd15_shape(args, device)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(build_tiny_diffusion(Path(tmp) / "sd"))
        model = load_diffusion(model_dir, device, torch.float32)
        levels = inversion_levels(args.levels, model.scheduler.config.num_train_timesteps)
        rows = trainable_pairs(Path(tmp) / "data", args.batch, seed=1)
        inverted = invert_pair_batch(model, rows, levels, args.resolution,
                                     args.renoise_steps, "mean")
    weight = torch.linspace(-3, 3, len(rows), device=device)
    batch = PairBatch(inverted.z0, inverted.z, inverted.text, weight, (weight < 0).long())
    alphas = model.alphas_cumprod
    reference = model.unet
    results = {}
    for source in ("cache", "online"):
        policy = copy.deepcopy(model.unet).train().requires_grad_(True)
        cfg = StepConfig("preference", "inversion", source, 2000.0, levels,
                         args.renoise_steps, "mean")
        run_batch = batch if source == "cache" else PairBatch(
            batch.z0, None, batch.text, batch.weight, batch.winner)
        results[source] = time_steps(policy, reference, run_batch, alphas, cfg, args.steps,
                                     device)
    report(results, device, args, len(levels))


def run_sd15_shape(args, device: torch.device) -> None:
    """Random SD1.5-sized UNet: the step costs a real SD1.5 run has, without its weights."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    reference = UNet2DConditionModel(sample_size=args.latent, cross_attention_dim=768)
    reference = reference.to(device, half).requires_grad_(False).eval()
    alphas = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear").alphas_cumprod.float()
    levels = inversion_levels(args.levels)
    b, side = args.batch, args.latent
    z0 = torch.randn(b, 2, 4, side, side, device=device)
    text = torch.randn(b, 77, 768, device=device)
    weight = torch.linspace(-3, 3, b, device=device)
    probe = PairBatch(z0, None, text, weight, (weight < 0).long())
    cfg = StepConfig("preference", "inversion", "online", 2000.0, levels,
                     args.renoise_steps, "mean")
    with torch.autocast(device.type, dtype=half, enabled=device.type == "cuda"):
        z = online_trajectory(reference, probe, alphas, cfg)  # the cache's content
    results = {}
    for source in ("cache", "online"):
        policy = copy.deepcopy(reference).float().train().requires_grad_(True)
        batch = PairBatch(z0, z if source == "cache" else None, text, weight, probe.winner)
        step_cfg = StepConfig("preference", "inversion", source, 2000.0, levels,
                              args.renoise_steps, "mean")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast(device.type, dtype=half, enabled=device.type == "cuda"):
            results[source] = time_steps(policy, reference, batch, alphas, step_cfg,
                                         args.steps, device)
        if device.type == "cuda":
            print(f"{source}: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        del policy
    report(results, device, args, len(levels))


def report(results: dict[str, list[float]], device: torch.device, args, levels: int) -> None:
    cached, online = (statistics.median(results[s]) for s in ("cache", "online"))
    print(f"device {device}, shape {args.shape}, {args.batch} pairs/step, K={levels}, "
          f"R={args.renoise_steps}, {args.steps} timed steps")
    print(f"{'trajectory':<10} {'median s/step':>14} {'min':>8} {'max':>8}")
    for source, times in results.items():
        print(f"{source:<10} {statistics.median(times):>14.4f} {min(times):>8.4f} "
              f"{max(times):>8.4f}")
    print(f"online / cached: {online / cached:.2f}x")


if __name__ == "__main__":
    main()
