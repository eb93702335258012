"""Rollout correction (TIS / MIS) against hand-computed weights, losses, gradients and metrics."""

from __future__ import annotations

import math

import pytest
import torch
from twinkle.loss._tokens import sequence_index
from twinkle.loss.rl import CISPOLoss, GRPOLoss
from twinkle.loss.rollout_correction import RolloutCorrection

LN2, LN4 = math.log(2.0), math.log(4.0)


def two_rows():
    """Row 0: token gaps (trainer - sampler) 0, ln4, -ln4 (ratios 1, 4, 1/4; product 1).
    Row 1: gaps ln2, ln2 and one untrained position (ratios 2, 2; product 4)."""
    mask = torch.tensor([[True, True, True], [True, True, False]])
    sampler = torch.tensor([[-1.0, -2.0, -3.0], [-1.5, -0.5, 0.0]])
    gaps = torch.tensor([[0.0, LN4, -LN4], [LN2, LN2, 0.0]])
    proximal = (sampler + gaps) * mask
    index, n = sequence_index({"row_ids": torch.tensor([[0, 0, 0], [1, 1, 1]])}, mask)
    return proximal, sampler, mask, index, n


@pytest.mark.parametrize(
    ("mode", "clip_min", "clip_max", "expected", "key", "share"),
    [
        # token ratios [1, 4, 1/4], [2, 2]
        ("token_truncate", None, 3.0, [[1, 3, 0.25], [2, 2, 0]], "rollout_truncated_fraction", 1 / 5),
        ("token_truncate", 0.5, 3.0, [[1, 3, 0.5], [2, 2, 0]], "rollout_truncated_fraction", 2 / 5),
        ("token_mask", 0.5, 3.0, [[1, 0, 0], [2, 2, 0]], "rollout_masked_fraction", 2 / 5),  # IcePop-style
        # sequence ratios 1 and 4
        ("sequence_truncate", None, 3.0, [[1, 1, 1], [3, 3, 0]], "rollout_truncated_fraction", 2 / 5),
        ("sequence_mask", None, 3.0, [[1, 1, 1], [0, 0, 0]], "rollout_masked_fraction", 2 / 5),
        ("sequence_mask", None, 5.0, [[1, 1, 1], [4, 4, 0]], "rollout_masked_fraction", 0.0),
    ],
)
def test_weights_by_hand(mode, clip_min, clip_max, expected, key, share):
    proximal, sampler, mask, index, n = two_rows()
    weight, metrics = RolloutCorrection(mode, clip_max=clip_max, clip_min=clip_min)(proximal, sampler, mask, index, n)
    torch.testing.assert_close(weight, torch.tensor(expected, dtype=torch.float32))
    assert metrics[key] == pytest.approx(share)
    # the mismatch itself does not depend on the mode
    assert metrics["rollout_logp_gap"] == pytest.approx((0 + LN4 + LN4 + LN2 + LN2) / 5)
    assert metrics["rollout_logp_gap_max"] == pytest.approx(LN4)
    k3 = [0.0, 4 - 1 - LN4, 0.25 - 1 + LN4, 2 - 1 - LN2, 2 - 1 - LN2]
    assert metrics["rollout_kl"] == pytest.approx(sum(k3) / 5)
    applied = [w for row, m in zip(expected, mask.tolist()) for w, keep in zip(row, m) if keep]
    if mode.startswith("sequence"):
        applied = [expected[0][0], expected[1][0]]  # one weight per sequence, as TRL reports them
    assert metrics["rollout_is_mean"] == pytest.approx(sum(applied) / len(applied))
    assert metrics["rollout_is_min"] == pytest.approx(min(applied))
    assert metrics["rollout_is_max"] == pytest.approx(max(applied))


def test_bad_options():
    with pytest.raises(ValueError, match="must be one of"):
        RolloutCorrection("token")
    with pytest.raises(ValueError, match="clip_min"):
        RolloutCorrection("token_mask", clip_min=4.0, clip_max=2.0)
    with pytest.raises(ValueError, match="> 0"):
        RolloutCorrection("token_truncate", clip_max=0.0)
    with pytest.raises(ValueError, match="must be one of"):
        GRPOLoss(rollout_correction="tis")


def logps_of(logits, labels):
    mask = labels != -100
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask


def make_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    labels = torch.tensor([[-100, 3, 5, 1], [-100, 2, 6, -100]])
    mask = labels != -100
    lp = logps_of(logits, labels).detach()
    gaps = torch.tensor([[0.0, 0.0, LN4, -LN4], [0.0, LN2, LN2, 0.0]])  # as in two_rows
    inputs = {
        "shift_labels": labels,
        "advantages": torch.tensor([[1.5] * 4, [-0.5] * 4]),
        "old_logps": (lp - gaps) * mask,  # the sampler's log-probs: trainer - gap
        "row_ids": torch.tensor([[0] * 4, [1] * 4]),
    }
    return inputs, logits, mask


def test_on_policy_tis_gradient_by_hand():
    """One update per batch: anchor = current policy (ratio 1), loss = -w A logp per token (per-sequence mean)."""
    inputs, logits, mask = make_batch()
    out = GRPOLoss(rollout_correction="token_truncate", rollout_clip_max=3.0)(inputs, {"logits": logits})
    (out.loss / out.num_tokens).backward()
    got = logits.grad.clone()
    logits.grad = None
    w = torch.tensor([[0, 1, 3, 0.25], [0, 2, 2, 0]])
    lp = logps_of(logits, inputs["shift_labels"])
    a = inputs["advantages"]
    m = mask.float()
    expected = (((-w * a * torch.exp(lp - lp.detach())) * m).sum(1) / m.sum(1)).mean()
    expected.backward()
    torch.testing.assert_close(got, logits.grad)
    # value: ratio 1 -> -A * w averaged per sequence, then over sequences
    value = ((-1.5 * (1 + 3 + 0.25) / 3) + (0.5 * (2 + 2) / 2)) / 2
    assert float((out.loss / out.num_tokens).detach()) == pytest.approx(value, rel=1e-6)
    assert out.extra["ratio"] == pytest.approx(1.0)
    assert out.extra["rollout_truncated_fraction"] == pytest.approx(1 / 5)
    assert out.extra["rollout_logp_gap"] == pytest.approx((2 * LN4 + 2 * LN2) / 5, rel=1e-5)


def test_sequence_mask_drops_the_sequence():
    inputs, logits, mask = make_batch()
    out = GRPOLoss(rollout_correction="sequence_mask", rollout_clip_max=3.0)(inputs, {"logits": logits})
    out.loss.backward()
    assert logits.grad[1].abs().sum() == 0  # sequence ratio 4 > 3: masked
    assert logits.grad[0].abs().sum() > 0
    assert out.extra["rollout_masked_fraction"] == pytest.approx(2 / 5)


def test_proximal_logps_anchor_the_ppo_ratio():
    """With proximal_logps the PPO ratio is exp(logp - proximal) and w = exp(proximal - sampler)."""
    inputs, logits, mask = make_batch()
    lp = logps_of(logits, inputs["shift_labels"]).detach()
    shift = torch.tensor([[0.0, 0.1, -0.05, 0.3], [0.0, -0.2, 0.02, 0.0]]) * mask
    proximal = lp - shift  # the policy moved since the proximal weights: PPO ratio exp(shift)
    sampler = proximal - torch.tensor([[0.0, 0.0, LN4, -LN4], [0.0, LN2, LN2, 0.0]]) * mask
    inputs = dict(inputs, old_logps=sampler, proximal_logps=proximal)
    eps = 0.2
    loss = CISPOLoss(max_ratio=1.2, rollout_correction="token_mask", rollout_clip_min=0.5, rollout_clip_max=3.0)
    out = loss(inputs, {"logits": logits})
    (out.loss / out.num_tokens).backward()
    got = logits.grad.clone()
    logits.grad = None
    w = torch.tensor([[0, 1, 0, 0], [0, 2, 2, 0]], dtype=torch.float32)
    lpg = logps_of(logits, inputs["shift_labels"])
    ratio = torch.exp(lpg - proximal).detach().clamp(max=1.2)
    m = mask.float()
    ((-w * ratio * inputs["advantages"] * lpg * m).sum() / m.sum()).backward()
    torch.testing.assert_close(got, logits.grad)
    assert out.extra["ratio"] == pytest.approx(float((torch.exp(shift) * m).sum() / m.sum()), rel=1e-5)
    # the PPO clip of GRPOLoss uses the proximal anchor too
    logits.grad = None
    no_proximal = {k: v for k, v in inputs.items() if k != "proximal_logps"}
    out = GRPOLoss(epsilon=eps)(no_proximal, {"logits": logits})  # no correction, no anchor: ratio to the sampler
    no_anchor = out.extra["ratio"]
    out = GRPOLoss(epsilon=eps)(inputs, {"logits": logits})  # proximal_logps anchor without a correction
    assert out.extra["ratio"] == pytest.approx(float((torch.exp(shift) * m).sum() / m.sum()), rel=1e-5)
    assert no_anchor != pytest.approx(out.extra["ratio"])


def test_needs_sampler_logps():
    inputs, logits, _ = make_batch()
    del inputs["old_logps"]
    with pytest.raises(ValueError, match="old_logps"):
        GRPOLoss(rollout_correction="token_truncate")(inputs, {"logits": logits})


def test_metrics_reach_calculate_metric(rl_model_dir):
    """The rollout_* metrics are reported by forward_backward and model.calculate_metric()."""
    from twinkle.data_format.sampling import build_input_feature
    from twinkle.model import TransformersModel

    model = TransformersModel(model_id=rl_model_dir, seed=1, device="cpu")
    model.set_optimizer("AdamW", lr=1e-3)
    model.set_loss("GRPOLoss", rollout_correction="token_mask", rollout_clip_min=0.5, rollout_clip_max=2.0)
    rows = [build_input_feature([5, 6, 7], [8, 9, 10]), build_input_feature([5, 6], [11, 12])]
    trainer = model.forward_only(inputs=rows)["logps"]
    gaps = [[0.0, 0.0, 0.0, 0.0, LN4, 0.0], [0.0, 0.0, 0.1, -0.1]]  # one token ratio 4 > 2: masked
    rows = [
        dict(row, advantages=a, old_logps=[t - g for t, g in zip(lp, gap)])
        for row, a, lp, gap in zip(rows, [1.0, -1.0], trainer, gaps)
    ]
    out = model.forward_backward(inputs=rows)
    model.clip_grad_and_step()
    metric = model.calculate_metric(is_training=True)
    for m in (out, metric):
        assert m["rollout_masked_fraction"] == pytest.approx(1 / 5, abs=1e-6)
        assert m["rollout_logp_gap"] == pytest.approx((LN4 + 0.2) / 5, rel=1e-4)
        assert m["rollout_logp_gap_max"] == pytest.approx(LN4, rel=1e-5)
        assert m["rollout_is_max"] == pytest.approx(math.exp(0.1), rel=1e-4)
