"""Hugging Face <-> megatron-core: model configuration and weights, per model family.

Supported ``model_type`` values (:data:`SUPPORTED_MODEL_TYPES`): ``qwen2``, ``qwen3``,
``llama``, ``qwen2_moe``, ``qwen3_moe``, ``deepseek_v2``, ``deepseek_v3``. Each becomes a
megatron-core ``GPTModel`` built from the local (Transformer-Engine-free) layer spec with the
same numerics as the transformers implementation: RMSNorm, rotary embeddings (rotate-half),
grouped-query attention, SwiGLU MLPs, and for MoE a top-k softmax router (``norm_topk_prob``
maps to ``moe_router_pre_softmax``), per-expert SwiGLU MLPs and Qwen2-MoE's sigmoid-gated
shared expert.

DeepSeek-V2/V3 use megatron-core's multi-latent attention (``MLATransformerConfig``,
``MLASelfAttention``): ``first_k_dense_replace`` dense layers, then MoE layers with ungated
shared experts; the V2 router is softmax top-k (``greedy`` or ``group_limited_greedy``), the
V3 router sigmoid scores plus ``e_score_correction_bias`` (megatron's ``expert_bias``) with
group-limited top-k; both scale by ``routed_scaling_factor``. Multi-token-prediction layers
are not part of the transformers model and are not converted.

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

SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "qwen2",
    "qwen3",
    "llama",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
)
MOE_MODEL_TYPES: frozenset[str] = frozenset({"qwen2_moe", "qwen3_moe"})
#: families with multi-latent attention (and DeepSeek MoE): see :func:`deepseek_spec`.
MLA_MODEL_TYPES: frozenset[str] = frozenset({"deepseek_v2", "deepseek_v3"})


class ConversionError(ValueError):
    """A model or checkpoint this converter cannot express in megatron-core, with the reason."""


@dataclass
class MegatronSpec:
    """What building the megatron ``GPTModel`` for one HF configuration needs.

    Attributes:
        config_kwargs: keyword arguments of ``megatron.core.transformer.TransformerConfig``.
        model_kwargs: keyword arguments of ``GPTModel`` besides config and layer spec.
        num_experts: experts per MoE layer (``None`` for dense models).
        qk_layernorm: per-head RMSNorm of queries and keys (Qwen3), or MLA's RMSNorm of the
            compressed query and key-value latents (DeepSeek).
        multi_latent_attention: build ``MLATransformerConfig`` and MLA layers (DeepSeek).
    """

    config_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    num_experts: int | None = None
    qk_layernorm: bool = False
    multi_latent_attention: bool = False


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
    if model_type in MLA_MODEL_TYPES:
        _check_deepseek(cfg)
    return model_type


def _check_deepseek(cfg: Any) -> None:
    """Refuse the DeepSeek settings megatron-core's MLA and router cannot reproduce exactly."""
    t = cfg.model_type
    heads = cfg.num_attention_heads
    if (_get(cfg, "num_key_value_heads") or heads) != heads:
        raise ConversionError(
            f"{t}: num_key_value_heads={cfg.num_key_value_heads} != num_attention_heads={heads}; multi-latent "
            f"attention has one key/value head per query head (set num_key_value_heads={heads})"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if _get(cfg, flag, False):
            raise ConversionError(f"{t}: {flag}=True is not supported by MegatronModel (megatron's MLA has no biases)")
    if float(cfg.rms_norm_eps) != 1e-6:
        raise ConversionError(
            f"{t}: rms_norm_eps={cfg.rms_norm_eps}; transformers normalizes the q/kv latents with eps=1e-6 whatever "
            f"rms_norm_eps says, megatron-core uses one epsilon for all norms: only rms_norm_eps=1e-6 converts exactly"
        )
    _deepseek_rope(cfg)
    _deepseek_router(cfg)


def _deepseek_rope(cfg: Any) -> dict[str, Any]:
    """MLA rotary settings (``MLATransformerConfig`` fields) of a DeepSeek config."""
    params = dict(_get(cfg, "rope_parameters") or {})
    params.update(_get(cfg, "rope_scaling") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta", _get(cfg, "rope_theta"))
    base = float(theta if theta is not None else 10000.0)
    if rope_type == "default":
        return dict(rope_type="rope", rotary_base=base)
    if rope_type != "yarn":
        raise ConversionError(
            f"{cfg.model_type}: rope_type={rope_type!r} is not supported by Twinkle's megatron converter (plain "
            f"rotary embeddings and YaRN are); use TransformersModel for this checkpoint"
        )
    if params.get("attention_factor") is not None or not params.get("truncate", True):
        raise ConversionError(
            f"{cfg.model_type}: YaRN with an explicit attention_factor or truncate=False is not supported by "
            f"megatron-core's MLA (it derives the factor from mscale / mscale_all_dim and rounds the correction range)"
        )
    original = params.get("original_max_position_embeddings")
    if not original:
        raise ConversionError(f"{cfg.model_type}: YaRN rope_parameters need original_max_position_embeddings")
    factor = params.get("factor") or cfg.max_position_embeddings / original
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    return dict(
        rope_type="yarn",
        rotary_base=base,
        rotary_scaling_factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        # transformers uses mscale only together with mscale_all_dim (else the plain YaRN factor)
        mscale=float(mscale) if mscale and mscale_all_dim else 1.0,
        mscale_all_dim=float(mscale_all_dim or 0.0),
    )


def _group_limit(cfg: Any, per_group: int, how: str) -> dict[str, Any]:
    """megatron's group-limited routing for HF's ``n_group`` / ``topk_group``, or nothing when it is a no-op.

    megatron scores a group by the sum of its top ``topk // group_topk`` experts; transformers by
    ``per_group`` experts (V2 ``group_limited_greedy``: the best one; V3: the best two).
    """
    groups, group_topk, topk = _get(cfg, "n_group") or 1, _get(cfg, "topk_group") or 1, cfg.num_experts_per_tok
    if groups <= 1 or group_topk >= groups:
        return {}  # every group is selected: plain top-k
    if topk // group_topk != per_group:
        raise ConversionError(
            f"{cfg.model_type}: group-limited routing with num_experts_per_tok={topk}, topk_group={group_topk} "
            f"scores a group by its top {topk // group_topk} experts in megatron-core but by {how} in transformers; "
            f"only num_experts_per_tok // topk_group == {per_group} converts exactly. Use TransformersModel"
        )
    return dict(moe_router_num_groups=groups, moe_router_group_topk=group_topk)


def _deepseek_router(cfg: Any) -> dict[str, Any]:
    """megatron router settings (``TransformerConfig`` fields) of a DeepSeek MoE config."""
    t = cfg.model_type
    topk = cfg.num_experts_per_tok
    scaling = float(_get(cfg, "routed_scaling_factor", 1.0) or 1.0)
    out: dict[str, Any] = dict(moe_router_topk_scaling_factor=scaling if scaling != 1.0 else None)
    if t == "deepseek_v2":
        method = _get(cfg, "topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ConversionError(
                f"deepseek_v2: topk_method={method!r} is not supported (transformers implements 'greedy' and "
                f"'group_limited_greedy')"
            )
        # transformers' V2 router: softmax over all experts, top-k, no renormalization (norm_topk_prob unused)
        out.update(moe_router_score_function="softmax", moe_router_pre_softmax=True)
        if method == "group_limited_greedy":
            out.update(_group_limit(cfg, 1, "its best expert"))
        return out
    norm = bool(_get(cfg, "norm_topk_prob", True))
    if norm != (topk > 1):
        raise ConversionError(
            f"deepseek_v3: norm_topk_prob={norm} with num_experts_per_tok={topk}: megatron-core's sigmoid router "
            f"normalizes the top-k weights exactly when k > 1; only norm_topk_prob={topk > 1} converts exactly"
        )
    out.update(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0,  # transformers keeps e_score_correction_bias fixed
    )
    out.update(_group_limit(cfg, 2, "the sum of its best two experts"))
    return out


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
    if model_type in MLA_MODEL_TYPES:
        return deepseek_spec(cfg, config_kwargs)
    model_kwargs = dict(
        vocab_size=cfg.vocab_size,
        max_sequence_length=_get(cfg, "max_position_embeddings", 4096),
        position_embedding_type="rope",
        rotary_base=_rope_theta(cfg),
        share_embeddings_and_output_weights=bool(_get(cfg, "tie_word_embeddings", False)),
    )
    return MegatronSpec(config_kwargs, model_kwargs, num_experts, qk_layernorm)


def deepseek_spec(cfg: Any, base_kwargs: Mapping[str, Any]) -> MegatronSpec:
    """The :class:`MegatronSpec` of a DeepSeek-V2/V3 config: MLA, dense-then-MoE layers, its router.

    Args:
        cfg: a ``deepseek_v2`` / ``deepseek_v3`` configuration (checked by :func:`check_supported`).
        base_kwargs: the family-independent ``TransformerConfig`` keywords (norms, fusions off, dtype).

    Returns:
        A spec with ``multi_latent_attention=True`` whose ``config_kwargs`` are ``MLATransformerConfig``
        keywords.
    """
    heads = cfg.num_attention_heads
    layers = cfg.num_hidden_layers
    dense = min(int(_get(cfg, "first_k_dense_replace", 0) or 0), layers)
    kwargs = dict(base_kwargs)
    kwargs.update(
        num_query_groups=heads,
        kv_channels=cfg.v_head_dim,  # megatron's core attention sizes its output by kv_channels * heads
        qk_layernorm=True,  # the RMSNorms of the compressed q and kv latents
        multi_latent_attention=True,
        q_lora_rank=_get(cfg, "q_lora_rank"),
        kv_lora_rank=cfg.kv_lora_rank,
        qk_head_dim=cfg.qk_nope_head_dim,
        qk_pos_emb_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        **_deepseek_rope(cfg),
    )
    num_experts = None
    if dense < layers:
        num_experts = cfg.n_routed_experts
        shared = (_get(cfg, "n_shared_experts", 0) or 0) * cfg.moe_intermediate_size
        kwargs.update(
            num_moe_experts=num_experts,
            moe_router_topk=cfg.num_experts_per_tok,
            moe_ffn_hidden_size=cfg.moe_intermediate_size,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            moe_layer_freq=[0] * dense + [1] * (layers - dense),
            moe_router_dtype="fp32",  # transformers computes DeepSeek router logits in float32
            **_deepseek_router(cfg),
        )
        if shared:
            kwargs.update(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=False)
    model_kwargs = dict(
        vocab_size=cfg.vocab_size,
        max_sequence_length=_get(cfg, "max_position_embeddings", 4096),
        position_embedding_type="rope",  # MLA applies its own rotary embedding; GPTModel builds none
        share_embeddings_and_output_weights=bool(_get(cfg, "tie_word_embeddings", False)),
    )
    return MegatronSpec(kwargs, model_kwargs, num_experts, qk_layernorm=True, multi_latent_attention=True)


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
#: multi-latent attention and DeepSeek MoE (ungated ``shared_experts``, router expert bias), HF -> megatron.
_MLA_RENAMES = {
    "self_attn.q_proj.weight": "self_attention.linear_q_proj.weight",
    "self_attn.q_a_proj.weight": "self_attention.linear_q_down_proj.weight",
    "self_attn.q_a_layernorm.weight": "self_attention.q_layernorm.weight",
    "self_attn.q_b_proj.weight": "self_attention.linear_q_up_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "self_attention.linear_kv_down_proj.weight",
    "self_attn.kv_a_layernorm.weight": "self_attention.kv_layernorm.weight",
    "self_attn.kv_b_proj.weight": "self_attention.linear_kv_up_proj.weight",
    "mlp.shared_experts.down_proj.weight": "mlp.shared_experts.linear_fc2.weight",
    "mlp.gate.e_score_correction_bias": "mlp.router.expert_bias",
}
_TOP_RENAMES = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}


def _layer_renames(cfg: Any) -> dict[str, str]:
    """The one-to-one layer renames (HF -> megatron) of ``cfg``'s family."""
    if cfg.model_type not in MLA_MODEL_TYPES:
        return _LAYER_RENAMES
    skip = ("self_attn.q_norm", "self_attn.k_norm", "mlp.shared_expert")
    renames = {k: v for k, v in _LAYER_RENAMES.items() if not k.startswith(skip)}
    renames.update(_MLA_RENAMES)
    return renames


def _shared_expert_prefix(cfg: Any) -> str:
    """The HF module path of the shared expert MLP: Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``."""
    return "mlp.shared_experts." if cfg.model_type in MLA_MODEL_TYPES else "mlp.shared_expert."


def _rope_permutation(cfg: Any) -> Any:
    """Row order that lets megatron's MLA rotary (interleaved pairs) equal HF's rotate-half one, or ``None``.

    megatron-core's MLA rotates the pairs ``(2i, 2i+1)`` of the rotary part of q and k (as
    DeepSeek's own layout, ``rope_interleave=True``, and V2's complex rotation do). With
    ``rope_interleave=False`` transformers rotates ``(i, i + d/2)``; placing HF row ``i`` at
    megatron row ``2i`` and row ``i + d/2`` at ``2i + 1`` makes the two identical. Returns
    ``perm`` with ``megatron_rows = hf_rows[perm]``.
    """
    if cfg.model_type != "deepseek_v3" or _get(cfg, "rope_interleave", True):
        return None
    import torch

    half = cfg.qk_rope_head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


def _permute_rope_rows(name: str, tensor: Any, cfg: Any, perm: Any) -> Any:
    """Apply ``perm`` to the rotary rows of a query or compressed-kv projection (``name`` is megatron's)."""
    if perm is None:
        return tensor
    import torch

    nope, rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    if name.endswith(("linear_q_proj.weight", "linear_q_up_proj.weight")):
        per_head = tensor.reshape(cfg.num_attention_heads, nope + rope, -1)
        rows = torch.cat([per_head[:, :nope], per_head[:, nope:][:, perm]], dim=1)
        return rows.reshape(tensor.shape).contiguous()
    if name.endswith("linear_kv_down_proj.weight"):
        return torch.cat([tensor[: cfg.kv_lora_rank], tensor[cfg.kv_lora_rank :][perm]], dim=0).contiguous()
    return tensor


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
    renames = _layer_renames(cfg)
    perm = _rope_permutation(cfg)
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
        if rest in renames:
            out[prefix + renames[rest]] = _permute_rope_rows(renames[rest], tensor, cfg, perm)
            continue
        attn = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if attn:
            pending.setdefault((layer, "qkv." + attn.group(2)), {})[attn.group(1)] = tensor
            continue
        mlp = re.match(r"^mlp\.(shared_experts?\.|experts\.(\d+)\.)?(gate|up)_proj\.weight$", rest)
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
            elif sub in ("shared_expert.", "shared_experts."):
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
    reverse = {v: k for k, v in _layer_renames(cfg).items()}
    perm = _rope_permutation(cfg)
    inverse = None if perm is None else torch.argsort(perm)
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
            out[prefix + reverse[rest]] = _permute_rope_rows(rest, tensor, cfg, inverse)
        elif rest.startswith("self_attention.linear_qkv."):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = split_qkv(tensor, cfg)
            for proj, t in zip("qkv", (q, k, v)):
                out[prefix + f"self_attn.{proj}_proj.{kind}"] = t
        elif rest in ("mlp.linear_fc1.weight", "mlp.shared_experts.linear_fc1.weight"):
            gate, up = tensor.chunk(2, dim=0)
            sub = "mlp." if rest.startswith("mlp.linear") else _shared_expert_prefix(cfg)
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
