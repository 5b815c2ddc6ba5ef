"""Inversion against an analytic model whose exact noise predictor is known in closed form.

Data z_0 ~ N(mu, s^2 I) gives the marginal N(sqrt(abar) mu, (abar s^2 + 1 - abar) I) at level t,
so the exact (minimum-MSE) noise prediction is
  eps*(z, t) = sqrt(1 - abar) (z - sqrt(abar) mu) / (abar s^2 + 1 - abar).
Any reconstruction error is then the inversion's own, not a network's.
"""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from smpo_core.inversion import (
    ddim_inverse_step,
    ddim_sample_from_levels,
    forward_noise,
    implied_noise,
    inversion_levels,
    renoise_invert,
    renoise_invert_to,
)

SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
ALPHAS_CUMPROD = DDIMScheduler(**SD15).alphas_cumprod  # (1000,) float32
SHAPE = (4, 4, 8, 8)  # (B, C, H, W)
SPREAD = 1.0  # s: scaled VAE latents are roughly unit variance


def _gaussian_data():
    g = torch.Generator().manual_seed(0)
    mu = 0.5 * torch.randn(SHAPE[1:], generator=g)
    z0 = mu + SPREAD * torch.randn(SHAPE, generator=g)
    return mu, z0


MU, Z0 = _gaussian_data()


def exact_eps(z: torch.Tensor, t: int) -> torch.Tensor:
    abar = ALPHAS_CUMPROD[t].item()
    return (1 - abar) ** 0.5 * (z - abar**0.5 * MU) / (abar * SPREAD**2 + 1 - abar)


def reconstruction_rmse(num_levels: int, renoise_steps: int, average: str) -> float:
    levels = inversion_levels(num_levels)
    trajectory = renoise_invert(exact_eps, Z0, levels, ALPHAS_CUMPROD, renoise_steps, average)
    z0_back = ddim_sample_from_levels(exact_eps, trajectory[-1], levels, ALPHAS_CUMPROD)
    return (z0_back - Z0).square().mean().sqrt().item()


def test_inversion_levels_are_trailing_and_end_at_last_timestep():
    assert inversion_levels(5) == [199, 399, 599, 799, 999]
    assert inversion_levels(10) == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    assert inversion_levels(3) == [332, 666, 999]  # round(1000/3) - 1, round(2000/3) - 1, 999
    assert inversion_levels(1) == [999]
    assert inversion_levels(4, num_train_timesteps=20) == [4, 9, 14, 19]
    with pytest.raises(ValueError, match="num_levels"):
        inversion_levels(0)


def test_inverse_step_matches_diffusers_ddim_inverse_scheduler():
    # "trailing" spacing puts the scheduler's timesteps on our levels; its step(t) goes from
    # t - T // K to t, with abar = 1 below timestep 0 when set_alpha_to_one=True; clip_sample
    # would clamp z0_hat, which neither paper does.
    levels = inversion_levels(5)
    scheduler = DDIMInverseScheduler(
        **SD15,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == levels

    g = torch.Generator().manual_seed(1)
    abar_from = 1.0
    for t in levels:
        z, e = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        ours = ddim_inverse_step(z, e, abar_from, ALPHAS_CUMPROD[t])
        theirs = scheduler.step(e, t, z).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        abar_from = ALPHAS_CUMPROD[t]

    # The whole plain-DDIM chain, with predictions made at the source level (timestep 0 for
    # the clean latent), as renoise_invert documents.
    z, source = Z0.clone(), 0
    for t in levels:
        z = scheduler.step(exact_eps(z, source), t, z).prev_sample
        source = t
    ours = renoise_invert(exact_eps, Z0, levels, ALPHAS_CUMPROD, renoise_steps=0)
    torch.testing.assert_close(ours[-1], z, rtol=1e-5, atol=1e-5)


def test_sampling_matches_diffusers_ddim_scheduler():
    levels = inversion_levels(5)
    scheduler = DDIMScheduler(
        **SD15,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == levels[::-1]
    z_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    z = z_T.clone()
    for t in scheduler.timesteps.tolist():
        z = scheduler.step(exact_eps(z, t), t, z, eta=0.0).prev_sample
    ours = ddim_sample_from_levels(exact_eps, z_T, levels, ALPHAS_CUMPROD)
    torch.testing.assert_close(ours, z, rtol=1e-5, atol=1e-5)


def test_fixed_point_renoise_reconstructs_z0():
    # average="last" converges to the exact inverse of the sampling step, so inverting then
    # sampling back on the same grid returns z_0 even with only 5 coarse levels.
    assert reconstruction_rmse(5, 30, "last") < 1e-5
    # Plain DDIM gets there only by refining the grid: its error falls like 1 / K.
    plain = [reconstruction_rmse(k, 0, "last") for k in (10, 100, 1000)]
    assert plain[1] < 0.2 * plain[0]
    assert plain[2] < 0.2 * plain[1]
    assert plain[2] < 0.005


@pytest.mark.parametrize("num_levels", [5, 10])
def test_renoise_reduces_reconstruction_error(num_levels):
    last = [reconstruction_rmse(num_levels, r, "last") for r in (0, 1, 2, 5)]
    mean = [reconstruction_rmse(num_levels, r, "mean") for r in (0, 1, 2, 5)]
    assert last[0] == mean[0]  # renoise_steps=0 is plain DDIM for both
    # Fixed-point iteration: the error shrinks geometrically with each ReNoise step.
    assert last[0] > last[1] > last[2] > last[3]
    assert last[3] < 0.05 * last[0]
    # Mean (the authors' R = 1 setting) also beats plain DDIM, and keeps falling with R, but
    # slowly: the source-level prediction e_0, whose mismatch with the sampling step is the
    # whole error of plain DDIM, keeps weight 1 / (R + 1) in the average, and early, poorer
    # iterates are diluted only as fast. So it stays well behind "last" at every R >= 1.
    assert mean[0] > mean[1] > mean[2] > mean[3]
    assert mean[1] < 0.8 * mean[0]
    assert all(m > ell for m, ell in zip(mean[1:], last[1:], strict=True))


def test_shape_and_float32_from_bfloat16_model():
    seen = []

    def bf16_eps(z: torch.Tensor, t: int) -> torch.Tensor:
        seen.append(z.dtype)
        return exact_eps(z, t).to(torch.bfloat16)

    levels = inversion_levels(5)
    out = renoise_invert(bf16_eps, Z0.to(torch.bfloat16), levels, ALPHAS_CUMPROD, 1)
    assert out.shape == (5, *SHAPE)
    assert out.dtype == torch.float32
    assert set(seen) == {torch.float32}
    reference = renoise_invert(exact_eps, Z0.to(torch.bfloat16).float(), levels, ALPHAS_CUMPROD, 1)
    torch.testing.assert_close(out, reference, rtol=0.0, atol=0.05)


def test_plain_ddim_is_chained_inverse_steps():
    levels = [0, 250, 600, 999]
    out = renoise_invert(exact_eps, Z0, levels, ALPHAS_CUMPROD, renoise_steps=0)
    z, t_prev, abar_prev = Z0, 0, 1.0
    for k, t in enumerate(levels):
        z = ddim_inverse_step(z, exact_eps(z, t_prev), abar_prev, ALPHAS_CUMPROD[t].item())
        torch.testing.assert_close(out[k], z, rtol=0.0, atol=0.0)
        t_prev, abar_prev = t, ALPHAS_CUMPROD[t].item()


@pytest.mark.parametrize(("num_levels", "renoise_steps"), [(5, 0), (5, 1), (10, 3)])
def test_number_of_model_calls(num_levels, renoise_steps):
    calls = []

    def counting_eps(z: torch.Tensor, t: int) -> torch.Tensor:
        calls.append(t)
        return exact_eps(z, t)

    levels = inversion_levels(num_levels)
    renoise_invert(counting_eps, Z0, levels, ALPHAS_CUMPROD, renoise_steps, "last")
    assert len(calls) == num_levels * (1 + renoise_steps)
    # One prediction at the source level, then the ReNoise ones at the destination.
    assert calls[: 1 + renoise_steps] == [0] + [levels[0]] * renoise_steps
    assert all(isinstance(t, int) for t in calls)


def test_renoise_mean_with_one_step_averages_two_predictions():
    levels = [199]
    abar = ALPHAS_CUMPROD[199].item()
    e_0 = exact_eps(Z0, 0)
    e_1 = exact_eps(ddim_inverse_step(Z0, e_0, 1.0, abar), 199)
    expected = ddim_inverse_step(Z0, (e_0 + e_1) / 2, 1.0, abar)
    out = renoise_invert(exact_eps, Z0, levels, ALPHAS_CUMPROD, renoise_steps=1, average="mean")
    torch.testing.assert_close(out[0], expected)


def test_per_sample_abar_broadcasts_over_batch():
    g = torch.Generator().manual_seed(3)
    z, e = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    timesteps = torch.tensor([10, 300, 700, 990])
    abar = ALPHAS_CUMPROD[timesteps]  # (B,)
    noisy = forward_noise(z, e, abar)
    stepped = ddim_inverse_step(z, e, abar, ALPHAS_CUMPROD[timesteps + 5])
    for i in range(SHAPE[0]):
        a = abar[i].item()
        torch.testing.assert_close(noisy[i], a**0.5 * z[i] + (1 - a) ** 0.5 * e[i])
        torch.testing.assert_close(
            stepped[i : i + 1],
            ddim_inverse_step(z[i : i + 1], e[i : i + 1], a, ALPHAS_CUMPROD[timesteps[i] + 5]),
        )
    torch.testing.assert_close(implied_noise(noisy, z, abar), e, rtol=1e-4, atol=1e-4)


def test_implied_noise_of_inverted_latents_is_float32_target():
    levels = inversion_levels(5)
    trajectory = renoise_invert(exact_eps, Z0.half(), levels, ALPHAS_CUMPROD, 1)
    tau = implied_noise(trajectory[2].half(), Z0.half(), ALPHAS_CUMPROD[levels[2]])
    assert tau.dtype == torch.float32
    assert tau.shape == SHAPE


@pytest.mark.parametrize(
    ("levels", "kwargs", "message"),
    [
        ([199, 199, 399], {}, "strictly increasing"),
        ([399, 199], {}, "strictly increasing"),
        ([199, 1000], {}, r"\[0, 999\]"),
        ([-1, 199], {}, r"\[0, 999\]"),
        ([199.0, 399.0], {}, "integer"),
        ([], {}, "empty"),
        ([199], {"average": "median"}, "average"),
        ([199], {"renoise_steps": -1}, "renoise_steps"),
    ],
)
def test_renoise_invert_validates_inputs(levels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        renoise_invert(exact_eps, Z0, levels, ALPHAS_CUMPROD, **kwargs)


def test_inverting_up_to_a_level_per_sample_is_the_full_trajectory_cut_there():
    levels = inversion_levels(5)
    top = torch.tensor([0, 4, 2, 2])
    seen = []

    def eps(z, t, rows):
        seen.append(len(rows))
        return exact_eps(z, t)

    part = renoise_invert_to(eps, Z0, levels, top, ALPHAS_CUMPROD, 1, "mean")
    full = renoise_invert(exact_eps, Z0, levels, ALPHAS_CUMPROD, 1, "mean")
    for b, k in enumerate(top.tolist()):
        torch.testing.assert_close(part[:k + 1, b], full[:k + 1, b], rtol=0, atol=1e-6)
        assert part[k + 1:, b].isnan().all()
    # The authors' online cost: (top + 1) levels x 2 predictions per sample, not K x 2.
    assert sum(seen) == 2 * (1 + 5 + 3 + 3)
    with pytest.raises(ValueError, match="top must hold one level index"):
        renoise_invert_to(eps, Z0, levels, torch.tensor([0, 5, 1, 1]), ALPHAS_CUMPROD)
