"""SmPO training on the tiny model: the step, its switches, and that it learns."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler

from smpo_core.errors import SmpoError
from smpo_core.inversion import inversion_levels, noise_from_prediction, prediction_target
from smpo_core.models import load_diffusion
from smpo_core.training import (
    LoopConfig,
    PairBatch,
    StepConfig,
    StepPlan,
    TrainingPlan,
    make_optimizer,
    place_on_trajectory,
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
                beta=2000.0, levels=LEVELS)
    return StepConfig(**(base | changes))


def _plan(pairs: int, sampling: str = "level", seed: int = 0, step: int = 0) -> StepPlan:
    """The draws of one step over `pairs` pairs, in cache order (positions 0..pairs-1)."""
    drawn = TrainingPlan(pairs, pairs, seed, tuple(LEVELS), 1000, sampling).step(step)
    drawn.positions = torch.arange(pairs)
    return drawn


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


def test_uniform_timesteps_cover_the_whole_schedule_uniformly():
    """METHOD.md §4: t uniform over {0, ..., 999}, its latent from the level at or above t.
    Pearson's chi-square over 1000 cells with 400 draws each: under uniformity the statistic
    has mean 999 and standard deviation sqrt(2 x 999) ~ 44.7; 5 of those is a 1e-6 false
    alarm, while the old grid-only sampling (5 cells) or a missing t < 199 is off by
    thousands."""
    plan = TrainingPlan(100, 4000, 0, tuple(LEVELS), 1000, "uniform")
    steps = [plan.step(i) for i in range(100)]
    t = torch.cat([s.t for s in steps])
    k = torch.cat([s.k for s in steps])
    counts = torch.bincount(t, minlength=1000).double()
    assert len(counts) == 1000
    expected = len(t) / 1000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert abs(chi2 - 999) < 5 * math.sqrt(2 * 999), chi2
    # The level at or above t, by brute force.
    oracle = torch.tensor([min(i for i, level in enumerate(LEVELS) if level >= int(step))
                           for step in t[:5000]])
    assert torch.equal(k[:5000], oracle)


def test_level_timesteps_stay_on_the_inversion_grid():
    drawn = TrainingPlan(100, 5000, 0, tuple(LEVELS), 1000, "level").step(0)
    assert set(drawn.t.tolist()) == set(LEVELS)
    assert torch.equal(drawn.t, torch.tensor(LEVELS)[drawn.k])


def test_the_plan_is_seeded_visits_every_pair_each_epoch_and_splits_into_slices():
    plan = TrainingPlan(10, 4, 7, tuple(LEVELS), 1000, "uniform", empty_caption_prob=0.5)
    again = TrainingPlan(10, 4, 7, tuple(LEVELS), 1000, "uniform", empty_caption_prob=0.5)
    other = TrainingPlan(10, 4, 8, tuple(LEVELS), 1000, "uniform", empty_caption_prob=0.5)
    for step in range(3):
        a, b = plan.step(step), again.step(step)
        for name in ("positions", "t", "k", "drop_caption", "noise_seed"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(plan.step(0).t, other.step(0).t)
    # Steps 0-4 hold 20 pair slots: two epochs, each a permutation of the 10 pairs.
    slots = torch.cat([plan.step(i).positions for i in range(5)]).tolist()
    assert sorted(slots[:10]) == list(range(10)) and sorted(slots[10:]) == list(range(10))
    assert slots[:10] != slots[10:]
    # Micro-batches are slices of the step: any split sees the same draws.
    whole = plan.step(1)
    halves = [whole.slice(i, 2) for i in range(2)]
    assert torch.cat([h.t for h in halves]).tolist() == whole.t.tolist()
    assert torch.cat([h.positions for h in halves]).tolist() == whole.positions.tolist()


def test_a_plan_needs_a_level_at_or_above_every_timestep():
    with pytest.raises(ValueError, match="top inversion level must be T - 1 = 999"):
        TrainingPlan(10, 4, 0, (199, 399), 1000)


@pytest.mark.integration
def test_forward_trajectory_shares_one_noise_draw_per_pair(tiny):
    model, batch = tiny
    _, noise = place_on_trajectory(batch, _plan(8, "uniform"), model.alphas_cumprod, "forward",
                                   LEVELS)
    torch.testing.assert_close(noise[:, 0], noise[:, 1])
    assert abs(noise.std().item() - 1) < 0.1


@pytest.mark.integration
def test_cached_and_online_trajectories_give_the_same_first_loss(tiny):
    model, batch = tiny
    policy = copy.deepcopy(model.unet)
    reference = _perturbed(model.unet)
    losses = {}
    for source in ("cache", "online"):
        run_batch = batch if source == "cache" else _copy(batch, z=None)
        loss, _ = smpo_loss(policy, reference, run_batch, _plan(8, seed=5),
                            model.alphas_cumprod, _cfg(trajectory_source=source))
        losses[source] = loss.item()
    assert losses["cache"] == pytest.approx(losses["online"], rel=1e-4)
    assert abs(losses["cache"] - math.log(2)) > 1e-3  # the reference differs: a real value


SD15_SCHEDULER = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                               beta_schedule="scaled_linear")
SD15_ALPHAS = SD15_SCHEDULER.alphas_cumprod


@pytest.fixture(scope="module")
def known():
    """4 pairs whose cached latents are built from noise drawn here: at level k,
    z_k = sqrt(abar_k) z0 + sqrt(1 - abar_k) tau_k, so the right target tau_k is known without
    inverting anything."""
    generator = torch.Generator().manual_seed(11)
    z0 = torch.randn(4, 2, 4, 2, 2, generator=generator)
    tau = torch.randn(4, 2, len(LEVELS), 4, 2, 2, generator=generator)
    abar = SD15_ALPHAS[LEVELS].view(1, 1, -1, 1, 1, 1)
    z = abar.sqrt() * z0[:, :, None] + (1 - abar).sqrt() * tau
    weight = torch.tensor([2.0, -1.5, 0.5, 3.0])
    batch = PairBatch(z0, z, torch.zeros(4, 1, 1), weight, torch.tensor([0, 1, 0, 0]))
    return batch, tau


def test_level_sampling_places_pairs_on_their_cached_latents(known):
    batch, tau = known
    drawn = _plan(4, "level")
    k = drawn.k
    z_t, target = place_on_trajectory(batch, drawn, SD15_ALPHAS, "inversion", LEVELS)
    rows = torch.arange(4)
    torch.testing.assert_close(z_t, batch.z[rows, :, k])
    torch.testing.assert_close(target, tau[rows, :, k], atol=1e-5, rtol=1e-5)


def test_uniform_sampling_moves_pairs_along_their_level_path(known):
    batch, tau = known
    drawn = _plan(4, "uniform", seed=1)
    k, t = drawn.k, drawn.t
    z_t, target = place_on_trajectory(batch, drawn, SD15_ALPHAS, "inversion", LEVELS)
    rows = torch.arange(4)
    abar_t, level_noise = SD15_ALPHAS[t].view(4, 1, 1, 1, 1), tau[rows, :, k]
    torch.testing.assert_close(target, level_noise, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_t, abar_t.sqrt() * batch.z0 + (1 - abar_t).sqrt() * level_noise,
                               atol=1e-5, rtol=1e-5)


class LinearNoisePredictor(torch.nn.Module):
    """A stand-in UNet whose every prediction is known, eps(z, t) = scale * z, recording the
    latents and timesteps it is asked about."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))
        self.config = SimpleNamespace(addition_embed_type=None)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    dtype = torch.float32
    device = torch.device("cpu")

    def forward(self, sample, timestep, **condition):
        self.seen.append((sample.detach().clone(), timestep.clone()))
        return SimpleNamespace(sample=self.scale * sample)


def _level_of(t: int, uniform: bool) -> int:
    """The inversion level a timestep is drawn from: its own, or the one just above it."""
    return next(i for i, level in enumerate(LEVELS) if (t <= level if uniform else t == level))


def _velocity(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """diffusers' own v target (its scheduler's get_velocity), for (B, 2, ...) pairs."""
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    v = SD15_SCHEDULER.get_velocity(flat(z0), flat(noise), t.repeat_interleave(2))
    return v.reshape(z0.shape)


def _expected_loss(cfg: StepConfig, sampling: str, batch: PairBatch, tau: torch.Tensor,
                   policy: LinearNoisePredictor, reference: LinearNoisePredictor) -> float:
    """METHOD.md §4 on the latents and timesteps the two models were shown, with targets
    known from how the batch was built."""
    seen, t = policy.seen[-1]
    t = t.view(-1, 2)[:, 0]
    z_t = seen.view(batch.z0.shape)
    rows = torch.arange(len(t))
    abar = SD15_ALPHAS[t].view(-1, 1, 1, 1, 1)
    z0 = batch.z0
    if cfg.method == "sft":  # the policy is shown the human winner only, in both slots
        z0 = z0[rows, batch.winner][:, None].expand_as(z0)
        tau = tau[rows, batch.winner][:, None].expand_as(tau)
    if cfg.trajectory == "forward":
        # Diffusion-DPO: one noise draw per pair, the same for both images; it is the target.
        target = (z_t - abar.sqrt() * z0) / (1 - abar).sqrt()
        torch.testing.assert_close(target[:, 0], target[:, 1], atol=1e-4, rtol=1e-4)
    else:
        k = [_level_of(int(step), sampling == "uniform") for step in t]
        target = tau[rows, :, k]
        torch.testing.assert_close(z_t, abar.sqrt() * z0 + (1 - abar).sqrt() * target,
                                   atol=1e-5, rtol=1e-5)
    if cfg.prediction_type == "v_prediction":
        target = _velocity(z0, target, t)
    error = {name: (float(model.scale.detach()) * z_t - target).pow(2).flatten(2).mean(2)
             for name, model in (("policy", policy), ("reference", reference))}
    if cfg.method == "sft":
        assert not reference.seen
        return float(error["policy"][:, 0].mean())
    ref_seen, ref_t = reference.seen[-1]
    assert torch.equal(ref_seen, seen) and torch.equal(ref_t.view(-1, 2)[:, 0], t)
    m, r = error["policy"], error["reference"]
    d = (m[:, 0] - r[:, 0]) - (m[:, 1] - r[:, 1])
    return float(-torch.nn.functional.logsigmoid(-0.5 * cfg.beta * batch.weight * d).mean())


def test_every_ablation_row_computes_the_loss_it_names(known):
    """Smoothed or human labels, inversion or forward trajectories, level or uniform
    timesteps, SFT, epsilon or v-prediction (the target from diffusers' get_velocity): each
    loss equals the formula on the inputs that row must use."""
    batch, tau = known
    human = _copy(batch, weight=torch.where(batch.winner == 0, 1.0, -1.0))
    rows = {"smpo": (_cfg(), batch, "uniform"),
            "smoothed + forward": (_cfg(trajectory="forward"), batch, "uniform"),
            "human + inversion": (_cfg(), human, "uniform"),
            "diffusion-dpo": (_cfg(trajectory="forward"), human, "uniform"),
            "smpo, level t": (_cfg(), batch, "level"),
            "smpo, v-prediction": (_cfg(prediction_type="v_prediction"), batch, "uniform"),
            "dpo, v-prediction": (_cfg(trajectory="forward", prediction_type="v_prediction"),
                                  human, "uniform"),
            "sft": (_cfg(method="sft"), batch, "uniform"),
            "sft, v-prediction": (_cfg(method="sft", prediction_type="v_prediction"), batch,
                                  "uniform")}
    losses = {}
    for name, (cfg, pairs, sampling) in rows.items():
        cfg = dataclasses.replace(cfg, beta=5.0)
        policy, reference = LinearNoisePredictor(0.9), LinearNoisePredictor(1.1)
        loss, metrics = smpo_loss(policy, reference, _copy(pairs), _plan(4, sampling, seed=2),
                                  SD15_ALPHAS, cfg)
        expected = _expected_loss(cfg, sampling, pairs, tau, policy, reference)
        assert loss.item() == pytest.approx(expected, rel=1e-5), name
        assert metrics["loss"] == pytest.approx(loss.item())
        loss.backward()
        assert policy.scale.grad is not None and policy.scale.grad != 0, name
        assert reference.scale.grad is None, name  # the reference is frozen
        losses[name] = loss.item()
    assert len({round(v, 6) for v in losses.values()}) == len(rows)


def _held_out_loss(policy, reference, model, batch) -> tuple[float, float]:
    """Loss and implicit accuracy over every pair at every level, fixed randomness."""
    losses, accuracies = [], []
    for k in range(len(LEVELS)):
        cfg = _cfg(levels=[LEVELS[k]])
        z_one_level = batch.z[:, :, k:k + 1]
        drawn = TrainingPlan(len(batch.z0), len(batch.z0), 0, (LEVELS[-1],), 1000,
                             "level").step(0)
        drawn.positions = torch.arange(len(batch.z0))
        drawn.t = torch.full_like(drawn.t, LEVELS[k])
        with torch.no_grad():
            _, metrics = smpo_loss(policy, reference, _copy(batch, z=z_one_level), drawn,
                                   model.alphas_cumprod, cfg)
        losses.append(metrics["loss"])
        accuracies.append(metrics["implicit_accuracy"])
    return sum(losses) / len(losses), sum(accuracies) / len(accuracies)


@pytest.mark.integration
def test_a_few_smpo_steps_lower_the_loss_and_raise_implicit_accuracy(tiny):
    model, batch = tiny
    policy = copy.deepcopy(model.unet).train().requires_grad_(True)
    reference = model.unet
    before = _held_out_loss(policy, reference, model, batch)
    assert before[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    optimizer = make_optimizer("adamw", policy.parameters(), lr=3e-4, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(0))
    policy, optimizer, schedule = accelerator.prepare(policy, optimizer, schedule)

    def load_batch(part: StepPlan) -> PairBatch:
        rows = part.positions
        return PairBatch(batch.z0[rows], batch.z[rows], batch.text[rows], batch.weight[rows],
                         batch.winner[rows])

    history = []
    plan = TrainingPlan(8, 8, 100, tuple(LEVELS), 1000, "level")
    train_loop(policy, reference, plan, load_batch, model.alphas_cumprod, _cfg(),
               LoopConfig(max_steps=15, micro_batch=4, max_grad_norm=1.0,
                          checkpoint_every=1000, log_every=1),
               optimizer, schedule, accelerator,
               on_metrics=lambda step, m: history.append(m))
    after = _held_out_loss(policy, reference, model, batch)
    assert len(history) == 15
    assert after[0] < before[0] - 0.05
    assert after[1] > 0.5


def _with_prediction_type(folder: Path, prediction_type: str, out: Path) -> Path:
    """A copy of a diffusers model folder whose scheduler says `prediction_type`."""
    shutil.copytree(folder, out)
    config = out / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text())
                                 | {"prediction_type": prediction_type}))
    return out


@pytest.mark.integration
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_tiny_model_of_each_prediction_type_trains_on_its_own_target(tmp_path,
                                                                       prediction_type):
    """The SFT loss on a real tiny UNet against a target made here: the noise the cached
    latent implies (epsilon), or diffusers' get_velocity of it (v_prediction)."""
    folder = _with_prediction_type(build_tiny_diffusion(tmp_path / "sd"), prediction_type,
                                   tmp_path / prediction_type)
    model = load_diffusion(str(folder), torch.device("cpu"), torch.float32)
    assert model.prediction_type == prediction_type
    rows = trainable_pairs(tmp_path / "data", 4, seed=3)
    inverted = invert_pair_batch(model, rows, LEVELS, 32, renoise_steps=1, average="mean")
    winner = torch.tensor([0, 1, 1, 0])
    batch = PairBatch(inverted.z0, inverted.z, inverted.text, torch.ones(4), winner)
    drawn = _plan(4, "uniform", seed=9)
    loss, _ = smpo_loss(model.unet, None, batch, drawn, model.alphas_cumprod,
                        _cfg(method="sft", prediction_type=prediction_type))

    rows = torch.arange(4)
    abar = model.scheduler.alphas_cumprod
    level = torch.tensor(LEVELS)[drawn.k]
    z0, z_level = inverted.z0[rows, winner], inverted.z[rows, winner, drawn.k]
    a_level = abar[level].view(-1, 1, 1, 1)
    noise = (z_level - a_level.sqrt() * z0) / (1 - a_level).sqrt()
    z_t = model.scheduler.add_noise(z0, noise, drawn.t)
    target = noise if prediction_type == "epsilon" else \
        model.scheduler.get_velocity(z0, noise, drawn.t)
    with torch.no_grad():
        pred = model.unet(z_t, drawn.t, encoder_hidden_states=inverted.text).sample
    assert loss.item() == pytest.approx((pred - target).pow(2).mean().item(), rel=1e-4)


def test_a_model_predicting_anything_else_is_refused(tmp_path):
    folder = _with_prediction_type(build_tiny_diffusion(tmp_path / "sd"), "sample",
                                   tmp_path / "sample")
    with pytest.raises(SmpoError, match=r"prediction_type is 'sample'; expected one of "
                                        r"epsilon, v_prediction"):
        load_diffusion(str(folder), torch.device("cpu"), torch.float32)


def test_v_prediction_and_noise_convert_both_ways():
    """v = sqrt(abar) eps - sqrt(1 - abar) z0 (diffusers' get_velocity), and the noise a
    v-prediction implies at z_t is eps again: what inversion with a v-model relies on."""
    generator = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 3, 4, 4, 4, generator=generator)
    t = torch.tensor([0, 350, 999])
    abar = SD15_ALPHAS[t]
    v = prediction_target("v_prediction", z0, eps, abar)
    torch.testing.assert_close(v, SD15_SCHEDULER.get_velocity(z0, eps, t))
    z_t = SD15_SCHEDULER.add_noise(z0, eps, t)
    torch.testing.assert_close(noise_from_prediction("v_prediction", v, z_t, abar), eps,
                               atol=1e-5, rtol=1e-5)
    assert prediction_target("epsilon", z0, eps, abar) is not None
    torch.testing.assert_close(prediction_target("epsilon", z0, eps, abar), eps)
    with pytest.raises(ValueError, match="'sample'"):
        prediction_target("sample", z0, eps, abar)


def test_the_lora_reference_is_the_unet_without_its_adapters(tmp_path):
    """One UNet: with adapters on it is the policy, with them off exactly the starting UNet."""
    from smpo_core.models import AdaptersDisabled, add_lora, load_unet

    folder = build_tiny_diffusion(tmp_path / "sd")
    start = load_unet(str(folder))
    policy = load_unet(str(folder))
    add_lora(policy, 4)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 77, 32, generator=generator)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        base = start(z, t, encoder_hidden_states=text).sample
        tuned = policy(z, t, encoder_hidden_states=text).sample
        reference = AdaptersDisabled(policy)(z, t, encoder_hidden_states=text).sample
        again = policy(z, t, encoder_hidden_states=text).sample
    assert not torch.allclose(tuned, base, atol=1e-4)
    torch.testing.assert_close(reference, base, atol=1e-6, rtol=1e-6)
    assert torch.equal(again, tuned)  # the adapters are back on
