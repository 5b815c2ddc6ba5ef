"""SmPO training on the tiny model: the step, its switches, and that it learns."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from accelerate import Accelerator

from smpo_core.inversion import implied_noise, inversion_levels
from smpo_core.models import load_diffusion
from smpo_core.training import (
    LoopConfig,
    PairBatch,
    StepConfig,
    make_optimizer,
    place_on_trajectory,
    sample_timesteps,
    smpo_loss,
    train_loop,
    warmup_constant,
)
from smpo_core.trajectories import invert_pair_batch
from smpo_core.worlds.tiny import build_tiny_diffusion, trainable_pairs

LEVELS = inversion_levels(5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny diffusion model and 8 inverted pairs with preference weights."""
    root = tmp_path_factory.mktemp("tiny")
    model = load_diffusion(str(build_tiny_diffusion(root / "sd")), torch.device("cpu"),
                           torch.float32)
    rows = trainable_pairs(root / "data", 8, seed=3)
    inverted = invert_pair_batch(model, rows, LEVELS, 32, renoise_steps=1, average="mean")
    weight = torch.linspace(-4, 4, len(rows))
    winner = (weight < 0).long()
    return model, PairBatch(inverted.z0, inverted.z, inverted.text, weight, winner)


def _cfg(**changes) -> StepConfig:
    base = dict(method="preference", trajectory="inversion", trajectory_source="cache",
                timestep_sampling="level", beta=2000.0, levels=LEVELS)
    return StepConfig(**(base | changes))


def _copy(batch: PairBatch, **changes) -> PairBatch:
    fields = dict(z0=batch.z0, z=batch.z, text=batch.text, weight=batch.weight,
                  winner=batch.winner)
    return PairBatch(**(fields | changes))


def _perturbed(unet, scale=1e-3, seed=0):
    other = copy.deepcopy(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return other


def test_level_sampling_places_pairs_on_their_cached_latents(tiny):
    model, batch = tiny
    generator = torch.Generator().manual_seed(0)
    k, t = sample_timesteps(LEVELS, 8, "level", generator)
    z_t, target = place_on_trajectory(batch, k, t, model.alphas_cumprod, "inversion", LEVELS,
                                      generator)
    rows = torch.arange(8)
    torch.testing.assert_close(z_t, batch.z[rows, :, k], atol=1e-5, rtol=1e-5)
    abar = model.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(target, implied_noise(batch.z[rows, :, k], batch.z0, abar))


def test_uniform_sampling_stays_in_the_interval_below_each_level():
    generator = torch.Generator().manual_seed(0)
    k, t = sample_timesteps(LEVELS, 4000, "uniform", generator)
    lower = torch.tensor([-1, *LEVELS[:-1]])[k]
    upper = torch.tensor(LEVELS)[k]
    assert bool(((t > lower) & (t <= upper)).all())
    assert int(t.min()) == 0 and int(t.max()) == 999
    assert len(set(t.tolist())) > 900  # covers the whole range, not just the grid


def test_forward_trajectory_shares_one_noise_draw_per_pair(tiny):
    model, batch = tiny
    generator = torch.Generator().manual_seed(0)
    k, t = sample_timesteps(LEVELS, 8, "level", generator)
    _, noise = place_on_trajectory(batch, k, t, model.alphas_cumprod, "forward", LEVELS,
                                   generator)
    torch.testing.assert_close(noise[:, 0], noise[:, 1])
    assert abs(noise.std().item() - 1) < 0.1


def test_cached_and_online_trajectories_give_the_same_first_loss(tiny):
    model, batch = tiny
    policy = copy.deepcopy(model.unet)
    reference = _perturbed(model.unet)
    losses = {}
    for source in ("cache", "online"):
        run_batch = batch if source == "cache" else _copy(batch, z=None)
        loss, _ = smpo_loss(policy, reference, run_batch, model.alphas_cumprod,
                            _cfg(trajectory_source=source), torch.Generator().manual_seed(5))
        losses[source] = loss.item()
    assert losses["cache"] == pytest.approx(losses["online"], rel=1e-4)
    assert abs(losses["cache"] - math.log(2)) > 1e-3  # the reference differs: a real value


def test_every_ablation_row_gives_a_finite_loss(tiny):
    model, batch = tiny
    policy, reference = copy.deepcopy(model.unet).requires_grad_(True), _perturbed(model.unet)
    human = _copy(batch, weight=torch.where(batch.winner == 0, 1.0, -1.0))
    for cfg, pairs in [(_cfg(), batch), (_cfg(trajectory="forward"), batch),
                       (_cfg(), human), (_cfg(trajectory="forward"), human),
                       (_cfg(timestep_sampling="uniform"), batch),
                       (_cfg(method="sft"), batch)]:
        loss, metrics = smpo_loss(policy, reference, pairs, model.alphas_cumprod, cfg,
                                  torch.Generator().manual_seed(1))
        assert math.isfinite(loss.item()) and loss.item() > 0
        loss.backward()
        assert "model_mse" in metrics


def _held_out_loss(policy, reference, model, batch) -> tuple[float, float]:
    """Loss and implicit accuracy over every pair at every level, fixed randomness."""
    losses, accuracies = [], []
    for k in range(len(LEVELS)):
        cfg = _cfg(levels=[LEVELS[k]])
        z_one_level = batch.z[:, :, k:k + 1]
        with torch.no_grad():
            _, metrics = smpo_loss(policy, reference, _copy(batch, z=z_one_level),
                                   model.alphas_cumprod, cfg, torch.Generator().manual_seed(0))
        losses.append(metrics["loss"])
        accuracies.append(metrics["implicit_accuracy"])
    return sum(losses) / len(losses), sum(accuracies) / len(accuracies)


def test_a_few_smpo_steps_lower_the_loss_and_raise_implicit_accuracy(tiny):
    model, batch = tiny
    policy = copy.deepcopy(model.unet).train().requires_grad_(True)
    reference = model.unet
    before = _held_out_loss(policy, reference, model, batch)
    assert before[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference

    accelerator = Accelerator(cpu=True)
    optimizer = make_optimizer("adamw", policy.parameters(), lr=3e-4, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(0))
    policy, optimizer, schedule = accelerator.prepare(policy, optimizer, schedule)

    def next_batch(index):
        return batch, torch.Generator().manual_seed(100 + index)

    history = []
    train_loop(policy, reference, next_batch, model.alphas_cumprod, _cfg(),
               LoopConfig(max_steps=15, grad_accum=1, max_grad_norm=1.0, checkpoint_every=1000,
                          log_every=1),
               optimizer, schedule, accelerator,
               on_metrics=lambda step, m: history.append(m))
    after = _held_out_loss(policy, reference, model, batch)
    assert len(history) == 15
    assert after[0] < before[0] - 0.05
    assert after[1] > 0.5
