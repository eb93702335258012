"""RL, preference and distillation losses against their formulas written out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from twinkle.loss.distill import GKDLoss
from twinkle.loss.preference import DPOLoss, ORPOLoss, SimPOLoss
from twinkle.loss.rl import CISPOLoss, DAPOLoss, DrGRPOLoss, GRPOLoss, GSPOLoss
from twinkle.runtime import get_registry

B, T, V = 4, 7, 13


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100  # prompt
    labels[1, -2:] = -100  # a shorter completion
    mask = labels != -100
    inputs = {
        "shift_labels": labels,
        "advantages": torch.tensor([1.0, -0.5, 2.0, -1.0]).unsqueeze(1).expand(B, T),
        "old_logps": (torch.randn(B, T, generator=g) * 0.3 - 2.5) * mask,
        "ref_logps": (torch.randn(B, T, generator=g) * 0.3 - 2.5) * mask,
        "row_ids": torch.arange(B).unsqueeze(1).expand(B, T),
    }
    return inputs, logits, mask


def logps_of(logits, labels):
    mask = labels != -100
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask


def reference_ppo(inputs, logits, eps_low, eps_high, beta, seq_level=False):
    """Per-token PPO-clip + k3 KL, written out."""
    labels = inputs["shift_labels"]
    mask = (labels != -100).float()
    lp = logps_of(logits, labels)
    lr = (lp - inputs["old_logps"]) * mask
    if seq_level:
        lr = ((lr.sum(1) / mask.sum(1)).unsqueeze(1)).expand_as(lr)
    ratio = torch.exp(lr)
    a = inputs["advantages"]
    per = -torch.min(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
    d = inputs["ref_logps"] - lp
    per = per + beta * (torch.exp(d) - d - 1)
    return per * mask, mask


def test_all_registered():
    import twinkle.loss
    from twinkle.loss.base import Loss

    for name in (
        "GRPOLoss",
        "PPOLoss",
        "DAPOLoss",
        "DrGRPOLoss",
        "GSPOLoss",
        "CISPOLoss",
        "DPOLoss",
        "SimPOLoss",
        "ORPOLoss",
        "GKDLoss",
    ):
        assert get_registry().resolve("loss", name) is getattr(twinkle.loss, name)
        assert issubclass(getattr(twinkle.loss, name), Loss)


@pytest.mark.parametrize(
    ("loss", "aggregation"),
    [
        (GRPOLoss(beta=0.05), "sequence"),
        (DAPOLoss(beta=0.05), "token"),
        (DrGRPOLoss(max_completion_length=10, beta=0.05), "fixed"),
    ],
)
def test_ppo_family_value_and_gradient(batch, loss, aggregation):
    inputs, logits, mask = batch
    out = loss(inputs, {"logits": logits})
    (out.loss / out.num_tokens).backward()
    got_grad = logits.grad.clone()
    logits.grad = None
    per, m = reference_ppo(inputs, logits, loss.epsilon_low, loss.epsilon_high, 0.05)
    if aggregation == "sequence":
        expected = ((per.sum(1) / m.sum(1)).mean(), B)
    elif aggregation == "token":
        expected = (per.sum() / m.sum(), int(m.sum()))
    else:
        expected = (per.sum() / (B * 10), B * 10)
    expected[0].backward()
    assert out.num_tokens == expected[1]
    assert float(out.loss / out.num_tokens) == pytest.approx(float(expected[0]), rel=1e-5)
    torch.testing.assert_close(got_grad, logits.grad, rtol=1e-5, atol=1e-7)
    assert out.extra["kl"] > 0 and 0 <= out.extra["clip_ratio"] <= 1


def test_on_policy_gradient_is_reinforce(batch):
    """Without old_logps the ratio is 1: grad = -A * grad(logp) (per-sequence mean)."""
    inputs, logits, mask = batch
    inputs = {k: v for k, v in inputs.items() if k != "old_logps"}
    out = GRPOLoss()(inputs, {"logits": logits})
    (out.loss / out.num_tokens).backward()
    got = logits.grad.clone()
    logits.grad = None
    lp = logps_of(logits, inputs["shift_labels"])
    m = mask.float()
    (-(inputs["advantages"] * lp * m).sum(1) / m.sum(1)).mean().backward()
    torch.testing.assert_close(got, logits.grad)
    assert out.extra["ratio"] == pytest.approx(1.0)


def test_clipping_stops_the_gradient():
    logits = torch.zeros(1, 3, 5, requires_grad=True)
    labels = torch.tensor([[1, 2, -100]])
    lp = logps_of(logits, labels).detach()
    inputs = {
        "shift_labels": labels,
        "advantages": torch.ones(1, 3),
        "old_logps": lp - torch.tensor([[1.0, 0.0, 0.0]]),  # token 0: ratio e > 1 + eps -> clipped
    }
    out = DAPOLoss(epsilon=0.2, epsilon_high=0.28)(inputs, {"logits": logits})
    out.loss.backward()
    assert logits.grad[0, 0].abs().sum() == 0
    assert logits.grad[0, 1].abs().sum() > 0
    assert out.extra["clip_ratio"] == pytest.approx(0.5)


def test_gspo_uses_the_sequence_ratio(batch):
    inputs, logits, mask = batch
    loss = GSPOLoss(epsilon=0.2, epsilon_high=0.2, beta=0.05)
    out = loss(inputs, {"logits": logits})
    (out.loss / out.num_tokens).backward()
    got = logits.grad.clone()
    logits.grad = None
    per, m = reference_ppo(inputs, logits, 0.2, 0.2, 0.05, seq_level=True)
    (per.sum(1) / m.sum(1)).mean().backward()
    torch.testing.assert_close(got, logits.grad, rtol=1e-5, atol=1e-7)


def test_cispo(batch):
    inputs, logits, mask = batch
    out = CISPOLoss(max_ratio=1.1)(inputs, {"logits": logits})
    (out.loss / out.num_tokens).backward()
    got = logits.grad.clone()
    logits.grad = None
    lp = logps_of(logits, inputs["shift_labels"])
    w = torch.clamp(torch.exp(lp - inputs["old_logps"]), max=1.1).detach()
    m = mask.float()
    ((-w * inputs["advantages"] * lp * m).sum() / m.sum()).backward()
    torch.testing.assert_close(got, logits.grad)


def test_packed_equals_padded(batch):
    """One packed row with row_ids gives the same sequence-level loss as the padded batch."""
    inputs, logits, mask = batch
    padded = GRPOLoss(beta=0.1)(inputs, {"logits": logits})
    packed_inputs = {k: v.reshape(1, -1) for k, v in inputs.items()}
    packed = GRPOLoss(beta=0.1)(packed_inputs, {"logits": logits.reshape(1, B * T, V)})
    assert packed.num_tokens == padded.num_tokens == B
    assert float(packed.loss) == pytest.approx(float(padded.loss), rel=1e-6)


def test_missing_fields_are_clear_errors(batch):
    inputs, logits, _ = batch
    with pytest.raises(ValueError, match="advantages"):
        GRPOLoss()({k: v for k, v in inputs.items() if k != "advantages"}, {"logits": logits})
    with pytest.raises(ValueError, match="ref_logps.*adapter disabled"):
        GRPOLoss(beta=0.1)({k: v for k, v in inputs.items() if k != "ref_logps"}, {"logits": logits})
    with pytest.raises(ValueError, match="max_completion_length"):
        GRPOLoss(aggregation="fixed")
    with pytest.raises(ValueError, match="aggregation"):
        GRPOLoss(aggregation="mean")


def pair_reference(inputs, logits):
    lp = logps_of(logits, inputs["shift_labels"])
    m = (inputs["shift_labels"] != -100).float()
    return lp.sum(1), (inputs["ref_logps"] * m).sum(1), m.sum(1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo(batch, loss_type):
    inputs, logits, _ = batch
    beta = 0.3
    out = DPOLoss(beta=beta, loss_type=loss_type)(inputs, {"logits": logits})
    (out.loss / out.num_tokens).backward()
    got = logits.grad.clone()
    logits.grad = None
    pol, ref, n = pair_reference(inputs, logits)
    c, r = pol[0::2] - ref[0::2], pol[1::2] - ref[1::2]
    if loss_type == "sigmoid":
        expected = -F.logsigmoid(beta * (c - r))
    elif loss_type == "ipo":
        expected = (c / n[0::2] - r / n[1::2] - 1 / (2 * beta)) ** 2
    else:
        expected = torch.relu(1 - beta * (c - r))
    expected.mean().backward()
    assert out.num_tokens == 2
    assert float(out.loss / 2) == pytest.approx(float(expected.mean()), rel=1e-5)
    torch.testing.assert_close(got, logits.grad)
    assert out.extra["reward_margin"] == pytest.approx(float(beta * (c - r).mean()), rel=1e-5)


def test_simpo_and_orpo(batch):
    inputs, logits, _ = batch
    pol, _, n = pair_reference(inputs, logits)
    avg = pol / n
    simpo = SimPOLoss(beta=2.0, gamma=0.5)(inputs, {"logits": logits})
    expected = -F.logsigmoid(2.0 * (avg[0::2] - avg[1::2]) - 0.5)
    assert float(simpo.loss) == pytest.approx(float(expected.sum()), rel=1e-5)
    orpo = ORPOLoss(lam=0.1)(inputs, {"logits": logits})
    log_odds = lambda x: x - torch.log(1 - torch.exp(x))  # noqa: E731
    expected = -avg[0::2] - 0.1 * F.logsigmoid(log_odds(avg[0::2]) - log_odds(avg[1::2]))
    assert float(orpo.loss) == pytest.approx(float(expected.sum()), rel=1e-5)


def test_preference_pairs_are_validated(batch):
    inputs, logits, _ = batch
    odd = {k: v[:3] for k, v in inputs.items()}
    with pytest.raises(ValueError, match="interleaved"):
        DPOLoss()(odd, {"logits": logits[:3]})
    with pytest.raises(ValueError, match="ref_logps"):
        DPOLoss()({k: v for k, v in inputs.items() if k != "ref_logps"}, {"logits": logits})


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_full_logits(batch, beta):
    inputs, logits, mask = batch
    teacher = torch.randn(B, T, V, generator=torch.Generator().manual_seed(1))
    out = GKDLoss(beta=beta)({"shift_labels": inputs["shift_labels"], "teacher_logits": teacher}, {"logits": logits})
    s, t = torch.log_softmax(logits, -1), torch.log_softmax(teacher, -1)
    if beta == 0.0:
        per = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    elif beta == 1.0:
        per = F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    else:
        mix = torch.log(0.5 * s.exp() + 0.5 * t.exp())
        per = 0.5 * F.kl_div(mix, t, reduction="none", log_target=True).sum(-1) + 0.5 * F.kl_div(
            mix, s, reduction="none", log_target=True
        ).sum(-1)
    assert float(out.loss / out.num_tokens) == pytest.approx(float(per[mask].mean()), rel=1e-5)


def test_gkd_topk_with_full_support_equals_forward_kl(batch):
    inputs, logits, mask = batch
    teacher = torch.randn(B, T, V, generator=torch.Generator().manual_seed(1))
    full = GKDLoss(beta=0.0)({"shift_labels": inputs["shift_labels"], "teacher_logits": teacher}, {"logits": logits})
    top = torch.log_softmax(teacher, -1).topk(V, dim=-1)
    topk = GKDLoss(beta=0.0)(
        {"shift_labels": inputs["shift_labels"], "teacher_topk_ids": top.indices, "teacher_topk_logps": top.values},
        {"logits": logits},
    )
    assert float(topk.loss) == pytest.approx(float(full.loss), rel=1e-5)
    with pytest.raises(ValueError, match="teacher"):
        GKDLoss()({"shift_labels": inputs["shift_labels"]}, {"logits": logits})
