"""DeepSeek-V2/V3 on megatron-core: multi-latent attention, dense-then-MoE layers, their routers.

Each tiny model is built from a config with seeded random weights (no downloads): megatron's
logits equal transformers', weights round-trip bit-exactly, training and LoRA match
transformers / peft, and the saved checkpoint loads in transformers and peft.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from twinkle.model.transformers_model import TransformersModel
from twinkle_megatron import builder, convert
from twinkle_megatron.model import MegatronModel

from conftest import TINY

#: what the DeepSeek families share on top of conftest's TINY: MLA sizes, one dense layer, then MoE.
MLA = dict(
    num_hidden_layers=3,
    num_key_value_heads=4,  # MLA: one key/value head per query head
    first_k_dense_replace=1,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    moe_intermediate_size=32,
)
YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=32,
    beta_fast=32,
    beta_slow=1,
    mscale=0.707,
    mscale_all_dim=0.707,
)
DEEPSEEK = {
    # no query compression; softmax router, group-limited greedy (3 experts from the best 2 of 4 groups)
    "deepseek_v2": dict(
        model_type="deepseek_v2",
        q_lora_rank=None,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=2,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
    ),
    # compressed queries; sigmoid router with expert bias, groups scored by their best two experts
    "deepseek_v3": dict(
        model_type="deepseek_v3",
        q_lora_rank=24,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
}
DEEPSEEK["deepseek_v3_yarn"] = dict(DEEPSEEK["deepseek_v3"], rope_interleave=False, rope_parameters=YARN)

TOL = 1e-5


def deepseek_config(name: str) -> dict:
    """A config dict for ``TransformersModel/MegatronModel(config=...)``."""
    return {**TINY, **MLA, **DEEPSEEK[name]}


def _hf(name: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    data = {**deepseek_config(name), **overrides}
    cfg = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # transformers initializes the V3 expert bias to zeros; make it matter
        for key, buffer in hf.named_buffers():
            if key.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(7)) * 0.1)
    return hf


@pytest.mark.parametrize("name", list(DEEPSEEK))
def test_logits_equal_transformers_and_weights_round_trip(name: str, megatron_cpu) -> None:
    from twinkle_megatron import compat

    hf = _hf(name)
    compat.seed_model_parallel(0, "cpu")
    mg = builder.build_gpt_model(convert.megatron_spec_from_hf(hf.config))
    builder.load_full_state(mg, convert.hf_to_megatron(hf.state_dict(), hf.config))
    layers = mg.decoder.layers
    assert type(layers[0].self_attention).__name__ == "MLASelfAttention"
    assert [type(layer.mlp).__name__ for layer in layers] == ["MLP", "MoELayer", "MoELayer"]
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(12, 12, dtype=torch.bool).triu(1)[None, None].expand(2, 1, 12, 12)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = mg(ids, torch.arange(12).expand(2, 12), attention_mask=mask)
    diff = (out - ref).abs().max().item()
    print(f"{name}: max |logits diff| = {diff:.3e}")
    assert out.shape == ref.shape and diff < TOL
    back = convert.megatron_to_hf(builder.gather_full_state(mg), hf.config, hf.state_dict().keys())
    ref_state = hf.state_dict()
    assert set(back) == set(ref_state)
    for key, value in ref_state.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_mixed_dense_and_moe_layers_build_per_layer(model_type: str, megatron_cpu) -> None:
    """The per-layer spec DeepSeek's first_k_dense_replace needs also serves Qwen-MoE's mlp_only_layers."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from twinkle_megatron import compat

    from conftest import tiny_config

    data = {**tiny_config(model_type), "mlp_only_layers": [0]}
    cfg = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).float().eval()
    compat.seed_model_parallel(0, "cpu")
    mg = builder.build_gpt_model(convert.megatron_spec_from_hf(hf.config))
    builder.load_full_state(mg, convert.hf_to_megatron(hf.state_dict(), hf.config))
    assert [type(layer.mlp).__name__ for layer in mg.decoder.layers] == ["MLP", "MoELayer"]
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(10, 10, dtype=torch.bool).triu(1)[None, None]
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits - mg(ids, torch.arange(10)[None], attention_mask=mask)).abs().max().item()
    assert diff < TOL


def _pair(name: str, seed: int = 5) -> tuple[TransformersModel, MegatronModel]:
    cfg = deepseek_config(name)
    return (
        TransformersModel(config=cfg, device="cpu", attn_implementation="eager", seed=seed),
        MegatronModel(config=cfg, device="cpu", seed=seed),
    )


def _train(model, rows: list[dict], steps: int) -> list[float]:
    seen = []
    for step in range(steps):
        seen.append(model.forward_backward(inputs=rows[:2] if step % 2 == 0 else rows[2:]).loss)
        seen.append(model.clip_grad_and_step(max_grad_norm=1.0)["grad_norm"])
    return seen


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3"])
def test_training_matches_transformers_and_saves_for_transformers(name: str, rows, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    hf, mg = _pair(name)
    try:
        a = hf.forward_only(inputs=rows, return_logits=True)
        b = mg.forward_only(inputs=rows, return_logits=True)
        assert b.loss == pytest.approx(a.loss, abs=TOL)
        trajectories = {}
        for model in (hf, mg):
            model.set_optimizer("AdamW", lr=1e-2)
            trajectories[type(model).__name__] = _train(model, rows, 3)
        print(name, trajectories)
        assert trajectories["MegatronModel"] == pytest.approx(trajectories["TransformersModel"], abs=1e-4)
        path = mg.save(tmp_path / name, save_optimizer=False)
        loaded = AutoModelForCausalLM.from_pretrained(path).eval()
        ids = torch.tensor([rows[1]["input_ids"]])
        with torch.no_grad():
            ref = loaded(input_ids=ids).logits
        ours = mg.forward_only(inputs=rows[1:2], return_logits=True).logits
        assert (ref - ours).abs().max().item() < TOL
    finally:
        mg.close()


#: every linear layer of MLA, with and without query compression. (MLP names are left out: with
#: transformers 5, peft 0.21 also adapts the fused routed experts for gate/up/down_proj, which
#: MegatronModel does not; see docs/megatron.md.)
MLA_LINEARS = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3"])
def test_lora_on_mla_matches_peft_and_saves_a_peft_adapter(name: str, rows, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf, mg = _pair(name, seed=9)
    try:
        base_dir = mg.save(tmp_path / "base", save_optimizer=False)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=MLA_LINEARS)
        for model in (hf, mg):
            model.add_adapter_to_model("tenant", config)
            model.set_optimizer("AdamW", lr=2e-2)
        a, b = hf.get_state_dict(), mg.get_state_dict()
        assert set(a) == set(b)
        for key in a:  # the same initial adapter: seeded, created in the same order
            assert torch.equal(a[key], b[key]), key
        leaves = {key.split(".")[-3] for key in b}
        query = {"q_proj"} if name == "deepseek_v2" else {"q_a_proj", "q_b_proj"}
        assert leaves == query | {"kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
        assert len(b) == 2 * len(leaves) * MLA["num_hidden_layers"]
        results = {type(model).__name__: _train(model, rows, 3) for model in (hf, mg)}
        print(name, "lora", results)
        assert results["MegatronModel"] == pytest.approx(results["TransformersModel"], abs=1e-4)
        adapter_dir = mg.save(tmp_path / "adapter", save_optimizer=False)
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
        with torch.no_grad():
            ref = peft_model(input_ids=torch.tensor([rows[1]["input_ids"]])).logits
        ours = mg.forward_only(inputs=rows[1:2], return_logits=True).logits
        assert (ref - ours).abs().max().item() < 1e-4
    finally:
        mg.close()


@pytest.mark.parametrize(
    ("name", "overrides", "match"),
    [
        ("deepseek_v2", dict(num_experts_per_tok=4), "num_experts_per_tok // topk_group == 1"),
        ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method"),
        ("deepseek_v3", dict(norm_topk_prob=False), "norm_topk_prob"),
        ("deepseek_v3", dict(num_experts_per_tok=2), "num_experts_per_tok // topk_group == 2"),
        ("deepseek_v3", dict(num_key_value_heads=2), "num_key_value_heads"),
        ("deepseek_v3", dict(rms_norm_eps=1e-5), "rms_norm_eps"),
        ("deepseek_v3", dict(attention_bias=True), "attention_bias"),
        ("deepseek_v3", dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0)), "rope_type"),
        ("deepseek_v3", dict(rope_parameters=dict(YARN, truncate=False)), "truncate"),
    ],
)
def test_settings_megatron_cannot_reproduce_are_refused(name: str, overrides: dict, match: str) -> None:
    from transformers import AutoConfig

    data = {**deepseek_config(name), **overrides}
    cfg = AutoConfig.for_model(data.pop("model_type"), **data)
    with pytest.raises(convert.ConversionError, match=match):
        convert.megatron_spec_from_hf(cfg)


def test_lora_mlp_targets_are_refused_on_deepseek() -> None:
    """peft (transformers 5) maps gate/up/down_proj on DeepSeek onto the routed experts only: refuse, not diverge."""
    mg = MegatronModel(config=deepseek_config("deepseek_v2"), device="cpu", seed=4)
    try:
        for targets in ("all-linear", ["q_proj", "gate_proj"], ["down_proj"]):
            with pytest.raises(ValueError, match="routed experts"):
                mg.add_adapter_to_model("x", LoraConfig(r=2, target_modules=targets))
        with pytest.raises(ValueError, match="matched no layer"):  # V2 here has no query compression
            mg.add_adapter_to_model("x", LoraConfig(r=2, target_modules=["q_a_proj"]))
    finally:
        mg.close()
