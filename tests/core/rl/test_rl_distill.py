"""On-policy distillation: the per-token reverse KL to a teacher (GRPOLoss/PPOLoss teacher_kl_coef) and the
teacher's scores of the student's tokens (Sampler.compute_logps)."""

from __future__ import annotations

import pytest
import torch
from twinkle.data_format import SamplingParams
from twinkle.loss.rl import GRPOLoss, PPOLoss
from twinkle.sampler.base import Sampler


def logps_of(logits, labels):
    mask = labels != -100
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask


def batch():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 5, 9, generator=g, requires_grad=True)
    labels = torch.tensor([[-100, 3, 5, 1, 7], [-100, -100, 2, 6, -100]])
    mask = labels != -100
    teacher = (torch.randn(2, 5, generator=g) * 0.5 - 2.0) * mask
    return logits, labels, mask, teacher


def test_reverse_kl_gradient_by_hand():
    """Pure distillation (no advantages), on-policy: loss grad = sum_t coef * (l_t - teacher_t) * grad l_t / #tokens."""
    logits, labels, mask, teacher = batch()
    inputs = {"shift_labels": labels, "teacher_logps": teacher}
    out = PPOLoss(teacher_kl_coef=0.5)(inputs, {"logits": logits})
    (out.loss / out.num_tokens).backward()
    got = logits.grad.clone()
    logits.grad = None
    lp = logps_of(logits, labels)
    m = mask.float()
    ((0.5 * (lp.detach() - teacher) * lp * m).sum() / m.sum()).backward()
    torch.testing.assert_close(got, logits.grad)
    kl = float(((logps_of(logits, labels).detach() - teacher) * m).sum() / m.sum())
    assert out.extra["teacher_kl"] == pytest.approx(kl, rel=1e-6)


def test_teacher_term_adds_to_the_row_advantage():
    """With a reward advantage A_i the per-token advantage is A_i - coef * (l - teacher) (per-sequence mean)."""
    logits, labels, mask, teacher = batch()
    adv = torch.tensor([[1.0] * 5, [-2.0] * 5])
    inputs = {"shift_labels": labels, "teacher_logps": teacher, "advantages": adv}
    out = GRPOLoss(teacher_kl_coef=2.0)(inputs, {"logits": logits})
    (out.loss / out.num_tokens).backward()
    got = logits.grad.clone()
    logits.grad = None
    lp = logps_of(logits, labels)
    m = mask.float()
    a = adv - 2.0 * (lp.detach() - teacher)
    ((-(a * lp * m).sum(1) / m.sum(1)).mean()).backward()
    torch.testing.assert_close(got, logits.grad)


def test_teacher_options_and_missing_field():
    logits, labels, _, _ = batch()
    with pytest.raises(ValueError, match="teacher_logps"):
        PPOLoss(teacher_kl_coef=1.0)({"shift_labels": labels}, {"logits": logits})
    with pytest.raises(ValueError, match="teacher_kl_coef"):
        PPOLoss(teacher_kl_coef=-1.0)


def test_compute_logps_scores_the_sampled_tokens(rl_sampler):
    """The sampler's own scores of its samples equal the log-probs it sampled with; the batched TorchSampler
    pass equals the protocol's default (prompt_logprobs) implementation."""
    prompts = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10]}]
    responses = rl_sampler.sample(prompts, SamplingParams(max_tokens=4, num_samples=2, seed=3))
    rows = [seq.input_feature for r in responses for seq in r.sequences]
    scores = rl_sampler.compute_logps(rows)
    default = Sampler.compute_logps(rl_sampler, rows)
    for row, s, d in zip(rows, scores, default):
        assert len(s) == len(row["input_ids"])
        assert s == pytest.approx(row["old_logps"], abs=1e-4)
        assert s == pytest.approx(d, abs=1e-4)
        assert all(v == 0.0 for v, label in zip(s, row["labels"]) if label == -100)
