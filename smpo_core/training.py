"""SmPO fine-tuning (METHOD.md §4): a batch of pairs in, a loss out; the loop around it.

The step reads top to bottom: take each pair's timestep from the plan, place both images at
that timestep on their trajectory (ReNoise inversion or forward noise), compare the policy's
and the frozen reference's errors against the target of the model's prediction type, weight
the difference by the preference, back-propagate. `TrainingPlan` fixes every random draw of a
run; `smpo_core.recipe` builds the models, optimiser and data around this loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from smpo_core.errors import SmpoError
from smpo_core.inversion import (
    forward_noise,
    implied_noise,
    noise_from_prediction,
    prediction_target,
    renoise_invert,
)
from smpo_core.losses import per_image_mse, preference_loss, sft_loss
from smpo_core.models import unet_condition


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
    # (B, 2) the reference's errors r_j at this batch's draws, computed by the invert stage
    # (train.reference_errors=cached); None: the reference UNet computes them in the step.
    ref_err: torch.Tensor | None = None

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
    beta: float
    levels: list[int]
    renoise_steps: int = 1
    average: str = "mean"
    prediction_type: str = "epsilon"  # what the UNet outputs: "epsilon" | "v_prediction"


@dataclass
class StepPlan:
    """The draws of one optimiser step, one entry per pair slot of its effective batch:
    which cached pair, its timestep t and inversion level k, whether its caption is dropped,
    the seed of its forward noise, and the slot's index in the whole run (step x effective
    batch + slot: where its cached reference errors are). Micro-batches are slices of it."""

    positions: torch.Tensor  # (E,) positions in the trajectory cache
    t: torch.Tensor  # (E,) timesteps, shared by both images of a pair
    k: torch.Tensor  # (E,) the inversion level at or above t
    drop_caption: torch.Tensor  # (E,) bool
    noise_seed: torch.Tensor  # (E,) int64
    draw: torch.Tensor  # (E,) int64, the slot's index in the run

    def __len__(self) -> int:
        return len(self.positions)

    def slice(self, index: int, size: int) -> StepPlan:
        """Micro-batch `index` of `size` pairs."""
        part = slice(index * size, (index + 1) * size)
        return StepPlan(*(getattr(self, f.name)[part] for f in dataclasses.fields(self)))


@dataclass(frozen=True)
class TrainingPlan:
    """Every random draw of a training run, a pure function of (seed, step): the same pairs,
    timesteps, caption drops and noise for any micro-batch size or number of processes, and
    for a run resumed mid-way.

    Pairs are visited in a fresh seeded permutation of the cache each epoch. Timesteps
    (METHOD.md §4): `uniform` draws t uniformly over the whole schedule {0, ..., T-1}, one t
    per pair, and takes the inversion level at or above it; `level` draws one of the K
    levels and trains at that level's timestep (the ablation).
    """

    num_pairs: int
    effective_batch: int
    seed: int
    levels: tuple[int, ...]
    num_train_timesteps: int
    timestep_sampling: str = "uniform"
    empty_caption_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.timestep_sampling not in ("uniform", "level"):
            raise ValueError(f"timestep_sampling must be uniform or level, got "
                             f"{self.timestep_sampling!r}")
        if self.levels[-1] != self.num_train_timesteps - 1:
            raise ValueError(f"the top inversion level must be T - 1 = "
                             f"{self.num_train_timesteps - 1} so that every t has a level at "
                             f"or above it; got levels {list(self.levels)}")
        if self.num_pairs < 1:
            raise ValueError("the trajectory cache holds no pairs")

    @classmethod
    def of_run(cls, train: Any, levels: Sequence[int], num_pairs: int,
               num_train_timesteps: int) -> TrainingPlan:
        """The plan of a run with these train settings over a cache of `num_pairs` pairs:
        what training draws, and what the invert stage plans a cache for."""
        return cls(num_pairs, train.effective_batch, train.seed, tuple(levels),
                   num_train_timesteps, train.timestep_sampling, train.empty_caption_prob)

    def _order(self, epoch: int) -> torch.Tensor:
        return _epoch_order(self.num_pairs, self.seed, epoch)

    def timesteps(self, count: int, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` timesteps t and their levels k (the level at or above t)."""
        levels = torch.tensor(self.levels)
        if self.timestep_sampling == "level":
            k = torch.randint(len(levels), (count,), generator=generator)
            return levels[k], k
        t = torch.randint(self.num_train_timesteps, (count,), generator=generator)
        return t, torch.searchsorted(levels, t)

    def step(self, step: int) -> StepPlan:
        """The draws of optimiser step `step` (0-based)."""
        first = step * self.effective_batch
        slots = torch.arange(first, first + self.effective_batch)
        epochs, offsets = slots // self.num_pairs, slots % self.num_pairs
        positions = torch.empty_like(slots)
        for epoch in epochs.unique().tolist():
            chosen = epochs == epoch
            positions[chosen] = self._order(epoch)[offsets[chosen]]
        generator = _generator(self.seed, 1, step)
        t, k = self.timesteps(self.effective_batch, generator)
        drop = torch.rand(self.effective_batch, generator=generator,
                          dtype=torch.float32) < self.empty_caption_prob
        noise_seed = torch.randint(2**62, (self.effective_batch,), generator=generator)
        return StepPlan(positions, t, k, drop, noise_seed, slots)

    def draws(self, max_steps: int) -> dict[str, torch.Tensor]:
        """What the reference errors of steps 0..max_steps-1 depend on, one row per draw:
        the pair's cache position, its timestep and whether its caption is dropped."""
        steps = [self.step(step) for step in range(max_steps)]
        return {"position": torch.cat([s.positions for s in steps]),
                "t": torch.cat([s.t for s in steps]),
                "drop_caption": torch.cat([s.drop_caption for s in steps])}


def levels_read(plan: TrainingPlan, max_steps: int) -> dict[int, set[int]]:
    """Cache position -> the inversion level indices that steps 0..max_steps-1 of the plan
    read of that pair: all a cache for this run must hold (invert.levels=planned)."""
    read: dict[int, set[int]] = {}
    for step in range(max_steps):
        drawn = plan.step(step)
        for position, k in zip(drawn.positions.tolist(), drawn.k.tolist(), strict=True):
            read.setdefault(position, set()).add(k)
    return read


def _generator(*seeds: int) -> torch.Generator:
    # Hashes of int tuples are the same in every process (PYTHONHASHSEED salts only strings).
    return torch.Generator().manual_seed(hash(seeds) % 2**63)


@functools.lru_cache(maxsize=2)  # a step spans at most two epochs
def _epoch_order(num_pairs: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_pairs, generator=_generator(seed, 0, epoch))


def place_on_trajectory(
    batch: PairBatch, plan: StepPlan, alphas_cumprod: torch.Tensor, trajectory: str,
    levels: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t and the noise it holds for both images: (B, 2, C, H, W) each.

    inversion: tau is the noise implied by the inverted latent at level k; for a t below the
    level the latent is moved along that same DDIM path, z_t = sqrt(abar_t) z0 + sqrt(1-abar_t)
    tau, so the target stays exact. forward: Diffusion-DPO's q(x_t | x_0), one noise draw
    (seeded per pair by the plan) shared by the two images of a pair.
    """
    abar_t = alphas_cumprod[plan.t].view(-1, 1, 1, 1, 1).to(batch.z0.device)
    if trajectory == "forward":
        noise = torch.stack([
            torch.randn(batch.z0.shape[2:], generator=torch.Generator().manual_seed(int(seed)),
                        dtype=torch.float32)
            for seed in plan.noise_seed]).to(batch.z0)
        noise = noise[:, None].expand_as(batch.z0)
        return forward_noise(batch.z0, noise, abar_t), noise
    rows = torch.arange(len(plan))
    z_level = batch.z[rows, :, plan.k]  # (B, 2, C, H, W)
    abar_level = alphas_cumprod[torch.tensor(levels)[plan.k]].view(-1, 1, 1, 1, 1).to(
        z_level.device)
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
        pred = policy(z.to(policy.dtype), steps, **condition).sample
        return noise_from_prediction(cfg.prediction_type, pred, z, alphas_cumprod[t])

    with torch.no_grad():
        z = renoise_invert(eps, z0, cfg.levels, alphas_cumprod, cfg.renoise_steps, cfg.average)
    return z.movedim(0, 1).reshape(b, 2, len(cfg.levels), *z0.shape[1:])


def trajectory_targets(batch: PairBatch, plan: StepPlan, alphas_cumprod: torch.Tensor,
                       cfg: StepConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t and the target of the model's prediction type at the plan's draws, both images of
    every pair: (B, 2, C, H, W) each."""
    z_t, noise = place_on_trajectory(batch, plan, alphas_cumprod, cfg.trajectory, cfg.levels)
    abar_t = alphas_cumprod[plan.t].view(-1, 1, 1, 1, 1).to(z_t.device)
    return z_t, prediction_target(cfg.prediction_type, batch.z0, noise, abar_t)


def reference_errors(reference: UNet2DConditionModel, batch: PairBatch, plan: StepPlan,
                     alphas_cumprod: torch.Tensor, cfg: StepConfig) -> torch.Tensor:
    """(B, 2) the reference's errors r_j = ||target_j - eps_ref(z_t^j, c, t)||^2 (METHOD.md
    §4) at the plan's draws, as the train step computes them. With a cached trajectory the
    invert stage computes them once for every run of a sweep (train.reference_errors=cached):
    the reference is the base that inverts, and z_t, c and t are the plan's."""
    z_t, target = trajectory_targets(batch, plan, alphas_cumprod, cfg)
    with torch.no_grad():
        return pair_errors(predict_pairs(reference, z_t, plan.t, batch), target)


def smpo_loss(
    policy: UNet2DConditionModel,
    reference: UNet2DConditionModel | None,
    batch: PairBatch,
    plan: StepPlan,
    alphas_cumprod: torch.Tensor,
    cfg: StepConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch: the preference (or SFT) loss and its metrics, at the plan's draws.
    The reference's errors are the batch's `ref_err` where the invert stage computed them,
    else the reference UNet's now."""
    if cfg.trajectory == "inversion" and cfg.trajectory_source == "online":
        batch.z = online_trajectory(policy, batch, alphas_cumprod, cfg)
    z_t, target = trajectory_targets(batch, plan, alphas_cumprod, cfg)
    if cfg.method == "sft":
        rows = torch.arange(len(batch.winner))
        winner_t, winner_target = z_t[rows, batch.winner], target[rows, batch.winner]
        pred = predict_pairs(policy, winner_t[:, None].expand_as(z_t), plan.t, batch)[:, 0]
        return sft_loss(per_image_mse(pred, winner_target))
    model_err = pair_errors(predict_pairs(policy, z_t, plan.t, batch), target)
    if batch.ref_err is not None:
        ref_err = batch.ref_err.to(model_err)
    else:
        with torch.no_grad():
            ref_err = pair_errors(predict_pairs(reference, z_t, plan.t, batch), target)
    return preference_loss(model_err, ref_err, batch.weight.to(model_err.device), cfg.beta)


@dataclass
class LoopConfig:
    max_steps: int
    micro_batch: int  # pairs per micro-batch on one process
    max_grad_norm: float
    checkpoint_every: int
    log_every: int


def train_loop(
    policy: UNet2DConditionModel,
    reference: UNet2DConditionModel | None,
    plan: TrainingPlan,
    load_batch: Callable[[StepPlan], PairBatch],
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
    """Optimiser steps `start_step`..`max_steps`, each over the plan's effective batch.

    The step's pairs are cut into micro-batches of `loop.micro_batch`; with W processes,
    process r takes micro-batches r, r + W, r + 2W, ... and accumulates them (accelerate's
    gradient accumulation: the effective batch over W x micro_batch). Every micro-batch has
    the same size, so the accumulated, process-averaged gradient is the gradient of the mean
    loss over the whole effective batch, however it is split. Metrics are averaged likewise.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    accumulation, rest = divmod(plan.effective_batch, loop.micro_batch * world)
    if rest or accumulation != accelerator.gradient_accumulation_steps:
        raise ValueError(f"an effective batch of {plan.effective_batch} in micro-batches of "
                         f"{loop.micro_batch} on {world} processes needs the accelerator's "
                         f"gradient_accumulation_steps = {plan.effective_batch} / "
                         f"({loop.micro_batch} x {world}), a whole number; it has "
                         f"{accelerator.gradient_accumulation_steps}")
    def parts(step: int) -> list[StepPlan]:  # this process's micro-batches of a step
        drawn = plan.step(step)
        return [drawn.slice(micro * world + rank, loop.micro_batch)
                for micro in range(accumulation)]

    ahead = getattr(load_batch, "ahead", None)  # a loader that can read the next one early
    last: dict[str, float] = {}
    upcoming = parts(start_step) if start_step < loop.max_steps else []
    for step in range(start_step, loop.max_steps):
        started = time.perf_counter()
        current, upcoming = upcoming, parts(step + 1) if step + 1 < loop.max_steps else []
        totals: dict[str, float] = {}
        for micro, part in enumerate(current):
            batch = load_batch(part)
            # Read the next micro-batch while this one computes (one read at a time: the
            # cache's file handles are not shared between threads).
            if ahead is not None and (later := [*current[micro + 1:], *upcoming]):
                ahead(later[0])
            with accelerator.accumulate(policy), accelerator.autocast():
                loss, metrics = smpo_loss(policy, reference, batch, part, alphas_cumprod,
                                          step_cfg)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    metrics["grad_norm"] = float(accelerator.clip_grad_norm_(
                        policy.parameters(), loop.max_grad_norm))
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value / accumulation
        totals["grad_norm"] = totals.get("grad_norm", 0.0) * accumulation
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
        if on_checkpoint and (step + 1) % loop.checkpoint_every == 0 \
                and step + 1 < loop.max_steps:
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
    """Micro-batches from the trajectory cache: the pairs a plan slice names, with the
    empty caption where the plan drops it. With `prefetch`, `ahead(plan)` starts reading a
    slice in a background thread (into pinned memory on a GPU, `acceleration.Prefetcher`), so
    the read and the copy to the device overlap the step before it. With `ref_err` (one
    (2,) row per draw of the run, `TrajectoryCache.reference_errors`) each batch carries its
    draws' reference errors."""

    def __init__(self, cache, weight: torch.Tensor, winner: torch.Tensor, load_levels: bool,
                 device: torch.device, prefetch: bool = False,
                 ref_err: torch.Tensor | None = None):
        from smpo_core.acceleration import Prefetcher

        self.cache, self.weight, self.winner = cache, weight, winner
        self.load_levels, self.device, self.ref_err = load_levels, device, ref_err
        self.prefetcher = Prefetcher(self._rows, device) if prefetch else None

    @staticmethod
    def _key(plan: StepPlan) -> tuple:
        return tuple(plan.positions.tolist()), tuple(plan.drop_caption.tolist())

    def _rows(self, key: tuple) -> dict[str, torch.Tensor]:
        """The slice's tensors on the CPU, float32, captions dropped where the plan says."""
        positions, drop = list(key[0]), torch.tensor(key[1], dtype=torch.bool)
        names = ["z0", "text", "pooled", "time_ids"] + (["z"] if self.load_levels else [])
        rows = {k: v.float() for k, v in self.cache.get(positions, names).items()}
        rows["text"][drop] = self.cache.empty_text.float()
        if "pooled" in rows:
            rows["pooled"][drop] = self.cache.empty_pooled.float()
        return rows | {"weight": self.weight[positions], "winner": self.winner[positions]}

    def ahead(self, plan: StepPlan) -> None:
        if self.prefetcher is not None:
            self.prefetcher.ahead(self._key(plan))

    def __call__(self, plan: StepPlan) -> PairBatch:
        key = self._key(plan)
        rows = (self.prefetcher.get(key) if self.prefetcher is not None else
                {k: v.to(self.device) for k, v in self._rows(key).items()})
        return PairBatch(
            z0=rows["z0"], z=rows.get("z"), text=rows["text"], weight=rows["weight"],
            winner=rows["winner"], pooled=rows.get("pooled"), time_ids=rows.get("time_ids"),
            ref_err=None if self.ref_err is None else self.ref_err[plan.draw].to(self.device),
        )
