"""HF <-> megatron-core conversion: per family, megatron's logits equal transformers' and weights round-trip."""

from __future__ import annotations

import pytest
import torch
from twinkle_megatron import builder, convert

from conftest import FAMILIES, tiny_config


def _hf(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    data = tiny_config(model_type)
    cfg = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_megatron_logits_equal_transformers(model_type: str, megatron_cpu) -> None:
    from twinkle_megatron import compat

    hf = _hf(model_type)
    compat.seed_model_parallel(0, "cpu")
    mg = builder.build_gpt_model(convert.megatron_spec_from_hf(hf.config))
    builder.load_full_state(mg, convert.hf_to_megatron(hf.state_dict(), hf.config))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(12, 12, dtype=torch.bool).triu(1)[None, None].expand(2, 1, 12, 12)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = mg(ids, torch.arange(12).expand(2, 12), attention_mask=mask)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-4
    # and back: every HF weight comes back bit-identical, in the layout of the HF model
    back = convert.megatron_to_hf(builder.gather_full_state(mg), hf.config, hf.state_dict().keys())
    ref_state = hf.state_dict()
    assert set(back) == set(ref_state)
    for key, value in ref_state.items():
        assert torch.equal(back[key], value), key


def test_qkv_fuse_split_round_trip() -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen2", hidden_size=48, num_attention_heads=6, num_key_value_heads=2)
    q, k, v = torch.randn(48, 48), torch.randn(16, 48), torch.randn(16, 48)
    fused = convert.fuse_qkv(q, k, v, cfg)
    assert fused.shape == (80, 48)
    # group 0 holds q heads 0-2, then k head 0, then v head 0
    assert torch.equal(fused[:24], q[:24]) and torch.equal(fused[24:32], k[:8]) and torch.equal(fused[32:40], v[:8])
    for a, b in zip(convert.split_qkv(fused, cfg), (q, k, v)):
        assert torch.equal(a, b)


def test_per_expert_hf_layout_converts_too() -> None:
    """Older transformers keep one module per expert; both layouts map onto the same megatron weights."""
    hf = _hf("qwen3_moe")
    state = hf.state_dict()
    fused = convert.hf_to_megatron(state, hf.config)
    legacy = {}
    for key, value in state.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            for e in range(value.shape[0]):
                gate, up = value[e].chunk(2, dim=0)
                legacy[f"{prefix}{e}.gate_proj.weight"] = gate
                legacy[f"{prefix}{e}.up_proj.weight"] = up
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e in range(value.shape[0]):
                legacy[f"{prefix}{e}.down_proj.weight"] = value[e]
        else:
            legacy[key] = value
    from_legacy = convert.hf_to_megatron(legacy, hf.config)
    assert set(from_legacy) == set(fused)
    assert all(torch.equal(from_legacy[k], fused[k]) for k in fused)
    back = convert.megatron_to_hf(fused, hf.config, legacy.keys())
    assert set(back) == set(legacy)


def test_unsupported_family_names_the_alternative() -> None:
    from transformers import AutoConfig

    with pytest.raises(convert.ConversionError, match="TransformersModel"):
        convert.megatron_spec_from_hf(AutoConfig.for_model("gpt2"))


def test_rope_scaling_is_refused_not_ignored() -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(convert.ConversionError, match="rope_type"):
        convert.megatron_spec_from_hf(cfg)


def test_unknown_weight_is_an_error_not_dropped() -> None:
    hf = _hf("qwen2")
    state = dict(hf.state_dict())
    state["model.layers.0.self_attn.rotary_extra.weight"] = torch.zeros(1)
    with pytest.raises(convert.ConversionError, match="rotary_extra"):
        convert.hf_to_megatron(state, hf.config)
