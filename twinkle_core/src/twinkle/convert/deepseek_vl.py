"""DeepSeek-VL checkpoints in their original layout (``model_type: multi_modality``, remote code) as
transformers' ``deepseek_vl_hybrid`` (deepseek-vl-7b: SigLIP + SAM towers) and ``deepseek_vl`` (1.3b).

The original repository (``deepseek_vl/models``) builds its towers from a model name and a table
of sizes (``SigLIP_MODEL_CONFIG``, ``SAM_MODEL_CONFIG``); ``config.json`` holds only the names:

* ``language_config``: a ``LlamaConfig`` dict (fields left out take Llama's defaults); its
  tensors are ``language_model.model.*`` and ``language_model.lm_head.weight``.
* ``vision_config: {"cls": "HybridVisionTower", "params": {"low_res_cfg": ..., "high_res_cfg": ...}}``:
  the low-resolution tower is a timm SigLIP ViT without its attention-pooling head
  (``vision_model.vision_tower_low.vision_tower.*``: fused ``attn.qkv`` rows q, k, v;
  ``pos_embed`` of shape ``(1, patches, width)``; ``select_layer`` keeps the first layers); the
  high-resolution tower is SAM ViT-B (``vision_model.vision_tower_high.vision_tower.*``: windowed
  attention with relative positions, ``neck`` and the global ``neck_hd``, two stride-2
  ``downsamples`` convolutions, the scalar ``hd_alpha_downsamples``).
* ``aligner_config: {"params": {"projector_type": "low_high_hybrid_split_mlp_gelu", "depth": 2}}``:
  ``high_up_proj`` / ``low_up_proj`` to half the text width each, then GELU and ``layers.1``.

The plain DeepSeek-VL (1.3b: ``CLIPVisionTower``, one SigLIP tower under
``vision_model.vision_tower.*``, the ``mlp_gelu`` aligner ``layers.0`` / ``layers.2``) becomes
transformers' ``deepseek_vl`` (:class:`DeepseekVLConverter`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from twinkle.convert.base import CheckpointConverter, ConversionError, require

#: ``SigLIP_MODEL_CONFIG`` of the original repository: tower name -> sizes (the image size comes
#: from ``low_res_cfg.image_size``). A test or plugin may add an entry for another tower.
SIGLIP_TOWERS: dict[str, dict[str, Any]] = {
    "siglip_so400m_patch14_384": {"width": 1152, "layers": 27, "heads": 16, "patch_size": 14, "mlp_ratio": 3.7362},
    "siglip_so400m_patch14_224": {"width": 1152, "layers": 27, "heads": 16, "patch_size": 14, "mlp_ratio": 3.7362},
    "siglip_large_patch16_384": {"width": 1024, "layers": 24, "heads": 16, "patch_size": 16, "mlp_ratio": 4},
}
#: ``SAM_MODEL_CONFIG`` of the original repository (``SAMViTCfg`` defaults: patch 16, 256 neck
#: channels); the original builds every SAM tower with 14x14 attention windows and MLP ratio 4.
SAM_TOWERS: dict[str, dict[str, Any]] = {
    "sam_b_downsample": {
        "width": 768,
        "layers": 12,
        "heads": 12,
        "global_attn_indexes": [2, 5, 8, 11],
        "downsample_channels": [512, 1024],
    },
}
_SAM_WINDOW = 14
#: The image token of DeepSeek-VL's tokenizer (``<image_placeholder>``) when the directory's
#: tokenizer files do not name it.
IMAGE_TOKEN = "<image_placeholder>"
_IMAGE_TOKEN_ID = 100015

_HIGH = "vision_model.vision_tower_high.vision_tower."
_SIGLIP = "model.vision_model."
_SAM = "model.high_res_vision_model.vision_encoder."

_LANGUAGE: tuple[tuple[str, str], ...] = (
    (r"language_model\.model\.(.+)", "model.language_model.{0}"),
    (r"language_model\.lm_head\.weight", "lm_head.weight"),
)


def _siglip_rules(low: str) -> tuple[tuple[str, str], ...]:
    """The SigLIP tower under the original prefix ``low`` (its pos_embed and fused qkv are reshaped apart)."""
    low = low.replace(".", r"\.")
    return (
        (low + r"patch_embed\.proj\.(weight|bias)", _SIGLIP + "embeddings.patch_embedding.{0}"),
        (low + r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", _SIGLIP + "encoder.layers.{0}.self_attn.out_proj.{1}"),
        (low + r"blocks\.(\d+)\.norm([12])\.(weight|bias)", _SIGLIP + "encoder.layers.{0}.layer_norm{1}.{2}"),
        (low + r"blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)", _SIGLIP + "encoder.layers.{0}.mlp.fc{1}.{2}"),
        (low + r"norm\.(weight|bias)", _SIGLIP + "post_layernorm.{0}"),
    )


_H = _HIGH.replace(".", r"\.")
#: (original regex, target template) of the hybrid's aligner and SAM tower; ``{0}``... the groups.
_HYBRID: tuple[tuple[str, str], ...] = (
    (r"aligner\.low_up_proj\.(weight|bias)", "model.aligner.vision_proj.{0}"),
    (r"aligner\.high_up_proj\.(weight|bias)", "model.aligner.high_res_vision_proj.{0}"),
    (r"aligner\.layers\.1\.(weight|bias)", "model.aligner.proj.{0}"),
    (_H + r"pos_embed", _SAM + "pos_embed"),
    (_H + r"patch_embed\.proj\.(weight|bias)", _SAM + "patch_embed.projection.{0}"),
    (_H + r"blocks\.(\d+)\.norm([12])\.(weight|bias)", _SAM + "layers.{0}.layer_norm{1}.{2}"),
    (_H + r"blocks\.(\d+)\.attn\.rel_pos_([hw])", _SAM + "layers.{0}.attn.rel_pos_{1}"),
    (_H + r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", _SAM + "layers.{0}.attn.{1}.{2}"),
    (_H + r"blocks\.(\d+)\.mlp\.lin([12])\.(weight|bias)", _SAM + "layers.{0}.mlp.lin{1}.{2}"),
    (_H + r"neck\.0\.weight", _SAM + "neck.conv1.weight"),
    (_H + r"neck\.1\.(weight|bias)", _SAM + "neck.layer_norm1.{0}"),
    (_H + r"neck\.2\.weight", _SAM + "neck.conv2.weight"),
    (_H + r"neck\.3\.(weight|bias)", _SAM + "neck.layer_norm2.{0}"),
    (_H + r"neck_hd\.0\.weight", "model.high_res_vision_neck.conv1.weight"),
    (_H + r"neck_hd\.1\.(weight|bias)", "model.high_res_vision_neck.layer_norm1.{0}"),
    (_H + r"neck_hd\.2\.weight", "model.high_res_vision_neck.conv2.weight"),
    (_H + r"neck_hd\.3\.(weight|bias)", "model.high_res_vision_neck.layer_norm2.{0}"),
    (_H + r"downsamples\.0\.weight", "model.high_res_vision_proj.conv1.weight"),
    (_H + r"downsamples\.1\.weight", "model.high_res_vision_proj.conv2.weight"),
    (_H + r"hd_alpha_downsamples", "model.high_res_vision_alpha"),
)
#: The plain (1.3b) aligner: ``Linear, GELU, Linear``.
_PLAIN: tuple[tuple[str, str], ...] = (
    (r"aligner\.layers\.0\.(weight|bias)", "model.aligner.linear1.{0}"),
    (r"aligner\.layers\.2\.(weight|bias)", "model.aligner.linear2.{0}"),
)
_TARGET_POS = _SIGLIP + "embeddings.position_embedding.weight"
_TARGET_QKV = _SIGLIP + r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)"


def _compile(rules: tuple[tuple[str, str], ...]) -> list[tuple[Any, str, Any, str]]:
    """Each rule both ways: (original regex, target template, target regex, original template)."""
    import re

    group = re.compile(r"\([^)]*\)")
    out = []
    for pattern, template in rules:
        groups = group.findall(pattern)
        original_template, target_regex = pattern, re.escape(template)
        for i, found in enumerate(groups):
            original_template = original_template.replace(found, f"{{{i}}}", 1)
            target_regex = target_regex.replace(re.escape(f"{{{i}}}"), found)
        original_template = original_template.replace("\\.", ".")
        out.append((re.compile(pattern), template, re.compile(target_regex), original_template))
    return out


def _text_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """``(text_config, tie_word_embeddings)`` from ``language_config`` (a Llama config dict)."""
    text = {
        k: v
        for k, v in require(config, "language_config", "DeepSeek-VL").items()
        if k not in ("torch_dtype", "dtype", "architectures", "_name_or_path", "transformers_version")
    }
    if text.get("model_type", "llama") != "llama":
        raise ConversionError(f"DeepSeek-VL: language_config model_type={text['model_type']!r}; expected 'llama'")
    text["model_type"] = "llama"
    tie = bool(text.get("tie_word_embeddings", False))
    text["tie_word_embeddings"] = tie
    return text, tie


def _siglip_config(cfg: Mapping[str, Any], siglip: Mapping[str, Any]) -> dict[str, Any]:
    """The SigLIP tower the original builds: ``select_layer`` <= 0 drops layers from the end, > 0 keeps that many."""
    total, select = siglip["layers"], int(cfg.get("select_layer", -1))
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": siglip["width"],
        "intermediate_size": int(siglip["width"] * siglip["mlp_ratio"]),
        "num_hidden_layers": min(total, total + select + 1) if select <= 0 else min(total, select),
        "num_attention_heads": siglip["heads"],
        "patch_size": siglip["patch_size"],
        "image_size": int(cfg.get("image_size", 384)),
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "vision_use_head": False,  # the original drops the attention-pooling head (ignore_head)
    }


class DeepseekVLHybridConverter(CheckpointConverter):
    """DeepSeek-VL 7b (``multi_modality``, ``HybridVisionTower``) <-> transformers ``deepseek_vl_hybrid``."""

    name = "DeepSeek-VL"
    source_model_types = ("multi_modality",)
    target_model_type = "deepseek_vl_hybrid"
    #: ``vision_config.cls`` of the original checkpoints this converter reads.
    vision_cls = "HybridVisionTower"
    #: The original SigLIP tower's tensor prefix.
    low_prefix = "vision_model.vision_tower_low.vision_tower."
    rules = _compile(_LANGUAGE + _siglip_rules(low_prefix) + _HYBRID)

    def matches(self, config: Mapping[str, Any]) -> bool:
        vision = config.get("vision_config") or {}
        return super().matches(config) and vision.get("cls") == self.vision_cls

    # -- config --------------------------------------------------------------------------------
    @staticmethod
    def _towers(config: Mapping[str, Any]) -> tuple[dict, dict, dict, dict]:
        """``(low_res_cfg, siglip sizes, high_res_cfg, sam sizes)``."""
        params = require(config, "vision_config", "DeepSeek-VL").get("params") or {}
        low, high = params.get("low_res_cfg") or {}, params.get("high_res_cfg") or {}
        siglip = SIGLIP_TOWERS.get(low.get("model_name"))
        sam = SAM_TOWERS.get(high.get("model_name"))
        if siglip is None or sam is None:
            raise ConversionError(
                f"DeepSeek-VL: unknown vision towers low_res_cfg.model_name={low.get('model_name')!r} "
                f"(known: {', '.join(SIGLIP_TOWERS)}), high_res_cfg.model_name={high.get('model_name')!r} "
                f"(known: {', '.join(SAM_TOWERS)}); "
                "add the sizes to twinkle.convert.deepseek_vl.SIGLIP_TOWERS / SAM_TOWERS"
            )
        if params.get("concat_type", "tuple") != "tuple":
            raise ConversionError(
                f"DeepSeek-VL: vision concat_type={params['concat_type']!r}; the converter maps 'tuple'"
            )
        return low, siglip, high, sam

    def target_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        low, siglip, high, sam = self._towers(config)
        aligner = (require(config, "aligner_config", "DeepSeek-VL").get("params")) or {}
        if aligner.get("projector_type") != "low_high_hybrid_split_mlp_gelu" or aligner.get("depth", 2) != 2:
            raise ConversionError(
                f"DeepSeek-VL: aligner projector_type={aligner.get('projector_type')!r}, "
                f"depth={aligner.get('depth')!r}; "
                "transformers' deepseek_vl_hybrid has the 'low_high_hybrid_split_mlp_gelu' projector of depth 2"
            )
        text, tie = _text_config(config)
        out_channels = sam.get("prompt_embed_dim", 256)
        if list(sam.get("downsample_channels", ())) != [2 * out_channels, 4 * out_channels]:
            raise ConversionError(
                f"DeepSeek-VL: SAM downsample_channels={sam.get('downsample_channels')}; transformers' "
                f"deepseek_vl_hybrid has two stride-2 convolutions to {2 * out_channels} "
                f"and {4 * out_channels} channels"
            )
        width = sam["width"]
        return {
            "text_config": text,
            "vision_config": _siglip_config(low, siglip),
            "high_res_vision_config": {
                "model_type": "sam_vision_model",
                "hidden_size": width,
                "output_channels": out_channels,
                "num_hidden_layers": sam["layers"],
                "num_attention_heads": sam["heads"],
                "mlp_dim": 4 * width,
                "image_size": int(high.get("image_size", 1024)),
                "patch_size": sam.get("patch_size", 16),
                "window_size": _SAM_WINDOW,
                "global_attn_indexes": list(sam["global_attn_indexes"]),
                "layer_norm_eps": 1e-6,
                "qkv_bias": True,
                "use_rel_pos": True,
            },
            "image_token_id": config.get("image_token_id", _IMAGE_TOKEN_ID),
            "tie_word_embeddings": tie,
        }

    def directory_fields(self, model_dir: str | Path) -> dict[str, Any]:
        """``image_token_id``: the id of ``<image_placeholder>`` in the directory's tokenizer files."""
        for name in ("tokenizer.json", "tokenizer_config.json"):
            path = Path(model_dir) / name
            if not path.is_file():
                continue
            data = json.loads(path.read_text(encoding="utf-8"))
            for entry in data.get("added_tokens") or []:
                if entry.get("content") == IMAGE_TOKEN:
                    return {"image_token_id": int(entry["id"])}
            for token_id, entry in (data.get("added_tokens_decoder") or {}).items():
                if entry.get("content") == IMAGE_TOKEN:
                    return {"image_token_id": int(token_id)}
            vocab = (data.get("model") or {}).get("vocab") or {}
            if isinstance(vocab, dict) and IMAGE_TOKEN in vocab:
                return {"image_token_id": int(vocab[IMAGE_TOKEN])}
        return {}

    # -- tensors -------------------------------------------------------------------------------
    def to_target(self, state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
        import re

        out: dict[str, Any] = {}
        for name, tensor in state_dict.items():
            if name == self.low_prefix + "pos_embed":
                out[_TARGET_POS] = tensor.squeeze(0)
                continue
            fused = re.fullmatch(re.escape(self.low_prefix) + r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", name)
            if fused is not None:
                layer, suffix = fused.groups()
                if tensor.shape[0] % 3:
                    raise ConversionError(f"DeepSeek-VL: {name} has {tensor.shape[0]} rows, not 3 equal q/k/v parts")
                for proj, part in zip("qkv", tensor.chunk(3, dim=0)):
                    out[f"{_SIGLIP}encoder.layers.{layer}.self_attn.{proj}_proj.{suffix}"] = part.clone()
                continue
            for pattern, template, _, _ in self.rules:
                match = pattern.fullmatch(name)
                if match:
                    out[template.format(*match.groups())] = tensor
                    break
            else:
                raise ConversionError(f"DeepSeek-VL: unexpected tensor {name!r} in the checkpoint")
        return out

    def to_original(self, state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
        import re

        import torch

        out: dict[str, Any] = {}
        qkv: dict[tuple[str, str], dict[str, Any]] = {}
        for name, tensor in state_dict.items():
            if name == _TARGET_POS:
                out[self.low_prefix + "pos_embed"] = tensor.unsqueeze(0)
                continue
            split = re.fullmatch(_TARGET_QKV, name)
            if split is not None:
                layer, proj, suffix = split.groups()
                qkv.setdefault((layer, suffix), {})[proj] = tensor
                continue
            for _, _, pattern, template in self.rules:
                match = pattern.fullmatch(name)
                if match:
                    out[template.format(*match.groups())] = tensor
                    break
            else:
                raise ConversionError(f"DeepSeek-VL: the model has a tensor {name!r} with no place in DeepSeek-VL")
        for (layer, suffix), parts in qkv.items():
            if set(parts) != set("qkv"):
                raise ConversionError(f"DeepSeek-VL: SigLIP layer {layer} lacks one of q/k/v_proj.{suffix}")
            out[f"{self.low_prefix}blocks.{layer}.attn.qkv.{suffix}"] = torch.cat([parts[p] for p in "qkv"], dim=0)
        return out


class DeepseekVLConverter(DeepseekVLHybridConverter):
    """DeepSeek-VL 1.3b (``multi_modality``, ``CLIPVisionTower``) <-> transformers ``deepseek_vl``.

    One SigLIP tower (``vision_model.vision_tower.*``, sizes by ``params.model_name``) and the
    ``mlp_gelu`` aligner of depth 2 (``layers.0``, GELU, ``layers.2``).
    """

    target_model_type = "deepseek_vl"
    vision_cls = "CLIPVisionTower"
    low_prefix = "vision_model.vision_tower."
    rules = _compile(_LANGUAGE + _siglip_rules(low_prefix) + _PLAIN)

    def target_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        params = require(config, "vision_config", "DeepSeek-VL").get("params") or {}
        siglip = SIGLIP_TOWERS.get(params.get("model_name"))
        if siglip is None:
            raise ConversionError(
                f"DeepSeek-VL: unknown vision towers params.model_name={params.get('model_name')!r} "
                f"(known: {', '.join(SIGLIP_TOWERS)}); add the sizes to twinkle.convert.deepseek_vl.SIGLIP_TOWERS"
            )
        aligner = (require(config, "aligner_config", "DeepSeek-VL").get("params")) or {}
        if aligner.get("projector_type") != "mlp_gelu" or aligner.get("depth", 2) != 2:
            raise ConversionError(
                f"DeepSeek-VL: aligner projector_type={aligner.get('projector_type')!r}, "
                f"depth={aligner.get('depth')!r}; transformers' deepseek_vl has the 'mlp_gelu' projector of depth 2"
            )
        text, tie = _text_config(config)
        return {
            "text_config": text,
            "vision_config": _siglip_config(params, siglip),
            "image_token_id": config.get("image_token_id", _IMAGE_TOKEN_ID),
            "tie_word_embeddings": tie,
        }
