"""InternLM2 / InternLM2.5 checkpoints (``model_type: internlm2``, remote code) as transformers' Llama.

The architecture is Llama's (pre-norm RMSNorm, rotate-half RoPE, grouped-query attention,
SwiGLU); only the layout differs:

* ``attention.wqkv`` fuses the projections per key/value head: for each of the
  ``num_key_value_heads`` groups, its ``q_per_kv = heads / kv_heads`` query heads, then its key
  head, then its value head, each ``head_dim`` rows. Query head ``g * q_per_kv + j`` attends with
  key/value head ``g``, which is Llama's order once the rows are regrouped.
* ``feed_forward.w1`` / ``w3`` / ``w2`` are gate / up / down; ``attention_norm`` / ``ffn_norm``
  the two RMSNorms; ``tok_embeddings`` and ``output`` the embedding and the LM head.
* ``bias`` (default ``True`` in InternLM2's config class) puts biases on every projection:
  Llama's ``attention_bias`` and ``mlp_bias``.
* ``rope_scaling: {"type": "dynamic" | "linear", "factor": f}`` is Llama's rope type of that name.
"""

from __future__ import annotations

from typing import Any, Mapping

from twinkle.convert.base import QKV, CheckpointConverter, ConversionError, Renames, gather_qkv, layer_of, require

_RENAMES = Renames(
    {
        "model.tok_embeddings.weight": "model.embed_tokens.weight",
        "model.norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "model.layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
        "model.layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        **{
            f"model.layers.{{i}}.{a}.{s}": f"model.layers.{{i}}.{b}.{s}"
            for a, b in (
                ("attention.wo", "self_attn.o_proj"),
                ("feed_forward.w1", "mlp.gate_proj"),
                ("feed_forward.w3", "mlp.up_proj"),
                ("feed_forward.w2", "mlp.down_proj"),
            )
            for s in ("weight", "bias")
        },
    }
)
_WQKV = "model.layers.{i}.attention.wqkv.{s}"
_QKV = QKV


class InternLM2Converter(CheckpointConverter):
    """InternLM2 / InternLM2.5 (``model_type: internlm2``) <-> transformers ``llama``."""

    name = "InternLM2"
    source_model_types = ("internlm2",)
    target_model_type = "llama"

    @staticmethod
    def _heads(config: Mapping[str, Any]) -> tuple[int, int, int]:
        """``(kv_heads, q_per_kv, head_dim)``."""
        hidden = require(config, "hidden_size", "InternLM2")
        heads = require(config, "num_attention_heads", "InternLM2")
        kv_heads = config.get("num_key_value_heads") or heads
        if heads % kv_heads or hidden % heads:
            raise ConversionError(
                f"InternLM2: num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads} "
                f"and divide hidden_size={hidden}"
            )
        return kv_heads, heads // kv_heads, hidden // heads

    def target_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        bias = bool(config.get("bias", True))
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000))}
        scaling = config.get("rope_scaling")
        if scaling:
            kind = scaling.get("type") or scaling.get("rope_type")
            if kind not in ("dynamic", "linear"):
                raise ConversionError(
                    f"InternLM2: rope_scaling type {kind!r} is not supported; InternLM2 defines 'dynamic' and 'linear'"
                )
            rope.update(rope_type=kind, factor=float(scaling["factor"]))
        if config.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"InternLM2: hidden_act={config['hidden_act']!r}; the converter maps SwiGLU (silu)")
        kv_heads, _, head_dim = self._heads(config)
        return {
            "vocab_size": require(config, "vocab_size", "InternLM2"),
            "hidden_size": config["hidden_size"],
            "intermediate_size": require(config, "intermediate_size", "InternLM2"),
            "num_hidden_layers": require(config, "num_hidden_layers", "InternLM2"),
            "num_attention_heads": config["num_attention_heads"],
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": config.get("max_position_embeddings", 2048),
            "initializer_range": config.get("initializer_range", 0.02),
            "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
            "rope_parameters": rope,
            "attention_bias": bias,
            "mlp_bias": bias,
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
            "pad_token_id": config.get("pad_token_id", 0),
            "bos_token_id": config.get("bos_token_id", 1),
            "eos_token_id": config.get("eos_token_id", 2),
        }

    def to_target(self, state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
        kv_heads, q_per_kv, head_dim = self._heads(config)
        out: dict[str, Any] = {}
        for name, tensor in state_dict.items():
            fused = layer_of(name, _WQKV)
            if fused is not None:
                layer, suffix = fused
                rest = tuple(tensor.shape[1:])
                if tensor.shape[0] != kv_heads * (q_per_kv + 2) * head_dim:
                    raise ConversionError(
                        f"InternLM2: {name} has {tensor.shape[0]} rows, expected kv_heads * (q_per_kv + 2) * head_dim "
                        f"= {kv_heads} * {q_per_kv + 2} * {head_dim}"
                    )
                groups = tensor.reshape(kv_heads, q_per_kv + 2, head_dim, *rest)
                parts = (groups[:, :q_per_kv], groups[:, q_per_kv], groups[:, q_per_kv + 1])
                for proj, part in zip(_QKV, parts):
                    out[f"model.layers.{layer}.self_attn.{proj}.{suffix}"] = part.reshape(-1, *rest).clone()
                continue
            target = _RENAMES.forward(name)
            if target is None:
                raise ConversionError(f"InternLM2: unexpected tensor {name!r} in the checkpoint")
            out[target] = tensor
        return out

    def to_original(self, state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        kv_heads, q_per_kv, head_dim = self._heads(config)
        out, fused = gather_qkv(state_dict, _RENAMES, "InternLM2")
        for (layer, suffix), parts in fused.items():
            rest = tuple(parts["q_proj"].shape[1:])
            q = parts["q_proj"].reshape(kv_heads, q_per_kv, head_dim, *rest)
            k = parts["k_proj"].reshape(kv_heads, 1, head_dim, *rest)
            v = parts["v_proj"].reshape(kv_heads, 1, head_dim, *rest)
            out[_WQKV.format(i=layer, s=suffix)] = torch.cat([q, k, v], dim=1).reshape(-1, *rest)
        return out
