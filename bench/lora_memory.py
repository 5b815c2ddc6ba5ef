"""Peak memory of SmPO training, whole UNet against LoRA (one UNet, reference = adapters off).

    .venv/bin/python bench/lora_memory.py [--steps 3] [--batch 2] [--device auto]

For each UNet shape (`tiny`: the tiny profile's; `medium`: ~20M parameters at 32x32 latents)
and each mode, a fresh process builds a random UNet and runs optimiser steps of the SmPO loss
through smpo_core's own step (`smpo_loss`, AdamW): `full` trains every weight against a second,
frozen UNet (the reference); `lora` trains rank-`--rank` adapters and takes the reference from
the same UNet with its adapters disabled (`AdaptersDisabled`). Reported side by side: the
process's peak resident memory above what it held before building the models (CPU), or peak
allocated GPU memory (CUDA), and the ratio full / LoRA. Exits 1 when LoRA does not use less
memory than full training on the largest shape measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

SHAPES = {
    "tiny": dict(sample_size=16, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=8),
    "medium": dict(sample_size=32, layers_per_block=2, block_out_channels=(64, 128, 256),
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=256, attention_head_dim=8),
}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(shape: str, mode: str, steps: int, batch: int, rank: int, device_name: str
            ) -> dict:
    """One configuration, in this process: peak memory of `steps` training steps."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from smpo_core.inversion import inversion_levels
    from smpo_core.models import AdaptersDisabled, add_lora, resolve_device
    from smpo_core.training import PairBatch, StepConfig, TrainingPlan, smpo_loss

    device = resolve_device(device_name)
    torch.manual_seed(0)
    config = SHAPES[shape]
    before = peak_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    policy = UNet2DConditionModel(**config).to(device)
    parameters = sum(p.numel() for p in policy.parameters())
    if mode == "lora":
        add_lora(policy, rank)
        reference = AdaptersDisabled(policy)
    else:
        reference = UNet2DConditionModel(**config).to(device).requires_grad_(False).eval()
        reference.load_state_dict(policy.state_dict())
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    levels = inversion_levels(5)
    alphas = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear").alphas_cumprod.float()
    side, width = config["sample_size"], config["cross_attention_dim"]
    generator = torch.Generator().manual_seed(1)
    z0 = torch.randn(batch, 2, 4, side, side, generator=generator)
    z = torch.randn(batch, 2, len(levels), 4, side, side, generator=generator)
    text = torch.randn(batch, 77, width, generator=generator)
    weight = torch.linspace(-3, 3, batch)
    pairs = PairBatch(z0.to(device), z.to(device), text.to(device), weight.to(device),
                      (weight < 0).long().to(device))
    plan = TrainingPlan(batch, batch, 0, tuple(levels), len(alphas))
    cfg = StepConfig("preference", "inversion", "cache", 2000.0, levels)
    for step in range(steps):
        loss, _ = smpo_loss(policy, reference, pairs, plan.step(step), alphas, cfg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else peak_rss_bytes() - before)
    return {"shape": shape, "mode": mode, "parameters": parameters,
            "trainable": sum(p.numel() for p in trainable), "peak_bytes": peak,
            "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--one", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: one configuration, its result as JSON
        print(json.dumps(measure(*args.one, args.steps, args.batch, args.rank, args.device)))
        return
    root = Path(__file__).resolve().parents[1]
    results = {}
    for shape in args.shapes:
        for mode in ("full", "lora"):
            # A fresh process each: peak memory never goes down within one.
            done = subprocess.run(
                [sys.executable, __file__, "--one", shape, mode, "--steps", str(args.steps),
                 "--batch", str(args.batch), "--rank", str(args.rank), "--device",
                 args.device], capture_output=True, text=True, check=True, cwd=root,
                env=os.environ | {"PYTHONPATH": str(root)})
            results[shape, mode] = json.loads(done.stdout.strip().splitlines()[-1])
    device = next(iter(results.values()))["device"]
    print(f"device {device}, {args.batch} pairs/step, {args.steps} steps, LoRA rank "
          f"{args.rank}; peak {'allocated GPU' if 'cuda' in device else 'RSS above start'}")
    print(f"{'shape':<8} {'parameters':>11} {'full MiB':>9} {'LoRA MiB':>9} {'full/LoRA':>10}")
    for shape in args.shapes:
        full, lora = results[shape, "full"], results[shape, "lora"]
        print(f"{shape:<8} {full['parameters']:>11,} {full['peak_bytes'] / 2**20:>9.1f} "
              f"{lora['peak_bytes'] / 2**20:>9.1f} "
              f"{full['peak_bytes'] / lora['peak_bytes']:>9.2f}x")
    largest = args.shapes[-1]
    if results[largest, "lora"]["peak_bytes"] >= results[largest, "full"]["peak_bytes"]:
        sys.exit(f"LoRA training used no less memory than full training ({largest})")


if __name__ == "__main__":
    main()
