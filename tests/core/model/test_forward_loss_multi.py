"""forward_loss_multi: each adapter's own loss on its rows in one packed pass, without gradients or bookkeeping."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from twinkle.loss.tinker import TinkerLoss  # noqa: E402
from twinkle.model.multi_adapter import forward_loss_multi  # noqa: E402
from twinkle.model.transformers_model import TransformersModel  # noqa: E402
from twinkle.testing import TINY_MODEL_SHAPE, random_token_rows  # noqa: E402

CONFIG = dict(
    TINY_MODEL_SHAPE, model_type="qwen2", vocab_size=512, max_position_embeddings=256, use_sliding_window=False
)


def test_forward_loss_multi_equals_each_adapters_own_loss_and_touches_nothing():
    model = TransformersModel(config=CONFIG, device="cpu", seed=1)
    rows = {}
    for i, name in enumerate(("alice", "bob")):
        model.add_adapter_to_model(name, {"r": 4 * (i + 1), "target_modules": ["q_proj", "v_proj"]})
        with torch.no_grad():  # B away from zero: the adapters differ from the base and from each other
            for p in model.state_of(name).params:
                p.normal_(0, 0.05)
        model.set_loss(TinkerLoss("cross_entropy", normalize=False), adapter_name=name)
        model.set_processor("PaddingFreeProcessor", adapter_name=name)
        rows[name] = random_token_rows(2 + i, 7 + i, vocab=512, min_len=5, max_len=11)
    together = forward_loss_multi(model, rows)
    for name in rows:
        state = model.state_of(name)
        assert all(p.grad is None for p in state.params) and state.micro_step == 0
        alone = model.forward_backward(rows[name], adapter_name=name)["loss"]
        # fp32 sums of a few dozen token losses in another order: ~1e-6 relative; a mix-up is O(1)
        assert together[name]["loss"] == pytest.approx(alone, rel=1e-5)
        assert together[name]["num_tokens"] == 1
