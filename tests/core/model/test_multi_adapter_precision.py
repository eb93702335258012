"""forward_backward_multi runs the forward under the model's ``mixed_precision`` autocast, as forward_backward does."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from twinkle.model.multi_adapter import forward_backward_multi  # noqa: E402
from twinkle.model.transformers_model import TransformersModel  # noqa: E402
from twinkle.testing import TINY_MODEL_SHAPE, random_token_rows  # noqa: E402

CONFIG = dict(
    TINY_MODEL_SHAPE, model_type="qwen2", vocab_size=512, max_position_embeddings=256, use_sliding_window=False
)


@pytest.mark.parametrize("mixed_precision, expected", [("bf16", torch.bfloat16), (None, torch.float32)])
def test_the_multi_adapter_pass_uses_the_models_autocast(mixed_precision, expected):
    model = TransformersModel(config=CONFIG, device="cpu", seed=1, mixed_precision=mixed_precision)
    rows = {}
    for i, name in enumerate(("alice", "bob")):
        model.add_adapter_to_model(name, {"r": 4, "target_modules": ["q_proj", "v_proj"]})
        model.set_processor("PaddingFreeProcessor", adapter_name=name)
        rows[name] = random_token_rows(2, 7 + i, vocab=512, min_len=5, max_len=11)
    seen: dict[str, set] = {"multi": set(), "alone": set()}
    which = {"now": "multi"}
    layer = model._hf_model().model.layers[0].mlp.down_proj  # a base linear layer (no adapter on it)
    handle = layer.register_forward_hook(lambda _m, _i, out: seen[which["now"]].add(out.dtype))
    try:
        forward_backward_multi(model, rows)
        which["now"] = "alone"
        model.forward_backward(rows["alice"], adapter_name="alice")
    finally:
        handle.remove()
    # the parameters stay fp32 either way; only the forward's matmuls run in the autocast dtype
    assert next(layer.parameters()).dtype == torch.float32
    assert seen["alone"] == {expected}
    assert seen["multi"] == {expected}
