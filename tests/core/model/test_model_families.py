"""Model families: a tiny random-weight model per architecture trains a LoRA and round-trips a checkpoint.

The rows of docs/model.md's support table come from here.
"""

from __future__ import annotations

import pytest
from model_test_utils import make_rows
from peft import LoraConfig
from twinkle.model.transformers_model import TransformersModel
from twinkle.testing import TINY_MODEL_SHAPE

_COMMON = dict(
    TINY_MODEL_SHAPE,
    vocab_size=512,
    max_position_embeddings=256,
    pad_token_id=0,
)

# DeepSeek V2 and V3 share this small MoE + multi-head latent attention (MLA) shape.
_DEEPSEEK_MLA = dict(
    _COMMON,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    n_group=1,
    topk_group=1,
    num_key_value_heads=4,  # MLA: one key/value head per query head
)

FAMILIES = {
    "qwen2": dict(_COMMON),
    "qwen2_moe": dict(
        _COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64
    ),
    "qwen3": dict(_COMMON, head_dim=16),
    "qwen3_moe": dict(_COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "llama": dict(_COMMON),
    "glm4": dict(_COMMON, head_dim=16),
    "glm": dict(_COMMON, head_dim=16),  # GLM-Edge (and glm-4-9b-chat-hf): half-dimension interleaved RoPE
    "deepseek_v2": dict(_DEEPSEEK_MLA),
    "deepseek_v3": dict(_DEEPSEEK_MLA),
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_lora_trains_and_round_trips(model_type, tmp_path):
    config = {"model_type": model_type, **FAMILIES[model_type]}
    model = TransformersModel(config=config, seed=3)
    model.add_adapter_to_model("default", LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=1e-2)
    rows = make_rows(4, seed=11, vocab=512)
    losses = []
    for _ in range(4):
        losses.append(model.forward_backward(inputs=rows).loss)
        model.clip_grad_and_step()
    assert losses[-1] < losses[0]
    before = model.forward_only(rows)
    path = model.save(tmp_path / model_type, save_optimizer=False)
    fresh = TransformersModel(config=config, seed=3)
    fresh.load(path)
    after = fresh.forward_only(rows)
    assert after.loss == pytest.approx(before.loss, rel=1e-5)


def test_docs_family_table_names_only_tested_families():
    """docs/model.md's family table: each row that loads as a transformers model_type has it in FAMILIES
    (or is converted through a converter tested in test_converters.py, or is a vision-language family of
    test_vlm.py); rows not supported give a reason."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[3] / "docs" / "model.md").read_text(encoding="utf-8")
    section = doc[doc.index("## Model families") :]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| seed's row")]
    rows = rows[: next(i for i, r in enumerate(rows) if r.startswith("| original"))]  # the converters table follows
    assert len(rows) >= 12
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        loads_as, status, test = cells[2], cells[3], cells[4]
        if status.startswith("not supported"):
            assert len(test) > 40, f"a row that is not supported must say why: {row}"
            continue
        assert status.startswith("supported"), row
        converted = re.fullmatch(r"`(\w+)` -> `(\w+)` through `(\w+)`", loads_as)
        if "VLM test" in test:  # vision-language families: tests/core/model/test_vlm.py
            from twinkle.template.tiny_vlm import TINY_VLM_FAMILIES

            family = converted[2] if converted else re.fullmatch(r"`(\w+)`", loads_as)[1]
            assert "test_vlm.py" in test and family in TINY_VLM_FAMILIES, row
            assert not converted or "test_converter_" in test, row  # the converter's own test file
            continue
        if converted:
            assert "test_converters.py" in test, row
            target = converted[2]
        else:
            target = re.fullmatch(r"`(\w+)`", loads_as)[1]
            assert "family test" in test, row
        assert target in FAMILIES, row
