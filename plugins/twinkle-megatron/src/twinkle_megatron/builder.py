"""Build a megatron-core ``GPTModel`` from a :class:`~twinkle_megatron.convert.MegatronSpec` and move
whole (unsharded) weights in and out of it across tensor- and expert-parallel ranks.

A whole state dict (``{name: full tensor}``, the form :mod:`twinkle_megatron.convert`
speaks) is sliced into this rank's shard by the parameter's megatron attributes
(``tensor_model_parallel``, ``partition_dim``); SwiGLU ``linear_fc1`` weights are sliced as
``[gate shard; up shard]``, and expert indices are offset by the expert-parallel rank.
:func:`gather_full_state` is the inverse (an all-gather over the same groups).

Example::

    model = build_gpt_model(spec)
    load_full_state(model, hf_to_megatron(hf_state, hf_config))
    full = gather_full_state(model)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from twinkle_megatron.convert import MegatronSpec

_EXPERT = re.compile(r"(\.experts\.local_experts\.)(\d+)(\.)")


def build_gpt_model(spec: MegatronSpec, device: Any = "cpu") -> Any:
    """A ``GPTModel`` (local layer spec, full-vocabulary logits) for ``spec`` on ``device``.

    Fill its weights with :func:`load_full_state`.

    Needs megatron's parallel state (:func:`twinkle_megatron.parallel.init_megatron_parallel`)
    and, on CPU, the shims of :mod:`twinkle_megatron.compat`.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    kwargs = dict(spec.config_kwargs)
    # on CUDA the parameters are allocated (and initialized, which also tags their
    # tensor-parallel layout) on the GPU directly; load_full_state overwrites the values
    on_cpu = str(device).startswith("cpu")
    kwargs.update(use_cpu_initialization=on_cpu)
    if spec.num_experts and on_cpu:
        # the all-to-all dispatcher allocates torch.cuda streams; all-gather is the CPU path
        kwargs["moe_token_dispatcher_type"] = "allgather"
    config = (MLATransformerConfig if spec.multi_latent_attention else TransformerConfig)(**kwargs)
    model = GPTModel(config, _layer_spec(spec, config), parallel_output=False, **spec.model_kwargs)
    return model.to(device)


def _layer_spec(spec: MegatronSpec, config: Any) -> Any:
    """One local layer spec for all layers, or per-layer specs (dense and MoE layers mixed, MLA).

    Standard attention runs on torch SDPA (:mod:`twinkle_megatron.attention`); multi-latent
    attention on megatron's local attention (:func:`mla_core_attention_class`).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    from twinkle_megatron.attention import sdpa_attention_class

    core = mla_core_attention_class() if spec.multi_latent_attention else sdpa_attention_class()
    if not spec.multi_latent_attention and not isinstance(config.moe_layer_freq, list):
        layer = get_gpt_layer_local_spec(
            num_experts=spec.num_experts, qk_layernorm=spec.qk_layernorm, normalization="RMSNorm"
        )
        return _with_core_attention(layer, core)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    return dataclasses.replace(block, layer_specs=[_with_core_attention(layer, core) for layer in block.layer_specs])


def uses_sdpa(spec: MegatronSpec) -> bool:
    """Whether the layers of ``spec`` take ``attention_mask=None`` as "causal" (SDPA attention)."""
    return not spec.multi_latent_attention


def _with_core_attention(layer: Any, core: type) -> Any:
    """``layer`` (a TransformerLayer ModuleSpec) with its self-attention's core attention replaced by ``core``."""
    attention = layer.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=core)
    )
    return dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, self_attention=attention))


_MLA_CORE: type | None = None


def mla_core_attention_class() -> type:
    """megatron-core's local ``DotProductAttention``, accepting the key/value widths MLA passes it.

    In megatron-core 0.16 ``MultiLatentAttention`` builds its core attention with
    ``k_channels=`` and ``v_channels=`` keywords that only the Transformer Engine attention
    takes; the local ``DotProductAttention`` (the Transformer-Engine-free path) raises
    ``TypeError`` on them. Its computation already works on the tensors' own head widths
    (queries and keys of ``qk_head_dim + qk_pos_emb_head_dim``, values of ``v_head_dim``; the
    output is sized by ``kv_channels``, which :func:`twinkle_megatron.convert.deepseek_spec`
    sets to ``v_head_dim``), so this subclass checks those widths and drops the keywords.
    """
    global _MLA_CORE
    if _MLA_CORE is None:
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        class MLADotProductAttention(DotProductAttention):
            """Local dot-product attention for multi-latent attention (see :func:`mla_core_attention_class`)."""

            def __init__(self, *args: Any, k_channels: int | None = None, v_channels: int | None = None, **kwargs: Any):
                super().__init__(*args, **kwargs)
                if v_channels is not None and v_channels != self.hidden_size_per_attention_head:
                    raise ValueError(
                        f"MLA core attention: v_channels={v_channels} but kv_channels="
                        f"{self.hidden_size_per_attention_head}; set kv_channels to v_head_dim"
                    )

        _MLA_CORE = MLADotProductAttention
    return _MLA_CORE


def _ranks() -> tuple[int, int, int, int]:
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_expert_model_parallel_rank(),
        ps.get_expert_model_parallel_world_size(),
    )


def _global_name(local_name: str, ep_rank: int, local_experts: int) -> str:
    local_name = local_name.replace(".base.", ".")  # a LoRA-wrapped linear keeps its weight under .base
    return _EXPERT.sub(lambda m: f"{m.group(1)}{ep_rank * local_experts + int(m.group(2))}{m.group(3)}", local_name)


def _local_experts(model: Any) -> int:
    indices = {int(m.group(2)) for name, _ in model.named_parameters() for m in [_EXPERT.search(name)] if m}
    return len(indices)


def _base_parameters(model: Any) -> list[tuple[str, Any]]:
    """The model's own weights: parameters (LoRA weights left out) and the MoE router's expert bias.

    The expert bias (DeepSeek-V3's ``e_score_correction_bias``) is a buffer in megatron-core,
    but a checkpoint weight like any other.
    """
    params = [(n, p) for n, p in model.named_parameters() if ".lora_" not in n]
    buffers = [(n, b) for n, b in model.named_buffers() if n.endswith(".router.expert_bias")]
    return params + buffers


def _is_glu_fc1(name: str) -> bool:
    return name.endswith("linear_fc1.weight")


def _shard(name: str, full: Any, param: Any, tp_rank: int, tp_size: int) -> Any:
    import torch

    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if _is_glu_fc1(name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def load_full_state(model: Any, full_state: Mapping[str, Any]) -> None:
    """Copy whole tensors into this rank's shards of ``model``'s parameters.

    Raises:
        ValueError: a parameter has no entry in ``full_state`` or an entry has no
            parameter, or shapes disagree (naming the weight).
    """
    import torch

    tp_rank, tp_size, ep_rank, _ = _ranks()
    local_experts = _local_experts(model)
    used: set[str] = set()
    with torch.no_grad():
        for name, param in _base_parameters(model):
            key = _global_name(name, ep_rank, local_experts)
            if key not in full_state:
                raise ValueError(f"megatron weight {key!r} is missing from the converted checkpoint")
            shard = _shard(key, full_state[key], param, tp_rank, tp_size)
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(
                    f"megatron weight {key!r}: checkpoint shard {tuple(shard.shape)} != parameter {tuple(param.shape)}"
                )
            param.copy_(shard.to(dtype=param.dtype, device=param.device))
            used.add(key)
    ep_size = _ranks()[3]
    if ep_size == 1:
        extra = sorted(set(full_state) - used)
        if extra:
            raise ValueError(f"checkpoint weights without a megatron parameter: {extra[:5]}")


def _all_gather(tensor: Any, group: Any, size: int, dim: int) -> Any:
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def gather_full_state(model: Any, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The whole (unsharded) state of ``model``'s parameters on every rank, detached.

    Args:
        model: a megatron ``GPTModel``.
        params: ``{local name: tensor}`` to gather instead of the parameters themselves
            (e.g. merged LoRA weights); must carry the same shapes.
    """
    import torch
    from megatron.core import parallel_state as ps

    tp_rank, tp_size, ep_rank, ep_size = _ranks()
    local_experts = _local_experts(model)
    out: dict[str, Any] = {}
    for name, param in _base_parameters(model):
        value = (params or {}).get(name, param).detach()
        if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
            group = ps.get_tensor_model_parallel_group()
            if _is_glu_fc1(name):
                gate, up = value.chunk(2, dim=0)
                value = torch.cat([_all_gather(gate, group, tp_size, 0), _all_gather(up, group, tp_size, 0)], dim=0)
            else:
                value = _all_gather(value, group, tp_size, param.partition_dim)
        out[_global_name(name, ep_rank, local_experts)] = value
    if ep_size > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * ep_size
        experts = {k: v.cpu() for k, v in out.items() if _EXPERT.search(k)}
        dist.all_gather_object(gathered, experts, group=ps.get_expert_model_parallel_group())
        for part in gathered:
            out.update({k: v.to(next(iter(out.values())).device) for k, v in part.items()})
    return out
