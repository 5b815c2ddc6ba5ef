"""The statistics of an evaluation: numbers worked out by hand, bootstrap intervals that cover
a known difference as often as they promise, and the per-style split."""

from __future__ import annotations

import math

import numpy as np
import pytest

from smpo_core.statistics import compare_group, paired_comparison, summarise_metric, win_rate


def test_win_rate_counts_ties_half():
    tuned = np.array([1.0, 2.0, 3.0, 4.0])
    base = np.array([0.0, 2.0, 5.0, 1.0])
    assert win_rate(tuned, base) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_paired_comparison_by_hand():
    # Two prompts, two images each, paired by seed.
    base = np.array([[1.0, 2.0], [3.0, 5.0]])
    tuned = np.array([[2.0, 2.0], [1.0, 9.0]])
    result = paired_comparison(base, tuned, resamples=500, seed=0)
    # Differences 1, 0, -2, 4: mean 0.75; wins 1, 0.5, 0, 1: win rate 0.625.
    assert result["diff_mean"] == pytest.approx(0.75)
    assert result["win_rate"] == pytest.approx(0.625)
    assert (result["n_prompts"], result["n_images"]) == (2, 4)
    # Resampling prompts: a resample holds prompt 0 twice (0.5, 0.75), prompt 1 twice (1.0,
    # 0.5) or one each; the interval lies within those extremes.
    assert 0.5 <= result["diff_ci"][0] <= result["diff_ci"][1] <= 1.0
    assert 0.5 <= result["win_rate_ci"][0] <= result["win_rate_ci"][1] <= 0.75
    assert paired_comparison(base, tuned, 500, seed=0) == result  # seeded: reproducible


def test_group_describes_every_model_and_pairs_the_others_with_the_reference():
    scores = {"base": np.array([[1.0], [2.0], [9.0]]), "tuned": np.array([[2.0], [2.0], [3.0]])}
    group = compare_group(scores, "base", resamples=200, seed=0)
    assert group["models"]["base"] == {"mean": 4.0, "median": 2.0, "n_images": 3}
    assert group["models"]["tuned"]["mean"] == pytest.approx(7 / 3)
    assert list(group["vs_reference"]) == ["tuned"]
    assert group["vs_reference"]["tuned"]["win_rate"] == pytest.approx(0.5)


def _simulate(rng, prompts, images, difference):
    """Paired scores whose true mean difference is `difference`: each prompt shifts both of
    its images together (difficulty), so images of a prompt are correlated."""
    prompt_effect = rng.normal(0.0, 1.0, size=(prompts, 1))
    base = rng.normal(0.0, 1.0, size=(prompts, images))
    tuned = base + difference + prompt_effect + rng.normal(0.0, 0.5, size=(prompts, images))
    return base, tuned


def test_bootstrap_intervals_cover_the_true_difference_and_win_rate_95_percent_of_the_time():
    rng = np.random.default_rng(2024)
    difference, trials = 0.3, 400
    # tuned - base = difference + N(0, 1) + N(0, 0.5^2) per image: P(win) = Phi(d / sqrt(1.25)).
    true_win = 0.5 * (1 + math.erf(difference / math.sqrt(1.25) / math.sqrt(2)))
    covered_diff = covered_win = 0
    for trial in range(trials):
        base, tuned = _simulate(rng, prompts=60, images=3, difference=difference)
        result = paired_comparison(base, tuned, resamples=1000, seed=trial)
        covered_diff += result["diff_ci"][0] <= difference <= result["diff_ci"][1]
        covered_win += result["win_rate_ci"][0] <= true_win <= result["win_rate_ci"][1]
    # 400 trials: the binomial standard error of a 0.95 coverage is 0.011; a percentile
    # bootstrap over 60 prompts runs slightly under nominal (~0.94).
    assert 0.91 <= covered_diff / trials <= 0.98
    assert 0.91 <= covered_win / trials <= 0.98


def test_style_groups_split_prompts_and_keep_the_overall_group():
    styles = ["anime", "photo", "anime", "photo", "photo"]
    base = np.array([[1.0], [10.0], [3.0], [20.0], [30.0]])
    tuned = np.array([[2.0], [10.0], [1.0], [25.0], [29.0]])
    groups = summarise_metric({"base": base, "tuned": tuned}, "base", styles, 200, 0)
    assert list(groups) == ["all", "anime", "photo"]
    assert groups["anime"]["n_prompts"] == 2 and groups["photo"]["n_prompts"] == 3
    assert groups["anime"]["models"]["base"]["mean"] == pytest.approx(2.0)
    assert groups["photo"]["models"]["tuned"]["mean"] == pytest.approx(64 / 3)
    # anime: +1, -2 -> mean -0.5, win 0.5; photo: 0, +5, -1 -> mean 4/3, win (0.5 + 1 + 0)/3.
    assert groups["anime"]["vs_reference"]["tuned"]["diff_mean"] == pytest.approx(-0.5)
    assert groups["photo"]["vs_reference"]["tuned"]["win_rate"] == pytest.approx(0.5)
    assert groups["all"]["vs_reference"]["tuned"]["diff_mean"] == pytest.approx(3 / 5)
    assert summarise_metric({"base": base, "tuned": tuned}, "base", None, 200, 0).keys() == \
        {"all"}
