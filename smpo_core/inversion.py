"""Trajectory estimates: DDIM inversion with ReNoise refinement, and forward noising (METHOD.md §3).

Conventions:
- `alphas_cumprod` is the model's training schedule, shape (T,); level t has abar_t =
  alphas_cumprod[t]. The clean latent z_0 sits "below" level 0 with abar = 1 and is given to
  the noise predictor at timestep 0.
- A noise predictor `eps_fn(z, t)` takes a batched latent z (B, C, H, W) and a python int
  timestep and returns the conditional noise prediction (no classifier-free guidance) with
  z's shape, in any float dtype. Casting z to the model's dtype is the caller's business.
- The step arithmetic runs in float32 (or float64 if given) whatever the model's dtype, and the
  functions return that dtype: fp16/bf16 rounding compounds over the K steps otherwise.
- abar arguments are python floats, 0-d tensors, or per-sample tensors of shape (B,), which
  are broadcast over the trailing latent dims.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence

import torch

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]
Abar = float | torch.Tensor

RENOISE_AVERAGES = ("mean", "last")


def _working(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _expand(abar: Abar, like: torch.Tensor) -> torch.Tensor:
    """abar as a tensor of like's dtype/device that broadcasts over like (B, C, H, W).

    A (B,) tensor gets trailing singleton dims; a plain reshape would broadcast it against the
    last dim instead of the batch dim.
    """
    a = torch.as_tensor(abar, dtype=like.dtype, device=like.device)
    return a.reshape(a.shape + (1,) * (like.dim() - a.dim()))


def ddim_inverse_step(
    z: torch.Tensor, eps: torch.Tensor, abar_from: Abar, abar_to: Abar
) -> torch.Tensor:
    """Deterministic DDIM step from noise level abar_from to abar_to with noise prediction eps.

    z0_hat = (z - sqrt(1 - abar_from) eps) / sqrt(abar_from);
    returns sqrt(abar_to) z0_hat + sqrt(1 - abar_to) eps.
    z, eps: (B, C, H, W) (any shape, same for both). abar_from = 1 for the clean latent.
    The map is the same in both directions: with abar_to > abar_from it is a DDIM sampling step.
    Returns z's shape in at least float32.
    """
    dtype = torch.promote_types(torch.promote_types(z.dtype, eps.dtype), torch.float32)
    z, eps = z.to(dtype), eps.to(dtype)
    a_from, a_to = _expand(abar_from, z), _expand(abar_to, z)
    z0_hat = (z - (1.0 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * z0_hat + (1.0 - a_to).sqrt() * eps


def inversion_levels(num_levels: int, num_train_timesteps: int = 1000) -> list[int]:
    """K training timesteps spaced T/K apart, increasing, ending at T - 1.

    Level k (k = 1..K) is round(k T / K) - 1, rounding halves up: for K = 5, T = 1000 that is
    [199, 399, 599, 799, 999]. This is the "trailing" spacing (Lin et al. 2023, Table 2), so the
    last level is the noisiest one the model was trained on and the trajectory spans the whole
    chain. We compute it ourselves so cached trajectories don't move with a diffusers release.
    """
    num_levels, T = operator.index(num_levels), operator.index(num_train_timesteps)
    if not 1 <= num_levels <= T:
        raise ValueError(f"num_levels must lie in [1, {T}] (num_train_timesteps), got {num_levels}")
    # Integer arithmetic: round-half-up of k*T/K without float error.
    return [(2 * k * T + num_levels) // (2 * num_levels) - 1 for k in range(1, num_levels + 1)]


def _check_levels(levels: Sequence[int], alphas_cumprod: torch.Tensor) -> list[int]:
    if alphas_cumprod.dim() != 1:
        raise ValueError(
            f"alphas_cumprod must be the 1-D training schedule (T,), got shape "
            f"{tuple(alphas_cumprod.shape)}"
        )
    T = alphas_cumprod.shape[0]
    try:
        checked = [operator.index(t) for t in levels]
    except TypeError as err:
        raise ValueError(f"levels must be integer timesteps, got {list(levels)!r}") from err
    if not checked:
        raise ValueError("levels is empty; pass at least one timestep, e.g. inversion_levels(5)")
    if checked[0] < 0 or checked[-1] >= T:
        raise ValueError(f"levels must lie in [0, {T - 1}] (the schedule's length), got {checked}")
    if any(b <= a for a, b in itertools.pairwise(checked)):
        raise ValueError(f"levels must be strictly increasing, got {checked}")
    return checked


@torch.no_grad()
def renoise_invert(
    eps_fn: EpsFn,
    z0: torch.Tensor,
    levels: Sequence[int],
    alphas_cumprod: torch.Tensor,
    renoise_steps: int = 1,
    average: str = "mean",
) -> torch.Tensor:
    """Invert clean latents z0 to the noise levels `levels` with DDIM + ReNoise.

    z0: (B, C, H, W) clean VAE latents. levels: K strictly increasing timesteps, e.g.
    inversion_levels(K). alphas_cumprod: (T,).
    Each step a -> b (a = clean with abar 1 and timestep 0 for the first) starts from plain
    DDIM, e_0 = eps(z_a, a); then renoise_steps times: e_i = eps(z_b^(i-1), b) and z_b^(i) is the
    DDIM step from z_a with e = mean(e_0..e_i) (average="mean", the authors' SmPO code) or
    e = e_i (average="last", the ReNoise fixed-point iteration, which converges to the exact
    inverse of the DDIM sampling step b -> a). renoise_steps=0 is plain DDIM inversion.
    eps_fn is called K * (1 + renoise_steps) times. The trajectory is a fixed target, so this
    runs without autograd.
    Returns (K, B, C, H, W) in at least float32: the latents at levels[0], ..., levels[-1].
    """
    checked = _check_levels(levels, alphas_cumprod)
    if average not in RENOISE_AVERAGES:
        raise ValueError(f"average must be one of {RENOISE_AVERAGES}, got {average!r}")
    if operator.index(renoise_steps) < 0:
        raise ValueError(f"renoise_steps must be >= 0 (0 is plain DDIM), got {renoise_steps}")
    abar = alphas_cumprod.tolist()

    z_a, t_a, abar_a = _working(z0), 0, 1.0
    trajectory = []
    for t_b in checked:
        z_b = _renoise_step(eps_fn, z_a, t_a, abar_a, t_b, abar[t_b], renoise_steps, average)
        trajectory.append(z_b)
        z_a, t_a, abar_a = z_b, t_b, abar[t_b]
    return torch.stack(trajectory)


def _renoise_step(eps_fn: EpsFn, z_a: torch.Tensor, t_a: int, abar_a: Abar, t_b: int,
                  abar_b: float, renoise_steps: int, average: str) -> torch.Tensor:
    """One inversion step a -> b: plain DDIM, then `renoise_steps` ReNoise refinements."""
    e_sum = eps_fn(z_a, t_a).to(z_a.dtype)
    z_b = ddim_inverse_step(z_a, e_sum, abar_a, abar_b)
    for i in range(1, renoise_steps + 1):
        e_i = eps_fn(z_b, t_b).to(z_a.dtype)
        e_sum = e_sum + e_i
        e = e_sum / (i + 1) if average == "mean" else e_i
        z_b = ddim_inverse_step(z_a, e, abar_a, abar_b)
    return z_b


@torch.no_grad()
def renoise_invert_to(
    eps_fn: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    levels: Sequence[int],
    top: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    renoise_steps: int = 1,
    average: str = "mean",
) -> torch.Tensor:
    """renoise_invert, but sample b only up to level index top[b]: the work a training step
    that reads level top[b] needs (the authors' online inversion stops at the sampled level).

    eps_fn(z, t, rows) predicts the noise of the samples `rows` (indices into the batch, a
    (n,) long tensor) given their latents z (n, C, H, W). top: (B,) level indices in [0, K).
    Each step runs only the samples still climbing, so eps_fn sees sum_b (top[b] + 1) (1 + R)
    samples in all, against B K (1 + R) for renoise_invert; top[b] = -1 inverts nothing of
    sample b. Returns (K, B, C, H, W) like
    renoise_invert, with the same values at every level <= top[b] and NaN above it (never
    computed: reading one is a bug the NaN makes loud).
    """
    checked = _check_levels(levels, alphas_cumprod)
    if average not in RENOISE_AVERAGES:
        raise ValueError(f"average must be one of {RENOISE_AVERAGES}, got {average!r}")
    top = torch.as_tensor(top, dtype=torch.long).cpu()
    if top.shape != (z0.shape[0],) or top.min() < -1 or top.max() >= len(checked):
        raise ValueError(f"top must hold one level index in [-1, {len(checked) - 1}] per "
                         f"sample ({z0.shape[0]}), got {top.tolist()}")
    abar = alphas_cumprod.tolist()
    z_a = _working(z0)
    # Each level like z_a, memory format included: a VAE hands out channels-last latents, and
    # a convolution over another layout rounds differently, so the levels kept would not be
    # renoise_invert's bit for bit.
    trajectory = [torch.full_like(z_a, float("nan")) for _ in checked]
    t_a, abar_a = 0, 1.0
    for j, t_b in enumerate(checked[:int(top.max()) + 1]):
        rows = (top >= j).nonzero().squeeze(1)
        every = len(rows) == len(top)
        z_rows = z_a if every else z_a[rows.to(z_a.device)]

        def eps(z: torch.Tensor, t: int, rows: torch.Tensor = rows) -> torch.Tensor:
            return eps_fn(z, t, rows)

        z_b = _renoise_step(eps, z_rows, t_a, abar_a, t_b, abar[t_b], renoise_steps, average)
        if every:
            trajectory[j] = z_b
        else:
            trajectory[j][rows.to(z_a.device)] = z_b
        z_a, t_a, abar_a = trajectory[j], t_b, abar[t_b]
    return torch.stack(trajectory)


@torch.no_grad()
def ddim_sample_from_levels(
    eps_fn: EpsFn, z_T: torch.Tensor, levels: Sequence[int], alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Deterministic DDIM sampling from z_T at levels[-1] down through `levels` to the clean latent.

    The exact reverse of renoise_invert's grid: each step b -> a uses e = eps(z_b, b), and the
    last step lands on abar = 1. z_T: (B, C, H, W). Returns z_0 estimate (B, C, H, W) in at
    least float32.
    """
    checked = _check_levels(levels, alphas_cumprod)
    abar = alphas_cumprod.tolist()
    z = _working(z_T)
    # Step b -> a lands on the level below b, and on abar = 1 (clean) below the first level.
    below = [1.0, *(abar[t] for t in checked[:-1])]
    for t_b, abar_a in zip(reversed(checked), reversed(below), strict=True):
        z = ddim_inverse_step(z, eps_fn(z, t_b).to(z.dtype), abar[t_b], abar_a)
    return z


def implied_noise(z_t: torch.Tensor, z0: torch.Tensor, abar_t: Abar) -> torch.Tensor:
    """tau_t = (z_t - sqrt(abar_t) z0) / sqrt(1 - abar_t): the noise target at level t.

    z_t, z0: (B, C, H, W); abar_t < 1. Returns (B, C, H, W) in at least float32.
    """
    z_t, z0 = _working(z_t), _working(z0)
    a = _expand(abar_t, z_t)
    return (z_t - a.sqrt() * z0) / (1.0 - a).sqrt()


def forward_noise(z0: torch.Tensor, noise: torch.Tensor, abar_t: Abar) -> torch.Tensor:
    """A sample of q(z_t | z_0): sqrt(abar_t) z0 + sqrt(1 - abar_t) noise (Diffusion-DPO's z_t).

    z0, noise: (B, C, H, W). Returns (B, C, H, W) in at least float32; implied_noise of the
    result recovers `noise`.
    """
    z0, noise = _working(z0), _working(noise)
    a = _expand(abar_t, z0)
    return a.sqrt() * z0 + (1.0 - a).sqrt() * noise


#: What a UNet's output can stand for (its scheduler's `prediction_type`) that we train and
#: invert: the noise, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0 (Salimans & Ho 2022).
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prediction_type(prediction_type: str, model: str) -> str:
    """The prediction type, or a ValueError naming the model and what is supported."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{model}: its scheduler's prediction_type is {prediction_type!r}; "
                         f"expected one of {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def prediction_target(prediction_type: str, z0: torch.Tensor, noise: torch.Tensor,
                      abar_t: Abar) -> torch.Tensor:
    """What the UNet should output for z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise:
    the noise (epsilon) or v = sqrt(abar_t) noise - sqrt(1 - abar_t) z0 (v_prediction).

    z0, noise: (B, ...) same shape. Returns that shape in at least float32.
    """
    check_prediction_type(prediction_type, "prediction_target")
    if prediction_type == "epsilon":
        return _working(noise)
    z0, noise = _working(z0), _working(noise)
    a = _expand(abar_t, z0)
    return a.sqrt() * noise - (1.0 - a).sqrt() * z0


def noise_from_prediction(prediction_type: str, pred: torch.Tensor, z_t: torch.Tensor,
                          abar_t: Abar) -> torch.Tensor:
    """The noise eps a UNet's output implies at z_t: the output itself (epsilon), or
    sqrt(abar_t) v + sqrt(1 - abar_t) z_t (v_prediction). For inversion with either kind."""
    check_prediction_type(prediction_type, "noise_from_prediction")
    if prediction_type == "epsilon":
        return pred
    pred, z_t = _working(pred), _working(z_t)
    a = _expand(abar_t, z_t)
    return a.sqrt() * pred + (1.0 - a).sqrt() * z_t
