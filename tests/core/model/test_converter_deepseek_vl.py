"""DeepSeek-VL's original layout (``model_type: multi_modality``, remote code) loads natively: 7b as
transformers' ``deepseek_vl_hybrid`` through ``DeepseekVLHybridConverter`` (issue 35, the spec's
``deepseek-vl-7b-chat`` row), 1.3b as ``deepseek_vl`` through ``DeepseekVLConverter``.

A tiny transformers ``DeepseekVLHybridForConditionalGeneration`` with random weights is written in
the ORIGINAL layout (the ``config.json`` fields and tensor names of ``deepseek_vl/models``: a
``LlamaConfig`` dict, the tower names of ``HybridVisionTower``, timm SigLIP's fused ``qkv`` and
``(1, patches, width)`` ``pos_embed``, SAM's ``neck``/``neck_hd``/``downsamples``, the aligner's
``high_up_proj``/``low_up_proj``/``layers.1``) by an inverse mapping written here, independently
of the converter. ``TransformersModel`` must load it (no ``trust_remote_code``) into a model whose
logits, with images, equal the reference model's; saving with ``original_layout=True`` must give
back the very same tensors, bit for bit.

Tolerance: both sides run the same transformers code on the same float32 weights, so the logits are
equal up to nothing but kernel nondeterminism; 1e-5 on logits of size ~1. A q/k swap in the SigLIP
qkv split moves the logits by far more (checked below).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from twinkle.convert import ConversionError, find_converter, read_state_dict
from twinkle.convert import deepseek_vl as dsvl
from twinkle.model.transformers_model import TransformersModel

ATOL = 1e-5
VOCAB, HIDDEN = 3072, 64
SIGLIP = {"width": 32, "layers": 2, "heads": 2, "patch_size": 4, "mlp_ratio": 2}
SAM = {
    "width": 16,
    "layers": 2,
    "heads": 2,
    "patch_size": 4,
    "prompt_embed_dim": 8,
    "global_attn_indexes": [1],
    "downsample_channels": [16, 32],
}
LOW_IMAGE, HIGH_IMAGE = 16, 64  # 4x4 SigLIP patches; SAM 16x16 patches, downsampled twice to 4x4
IMAGE_TOKENS = (LOW_IMAGE // 4) ** 2


@pytest.fixture(autouse=True)
def tiny_towers(monkeypatch):
    """The tiny towers in the converter's tables, as the original's SigLIP_/SAM_MODEL_CONFIG entries."""
    monkeypatch.setitem(dsvl.SIGLIP_TOWERS, "tiny_siglip", SIGLIP)
    monkeypatch.setitem(dsvl.SAM_TOWERS, "tiny_sam", SAM)


def original_config() -> dict:
    """config.json as deepseek-vl-7b-chat writes it, with tiny sizes."""
    return {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "torch_dtype": "float32",
        "transformers_version": "4.38.2",
        "language_config": {
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
            "torch_dtype": "float32",
        },
        "vision_config": {
            "cls": "HybridVisionTower",
            "model_type": "vision",
            "params": {
                "concat_type": "tuple",
                "freeze_high": True,
                "freeze_low": True,
                "high_res_cfg": {
                    "ckpt_path": "",
                    "image_size": HIGH_IMAGE,
                    "model_name": "tiny_sam",
                    "output_dim": 32,
                    "pixel_mean": [0.48145466, 0.4578275, 0.40821073],
                    "pixel_std": [0.26862954, 0.26130258, 0.27577711],
                    "select_feature": "same",
                    "select_layer": -1,
                },
                "low_res_cfg": {
                    "ckpt_path": "",
                    "image_size": LOW_IMAGE,
                    "model_name": "tiny_siglip",
                    "output_dim": 32,
                    "pixel_mean": [0.5, 0.5, 0.5],
                    "pixel_std": [0.5, 0.5, 0.5],
                    "select_feature": "same",
                    "select_layer": -1,
                },
            },
        },
        "aligner_config": {
            "cls": "MlpProjector",
            "model_type": "aligner",
            "params": {
                "depth": 2,
                "input_dim": 32,
                "n_embed": HIDDEN,
                "projector_type": "low_high_hybrid_split_mlp_gelu",
            },
        },
    }


def plain_original_config() -> dict:
    """config.json as deepseek-vl-1.3b-chat writes it, with tiny sizes."""
    config = original_config()
    config["vision_config"] = {
        "cls": "CLIPVisionTower",
        "model_type": "vision",
        "params": {"image_size": LOW_IMAGE, "model_name": "tiny_siglip", "select_feature": "same", "select_layer": -1},
    }
    config["aligner_config"] = {
        "cls": "MlpProjector",
        "model_type": "aligner",
        "params": {"depth": 2, "input_dim": 32, "n_embed": HIDDEN, "projector_type": "mlp_gelu"},
    }
    return config


def reference_model(image_token_id: int, hybrid: bool = True):
    """The transformers model, configured here by hand (not through the converter), random weights."""
    from transformers import (
        DeepseekVLConfig,
        DeepseekVLForConditionalGeneration,
        DeepseekVLHybridConfig,
        DeepseekVLHybridForConditionalGeneration,
    )

    config = dict(
        text_config=dict(
            model_type="llama",
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=4,
            image_size=LOW_IMAGE,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
            vision_use_head=False,
        ),
        high_res_vision_config=dict(
            model_type="sam_vision_model",
            hidden_size=16,
            output_channels=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_dim=64,
            image_size=HIGH_IMAGE,
            patch_size=4,
            window_size=14,
            global_attn_indexes=[1],
            layer_norm_eps=1e-6,
        ),
        image_token_id=image_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if hybrid:
        model = DeepseekVLHybridForConditionalGeneration(DeepseekVLHybridConfig(**config)).eval()
    else:
        config.pop("high_res_vision_config")
        model = DeepseekVLForConditionalGeneration(DeepseekVLConfig(**config)).eval()
    with torch.no_grad():  # no zero-initialized tensor may hide a wrong mapping (SAM's alpha, biases)
        for tensor in model.state_dict().values():
            tensor.add_(0.05 * torch.randn_like(tensor))
    return model


# The inverse mapping, transformers name -> original name (SigLIP's q/k/v and pos_embed apart).
_INVERSE = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.aligner.vision_proj.", "aligner.low_up_proj."),
    ("model.aligner.high_res_vision_proj.", "aligner.high_up_proj."),
    ("model.aligner.proj.", "aligner.layers.1."),
    ("model.high_res_vision_neck.conv1.", "vision_model.vision_tower_high.vision_tower.neck_hd.0."),
    ("model.high_res_vision_neck.layer_norm1.", "vision_model.vision_tower_high.vision_tower.neck_hd.1."),
    ("model.high_res_vision_neck.conv2.", "vision_model.vision_tower_high.vision_tower.neck_hd.2."),
    ("model.high_res_vision_neck.layer_norm2.", "vision_model.vision_tower_high.vision_tower.neck_hd.3."),
    ("model.high_res_vision_proj.conv1.", "vision_model.vision_tower_high.vision_tower.downsamples.0."),
    ("model.high_res_vision_proj.conv2.", "vision_model.vision_tower_high.vision_tower.downsamples.1."),
    ("model.high_res_vision_alpha", "vision_model.vision_tower_high.vision_tower.hd_alpha_downsamples"),
    ("model.high_res_vision_model.vision_encoder.neck.conv1.", "vision_model.vision_tower_high.vision_tower.neck.0."),
    (
        "model.high_res_vision_model.vision_encoder.neck.layer_norm1.",
        "vision_model.vision_tower_high.vision_tower.neck.1.",
    ),
    ("model.high_res_vision_model.vision_encoder.neck.conv2.", "vision_model.vision_tower_high.vision_tower.neck.2."),
    (
        "model.high_res_vision_model.vision_encoder.neck.layer_norm2.",
        "vision_model.vision_tower_high.vision_tower.neck.3.",
    ),
    (
        "model.high_res_vision_model.vision_encoder.patch_embed.projection.",
        "vision_model.vision_tower_high.vision_tower.patch_embed.proj.",
    ),
    ("model.high_res_vision_model.vision_encoder.pos_embed", "vision_model.vision_tower_high.vision_tower.pos_embed"),
    ("model.high_res_vision_model.vision_encoder.layers.", "vision_model.vision_tower_high.vision_tower.blocks."),
    ("model.vision_model.embeddings.patch_embedding.", "vision_model.vision_tower_low.vision_tower.patch_embed.proj."),
    ("model.vision_model.post_layernorm.", "vision_model.vision_tower_low.vision_tower.norm."),
    ("model.vision_model.encoder.layers.", "vision_model.vision_tower_low.vision_tower.blocks."),
]
_SUFFIXES = [(".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."), (".self_attn.out_proj.", ".attn.proj.")]


def to_original_layout(state: dict, qkv_order: str = "qkv", hybrid: bool = True) -> dict:
    low = "vision_model.vision_tower_low.vision_tower." if hybrid else "vision_model.vision_tower."
    inverse = [
        ("model.aligner.linear1.", "aligner.layers.0."),
        ("model.aligner.linear2.", "aligner.layers.2."),
        *((new, old.replace("vision_model.vision_tower_low.vision_tower.", low)) for new, old in _INVERSE),
    ]
    out = {}
    for name, tensor in state.items():
        if name == "model.vision_model.embeddings.position_embedding.weight":
            out[low + "pos_embed"] = tensor[None].clone()
            continue
        siglip = name.startswith("model.vision_model.")
        if siglip and ".self_attn.q_proj." in name:
            fused = [state[name.replace(".q_proj.", f".{p}_proj.")] for p in qkv_order]
            name = name.replace(".self_attn.q_proj.", ".attn.qkv.")
            tensor = torch.cat(fused)
        elif siglip and (".self_attn.k_proj." in name or ".self_attn.v_proj." in name):
            continue
        for new, old in inverse:
            if name.startswith(new):
                name = old + name[len(new) :]
                break
        else:
            raise AssertionError(f"no original name for {name}")
        if "vision_tower_high" in name:
            name = name.replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
        elif name.startswith(low):
            for new, old in _SUFFIXES:
                name = name.replace(new, old)
        out[name] = tensor.clone().contiguous()
    return out


def write_original(directory, tmp_path, qkv_order: str = "qkv", hybrid: bool = True) -> tuple[str, dict, object]:
    """An original-layout directory (config, 2 safetensors shards, tokenizer); returns (dir, tensors, reference)."""
    from twinkle.template.tiny_vlm import write_tiny_vlm

    write_tiny_vlm("deepseek_vl_hybrid", directory)  # the tokenizer with <image_placeholder>
    token_id = json.loads((directory / "config.json").read_text())["image_token_id"]
    (directory / "preprocessor_config.json").unlink()
    (directory / "config.json").write_text(json.dumps(original_config() if hybrid else plain_original_config()))
    (directory / "modeling_vlm.py").write_text("# the original modeling code\n")
    reference = reference_model(token_id, hybrid)
    tensors = to_original_layout(reference.state_dict(), qkv_order, hybrid)
    names = sorted(tensors)
    for k in range(2):
        save_file({n: tensors[n] for n in names[k::2]}, str(directory / f"model-0000{k + 1}-of-00002.safetensors"))
    return str(directory), tensors, reference


def inputs(token_id: int, hybrid: bool = True) -> dict:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 2000, (2, 24), generator=gen)
    ids[:, 2 : 2 + IMAGE_TOKENS] = token_id
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.rand(2, 3, LOW_IMAGE, LOW_IMAGE, generator=gen) * 2 - 1,
    }
    if hybrid:
        batch["high_res_pixel_values"] = torch.rand(2, 3, HIGH_IMAGE, HIGH_IMAGE, generator=gen) * 2 - 1
    return batch


@pytest.mark.parametrize("hybrid", [True, False], ids=["deepseek-vl-7b-hybrid", "deepseek-vl-1.3b-plain"])
def test_original_layout_loads_with_equal_logits_and_round_trips(hybrid, tmp_path):
    source, tensors, reference = write_original(tmp_path / "deepseek-vl-chat", tmp_path, hybrid=hybrid)
    config = original_config() if hybrid else plain_original_config()
    want_converter, want_type = (
        ("DeepseekVLHybridConverter", "deepseek_vl_hybrid") if hybrid else ("DeepseekVLConverter", "deepseek_vl")
    )
    assert type(find_converter(config)).__name__ == want_converter
    model = TransformersModel(model_id=source, seed=1)
    hf = model._hf_model().eval()
    assert hf.config.model_type == want_type
    token_id = reference.config.image_token_id
    assert hf.config.image_token_id == token_id  # read from the directory's tokenizer
    batch = inputs(token_id, hybrid)
    with torch.no_grad():
        want = reference(**batch).logits
        got = hf(**{k: v.to(hf.device) for k, v in batch.items()}).logits.cpu()
        text_only = reference(input_ids=batch["input_ids"].clamp(max=token_id - 1)).logits
    assert (want - text_only).abs().max() > 1e-2  # the images matter to these logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # the towers are frozen by default (the language model trains)
    frozen = [n for n, p in hf.named_parameters() if not p.requires_grad]
    assert any("vision_model.encoder" in n for n in frozen)
    assert not hybrid or any("high_res_vision_model" in n for n in frozen)
    saved = model.save(tmp_path / "saved", save_optimizer=False, original_layout=True)
    back = read_state_dict(saved)
    assert sorted(back) == sorted(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == config
    assert (tmp_path / "saved" / "modeling_vlm.py").is_file()


def test_a_wrong_qkv_order_is_caught(tmp_path):
    """The logits check has teeth: a checkpoint whose SigLIP qkv rows are k, q, v misses by far more than ATOL."""
    source, _, reference = write_original(tmp_path / "swapped", tmp_path, qkv_order="kqv")
    hf = TransformersModel(model_id=source, seed=1)._hf_model().eval()
    batch = inputs(reference.config.image_token_id)
    with torch.no_grad():
        gap = (hf(**batch).logits - reference(**batch).logits).abs().max()
    assert gap > 1000 * ATOL


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c["vision_config"]["params"]["low_res_cfg"].update(model_name="siglip_huge"),
            "unknown vision towers",
        ),
        (lambda c: c["aligner_config"]["params"].update(depth=3), "projector"),
        (lambda c: c["vision_config"]["params"].update(concat_type="sequence"), "concat_type"),
    ],
)
def test_an_unsupported_variant_is_refused(change, message):
    config = original_config()
    change(config)
    converter = find_converter(config)
    with pytest.raises(ConversionError, match=message):
        converter.target_config(config)


def test_the_transformers_layouts_and_other_towers_are_left_alone():
    config = original_config()
    config["vision_config"] = {"cls": "SomeOtherTower", "params": {}}
    assert find_converter(config) is None
    assert find_converter({"model_type": "deepseek_vl_hybrid"}) is None
    assert find_converter({"model_type": "deepseek_vl"}) is None
