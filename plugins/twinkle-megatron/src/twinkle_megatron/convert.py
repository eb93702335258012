"""Hugging Face <-> megatron-core: model configuration and weights, per model family.

Supported ``model_type`` values (:data:`SUPPORTED_MODEL_TYPES`): ``qwen2``, ``qwen3``,
``llama``, ``qwen2_moe``, ``qwen3_moe``. Each becomes a megatron-core ``GPTModel`` built
from the local (Transformer-Engine-free) layer spec with the same numerics as the
transformers implementation: RMSNorm, rotary embeddings (rotate-half), grouped-query
attention, SwiGLU MLPs, and for MoE a top-k softmax router (``norm_topk_prob`` maps to
``moe_router_pre_softmax``), per-expert SwiGLU MLPs and Qwen2-MoE's sigmoid-gated shared
expert.

Weights are converted as whole (unsharded) tensors keyed by their names:

* HF ``q_proj/k_proj/v_proj`` <-> megatron ``linear_qkv``, laid out per query group as
  ``[q heads of the group, k, v]`` (biases alike);
* HF ``gate_proj`` + ``up_proj`` <-> megatron ``linear_fc1`` (``[gate; up]``);
* HF experts in either layout transformers uses (fused ``experts.gate_up_proj`` /
  ``experts.down_proj`` 3-D tensors, or one module per expert) <-> megatron
  ``experts.local_experts.{e}.linear_fc1/linear_fc2``.

Example::

    spec = megatron_spec_from_hf(hf_config)
    mg_state = hf_to_megatron(hf_model.state_dict(), hf_config)
    hf_state = megatron_to_hf(mg_state, hf_config, hf_layout=hf_model.state_dict().keys())
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("qwen2", "qwen3", "llama", "qwen2_moe", "qwen3_moe")
MOE_MODEL_TYPES: frozenset[str] = frozenset({"qwen2_moe", "qwen3_moe"})


class ConversionError(ValueError):
    """A model or checkpoint this converter cannot express in megatron-core, with the reason."""


@dataclass
class MegatronSpec:
    """What building the megatron ``GPTModel`` for one HF configuration needs.

    Attributes:
        config_kwargs: keyword arguments of ``megatron.core.transformer.TransformerConfig``.
        model_kwargs: keyword arguments of ``GPTModel`` besides config and layer spec.
        num_experts: experts per MoE layer (``None`` for dense models).
        qk_layernorm: per-head RMSNorm of queries and keys (Qwen3).
    """

    config_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    num_experts: int | None = None
    qk_layernorm: bool = False


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default)


def _rope_theta(cfg: Any) -> float:
    params = _get(cfg, "rope_parameters") or {}
    scaling = _get(cfg, "rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConversionError(
            f"{cfg.model_type}: rope_type={rope_type!r} is not supported by Twinkle's megatron converter (only "
            f"plain rotary embeddings); use TransformersModel for this checkpoint"
        )
    theta = params.get("rope_theta", _get(cfg, "rope_theta"))
    return float(theta if theta is not None else 10000.0)


def check_supported(cfg: Any) -> str:
    """The model type of ``cfg`` if this converter supports it.

    Raises:
        ConversionError: naming the type, the supported ones, and the alternative.
    """
    model_type = _get(cfg, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"MegatronModel does not support model_type={model_type!r}; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Use TransformersModel for other families."
        )
    if _get(cfg, "use_sliding_window", False):
        raise ConversionError(f"{model_type}: use_sliding_window=True is not supported by MegatronModel")
    return model_type


def megatron_spec_from_hf(cfg: Any, params_dtype: Any = None) -> MegatronSpec:
    """Translate a transformers ``PretrainedConfig`` into megatron-core settings.

    Args:
        cfg: the HF configuration (``model_type`` in :data:`SUPPORTED_MODEL_TYPES`).
        params_dtype: torch dtype of the parameters (default float32).

    Returns:
        A :class:`MegatronSpec`.

    Raises:
        ConversionError: an unsupported family or feature.
    """
    import torch
    import torch.nn.functional as F

    model_type = check_supported(cfg)
    heads = cfg.num_attention_heads
    head_dim = _get(cfg, "head_dim") or cfg.hidden_size // heads
    act = _get(cfg, "hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{model_type}: hidden_act={act!r} is not supported (only silu / SwiGLU)")
    qk_layernorm = model_type in ("qwen3", "qwen3_moe")
    if model_type in ("qwen2", "qwen2_moe"):
        qkv_bias = True
    else:
        qkv_bias = bool(_get(cfg, "attention_bias", False))
    if model_type == "llama" and _get(cfg, "mlp_bias", False):
        raise ConversionError("llama: mlp_bias=True is not supported by MegatronModel")
    dtype = params_dtype or torch.float32
    config_kwargs: dict[str, Any] = dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=heads,
        num_query_groups=_get(cfg, "num_key_value_heads") or heads,
        kv_channels=head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=qkv_bias,
        qk_layernorm=qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        init_method_std=_get(cfg, "initializer_range", 0.02),
    )
    num_experts = None
    if model_type in MOE_MODEL_TYPES:
        num_experts = cfg.num_experts
        sparse_step = _get(cfg, "decoder_sparse_step", 1) or 1
        dense_layers = set(_get(cfg, "mlp_only_layers", None) or [])
        freq = [0 if (i in dense_layers or (i + 1) % sparse_step != 0) else 1 for i in range(cfg.num_hidden_layers)]
        config_kwargs.update(
            num_moe_experts=num_experts,
            moe_router_topk=cfg.num_experts_per_tok,
            moe_ffn_hidden_size=cfg.moe_intermediate_size,
            moe_router_pre_softmax=not bool(_get(cfg, "norm_topk_prob", False)),
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            moe_layer_freq=freq if 0 in freq else 1,
        )
        shared = _get(cfg, "shared_expert_intermediate_size", 0) or 0
        if shared:
            config_kwargs.update(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=True)
    model_kwargs = dict(
        vocab_size=cfg.vocab_size,
        max_sequence_length=_get(cfg, "max_position_embeddings", 4096),
        position_embedding_type="rope",
        rotary_base=_rope_theta(cfg),
        share_embeddings_and_output_weights=bool(_get(cfg, "tie_word_embeddings", False)),
    )
    return MegatronSpec(config_kwargs, model_kwargs, num_experts, qk_layernorm)


# -- weights ---------------------------------------------------------------------------
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MG_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

#: one-to-one renames inside a layer, HF -> megatron.
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.shared_expert.down_proj.weight": "mlp.shared_experts.linear_fc2.weight",
    "mlp.shared_expert_gate.weight": "mlp.shared_experts.gate_weight",
}
_TOP_RENAMES = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}


def _groups(cfg: Any) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    groups = _get(cfg, "num_key_value_heads") or heads
    head_dim = _get(cfg, "head_dim") or cfg.hidden_size // heads
    return heads, groups, head_dim


def fuse_qkv(q: Any, k: Any, v: Any, cfg: Any) -> Any:
    """HF q/k/v projection weights (or biases) -> megatron's per-group interleaved ``linear_qkv``."""
    import torch

    heads, groups, d = _groups(cfg)
    tail = q.shape[1:]
    qg = q.reshape(groups, (heads // groups) * d, *tail)
    kg = k.reshape(groups, d, *tail)
    vg = v.reshape(groups, d, *tail)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *tail)


def split_qkv(qkv: Any, cfg: Any) -> tuple[Any, Any, Any]:
    """Inverse of :func:`fuse_qkv`."""
    heads, groups, d = _groups(cfg)
    per = heads // groups
    tail = qkv.shape[1:]
    g = qkv.reshape(groups, (per + 2) * d, *tail)
    q = g[:, : per * d].reshape(heads * d, *tail)
    k = g[:, per * d : (per + 1) * d].reshape(groups * d, *tail)
    v = g[:, (per + 1) * d :].reshape(groups * d, *tail)
    return q.contiguous(), k.contiguous(), v.contiguous()


def hf_to_megatron(hf_state: Mapping[str, Any], cfg: Any) -> dict[str, Any]:
    """Convert a transformers state dict into a whole (unsharded) megatron ``GPTModel`` state dict.

    Args:
        hf_state: ``AutoModelForCausalLM(...).state_dict()`` of a supported family.
        cfg: its configuration.

    Returns:
        ``{megatron name: tensor}``; ``output_layer.weight`` is left out for tied embeddings.

    Raises:
        ConversionError: a weight this converter does not know (so nothing is silently dropped).
    """
    import torch

    check_supported(cfg)
    tied = bool(_get(cfg, "tie_word_embeddings", False))
    out: dict[str, Any] = {}
    pending: dict[tuple[int, str], dict[str, Any]] = {}
    for name, tensor in hf_state.items():
        if name in _TOP_RENAMES:
            if name == "lm_head.weight" and tied:
                continue
            out[_TOP_RENAMES[name]] = tensor
            continue
        m = _LAYER.match(name)
        if m is None:
            raise ConversionError(f"unknown weight {name!r} in a {cfg.model_type} checkpoint")
        layer, rest = int(m.group(1)), m.group(2)
        prefix = f"decoder.layers.{layer}."
        if rest in _LAYER_RENAMES:
            out[prefix + _LAYER_RENAMES[rest]] = tensor
            continue
        attn = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if attn:
            pending.setdefault((layer, "qkv." + attn.group(2)), {})[attn.group(1)] = tensor
            continue
        mlp = re.match(r"^mlp\.(shared_expert\.|experts\.(\d+)\.)?(gate|up)_proj\.weight$", rest)
        if mlp:
            pending.setdefault((layer, "fc1." + (mlp.group(1) or "")), {})[mlp.group(3)] = tensor
            continue
        down = re.match(r"^mlp\.experts\.(\d+)\.down_proj\.weight$", rest)
        if down:
            out[prefix + f"mlp.experts.local_experts.{down.group(1)}.linear_fc2.weight"] = tensor
            continue
        if rest == "mlp.experts.gate_up_proj":
            for e in range(tensor.shape[0]):
                out[prefix + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = tensor[e].contiguous()
            continue
        if rest == "mlp.experts.down_proj":
            for e in range(tensor.shape[0]):
                out[prefix + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = tensor[e].contiguous()
            continue
        raise ConversionError(f"unknown weight {name!r} in a {cfg.model_type} checkpoint")
    for (layer, what), parts in pending.items():
        prefix = f"decoder.layers.{layer}."
        if what.startswith("qkv."):
            kind = what.split(".", 1)[1]
            if set(parts) != {"q", "k", "v"}:
                raise ConversionError(f"layer {layer}: q/k/v {kind} incomplete (have {sorted(parts)})")
            out[prefix + f"self_attention.linear_qkv.{kind}"] = fuse_qkv(parts["q"], parts["k"], parts["v"], cfg)
        else:
            if set(parts) != {"gate", "up"}:
                raise ConversionError(f"layer {layer}: gate/up projections incomplete (have {sorted(parts)})")
            fused = torch.cat([parts["gate"], parts["up"]], dim=0)
            sub = what.split(".", 1)[1]
            if sub == "":
                out[prefix + "mlp.linear_fc1.weight"] = fused
            elif sub == "shared_expert.":
                out[prefix + "mlp.shared_experts.linear_fc1.weight"] = fused
            else:
                e = sub.split(".")[1]
                out[prefix + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = fused
    return out


def megatron_to_hf(mg_state: Mapping[str, Any], cfg: Any, hf_layout: Iterable[str] | None = None) -> dict[str, Any]:
    """Convert a whole megatron ``GPTModel`` state dict back to transformers names.

    Args:
        mg_state: ``{megatron name: tensor}`` (``_extra_state`` entries are ignored).
        cfg: the HF configuration of the family.
        hf_layout: the key names of the target transformers model; decides whether experts
            are written fused (``experts.gate_up_proj``) or one module per expert.
            ``None``: fused (the layout of transformers 5).

    Returns:
        ``{HF name: tensor}``, including ``lm_head.weight`` (a copy of the embedding when tied).

    Raises:
        ConversionError: a megatron weight this converter does not know.
    """
    import torch

    check_supported(cfg)
    keys = set(hf_layout) if hf_layout is not None else None
    fused_experts = keys is None or any(k.endswith("mlp.experts.gate_up_proj") for k in keys)
    reverse = {v: k for k, v in _LAYER_RENAMES.items()}
    top = {v: k for k, v in _TOP_RENAMES.items()}
    out: dict[str, Any] = {}
    experts: dict[tuple[int, str], dict[int, Any]] = {}
    for name, tensor in mg_state.items():
        if name.endswith("_extra_state"):
            continue
        if name in top:
            out[top[name]] = tensor
            continue
        m = _MG_LAYER.match(name)
        if m is None:
            raise ConversionError(f"unknown megatron weight {name!r}")
        layer, rest = int(m.group(1)), m.group(2)
        prefix = f"model.layers.{layer}."
        if rest in reverse:
            out[prefix + reverse[rest]] = tensor
        elif rest.startswith("self_attention.linear_qkv."):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = split_qkv(tensor, cfg)
            for proj, t in zip("qkv", (q, k, v)):
                out[prefix + f"self_attn.{proj}_proj.{kind}"] = t
        elif rest in ("mlp.linear_fc1.weight", "mlp.shared_experts.linear_fc1.weight"):
            gate, up = tensor.chunk(2, dim=0)
            sub = "mlp." if rest.startswith("mlp.linear") else "mlp.shared_expert."
            out[prefix + sub + "gate_proj.weight"] = gate.contiguous()
            out[prefix + sub + "up_proj.weight"] = up.contiguous()
        else:
            em = re.match(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$", rest)
            if em is None:
                raise ConversionError(f"unknown megatron weight {name!r}")
            experts.setdefault((layer, em.group(2)), {})[int(em.group(1))] = tensor
    for (layer, which), per_expert in experts.items():
        prefix = f"model.layers.{layer}.mlp.experts."
        order = [per_expert[e] for e in sorted(per_expert)]
        if fused_experts:
            out[prefix + ("gate_up_proj" if which == "linear_fc1" else "down_proj")] = torch.stack(order)
        else:
            for e, t in enumerate(order):
                if which == "linear_fc1":
                    gate, up = t.chunk(2, dim=0)
                    out[prefix + f"{e}.gate_proj.weight"] = gate.contiguous()
                    out[prefix + f"{e}.up_proj.weight"] = up.contiguous()
                else:
                    out[prefix + f"{e}.down_proj.weight"] = t
    if "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out
