"""ChatGLM2 / ChatGLM3 and GLM-4 checkpoints in the ChatGLM layout (``model_type: chatglm``) as transformers' ``glm``.

ChatGLM2's architecture is what transformers' ``glm`` computes:

* ``self_attention.query_key_value`` fuses ``[q (heads * head_dim), k (groups * head_dim),
  v (groups * head_dim)]`` rows, in that order (``multi_query_attention`` with
  ``multi_query_group_num`` key/value groups, else one per head); query head ``h`` attends with
  group ``h // (heads / groups)``; ``add_qkv_bias`` gives it a bias.
* RoPE on the first half of each head (``kv_channels // 2`` dimensions), on interleaved pairs
  ``(2i, 2i + 1)`` with frequency ``(10000 * rope_ratio) ** (-2i / (kv_channels / 2))``: ``glm``'s
  ``partial_rotary_factor=0.5`` with its interleaved ``rotate_half``.
* ``mlp.dense_h_to_4h`` fuses ``[gate; up]`` (SwiGLU on its two halves), as ``glm``'s
  ``gate_up_proj``; ``dense_4h_to_h`` is ``down_proj``.
* ``transformer.embedding.word_embeddings``, ``transformer.encoder.final_layernorm`` and
  ``transformer.output_layer`` are the embedding, final RMSNorm and LM head.

The saved ``transformer.rotary_pos_emb.inv_freq`` buffer is recomputed by ``glm``; it is kept
aside and written back unchanged. Variants the ``glm`` model cannot express (LayerNorm instead of
RMSNorm, post-LayerNorm residuals, biases on the dense layers, P-tuning prefixes, quantized
weights) raise :class:`ConversionError`.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from twinkle.convert.base import QKV, CheckpointConverter, ConversionError, Renames, gather_qkv, layer_of, require

logger = logging.getLogger(__name__)

_RENAMES = Renames(
    {
        "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "transformer.encoder.final_layernorm.weight": "model.norm.weight",
        "transformer.output_layer.weight": "lm_head.weight",
        "transformer.encoder.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
        "transformer.encoder.layers.{i}.post_attention_layernorm.weight": (
            "model.layers.{i}.post_attention_layernorm.weight"
        ),
        "transformer.encoder.layers.{i}.self_attention.dense.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight": "model.layers.{i}.mlp.gate_up_proj.weight",
        "transformer.encoder.layers.{i}.mlp.dense_4h_to_h.weight": "model.layers.{i}.mlp.down_proj.weight",
    }
)
_QKV_FUSED = "transformer.encoder.layers.{i}.self_attention.query_key_value.{s}"
_QKV = QKV

#: ChatGLM config fields the ``glm`` model has no counterpart for, and the value it computes.
_FIXED = {
    "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "original_rope": True,
    "pre_seq_len": None,
    "quantization_bit": 0,
}


class ChatGLMConverter(CheckpointConverter):
    """ChatGLM2 / ChatGLM3 / GLM-4 in the ChatGLM layout (``model_type: chatglm``) <-> transformers ``glm``."""

    name = "ChatGLM"
    source_model_types = ("chatglm",)
    target_model_type = "glm"
    passthrough = (r"transformer\.rotary_pos_emb\.inv_freq",)

    @staticmethod
    def _shape(config: Mapping[str, Any]) -> tuple[int, int, int]:
        """``(heads, groups, head_dim)``."""
        hidden = require(config, "hidden_size", "ChatGLM")
        heads = require(config, "num_attention_heads", "ChatGLM")
        head_dim = config.get("kv_channels") or hidden // heads
        groups = config.get("multi_query_group_num", 1) if config.get("multi_query_attention", False) else heads
        if heads % groups:
            raise ConversionError(
                f"ChatGLM: num_attention_heads={heads} is not a multiple of multi_query_group_num={groups}"
            )
        return heads, groups, head_dim

    def target_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        for key, value in _FIXED.items():
            if key in config and config[key] != value and not (value in (None, 0) and not config[key]):
                raise ConversionError(
                    f"ChatGLM: {key}={config[key]!r} is not supported by transformers' glm model (it computes "
                    f"{key}={value!r}); load this checkpoint with its own code"
                )
        if config.get("hidden_dropout"):
            logger.warning("ChatGLM: hidden_dropout=%s is not applied by transformers' glm", config["hidden_dropout"])
        heads, groups, head_dim = self._shape(config)
        if head_dim % 4:
            raise ConversionError(f"ChatGLM: kv_channels={head_dim} must be a multiple of 4 (RoPE on half a head)")
        base = 10000.0 * float(config.get("rope_ratio", 1))
        return {
            "vocab_size": require(config, "padded_vocab_size", "ChatGLM"),
            "hidden_size": config["hidden_size"],
            "intermediate_size": require(config, "ffn_hidden_size", "ChatGLM"),
            "num_hidden_layers": require(config, "num_layers", "ChatGLM"),
            "num_attention_heads": heads,
            "num_key_value_heads": groups,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "attention_dropout": float(config.get("attention_dropout", 0.0)),
            "max_position_embeddings": config.get("seq_length", 2048),
            "rms_norm_eps": config.get("layernorm_epsilon", 1e-5),
            "rope_parameters": {"rope_type": "default", "rope_theta": base, "partial_rotary_factor": 0.5},
            "attention_bias": bool(config.get("add_qkv_bias", False)),
            "tie_word_embeddings": False,
            "pad_token_id": config.get("pad_token_id", 0),
            "eos_token_id": config.get("eos_token_id", 2),
            "bos_token_id": config.get("bos_token_id"),
        }

    def to_target(self, state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
        heads, groups, head_dim = self._shape(config)
        sizes = (heads * head_dim, groups * head_dim, groups * head_dim)
        out: dict[str, Any] = {}
        for name, tensor in state_dict.items():
            fused = layer_of(name, _QKV_FUSED)
            if fused is not None:
                layer, suffix = fused
                if tensor.shape[0] != sum(sizes):
                    raise ConversionError(
                        f"ChatGLM: {name} has {tensor.shape[0]} rows, expected (heads + 2 * groups) * kv_channels = "
                        f"({heads} + 2 * {groups}) * {head_dim}"
                    )
                for proj, part in zip(_QKV, tensor.split(sizes, dim=0)):
                    out[f"model.layers.{layer}.self_attn.{proj}.{suffix}"] = part.clone()
                continue
            target = _RENAMES.forward(name)
            if target is None:
                raise ConversionError(f"ChatGLM: unexpected tensor {name!r} in the checkpoint")
            out[target] = tensor
        return out

    def to_original(self, state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        out, fused = gather_qkv(state_dict, _RENAMES, "ChatGLM")
        for (layer, suffix), parts in fused.items():
            out[_QKV_FUSED.format(i=layer, s=suffix)] = torch.cat([parts[p] for p in _QKV], dim=0)
        return out
