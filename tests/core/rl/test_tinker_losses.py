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
    assert set(LOSSES) == {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro"}
