"""The SmPO / Diffusion-DPO preference loss and the SFT baseline (METHOD.md §4).

Errors are per image: m_j and r_j are the policy's and the reference's mean squared errors
against the noise target of image j of a pair (column 0: image 0, column 1: image 1).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def per_image_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample over all non-batch dims, in float32.

    pred, target: (B, ...) same shape. Returns (B,). float32 because fp16 squares of
    near-identical predictions underflow and the DPO loss lives on their differences.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    diff = pred.float() - target.float()
    return diff.square().reshape(diff.shape[0], -1).mean(dim=1)


def preference_loss(
    model_err: torch.Tensor, ref_err: torch.Tensor, weight: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Smoothed preference loss L = -log sigmoid(-0.5 beta w d), mean over pairs.

    model_err, ref_err: (B, 2) per-image MSEs of the policy and the frozen reference.
    weight: (B,) w = gamma (2p - 1) from smoothing.smoothed_weight; w = +1 with image 0 the
    human winner is Diffusion-DPO. d = (m_0 - r_0) - (m_1 - r_1).
    Returns the scalar loss and metrics (python floats): loss, implicit_accuracy (fraction of
    pairs with w != 0 whose logit -0.5 beta w d is > 0; 0.5 when every w is 0), model_mse,
    ref_mse, mean_abs_weight, reward_margin (mean of -0.5 beta d sign(w)).
    """
    if model_err.dim() != 2 or model_err.shape[1] != 2 or ref_err.shape != model_err.shape:
        raise ValueError(
            "model_err and ref_err must both be (B, 2) per-image errors, got "
            f"{tuple(model_err.shape)} and {tuple(ref_err.shape)}"
        )
    if weight.shape != model_err.shape[:1]:
        raise ValueError(
            f"weight must be (B,) = ({model_err.shape[0]},), got {tuple(weight.shape)}"
        )
    weight = weight.to(model_err.dtype)
    d = (model_err[:, 0] - ref_err[:, 0]) - (model_err[:, 1] - ref_err[:, 1])
    logits = -0.5 * beta * weight * d
    # logsigmoid rather than log(sigmoid(.)): beta ~ 2000 makes the logits large.
    loss = -F.logsigmoid(logits).mean()

    with torch.no_grad():
        decided = weight != 0
        n_decided = int(decided.sum())
        accuracy = float(((logits > 0) & decided).sum()) / n_decided if n_decided else 0.5
        metrics = {
            "loss": float(loss),
            "implicit_accuracy": accuracy,
            "model_mse": float(model_err.mean()),
            "ref_mse": float(ref_err.mean()),
            "mean_abs_weight": float(weight.abs().mean()),
            "reward_margin": float((-0.5 * beta * d * weight.sign()).mean()),
        }
    return loss, metrics


def sft_loss(model_err_winner: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain denoising loss on the human winner (the SFT baseline).

    model_err_winner: (B,) per-image MSEs of the policy on the winning images.
    Returns the mean and metrics {"loss", "model_mse"} (equal here; named alike for logging).
    """
    loss = model_err_winner.mean()
    value = float(loss.detach())
    return loss, {"loss": value, "model_mse": value}


def human_weight(label_0: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Diffusion-DPO's hard label as a weight: +1 where image 0 won, -1 where image 1 won.

    label_0: (B,) Pick-a-Pic label_0, 1.0 or 0.0. Ties (0.5) are dropped by the download
    stage, so any other value means the data skipped that step. Returns (B,) float32.
    """
    label = torch.as_tensor(label_0, dtype=torch.float64)
    valid = (label == 1.0) | (label == 0.0)
    if not bool(valid.all()):
        bad = sorted({float(v) for v in label[~valid].tolist()})
        raise ValueError(
            f"label_0 must be 1.0 (image 0 won) or 0.0 (image 1 won); got {bad} in "
            f"{int((~valid).sum())} of {label.numel()} pairs. Ties (0.5) must be dropped upstream"
        )
    return (2.0 * label - 1.0).to(torch.float32)
