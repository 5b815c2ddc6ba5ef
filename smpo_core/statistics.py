"""How sure an evaluation is (METHOD.md §5): per model the mean and median score; per model
against the reference (the base) the paired difference of means and the win rate, each with a
percentile-bootstrap interval.

Scores come as (P, K) arrays: P prompts, K images per prompt, image k of prompt p drawn from the
same seed for every model, so models are compared image by image (paired). The bootstrap
resamples prompts, not images: images of one prompt share its difficulty, and resampling them
independently would make the intervals too narrow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95
ALL = "all"  # the group of every prompt, beside one group per style
_BLOCK = 256  # resamples drawn at a time: memory stays at _BLOCK x P indices


def win_rate(other: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of paired images where `other` scores above `reference`; ties count half."""
    other, reference = np.asarray(other, dtype=float), np.asarray(reference, dtype=float)
    if other.size == 0:
        return float("nan")
    return float(np.mean((other > reference) + 0.5 * (other == reference)))


def describe(scores: np.ndarray) -> dict[str, float]:
    """Mean and median over every image, and how many images."""
    values = np.asarray(scores, dtype=float).ravel()
    return {"mean": float(np.mean(values)), "median": float(np.median(values)),
            "n_images": int(values.size)}


def _bootstrap_means(per_prompt: np.ndarray, resamples: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Means of `resamples` resamples (with replacement) of the per-prompt values, (B, ...)."""
    count = per_prompt.shape[0]
    means = []
    for start in range(0, resamples, _BLOCK):
        picks = rng.integers(0, count, size=(min(_BLOCK, resamples - start), count))
        means.append(per_prompt[picks].mean(axis=1))
    return np.concatenate(means)


def _interval(samples: np.ndarray, confidence: float) -> list[float]:
    low, high = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2])
    return [float(low), float(high)]


def paired_comparison(reference: np.ndarray, other: np.ndarray, resamples: int, seed: int,
                      confidence: float = CONFIDENCE) -> dict[str, object]:
    """`other` against `reference`, both (P, K): the mean paired difference (other minus
    reference) and the win rate (ties half), each with its percentile-bootstrap interval over
    prompts. The same `seed` draws the same resamples, so two metrics or two models are
    resampled alike."""
    reference = np.asarray(reference, dtype=float)
    other = np.asarray(other, dtype=float)
    if reference.shape != other.shape or reference.ndim != 2:
        raise ValueError(f"paired scores must be (prompts, images) arrays of one shape; got "
                         f"{reference.shape} and {other.shape}")
    diff = (other - reference).mean(axis=1)
    wins = ((other > reference) + 0.5 * (other == reference)).mean(axis=1)
    rng = np.random.default_rng(seed)
    boot = _bootstrap_means(np.stack([diff, wins], axis=1), resamples, rng)
    return {
        "diff_mean": float(diff.mean()), "diff_ci": _interval(boot[:, 0], confidence),
        "win_rate": float(wins.mean()), "win_rate_ci": _interval(boot[:, 1], confidence),
        "n_prompts": int(reference.shape[0]), "n_images": int(reference.size),
    }


def compare_group(scores: Mapping[str, np.ndarray], reference: str, resamples: int,
                  seed: int, confidence: float = CONFIDENCE) -> dict[str, object]:
    """One metric on one group of prompts: each model described, each other model against
    `reference`."""
    first = scores[reference]
    return {
        "n_prompts": int(first.shape[0]), "n_images": int(first.size),
        "models": {label: describe(values) for label, values in scores.items()},
        "vs_reference": {label: paired_comparison(first, values, resamples, seed, confidence)
                         for label, values in scores.items() if label != reference},
    }


def summarise_metric(scores: Mapping[str, np.ndarray], reference: str,
                     styles: Sequence[str] | None, resamples: int, seed: int,
                     confidence: float = CONFIDENCE) -> dict[str, dict]:
    """One metric, every prompt (`all`) and, for a styled prompt set, each style on its own
    (HPS v2 reports its benchmark per style and overall)."""
    groups = {ALL: compare_group(scores, reference, resamples, seed, confidence)}
    if styles is not None:
        labels = np.asarray(styles)
        for style in dict.fromkeys(styles):
            mask = labels == style
            groups[style] = compare_group({k: v[mask] for k, v in scores.items()},
                                          reference, resamples, seed, confidence)
    return groups
