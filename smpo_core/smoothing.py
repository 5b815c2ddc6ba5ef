"""Smoothed preference labels from reward scores (METHOD.md §2).

A reward model scores both images of a pair; the scores are normalised with bounds
(r_min, r_max), turned into the smoothed probability p that image 0 is preferred, and into
the loss weight w = gamma * (2p - 1).

The three label functions accept python floats, numpy arrays or torch tensors and return the
same kind they were given, so the score stage (numpy / Arrow) and the train stage (torch) share
one definition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

# The paper's bounds for raw PickScore (cosine similarity, no logit scale) on Pick-a-Pic v2.
PICKSCORE_BOUNDS: tuple[float, float] = (0.11543526500463486, 0.28201571106910706)

Scores = TypeVar("Scores", float, np.ndarray, torch.Tensor)
ScoreCollection = np.ndarray | torch.Tensor | Sequence[float]

BOUND_KINDS = ("paper", "fitted", "fitted-quantile", "model")


def _check_bounds(r_min: float, r_max: float) -> None:
    if not (math.isfinite(r_min) and math.isfinite(r_max)) or r_max <= r_min:
        raise ValueError(
            f"reward bounds must be finite with r_max > r_min, got r_min={r_min}, r_max={r_max}"
        )


def _sigmoid(x: Scores) -> Scores:
    if isinstance(x, torch.Tensor):
        return torch.sigmoid(x)
    if isinstance(x, np.ndarray):
        # tanh form: no overflow warning for large |x|, unlike 1 / (1 + exp(-x)).
        return 0.5 * (1.0 + np.tanh(0.5 * x))
    return 0.5 * (1.0 + math.tanh(0.5 * float(x)))


def normalise_reward(score: Scores, r_min: float, r_max: float) -> Scores:
    """r' = (r - r_min) / (r_max - r_min); any shape, same kind (float/ndarray/Tensor) out."""
    _check_bounds(r_min, r_max)
    return (score - r_min) / (r_max - r_min)


def smoothed_preference(score_0: Scores, score_1: Scores, r_min: float, r_max: float) -> Scores:
    """p = sigmoid(r'_0 - r'_1): the smoothed probability that image 0 is preferred.

    score_0, score_1: raw reward scores of image 0 and image 1, same shape (e.g. (B,)).
    Returns p with that shape, in (0, 1); p = 0.5 for equally scored images.
    """
    return _sigmoid(
        normalise_reward(score_0, r_min, r_max) - normalise_reward(score_1, r_min, r_max)
    )


def smoothed_weight(p: Scores, gamma: float = 10.0) -> Scores:
    """w = gamma * (2p - 1): the loss weight; positive when image 0 is preferred.

    For scores inside the bounds |r'_0 - r'_1| <= 1, hence |w| <= gamma * (2 sigmoid(1) - 1).
    """
    return gamma * (2.0 * p - 1.0)


def fit_bounds(
    scores: ScoreCollection, method: str = "minmax", q: float = 0.01
) -> tuple[float, float]:
    """Fit (r_min, r_max) on scored data, for reward models without published bounds.

    scores: every image's score, any shape (flattened). method "minmax" takes the extremes;
    "quantile" takes the q and 1 - q quantiles so a few outlier images don't stretch the range
    (and flatten every weight towards 0).
    """
    if isinstance(scores, torch.Tensor):
        values = scores.detach().to(torch.float64).cpu().numpy().ravel()
    else:
        values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("cannot fit reward bounds on an empty set of scores")
    if not np.all(np.isfinite(values)):
        bad = int(np.sum(~np.isfinite(values)))
        raise ValueError(
            f"cannot fit reward bounds: {bad} of {values.size} scores are NaN or infinite; "
            "drop the images that failed to score first"
        )
    if method == "minmax":
        r_min, r_max = float(values.min()), float(values.max())
    elif method == "quantile":
        if not 0.0 < q < 0.5:
            raise ValueError(f"quantile q must lie in (0, 0.5), got {q}")
        r_min, r_max = (float(v) for v in np.quantile(values, [q, 1.0 - q]))
    else:
        raise ValueError(f"unknown bounds method {method!r}; expected 'minmax' or 'quantile'")
    if r_max <= r_min:
        raise ValueError(
            f"fitted reward bounds are degenerate (r_min={r_min}, r_max={r_max}): the scores "
            f"have no spread ({values.size} values); score more images or use other bounds"
        )
    return r_min, r_max


@dataclass(frozen=True)
class SmoothingBounds:
    """The normalisation bounds used for a run, with where they came from (for the record)."""

    r_min: float
    r_max: float
    source: str  # "paper", "fitted-minmax", "fitted-quantile" or "model"

    def __post_init__(self) -> None:
        _check_bounds(self.r_min, self.r_max)


def resolve_bounds(
    kind: str,
    scores: ScoreCollection | None = None,
    suggested: tuple[float, float] | None = None,
    q: float = 0.01,
) -> SmoothingBounds:
    """Pick the bounds named by `kind`.

    "paper": PICKSCORE_BOUNDS (only meaningful for raw PickScore); "fitted": min/max of
    `scores`; "fitted-quantile": the q / 1 - q quantiles of `scores`; "model": `suggested`,
    the bounds the reward model declares.
    """
    if kind == "paper":
        return SmoothingBounds(*PICKSCORE_BOUNDS, source="paper")
    if kind in ("fitted", "fitted-quantile"):
        if scores is None:
            raise ValueError(f"bounds kind {kind!r} needs the scored data (scores=...)")
        method = "minmax" if kind == "fitted" else "quantile"
        return SmoothingBounds(*fit_bounds(scores, method, q), source=f"fitted-{method}")
    if kind == "model":
        if suggested is None:
            raise ValueError(
                "bounds kind 'model' needs the reward model's suggested (r_min, r_max); this "
                "model suggests none, so use 'fitted' or 'fitted-quantile'"
            )
        r_min, r_max = suggested
        return SmoothingBounds(float(r_min), float(r_max), source="model")
    raise ValueError(f"unknown bounds kind {kind!r}; expected one of {', '.join(BOUND_KINDS)}")
