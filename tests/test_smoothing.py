import math

import numpy as np
import pytest
import torch

from smpo_core.smoothing import (
    PICKSCORE_BOUNDS,
    SmoothingBounds,
    fit_bounds,
    normalise_reward,
    resolve_bounds,
    smoothed_preference,
    smoothed_weight,
)

R_MIN, R_MAX = PICKSCORE_BOUNDS
W_MAX = 4.6211715726000975  # 10 * (2 sigmoid(1) - 1)


def test_normalise_maps_paper_bounds_to_unit_interval():
    assert normalise_reward(R_MIN, R_MIN, R_MAX) == 0.0
    assert normalise_reward(R_MAX, R_MIN, R_MAX) == pytest.approx(1.0)
    assert normalise_reward(0.2, R_MIN, R_MAX) == pytest.approx(
        (0.2 - 0.11543526500463486) / 0.1665804460644722
    )


@pytest.mark.parametrize(
    ("score_0", "score_1", "p", "w"),
    [
        (0.2, 0.2, 0.5, 0.0),  # equally good images carry no preference
        (R_MAX, R_MIN, 0.7310585786300049, W_MAX),  # r'_0 - r'_1 = 1
        (R_MIN, R_MAX, 1 - 0.7310585786300049, -W_MAX),
        # r'_0 - r'_1 = -0.1 / 0.16658... = -0.60031
        (0.15, 0.25, 0.3542726469387135, -2.9145470612257296),
    ],
)
def test_hand_computed_preference_and_weight(score_0, score_1, p, w):
    got_p = smoothed_preference(score_0, score_1, R_MIN, R_MAX)
    assert got_p == pytest.approx(p, abs=1e-12)
    assert smoothed_weight(got_p) == pytest.approx(w, abs=1e-10)


def test_gamma_scales_weight():
    assert smoothed_weight(0.75, gamma=4.0) == pytest.approx(2.0)


def test_weight_bounded_for_scores_inside_bounds():
    rng = np.random.default_rng(0)
    s0, s1 = rng.uniform(R_MIN, R_MAX, size=(2, 10_000))
    w = smoothed_weight(smoothed_preference(s0, s1, R_MIN, R_MAX))
    assert np.abs(w).max() <= W_MAX
    assert np.abs(w).max() > 4.0  # the bound is nearly reached, so it is the right bound


def test_kind_in_equals_kind_out_and_values_agree():
    s0, s1 = [0.21, 0.18, 0.25], [0.19, 0.22, 0.25]
    p_np = smoothed_preference(np.array(s0), np.array(s1), R_MIN, R_MAX)
    p_t = smoothed_preference(
        torch.tensor(s0, dtype=torch.float64), torch.tensor(s1, dtype=torch.float64), R_MIN, R_MAX
    )
    p_f = [smoothed_preference(a, b, R_MIN, R_MAX) for a, b in zip(s0, s1, strict=True)]
    assert isinstance(p_np, np.ndarray)
    assert isinstance(p_t, torch.Tensor)
    assert all(isinstance(p, float) for p in p_f)
    np.testing.assert_allclose(p_np, p_t.numpy(), atol=1e-12)
    np.testing.assert_allclose(p_np, p_f, atol=1e-12)
    assert isinstance(smoothed_weight(p_np), np.ndarray)
    assert isinstance(smoothed_weight(p_t), torch.Tensor)
    assert isinstance(smoothed_weight(p_f[0]), float)


def test_numpy_sigmoid_saturates_without_overflow():
    with np.errstate(all="raise"):
        p = smoothed_preference(np.array([1e4, -1e4]), np.array([0.0, 0.0]), R_MIN, R_MAX)
    np.testing.assert_array_equal(p, [1.0, 0.0])


def test_degenerate_bounds_rejected():
    with pytest.raises(ValueError, match="r_max > r_min"):
        smoothed_preference(0.2, 0.1, 0.3, 0.3)


def test_fit_bounds_minmax():
    assert fit_bounds([0.3, 0.1, 0.2]) == (0.1, 0.3)
    assert fit_bounds(torch.tensor([[0.5, -1.0], [2.0, 0.0]])) == (-1.0, 2.0)


def test_fit_bounds_quantile_resists_outlier():
    scores = np.append(np.arange(100) / 100, 100.0)  # 0.00 .. 0.99 and one outlier
    assert fit_bounds(scores, "minmax") == (0.0, 100.0)
    r_min, r_max = fit_bounds(scores, "quantile", q=0.01)
    assert r_min == pytest.approx(0.01)
    assert r_max == pytest.approx(0.99)


@pytest.mark.parametrize(
    ("scores", "kwargs", "message"),
    [
        ([], {}, "empty"),
        ([0.2, 0.2, 0.2], {}, "degenerate"),
        ([0.1, float("nan")], {}, "NaN"),
        ([0.1, 0.2], {"method": "median"}, "'minmax' or 'quantile'"),
        ([0.1, 0.2], {"method": "quantile", "q": 0.5}, r"\(0, 0.5\)"),
    ],
)
def test_fit_bounds_errors(scores, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_bounds(scores, **kwargs)


def test_resolve_bounds_kinds():
    scores = np.append(np.arange(100) / 100, 100.0)
    assert resolve_bounds("paper") == SmoothingBounds(R_MIN, R_MAX, "paper")
    assert resolve_bounds("fitted", scores=scores) == SmoothingBounds(0.0, 100.0, "fitted-minmax")
    quantile = resolve_bounds("fitted-quantile", scores=scores)
    assert quantile.source == "fitted-quantile"
    assert (quantile.r_min, quantile.r_max) == pytest.approx((0.01, 0.99))
    assert resolve_bounds("model", suggested=(0.0, 1.0)) == SmoothingBounds(0.0, 1.0, "model")


def test_resolve_bounds_errors():
    with pytest.raises(ValueError, match="paper, fitted, fitted-quantile, model"):
        resolve_bounds("pickscore")
    with pytest.raises(ValueError, match="scores"):
        resolve_bounds("fitted")
    with pytest.raises(ValueError, match="suggested"):
        resolve_bounds("model")
    with pytest.raises(ValueError, match="r_max > r_min"):
        SmoothingBounds(1.0, math.nan, "model")
