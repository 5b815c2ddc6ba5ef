"""What the trajectory cache buys: pairs/s of SmPO train steps, cached vs online inversion.

    .venv/bin/python bench/cache_vs_online.py                       # tiny model, K = 5, CPU
    .venv/bin/python bench/cache_vs_online.py --size medium --levels 10 --steps 4

Both sides train the same policy from the same draws: per pair a timestep t uniform over the
schedule and the inversion level k at or above it (METHOD.md §4), stratified over the timed
steps so that every level is drawn equally often (a handful of steps would otherwise make the
online cost a lottery).

- cached: the pair's latent at level k is read from a trajectory computed beforehand with the
  frozen base (the invert stage); the step is policy forward + backward and a reference
  forward per image.
- online (the baseline, the authors' way): the same step, after VAE-encoding the pairs'
  images and encoding their captions (`bench/run.py`; their training script does so every
  step) and inverting each pair with the policy, without gradients, from z_0 up to level k
  only (`renoise_invert_to`): (k + 1) (1 + R) UNet forwards per image, (K + 1) (1 + R) / 2 on
  average.
- online-all-K (reported, not a baseline): inverting all K levels every step, what this bench
  compared against before; it flatters the cache by about 2x in inversion work.
- cached-ref (`bench/run.py`): the cached step reading the reference's errors too, computed
  beforehand with the frozen base (train.reference_errors=cached): no reference forward.

Steps of the variants alternate (cached, online, online-all-K, cached, ...), so a noisy shared
machine slows them alike; the figures are medians and the ratios are of medians.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from smpo_core.inversion import forward_noise, implied_noise, inversion_levels, renoise_invert_to
from smpo_core.losses import preference_loss
from smpo_core.models import DiffusionModel, condition_rows, load_diffusion, resolve_device
from smpo_core.training import PairBatch, bare, pair_errors, predict_pairs
from smpo_core.trajectories import encode_pair_batch, invert_pair_batch
from smpo_core.worlds.tiny import MEDIUM_UNET, TINY_UNET, build_tiny_diffusion, trainable_pairs

SIZES = {"tiny": (TINY_UNET, 32), "medium": (MEDIUM_UNET, 64)}  # UNet, image px (latent = px/2)
BETA = 2000.0


def build_model(size: str, folder: Path, device: torch.device) -> tuple[DiffusionModel, int]:
    """A random SD1.5-shaped model of that size saved in diffusers format and loaded back the
    way the stages load one; returns it and its image resolution."""
    unet, resolution = SIZES[size]
    path = build_tiny_diffusion(folder / f"sd-{size}", resolution=resolution, unet=unet)
    return load_diffusion(str(path), device, torch.float32), resolution


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes (GPU work included)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def interleaved(variants: dict[str, Callable[[int], object]], rounds: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each variant, round-robin; call `i` of each gets index i. An
    untimed warm-up call first (kernels, allocators, lazy imports): of every variant on a GPU
    (each shape tunes its own kernels), of the first one on the CPU."""
    for fn in variants.values() if device.type == "cuda" else list(variants.values())[:1]:
        fn(0)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(rounds):
        for name, fn in variants.items():
            times[name].append(timed(lambda fn=fn, i=i: fn(i + 1), device))
    return times


def stratified_draws(levels: list[int], num_train_timesteps: int, count: int,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` timesteps t, uniform over the schedule and stratified (one per equal slice of
    it, shuffled), and the inversion level index k at or above each."""
    generator = torch.Generator().manual_seed(seed)
    edges = torch.arange(count) * num_train_timesteps / count
    t = (edges + torch.rand(count, generator=generator) * num_train_timesteps / count).long()
    t = t.clamp(max=num_train_timesteps - 1)[torch.randperm(count, generator=generator)]
    return t, torch.searchsorted(torch.tensor(levels), t)


def level_latents_online(policy, batch: PairBatch, k: torch.Tensor, alphas: torch.Tensor,
                         levels: list[int], renoise_steps: int, all_levels: bool = False
                         ) -> torch.Tensor:
    """Each pair's latents at its level k, inverted now with the policy: (B, 2, C, H, W).
    The authors' code inverts only up to k; `all_levels` inverts all K (the old baseline)."""
    unet = bare(policy)
    b = batch.z0.shape[0]
    z0 = batch.z0.reshape(2 * b, *batch.z0.shape[2:])
    condition = batch.condition(unet)
    top = torch.full_like(k, len(levels) - 1) if all_levels else k

    def eps(z: torch.Tensor, t: int, rows: torch.Tensor) -> torch.Tensor:
        steps = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
        return unet(z.to(unet.dtype), steps, **condition_rows(condition, rows)).sample

    with torch.no_grad():
        z = renoise_invert_to(eps, z0, levels, top.repeat_interleave(2), alphas, renoise_steps)
    z = z.movedim(0, 1).reshape(b, 2, len(levels), *z0.shape[1:])
    return z[torch.arange(b), :, k]


def placed(batch: PairBatch, z_level: torch.Tensor, k: torch.Tensor, t: torch.Tensor,
           alphas: torch.Tensor, levels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t and its target tau: the pairs' latents at their levels moved to t along the
    level's DDIM path (METHOD.md §4)."""
    device = batch.z0.device
    abar_level = alphas[torch.tensor(levels)[k]].view(-1, 1, 1, 1, 1).to(device)
    abar_t = alphas[t].view(-1, 1, 1, 1, 1).to(device)
    tau = implied_noise(z_level.float(), batch.z0.float(), abar_level)
    return forward_noise(batch.z0.float(), tau, abar_t), tau


def reference_errors(reference, batch: PairBatch, z_level: torch.Tensor, k: torch.Tensor,
                     t: torch.Tensor, alphas: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """(B, 2) the reference's errors at these draws: what a train step computes, and what
    the invert stage stores with train.reference_errors=cached."""
    z_t, tau = placed(batch, z_level, k, t, alphas, levels)
    with torch.no_grad():
        return pair_errors(predict_pairs(reference, z_t, t, batch), tau)


def train_step(policy, reference, optimizer, batch: PairBatch, z_level: torch.Tensor,
               k: torch.Tensor, t: torch.Tensor, alphas: torch.Tensor, levels: list[int],
               ref_err: torch.Tensor | None = None) -> float:
    """One SmPO optimiser step from the pairs' latents at their levels (METHOD.md §4): move
    them to t along the level's DDIM path, compare policy and reference errors (`ref_err`
    when computed beforehand, else the reference's now)."""
    z_t, tau = placed(batch, z_level, k, t, alphas, levels)
    model_err = pair_errors(predict_pairs(policy, z_t, t, batch), tau)
    if ref_err is None:
        with torch.no_grad():
            ref_err = pair_errors(predict_pairs(reference, z_t, t, batch), tau)
    loss, _ = preference_loss(model_err, ref_err, batch.weight, BETA)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def step_variants(model: DiffusionModel, cache: PairBatch, levels: list[int], micro_batch: int,
                  k: torch.Tensor, t: torch.Tensor, sources: list[str], renoise_steps: int = 1,
                  rows: list[dict] | None = None, resolution: int = 0
                  ) -> dict[str, Callable[[int], float]]:
    """One train-step function per source ("cached", "cached-ref", "online", "online-all-K"),
    each with its own copy of the policy; call i trains on the draws (k, t) i*B..i*B+B-1 and
    pairs i*B..i*B+B-1 (mod the cache's). `cache` holds the full trajectory of the pairs
    (B, 2, K, ...). With `rows` (the pairs' images and captions), an online step first
    VAE-encodes its pairs' images and encodes their captions, as the authors' training does
    every step; the cached step reads both from the cache; "cached-ref" also reads the
    reference's errors at its draws, computed here beforehand with the frozen base (the
    invert stage's work: `reference_errors`), and runs no reference forward."""
    alphas = model.alphas_cumprod
    n = cache.z0.shape[0]
    reference = model.unet.requires_grad_(False).eval()

    def batch_of(slots: torch.Tensor) -> PairBatch:
        pairs = slots % n
        return PairBatch(cache.z0[pairs], None, cache.text[pairs], cache.weight[pairs],
                         cache.winner[pairs])

    stored: dict[int, torch.Tensor] = {}
    if "cached-ref" in sources:
        for i in range(len(k) // micro_batch):
            slots = torch.arange(i * micro_batch, (i + 1) * micro_batch)
            stored[i] = reference_errors(reference, batch_of(slots),
                                         cache.z[slots % n, :, k[slots]], k[slots], t[slots],
                                         alphas, levels)

    def variant(source: str) -> Callable[[int], float]:
        policy = copy.deepcopy(reference).train().requires_grad_(True)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)

        def step(i: int) -> float:
            slots = torch.arange(i * micro_batch, (i + 1) * micro_batch)
            pairs = slots % n
            batch = batch_of(slots)
            ks, ts = k[slots], t[slots]
            if source.startswith("cached"):
                z_level = cache.z[pairs, :, ks]
            else:
                if rows is not None:
                    with torch.no_grad():
                        encoded = encode_pair_batch(model, [rows[p] for p in pairs.tolist()],
                                                    resolution)
                    batch.z0, batch.text = encoded.z0, encoded.text
                z_level = level_latents_online(policy, batch, ks, alphas, levels, renoise_steps,
                                               all_levels=source == "online-all-K")
            return train_step(policy, reference, optimizer, batch, z_level, ks, ts, alphas,
                              levels, stored.get(i) if source == "cached-ref" else None)
        return step
    return {source: variant(source) for source in sources}


def measure_train_steps(model: DiffusionModel, cache: PairBatch, levels: list[int],
                        micro_batch: int, steps: int, renoise_steps: int = 1,
                        with_all_levels: bool = True, rows: list[dict] | None = None,
                        resolution: int = 0) -> dict:
    """Seconds per step and pairs/s of cached, online (to level k) and online-all-K training
    (`step_variants`), over the same draws, alternating step by step."""
    t, k = stratified_draws(levels, len(model.alphas_cumprod), (steps + 1) * micro_batch)
    sources = ["cached", "online"] + (["online-all-K"] if with_all_levels else [])
    variants = step_variants(model, cache, levels, micro_batch, k, t, sources, renoise_steps,
                             rows, resolution)
    times = interleaved(variants, steps, model.device)
    out: dict = {"micro_batch": micro_batch, "timed_steps": steps, "levels": len(levels),
                 "renoise_steps": renoise_steps,
                 "mean_levels_inverted_online": float((k[micro_batch:] + 1).float().mean())}
    for source, seconds in times.items():
        median = statistics.median(seconds)
        out[source] = {"seconds_per_step": median, "pairs_per_second": micro_batch / median}
    cached = out["cached"]["seconds_per_step"]
    out["online_over_cached"] = out["online"]["seconds_per_step"] / cached
    if with_all_levels:
        out["online_all_K_over_cached"] = out["online-all-K"]["seconds_per_step"] / cached
    return out


def invert_cache(model: DiffusionModel, rows: list[dict], levels: list[int], resolution: int,
                 renoise_steps: int = 1) -> PairBatch:
    """The full trajectories of `rows` as the invert stage computes them, as one PairBatch."""
    inverted = invert_pair_batch(model, rows, levels, resolution, renoise_steps, "mean")
    weight = torch.linspace(-3, 3, len(rows))
    return PairBatch(inverted.z0, inverted.z, inverted.text, weight, (weight < 0).long())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--levels", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model, resolution = build_model(args.size, Path(tmp), device)
        levels = inversion_levels(args.levels, len(model.alphas_cumprod))
        rows = trainable_pairs(Path(tmp) / "data", 4 * args.batch, seed=1)
        cache = invert_cache(model, rows, levels, resolution)
        result = measure_train_steps(model, cache, levels, args.batch, args.steps)
    print(f"{args.size} model, K={args.levels}, {args.batch} pairs/step, {args.steps} steps, "
          f"online inverts {result['mean_levels_inverted_online']:.1f} levels/pair on average")
    for source in ("cached", "online", "online-all-K"):
        print(f"{source:>13}: {result[source]['seconds_per_step']:.3f} s/step, "
              f"{result[source]['pairs_per_second']:.2f} pairs/s")
    print(f"online / cached {result['online_over_cached']:.2f}x "
          f"(online-all-K / cached {result['online_all_K_over_cached']:.2f}x)")


if __name__ == "__main__":
    main()
