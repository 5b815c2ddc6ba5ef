import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smpo_core.losses import human_weight, per_image_mse, preference_loss, sft_loss
from smpo_core.smoothing import smoothed_weight


def dpo_loss(err_w, ref_w, err_l, ref_l, beta):
    """Diffusion-DPO's loss written from its paper, independently of preference_loss."""
    return -F.logsigmoid(-0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))).mean()


def random_errors(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    model_err = 0.1 + 0.05 * torch.rand(batch, 2, generator=g, dtype=torch.float64)
    ref_err = 0.1 + 0.05 * torch.rand(batch, 2, generator=g, dtype=torch.float64)
    return model_err.requires_grad_(), ref_err


def test_hand_computed_loss_and_metrics():
    beta = 2.0
    model_err = torch.tensor([[0.3, 0.5], [0.2, 0.1], [0.5, 0.1]], dtype=torch.float64)
    ref_err = torch.tensor([[0.4, 0.4], [0.1, 0.3], [0.1, 0.1]], dtype=torch.float64)
    weight = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    # d = -0.2, 0.3, 0.4; logits -0.5*beta*w*d = 0.2, 0.6, -0.2;
    # per-pair loss log(1 + e^-logit) = 0.5981388693815918, 0.4374879504858856, 0.7981388693815918
    loss, metrics = preference_loss(model_err, ref_err, weight, beta)
    assert loss.item() == pytest.approx(0.6112552297496897, abs=1e-12)
    assert metrics["loss"] == pytest.approx(0.6112552297496897, abs=1e-12)
    assert metrics["implicit_accuracy"] == pytest.approx(2 / 3)
    assert metrics["model_mse"] == pytest.approx(1.7 / 6)
    assert metrics["ref_mse"] == pytest.approx(1.4 / 6)
    assert metrics["mean_abs_weight"] == pytest.approx(3.5 / 3)
    # -0.5*beta*d*sign(w) = 0.2, 0.3, -0.4
    assert metrics["reward_margin"] == pytest.approx(0.1 / 3)
    assert all(isinstance(v, float) for v in metrics.values())


def test_weight_one_is_diffusion_dpo():
    model_err, ref_err = random_errors(16)
    loss, _ = preference_loss(model_err, ref_err, torch.ones(16), beta=2000.0)
    expected = dpo_loss(model_err[:, 0], ref_err[:, 0], model_err[:, 1], ref_err[:, 1], 2000.0)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_human_weight_gives_dpo_with_winner_in_either_column():
    model_err, ref_err = random_errors(6, seed=1)
    label_0 = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    loss, _ = preference_loss(model_err, ref_err, human_weight(label_0), beta=500.0)
    win = torch.as_tensor(label_0 == 0.0, dtype=torch.long)  # column of the winner
    rows = torch.arange(6)
    expected = dpo_loss(
        model_err[rows, win],
        ref_err[rows, win],
        model_err[rows, 1 - win],
        ref_err[rows, 1 - win],
        500.0,
    )
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_swapping_images_with_p_to_one_minus_p_leaves_loss_unchanged():
    model_err, ref_err = random_errors(32, seed=2)
    p = torch.rand(32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss, metrics = preference_loss(model_err, ref_err, smoothed_weight(p), beta=2000.0)
    swapped, swapped_metrics = preference_loss(
        model_err.flip(1), ref_err.flip(1), smoothed_weight(1 - p), beta=2000.0
    )
    torch.testing.assert_close(loss, swapped, rtol=1e-12, atol=1e-12)
    assert metrics["implicit_accuracy"] == swapped_metrics["implicit_accuracy"]
    assert metrics["reward_margin"] == pytest.approx(swapped_metrics["reward_margin"])


def test_equal_preference_gives_no_gradient():
    model_err, ref_err = random_errors(8, seed=4)
    weight = smoothed_weight(torch.full((8,), 0.5, dtype=torch.float64))
    loss, metrics = preference_loss(model_err, ref_err, weight, beta=2000.0)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2.0))
    assert torch.equal(model_err.grad, torch.zeros_like(model_err))
    assert metrics["implicit_accuracy"] == 0.5  # no decided pair: neutral by definition


def test_implicit_accuracy_matches_definition():
    model_err, ref_err = random_errors(200, seed=5)
    weight = torch.randn(200, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    weight[::10] = 0.0
    beta = 2000.0
    _, metrics = preference_loss(model_err, ref_err, weight, beta)
    d = (model_err[:, 0] - ref_err[:, 0]) - (model_err[:, 1] - ref_err[:, 1])
    logits = (-0.5 * beta * weight * d).tolist()
    decided = [x for x, w in zip(logits, weight.tolist(), strict=True) if w != 0.0]
    assert len(decided) == 180
    assert metrics["implicit_accuracy"] == pytest.approx(sum(x > 0 for x in decided) / 180)
    assert 0.0 < metrics["implicit_accuracy"] < 1.0


def test_gradient_reaches_model_err_and_is_finite_at_paper_beta():
    model_err = torch.tensor([[0.9, 0.01], [0.01, 0.9]], dtype=torch.float32, requires_grad=True)
    ref_err = torch.tensor([[0.01, 0.9], [0.9, 0.01]], dtype=torch.float32, requires_grad=True)
    # |logit| = 0.5 * 5000 * 4.6 * 1.78 ~ 1e4: log(sigmoid(.)) would underflow to -inf here
    loss, _ = preference_loss(model_err, ref_err, torch.tensor([4.6, -4.6]), beta=5000.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() > 1e3
    assert torch.isfinite(model_err.grad).all() and model_err.grad.abs().sum() > 0
    assert torch.isfinite(ref_err.grad).all()


def test_preference_loss_shape_errors():
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        preference_loss(torch.zeros(4), torch.zeros(4), torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="weight"):
        preference_loss(torch.zeros(4, 2), torch.zeros(4, 2), torch.ones(3), 1.0)


def test_per_image_mse():
    pred = torch.zeros(2, 1, 2, 2, dtype=torch.float16)
    target = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[0.0, 2.0], [0.0, 0.0]]]])
    err = per_image_mse(pred, target)
    assert err.dtype == torch.float32
    torch.testing.assert_close(err, torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="shapes differ"):
        per_image_mse(pred, target[:1])


def test_sft_loss_is_mean_winner_error():
    err = torch.tensor([0.1, 0.3], requires_grad=True)
    loss, metrics = sft_loss(err)
    loss.backward()
    assert loss.item() == pytest.approx(0.2)
    assert metrics == {"loss": pytest.approx(0.2), "model_mse": pytest.approx(0.2)}
    torch.testing.assert_close(err.grad, torch.tensor([0.5, 0.5]))


def test_human_weight():
    w = human_weight(torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    assert w.dtype == torch.float32
    assert w.tolist() == [1.0, -1.0, 1.0]
    with pytest.raises(ValueError, match="Ties"):
        human_weight(np.array([1.0, 0.5, 0.0]))
