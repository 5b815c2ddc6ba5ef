"""SmPO fine-tuning (METHOD.md §4): a batch of pairs in, a loss out; the loop around it.

The step reads top to bottom: pick a timestep per pair, place both images at that timestep on
their trajectory (ReNoise inversion or forward noise), compare the policy's and the frozen
reference's noise errors, weight the difference by the preference, back-propagate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from smpo_core.errors import SmpoError
from smpo_core.inversion import forward_noise, implied_noise, renoise_invert
from smpo_core.losses import per_image_mse, preference_loss, sft_loss
from smpo_core.models import unet_condition
from smpo_core.store import atomic_path


@dataclass
class PairBatch:
    """B preference pairs, both images of a pair sharing caption and timestep."""

    z0: torch.Tensor  # (B, 2, C, H, W) clean latents
    z: torch.Tensor | None  # (B, 2, K, C, H, W) inverted latents at the K levels, or None
    text: torch.Tensor  # (B, L, D) caption embeddings
    weight: torch.Tensor  # (B,) preference weight w: smoothed, or ±1 (human labels)
    winner: torch.Tensor  # (B,) index (0 or 1) of the human winner, for SFT
    pooled: torch.Tensor | None = None  # (B, P) SDXL pooled text embedding
    time_ids: torch.Tensor | None = None  # (B, 2, 6) SDXL size/crop ids of each image

    def condition(self, unet: UNet2DConditionModel) -> dict:
        """UNet keyword arguments for both images of every pair (pair-major, like z_t)."""
        return unet_condition(
            unet, self.text.repeat_interleave(2, dim=0),
            None if self.pooled is None else self.pooled.repeat_interleave(2, dim=0),
            None if self.time_ids is None else self.time_ids.reshape(-1, 6))


@dataclass
class StepConfig:
    """What the loss step needs to know about the method (the train settings' switches)."""

    method: str  # "preference" | "sft"
    trajectory: str  # "inversion" | "forward"
    trajectory_source: str  # "cache" | "online"
    timestep_sampling: str  # "level" | "uniform"
    beta: float
    levels: list[int]
    renoise_steps: int = 1
    average: str = "mean"


def sample_timesteps(
    levels: list[int], batch: int, mode: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A level index k per pair and its timestep t.

    `level`: t = levels[k]. `uniform`: t uniform in (levels[k-1], levels[k]] (levels[-1] := -1),
    the interval below the level, as the authors' code samples it.
    """
    k = torch.randint(len(levels), (batch,), generator=generator)
    top = torch.tensor(levels)[k]
    if mode == "level":
        return k, top
    bottom = torch.tensor([-1, *levels[:-1]])[k]
    offset = (torch.rand(batch, generator=generator) * (top - bottom)).floor().long()
    return k, top - offset


def place_on_trajectory(
    batch: PairBatch, k: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
    trajectory: str, levels: list[int], generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t and the noise target for both images: (B, 2, C, H, W) each.

    inversion: tau is the noise implied by the inverted latent at level k; for a t below the
    level the latent is moved along that same DDIM path, z_t = sqrt(abar_t) z0 + sqrt(1-abar_t)
    tau, so the target stays exact. forward: Diffusion-DPO's q(x_t | x_0), one noise draw
    shared by the two images of a pair.
    """
    abar_t = alphas_cumprod[t].view(-1, 1, 1, 1, 1).to(batch.z0.device)
    if trajectory == "forward":
        noise = torch.randn(batch.z0[:, :1].shape, generator=generator).to(batch.z0)
        noise = noise.expand_as(batch.z0)
        return forward_noise(batch.z0, noise, abar_t), noise
    rows = torch.arange(len(k))
    z_level = batch.z[rows, :, k]  # (B, 2, C, H, W)
    abar_level = alphas_cumprod[torch.tensor(levels)[k]].view(-1, 1, 1, 1, 1).to(z_level.device)
    tau = implied_noise(z_level.float(), batch.z0.float(), abar_level)
    return forward_noise(batch.z0.float(), tau, abar_t), tau


def bare(unet: torch.nn.Module) -> UNet2DConditionModel:
    """The UNet inside a DDP wrapper, for its `dtype` and config; a training forward pass
    goes through the wrapper, which synchronises the gradients."""
    if isinstance(unet, torch.nn.parallel.DistributedDataParallel):
        return unet.module
    return unet


def predict_pairs(unet: UNet2DConditionModel, z_t: torch.Tensor, t: torch.Tensor,
                  batch: PairBatch) -> torch.Tensor:
    """The UNet's noise prediction for both images of every pair, (B, 2, C, H, W)."""
    b = z_t.shape[0]
    flat = z_t.reshape(2 * b, *z_t.shape[2:]).to(bare(unet).dtype)
    pred = unet(flat, t.repeat_interleave(2).to(z_t.device),
                **batch.condition(bare(unet))).sample
    return pred.reshape(z_t.shape)


def pair_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, 2) per-image MSE."""
    b = pred.shape[0]
    flat = per_image_mse(pred.reshape(2 * b, *pred.shape[2:]),
                         target.reshape(2 * b, *target.shape[2:]))
    return flat.view(b, 2)


def online_trajectory(policy: UNet2DConditionModel, batch: PairBatch,
                      alphas_cumprod: torch.Tensor, cfg: StepConfig) -> torch.Tensor:
    """Invert the batch with the policy being trained, as the authors' code does: (B,2,K,...)."""
    b = batch.z0.shape[0]
    z0 = batch.z0.reshape(2 * b, *batch.z0.shape[2:])
    policy = bare(policy)  # no gradients here: nothing for DDP to synchronise
    condition = batch.condition(policy)

    def eps(z: torch.Tensor, t: int) -> torch.Tensor:
        steps = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
        return policy(z.to(policy.dtype), steps, **condition).sample

    with torch.no_grad():
        z = renoise_invert(eps, z0, cfg.levels, alphas_cumprod, cfg.renoise_steps, cfg.average)
    return z.movedim(0, 1).reshape(b, 2, len(cfg.levels), *z0.shape[1:])


def smpo_loss(
    policy: UNet2DConditionModel,
    reference: UNet2DConditionModel | None,
    batch: PairBatch,
    alphas_cumprod: torch.Tensor,
    cfg: StepConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch: the preference (or SFT) loss and its metrics."""
    if cfg.trajectory == "inversion" and cfg.trajectory_source == "online":
        batch.z = online_trajectory(policy, batch, alphas_cumprod, cfg)
    k, t = sample_timesteps(cfg.levels, batch.z0.shape[0], cfg.timestep_sampling, generator)
    z_t, target = place_on_trajectory(batch, k, t, alphas_cumprod, cfg.trajectory, cfg.levels,
                                      generator)
    if cfg.method == "sft":
        rows = torch.arange(len(batch.winner))
        winner_t, winner_target = z_t[rows, batch.winner], target[rows, batch.winner]
        pred = predict_pairs(policy, winner_t[:, None].expand_as(z_t), t, batch)[:, 0]
        return sft_loss(per_image_mse(pred, winner_target))
    model_err = pair_errors(predict_pairs(policy, z_t, t, batch), target)
    with torch.no_grad():
        ref_err = pair_errors(predict_pairs(reference, z_t, t, batch), target)
    return preference_loss(model_err, ref_err, batch.weight.to(model_err.device), cfg.beta)


@dataclass
class LoopConfig:
    max_steps: int
    grad_accum: int
    max_grad_norm: float
    checkpoint_every: int
    log_every: int


def train_loop(
    policy: UNet2DConditionModel,
    reference: UNet2DConditionModel | None,
    next_batch: Callable[[int], tuple[PairBatch, torch.Generator]],
    alphas_cumprod: torch.Tensor,
    step_cfg: StepConfig,
    loop: LoopConfig,
    optimizer: torch.optim.Optimizer,
    lr_schedule: torch.optim.lr_scheduler.LRScheduler,
    accelerator,
    start_step: int = 0,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Optimiser steps `start_step`..`max_steps`; `next_batch(micro_index)` is deterministic in
    its index, so a resumed run sees the batches an uninterrupted one would have.

    Under DDP (W processes), process r takes micro-batch index i * W + r at its i-th
    micro-step: the W processes together see the same micro-batches, with the same seeds, as
    one process with W times `grad_accum`, and metrics are averaged over the processes.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    last: dict[str, float] = {}
    for step in range(start_step, loop.max_steps):
        started = time.perf_counter()
        totals: dict[str, float] = {}
        for micro in range(loop.grad_accum):
            batch, generator = next_batch((step * loop.grad_accum + micro) * world + rank)
            with accelerator.accumulate(policy), accelerator.autocast():
                loss, metrics = smpo_loss(policy, reference, batch, alphas_cumprod, step_cfg,
                                          generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    metrics["grad_norm"] = float(accelerator.clip_grad_norm_(
                        policy.parameters(), loop.max_grad_norm))
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value / loop.grad_accum
        totals["grad_norm"] = totals.get("grad_norm", 0.0) * loop.grad_accum
        totals["lr"] = lr_schedule.get_last_lr()[0]
        totals["step_seconds"] = time.perf_counter() - started
        if world > 1:
            totals = _mean_over_processes(totals, accelerator)
        if not all(math.isfinite(v) for v in totals.values()):
            raise SmpoError(
                f"train: the loss diverged at step {step + 1} (non-finite metrics "
                f"{ {k: v for k, v in totals.items() if not math.isfinite(v)} }); lower "
                f"train.learning_rate or train.beta")
        last = totals
        if on_metrics and ((step + 1) % loop.log_every == 0 or step + 1 == loop.max_steps):
            on_metrics(step + 1, totals)
        if on_checkpoint and (step + 1) % loop.checkpoint_every == 0:
            on_checkpoint(step + 1)
    return last


def _mean_over_processes(metrics: dict[str, float], accelerator) -> dict[str, float]:
    """The same metrics on every process, so every process takes the same decisions."""
    names = list(metrics)
    values = torch.tensor([metrics[name] for name in names], dtype=torch.float64,
                          device=accelerator.device)
    return dict(zip(names, accelerator.reduce(values, "mean").tolist(), strict=True))


def warmup_constant(warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the full learning rate, then constant (the paper's schedule)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class CachedPairs:
    """Micro-batches from the trajectory cache, a pure function of their index.

    Pairs are visited in a fresh seeded permutation each epoch; caption dropout and the
    timestep / noise generator are seeded by (seed, index) too, so training resumes exactly.
    """

    def __init__(self, cache, weight: torch.Tensor, winner: torch.Tensor, batch_size: int,
                 seed: int, empty_caption_prob: float, load_levels: bool,
                 device: torch.device):
        self.cache, self.weight, self.winner = cache, weight, winner
        self.batch_size, self.seed = batch_size, seed
        self.empty_caption_prob, self.load_levels = empty_caption_prob, load_levels
        self.device = device
        self._perms: dict[int, torch.Tensor] = {}

    def positions(self, index: int) -> list[int]:
        n = len(self.cache)
        first = index * self.batch_size
        out = []
        for i in range(first, first + self.batch_size):
            epoch, offset = divmod(i, n)
            if epoch not in self._perms:
                self._perms = {epoch: torch.randperm(
                    n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))}
            out.append(int(self._perms[epoch][offset]))
        return out

    def __call__(self, index: int) -> tuple[PairBatch, torch.Generator]:
        positions = self.positions(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * index + 1)
        names = ["z0", "text", "pooled", "time_ids"] + (["z"] if self.load_levels else [])
        rows = {k: v.float() for k, v in self.cache.get(positions, names).items()}
        drop = torch.rand(len(positions), generator=generator) < self.empty_caption_prob
        rows["text"][drop] = self.cache.empty_text.float()
        if "pooled" in rows:
            rows["pooled"][drop] = self.cache.empty_pooled.float()
        rows = {k: v.to(self.device) for k, v in rows.items()}
        batch = PairBatch(
            z0=rows["z0"], z=rows.get("z"), text=rows["text"],
            weight=self.weight[positions].to(self.device),
            winner=self.winner[positions].to(self.device),
            pooled=rows.get("pooled"), time_ids=rows.get("time_ids"),
        )
        return batch, generator


def save_train_state(path: Path, policy: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     schedule, step: int, history: list[dict[str, float]]) -> None:
    """Everything a resumed run needs to continue as if never stopped; written atomically."""
    with atomic_path(path) as tmp:
        torch.save({"policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "step": step, "history": history}, tmp)


def load_train_state(path: Path, policy: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     schedule) -> tuple[int, list[dict[str, float]]]:
    """Restore a saved state in place; returns (step, history). (0, []) if there is none."""
    if not Path(path).is_file():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=False)
    policy.load_state_dict(state["policy"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return state["step"], state["history"]
