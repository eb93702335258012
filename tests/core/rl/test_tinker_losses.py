"""Tinker's losses as a core component (twinkle.loss.tinker.TinkerLoss), against the formulas applied by hand."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from twinkle.loss.tinker import LOSSES, LossConfigError, TinkerLoss, check_loss  # noqa: E402
from twinkle.model.transformers_model import TransformersModel  # noqa: E402
from twinkle.testing import TINY_MODEL_SHAPE, random_token_rows  # noqa: E402

CONFIG = dict(
    TINY_MODEL_SHAPE, model_type="qwen2", vocab_size=512, max_position_embeddings=256, use_sliding_window=False
)


def _reference(name, logps, olds, advs, weights, config):
    total = 0.0
    lo, hi = config.get("clip_low_threshold"), config.get("clip_high_threshold")
    for lp, q, a, w in zip(logps, olds, advs, weights):
        r = math.exp(lp - q)
        if name == "cross_entropy":
            total += -w * lp
        elif name == "importance_sampling":
            total += -r * a
        elif name == "ppo":
            total += -min(r * a, min(max(r, lo), hi) * a)
        elif name == "cispo":
            total += -min(max(r, lo), hi) * lp * a
        elif name == "stable_reinforce":
            total += -min(r, config["clip_high_threshold"]) * a * lp + config["kl_coeff"] * (r - 1 - (lp - q))
        else:
            total += -(lp * a - 0.5 * config["beta"] * (lp - q) ** 2)
    return total


@pytest.mark.parametrize(
    "name, config",
    [
        ("cross_entropy", {}),
        ("importance_sampling", {}),
        ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}),
        ("cispo", {}),
        ("dro", {"beta": 0.3}),
        ("stable_reinforce", {"clip_high_threshold": 1.5, "kl_coeff": 0.1}),
    ],
)
def test_tinker_loss_component_equals_the_formula_on_the_models_logprobs(name, config):
    model = TransformersModel(config=CONFIG, device="cpu", seed=1)
    model.add_adapter_to_model("tenant", {"r": 4, "target_modules": "all-linear"})
    rows = random_token_rows(3, 7, vocab=512, min_len=6, max_len=12)
    gen = torch.Generator().manual_seed(0)
    olds = [(-3 - torch.rand(len(r["input_ids"]), generator=gen)).tolist() for r in rows]
    weights = [torch.rand(len(r["input_ids"]), generator=gen).tolist() for r in rows]
    advs = [0.5, -1.0, 2.0]
    logps = model.forward_only(rows)["logps"]  # per row, aligned with its labels (first 0.0)
    flat_lp, flat_q, flat_a, flat_w = [], [], [], []
    for r, row in enumerate(rows):
        for t in range(1, len(row["input_ids"])):
            if row["labels"][t] != -100:
                flat_lp.append(logps[r][t])
                flat_q.append(olds[r][t])
                flat_a.append(advs[r])
                flat_w.append(weights[r][t])
    want = _reference(name, flat_lp, flat_q, flat_a, flat_w, check_loss(name, config))
    model.set_loss("TinkerLoss", loss_fn=name, normalize=False, **config)
    extra = {"logprobs": olds, "advantages": advs} if name != "cross_entropy" else {"weights": weights}
    out = model.forward_backward(rows, **extra)
    # float32 logprobs (~1e-6 relative each) through a sum of ~30 terms of magnitude ~5
    assert out["loss"] == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert out["num_tokens"] == 1  # a sum, as Tinker's
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.state_of("tenant").params)


def test_tinker_loss_config_is_checked():
    with pytest.raises(LossConfigError, match="needs loss_fn_config\\['beta'\\]"):
        TinkerLoss("dro")
    with pytest.raises(LossConfigError, match="not supported"):
        TinkerLoss("kl")
    with pytest.raises(LossConfigError, match="must not exceed"):
        TinkerLoss("ppo", clip_low_threshold=1.5, clip_high_threshold=1.2)
    with pytest.raises(LossConfigError, match="kl_coeff >= 0"):
        TinkerLoss("stable_reinforce", kl_coeff=-1.0)
    with pytest.raises(LossConfigError, match="not supported for 'gspo'"):
        TinkerLoss("gspo", beta=1.0)
    assert set(LOSSES) == {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"}


def _gspo_by_hand(lps, qs, advs, mask, lo, hi):
    """Tinker's documented GSPO-token: value and d loss / d logp_t, in plain floats."""
    chosen = [lp - q for lp, q, m in zip(lps, qs, mask) if m]
    s = math.exp(sum(chosen) / len(chosen))
    value, grads = 0.0, []
    for a in advs:
        clipped = min(max(s, lo), hi)
        if s * a <= clipped * a:  # the unclipped branch: its gradient is -A * s (ratio's own gradient)
            value += -s * a
            grads.append(-a * s)
        else:  # the clipped branch, constant where the clamp saturates
            value += -clipped * a
            grads.append(0.0)
    return value, grads


@pytest.mark.parametrize("shift", [0.0, 0.5, -0.5])  # ratio inside the clip range, above it, below it
def test_gspo_equals_tinkers_documented_formula_in_value_and_gradient(shift):
    lps = [-1.0, -2.0, -0.5, -3.0]
    qs = [lp - shift + d for lp, d in zip(lps, [0.02, -0.01, 0.03, 0.0])]
    advs = [1.0, -2.0, 0.5, 1.5]
    mask = [1, 1, 0, 1]  # the third token is outside the sequence ratio
    logp = torch.tensor(lps, dtype=torch.float64, requires_grad=True)
    inputs = {
        "logprobs": torch.tensor(qs, dtype=torch.float64),
        "advantages": torch.tensor(advs, dtype=torch.float64),
        "sequence_ratio_mask": torch.tensor(mask, dtype=torch.float64),
    }
    loss, out = LOSSES["gspo"](logp, inputs, check_loss("gspo", {}))
    loss.backward()
    want, grads = _gspo_by_hand(lps, qs, advs, mask, 0.8, 1.2)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert logp.grad.tolist() == pytest.approx(grads, rel=1e-12)
    assert out["logprobs"] is logp
    # without a mask every token is in the ratio
    loss_all, _ = LOSSES["gspo"](
        logp.detach(), {k: v for k, v in inputs.items() if k != "sequence_ratio_mask"}, check_loss("gspo", {})
    )
    assert loss_all.item() == pytest.approx(_gspo_by_hand(lps, qs, advs, [1, 1, 1, 1], 0.8, 1.2)[0], rel=1e-12)


def test_stable_reinforce_value_and_gradient_by_hand():
    lps = [-1.0, -2.0, -0.5, -3.0]
    qs = [-1.5, -1.9, -0.5, -2.0]  # ratios e^0.5 (1.65, truncated at 1.5), e^-0.1, 1, e^-1
    advs = [1.0, -2.0, 0.5, 1.5]
    mask = [1, 1, 1, 0]  # the last token was not sampled: no loss, no gradient
    cfg = check_loss("stable_reinforce", {"clip_high_threshold": 1.5, "kl_coeff": 0.2})
    logp = torch.tensor(lps, dtype=torch.float64, requires_grad=True)
    inputs = {
        "logprobs": torch.tensor(qs, dtype=torch.float64),
        "advantages": torch.tensor(advs, dtype=torch.float64),
        "stability_mask": torch.tensor(mask, dtype=torch.float64),
    }
    loss, _ = LOSSES["stable_reinforce"](logp, inputs, cfg)
    loss.backward()
    value, grads = 0.0, []
    for lp, q, a, m in zip(lps, qs, advs, mask):
        r = math.exp(lp - q)
        w = min(r, 1.5)
        value += m * (-w * a * lp + 0.2 * (r - 1 - (lp - q)))
        grads.append(m * (-w * a + 0.2 * (r - 1)))  # the weight is not differentiated
    assert loss.item() == pytest.approx(value, rel=1e-12)
    assert logp.grad.tolist() == pytest.approx(grads, rel=1e-12)
    assert check_loss("stable_reinforce", {}) == {"clip_high_threshold": 2.0, "kl_coeff": 0.0}


def test_gspo_component_takes_one_ratio_per_row():
    model = TransformersModel(config=CONFIG, device="cpu", seed=1)
    model.add_adapter_to_model("tenant", {"r": 4, "target_modules": "all-linear"})
    rows = random_token_rows(3, 7, vocab=512, min_len=6, max_len=12)
    gen = torch.Generator().manual_seed(0)
    logps = model.forward_only(rows)["logps"]
    # sampler logprobs near the model's so some rows fall inside the clip range, others outside
    olds = [
        [lp + 0.3 * (float(torch.rand(1, generator=gen)) - 0.5) * (i + 1) for lp in row_lps]
        for i, row_lps in enumerate(logps)
    ]
    advs = [0.5, -1.0, 2.0]
    want = 0.0
    for r, row in enumerate(rows):
        ts = [t for t in range(1, len(row["input_ids"])) if row["labels"][t] != -100]
        want += _gspo_by_hand(
            [logps[r][t] for t in ts], [olds[r][t] for t in ts], [advs[r]] * len(ts), [1] * len(ts), 0.8, 1.2
        )[0]
    model.set_loss("TinkerLoss", loss_fn="gspo", normalize=False)
    out = model.forward_backward(rows, logprobs=olds, advantages=advs)
    assert out["loss"] == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_gspo_component_takes_one_ratio_per_sequence_of_a_packed_row():
    """Packed padding-free (the service's passes): one row holds every sequence; row_ids tell them apart."""
    rows = random_token_rows(3, 7, vocab=512, min_len=6, max_len=12)
    gen = torch.Generator().manual_seed(0)
    olds = [[-6.0 + 0.3 * float(torch.rand(1, generator=gen)) for _ in row["input_ids"]] for row in rows]
    advs = [0.5, -1.0, 2.0]
    losses = []
    for processor in ("InputProcessor", "PaddingFreeProcessor"):
        model = TransformersModel(config=CONFIG, device="cpu", seed=1)
        model.add_adapter_to_model("tenant", {"r": 4, "target_modules": "all-linear"})
        model.set_processor(processor)
        model.set_loss("TinkerLoss", loss_fn="gspo", normalize=False)
        losses.append(model.forward_backward(rows, logprobs=olds, advantages=advs)["loss"])
    padded, packed = losses
    # the same per-sequence sums either way (fp32, a few dozen terms: ~1e-6 relative); one ratio
    # over the whole packed row would differ by O(1)
    assert packed == pytest.approx(padded, rel=1e-5)
