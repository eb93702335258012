"""PPO with a critic: GAE and the clipped value loss against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from twinkle.advantage.gae import gae, whiten
from twinkle.loss.value import ValueLoss
from twinkle.runtime import get_registry


def test_gae_by_hand():
    # rewards [0, 0, 1], values [0.5, 0.2, 0.4], gamma 0.9, lam 0.5, V_3 = 0
    # deltas: 0 + 0.9*0.2 - 0.5 = -0.32; 0 + 0.9*0.4 - 0.2 = 0.16; 1 + 0 - 0.4 = 0.6
    # A_2 = 0.6; A_1 = 0.16 + 0.45*0.6 = 0.43; A_0 = -0.32 + 0.45*0.43 = -0.1265
    adv, ret = gae([0.0, 0.0, 1.0], [0.5, 0.2, 0.4], gamma=0.9, lam=0.5)
    assert adv == pytest.approx([-0.1265, 0.43, 0.6])
    assert ret == pytest.approx([0.3735, 0.63, 1.0])
    # lam = 1, gamma = 1: Monte-Carlo return minus the value
    adv, ret = gae([0.0, 1.0], [0.2, 0.5], gamma=1.0, lam=1.0)
    assert adv == pytest.approx([0.8, 0.5]) and ret == pytest.approx([1.0, 1.0])
    # lam = 0: the one-step TD error
    adv, _ = gae([0.0, 1.0], [0.2, 0.5], gamma=1.0, lam=0.0)
    assert adv == pytest.approx([0.3, 0.5])


def test_gae_errors_and_whiten():
    with pytest.raises(ValueError, match="values"):
        gae([1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="gamma"):
        gae([1.0], [0.0], gamma=1.5)
    with pytest.raises(ValueError, match="finite"):
        gae([float("nan")], [0.0])
    w = whiten([[1.0, 3.0], [5.0]])
    flat = [x for seq in w for x in seq]
    assert sum(flat) == pytest.approx(0.0, abs=1e-9)
    assert sum(x * x for x in flat) / 3 == pytest.approx(1.0, rel=1e-6)


def test_value_loss_by_hand():
    """V = the value token's logit; L = 0.5 max((V - R)^2, (V_clip - R)^2) summed over trained tokens."""
    vt = 2
    logits = torch.zeros(1, 4, 5)
    logits[0, :, vt] = torch.tensor([0.0, 1.0, 0.1, 0.0])
    logits.requires_grad_(True)
    labels = torch.tensor([[-100, 7, 8, 9]])
    inputs = {
        "shift_labels": labels,
        "returns": torch.tensor([[0.0, 0.0, 1.0, 2.0]]),
        "old_values": torch.tensor([[0.0, 0.5, 0.0, 0.5]]),
    }
    out = ValueLoss(value_token_id=vt, clip_range=0.2)(inputs, {"logits": logits})
    # t=1: V 1.0, R 0, old 0.5 -> clip 0.7: max(1.0, 0.49) = 1.0 (unclipped)
    # t=2: V 0.1, R 1, old 0.0 -> clip 0.1: both 0.81
    # t=3: V 0.0, R 2, old 0.5 -> clip 0.3: max(4.0, 2.89) = 4.0 (unclipped)
    assert float(out.loss.detach()) == pytest.approx(0.5 * (1.0 + 0.81 + 4.0))
    assert out.num_tokens == 3
    assert out.extra["value_mse"] == pytest.approx((1.0 + 0.81 + 4.0) / 3)
    assert out.extra["value_mean"] == pytest.approx(1.1 / 3)
    out.loss.backward()
    assert logits.grad[0, :, vt].tolist() == pytest.approx([0.0, 1.0, -0.9, -2.0])
    # the clipped term wins when the value moved away from the return past the clip range
    logits2 = torch.zeros(1, 2, 5, requires_grad=True)
    inputs2 = {
        "shift_labels": torch.tensor([[4, -100]]),
        "returns": torch.tensor([[1.0, 0.0]]),
        "old_values": torch.tensor([[0.5, 0.0]]),
    }
    out2 = ValueLoss(value_token_id=vt, clip_range=0.2)(inputs2, {"logits": logits2})
    # V 0, R 1, old 0.5 -> clip 0.3: max(1.0, 0.49) = 1.0; the plain term, gradient V - R = -1
    out2.loss.backward()
    assert logits2.grad[0, 0, vt].item() == pytest.approx(-1.0)
    assert out2.extra["value_clip_ratio"] == 0.0


def test_value_loss_clipped_branch_stops_the_gradient():
    vt = 1
    logits = torch.zeros(1, 1, 3)
    logits[0, 0, vt] = 2.0  # V moved from old 0.0 up to 2.0; return 3.0
    logits.requires_grad_(True)
    inputs = {
        "shift_labels": torch.tensor([[0]]),
        "returns": torch.tensor([[3.0]]),
        "old_values": torch.tensor([[0.0]]),
    }
    out = ValueLoss(value_token_id=vt, clip_range=0.5)(inputs, {"logits": logits})
    # unclipped (2-3)^2 = 1; clipped V 0.5: (0.5-3)^2 = 6.25 wins: constant in V, no gradient
    assert float(out.loss.detach()) == pytest.approx(0.5 * 6.25)
    out.loss.backward()
    assert logits.grad.abs().sum() == 0
    assert out.extra["value_clip_ratio"] == 1.0


def test_value_loss_registered_and_needs_returns():
    assert get_registry().resolve("loss", "ValueLoss") is ValueLoss
    with pytest.raises(ValueError, match="returns"):
        ValueLoss(value_token_id=0)({"shift_labels": torch.tensor([[1]])}, {"logits": torch.zeros(1, 1, 3)})
    with pytest.raises(ValueError, match="clip_range"):
        ValueLoss(value_token_id=0, clip_range=0.0)
