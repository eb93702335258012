"""Tiny random vision-language model directories, offline: tests, the VLM example, quick checks.

:func:`write_tiny_vlm` writes a model directory for one family: a ``config.json`` with a tiny
random config (2 text layers, a 1-layer vision tower, width 64), the bundled tiny tokenizer with
the family's image tokens added, and a ``preprocessor_config.json`` for the family's image
processor (small patches, so a 16x16 image is a handful of tokens). Models built from it start
from seeded random weights (no weight files); :class:`~twinkle.template.vision.VisionTemplate`
builds the family's processor from it without the hub.

Example::

    from twinkle.template.tiny_vlm import write_tiny_vlm
    model_dir = write_tiny_vlm("qwen2_5_vl", "/tmp/tiny-qwen2_5_vl")
    model = TransformersModel(model_id=model_dir)
"""

from __future__ import annotations

import json
import os
from typing import Any

#: The families this module can write (transformers ``model_type``).
TINY_VLM_FAMILIES: tuple[str, ...] = ("qwen2_5_vl", "qwen3_vl", "glm4v", "deepseek_vl", "deepseek_vl_hybrid")

_VOCAB = 3072  # the bundled tokenizer (3,008 entries) plus the added image tokens, rounded up
_HIDDEN = 64
_PATCH = 4
_MEAN = [0.5, 0.5, 0.5]
_STD = [0.5, 0.5, 0.5]


def _qwen_like_processor(min_pixels: int = 8 * 8, max_pixels: int = 32 * 32) -> dict[str, Any]:
    return {
        "patch_size": _PATCH,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "image_mean": _MEAN,
        "image_std": _STD,
    }


def _text(**extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": _VOCAB,
        "hidden_size": _HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "bos_token_id": None,
        **extra,
    }


def tiny_vlm_config(family: str, token_ids: dict[str, int]) -> dict[str, Any]:
    """The ``config.json`` content of a tiny ``family`` model whose image tokens have ``token_ids``.

    Raises:
        ValueError: an unknown family (the message lists :data:`TINY_VLM_FAMILIES`).
    """
    if family == "qwen2_5_vl":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        return {
            "model_type": "qwen2_5_vl",
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "text_config": _text(rope_parameters=rope, model_type="qwen2_5_vl_text"),
            "vision_config": {
                "depth": 1,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "patch_size": _PATCH,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 2 * _PATCH * 2,
                "fullatt_block_indexes": [0],
                "out_hidden_size": _HIDDEN,
            },
            "image_token_id": token_ids["<|image_pad|>"],
            "video_token_id": token_ids["<|video_pad|>"],
            "vision_start_token_id": token_ids["<|vision_start|>"],
            "vision_end_token_id": token_ids["<|vision_end|>"],
            "tie_word_embeddings": True,
        }
    if family == "qwen3_vl":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        return {
            "model_type": "qwen3_vl",
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "text_config": _text(rope_parameters=rope, head_dim=16, model_type="qwen3_vl_text"),
            "vision_config": {
                "depth": 1,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "patch_size": _PATCH,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "num_position_embeddings": 16,
                "deepstack_visual_indexes": [0],
                "out_hidden_size": _HIDDEN,
            },
            "image_token_id": token_ids["<|image_pad|>"],
            "video_token_id": token_ids["<|video_pad|>"],
            "vision_start_token_id": token_ids["<|vision_start|>"],
            "vision_end_token_id": token_ids["<|vision_end|>"],
            "tie_word_embeddings": True,
        }
    if family == "glm4v":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5}
        return {
            "model_type": "glm4v",
            "architectures": ["Glm4vForConditionalGeneration"],
            "text_config": _text(rope_parameters=rope, model_type="glm4v_text"),
            "vision_config": {
                "depth": 1,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "image_size": 4 * _PATCH,
                "patch_size": _PATCH,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "out_hidden_size": _HIDDEN,
            },
            "image_token_id": token_ids["<|image|>"],
            "video_token_id": token_ids["<|video|>"],
            "image_start_token_id": token_ids["<|begin_of_image|>"],
            "image_end_token_id": token_ids["<|end_of_image|>"],
            "video_start_token_id": token_ids["<|begin_of_video|>"],
            "video_end_token_id": token_ids["<|end_of_video|>"],
            "tie_word_embeddings": True,
        }
    if family in ("deepseek_vl", "deepseek_vl_hybrid"):
        siglip = {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 4 * _PATCH,
            "patch_size": _PATCH,
        }
        config: dict[str, Any] = {
            "model_type": family,
            "architectures": [
                "DeepseekVLForConditionalGeneration"
                if family == "deepseek_vl"
                else "DeepseekVLHybridForConditionalGeneration"
            ],
            "text_config": _text(model_type="llama", head_dim=16),
            "vision_config": siglip,
            "image_token_id": token_ids["<image_placeholder>"],
            "tie_word_embeddings": True,
        }
        if family == "deepseek_vl_hybrid":
            config["high_res_vision_config"] = {
                "model_type": "sam_vision_model",
                "hidden_size": 32,
                "output_channels": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "mlp_dim": 64,
                "image_size": 16 * _PATCH,
                "patch_size": _PATCH,
                "window_size": 4,
                "global_attn_indexes": [1],
            }
        return config
    raise ValueError(f"write_tiny_vlm: unknown family {family!r}; one of {', '.join(TINY_VLM_FAMILIES)}")


def _image_processor_config(family: str) -> dict[str, Any]:
    if family in ("qwen2_5_vl", "qwen3_vl"):
        return {"image_processor_type": "Qwen2VLImageProcessor", **_qwen_like_processor()}
    if family == "glm4v":
        return {"image_processor_type": "Glm4vImageProcessor", **_qwen_like_processor()}
    side = 4 * _PATCH
    common = {
        "size": {"height": side, "width": side},
        "image_mean": _MEAN,
        "image_std": _STD,
        "do_pad": True,
        "min_size": 4,
    }
    if family == "deepseek_vl":
        return {"image_processor_type": "DeepseekVLImageProcessor", **common}
    return {
        "image_processor_type": "DeepseekVLHybridImageProcessor",
        **common,
        "high_res_size": {"height": 16 * _PATCH, "width": 16 * _PATCH},
        "high_res_image_mean": _MEAN,
        "high_res_image_std": _STD,
    }


def write_tiny_vlm(family: str, target: str | os.PathLike[str]) -> str:
    """Write a tiny random ``family`` vision-language model directory (no weights) and return its path.

    Args:
        family: one of :data:`TINY_VLM_FAMILIES` (a transformers ``model_type``).
        target: the directory (created; files in it are overwritten).

    Returns:
        ``target`` as a string: ``config.json``, the tokenizer files with the family's image
        tokens, ``preprocessor_config.json``.
    """
    from transformers import AutoTokenizer

    from twinkle import assets
    from twinkle.template.vision import vision_family

    spec = vision_family(family)
    target = os.fspath(target)
    os.makedirs(target, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(assets.path("tiny-qwen2")))
    tokenizer.add_special_tokens(
        {"additional_special_tokens": list(spec.special_tokens)}, replace_extra_special_tokens=False
    )
    tokenizer.save_pretrained(target)
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in spec.special_tokens}
    if max(token_ids.values()) >= _VOCAB:
        raise AssertionError(f"write_tiny_vlm: token ids {token_ids} do not fit the vocabulary {_VOCAB}")
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(tiny_vlm_config(family, token_ids), f, indent=2)
    with open(os.path.join(target, "preprocessor_config.json"), "w") as f:
        json.dump(_image_processor_config(family), f, indent=2)
    return target
