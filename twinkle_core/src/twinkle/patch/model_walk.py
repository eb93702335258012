"""Walking a transformers model: the one place that knows where its parts are.

Every patch, the model backends and the plugins find the parts of a model through these
helpers (nothing else in the codebase walks a model to find them):

* :func:`unwrap`: the transformers model under a peft / DDP wrapper;
* :func:`set_flag` / :func:`get_flag`: the fast-path flags patches leave on the unwrapped model;
* :func:`decoder_of`, :func:`decoder_layers`, :func:`lm_head_of`, :func:`lm_head_lora_of`: the
  decoder stack, its repeated layers, the plain LM head and the LoRA layer around it;
* :func:`swiglu_mlps`: the SwiGLU MLP modules (:data:`SWIGLU_MLPS`);
* :func:`model_device`: where the weights live.

Nothing here imports torch at module import (it is imported inside the functions that need it).

Example::

    from twinkle.patch.model_walk import decoder_layers, unwrap

    for layer in decoder_layers(model):  # peft- or DDP-wrapped is fine
        ...
"""

from __future__ import annotations

from typing import Any

#: Attribute on the (unwrapped) transformers model holding the fast-path flags.
FLAGS_ATTR = "_twinkle_fast_path"
#: Model types whose causal-LM head is exactly ``lm_head(decoder(...).last_hidden_state)``.
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {
        "qwen2",
        "qwen3",
        "qwen2_moe",
        "qwen3_moe",
        "llama",
        "mistral",
        "mixtral",
        "glm4",
        "glm",
        "deepseek_v2",
        "deepseek_v3",
        "phi3",
        "olmo2",
        "internlm3",
    }
)
#: MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``.
SWIGLU_MLPS = frozenset({"Qwen2MLP", "Qwen3MLP", "LlamaMLP", "MistralMLP", "Qwen2MoeMLP", "Qwen3MoeMLP", "Olmo2MLP"})


def unwrap(model: Any) -> Any:
    """The transformers model under a peft / DDP wrapper (the model itself otherwise)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "module") and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            model = model.module
    return model


def set_flag(model: Any, name: str, value: Any) -> None:
    """Record a fast-path flag on the unwrapped model (read with :func:`get_flag`)."""
    base = unwrap(model)
    flags = base.__dict__.setdefault(FLAGS_ATTR, {})
    flags[name] = value


def get_flag(model: Any, name: str, default: Any = None) -> Any:
    """A flag set by a patch (``None``/``default`` when unset)."""
    return unwrap(model).__dict__.get(FLAGS_ATTR, {}).get(name, default)


def decoder_of(model: Any) -> Any:
    """The decoder stack (``model.model`` for transformers causal LMs) or ``None``."""
    base = unwrap(model)
    prefix = getattr(base, "base_model_prefix", "model")
    decoder = getattr(base, prefix, None)
    return decoder if decoder is not None and decoder is not base else None


def decoder_layers(model: Any) -> list[Any]:
    """The repeated decoder layers (the first non-empty ``layers`` ModuleList); ``[]`` when there is none.

    Used by FSDP2 sharding (one ``fully_shard`` per layer) and regional compilation alike.
    """
    import torch

    for module in unwrap(model).modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return list(layers)
    return []


def lm_head_of(model: Any) -> Any:
    """The ``nn.Linear`` LM head of a plain causal LM (see :data:`PLAIN_HEAD_MODEL_TYPES`), else ``None``."""
    import torch

    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_scaling", None):
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    head = getattr(lm_head_lora_of(model), "base_layer", head)  # LoRA on the head: its frozen base
    if not isinstance(head, torch.nn.Linear) or decoder_of(base) is None:
        return None
    return head


def lm_head_lora_of(model: Any) -> Any:
    """The peft LoRA layer wrapping the LM head (LoRA on ``lm_head``, Tinker's ``train_unembed``), else ``None``.

    :func:`lm_head_of` then returns its base ``nn.Linear``; the fast path adds the adapters' low-rank
    terms to the chunked head (:func:`twinkle.patch.multi_lora.lora_head_terms`).
    """
    import torch

    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or not hasattr(head, "lora_A"):
        return None
    if not isinstance(getattr(head, "base_layer", None), torch.nn.Linear):
        return None
    return head


def swiglu_mlps(model: Any) -> list[Any]:
    """The SwiGLU MLP modules of ``model`` (:data:`SWIGLU_MLPS`)."""
    return [m for m in unwrap(model).modules() if type(m).__name__ in SWIGLU_MLPS]


def model_device(model: Any) -> Any:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")
