"""The GPU fast path: which registered patches a TransformersModel applies, and the hooks they use.

TransformersModel calls :func:`apply_patches` after loading the model and again after each
adapter is added (patches are idempotent), :func:`run_model` instead of ``model(**inputs)``,
and :func:`optimizer_kwargs` when it builds an optimizer. Everything here is exact or a
documented precision choice (bf16 adapters), and each piece is a ``patch`` component that
users switch off by name and plugins extend:

=============================  ========  ===============================================
patch                          default   what it does
=============================  ========  ===============================================
``FusedLinearCrossEntropy``    on        LM head + cross-entropy in chunks, no full logits
``VarlenAttention``            on        packed batches attend per sequence: no ``[T, T]`` mask
``Bf16Adapters``               on        LoRA weights in the base model's half dtype
``FusedLoraLinear``            on        lean LoRA forward: ``addmm`` epilogue, no dropout
``MergedLoraForward``          on        LoRA as one GEMM on ``W + s B A`` where that pays
``GroupedLoraProjections``     off       q/k/v (gate/up) LoRA computed together, one pass over x
``FusedLoraMLP``               on (GPU)  LoRA SwiGLU MLP: 3 GEMMs + 2 Triton passes each way
``FusedOptimizer``             on        ``fused=True`` for Adam/AdamW on CUDA
``CompileDecoderLayers``       on (GPU)  regional ``torch.compile`` of each decoder layer
``ActivationCheckpointing``    on        checkpointing only when activations would not fit
``RecomputeSwiGLU``            on (GPU)  ``act(gate) * up`` recomputed in backward, not kept
``LigerKernels``               off       Liger's RMSNorm/SwiGLU/RoPE (``pip install liger-kernel``)
``Fp8FrozenGemms``             off       LoRA's frozen base GEMMs in FP8 (not exact; opt-in by name)
=============================  ========  ===============================================

Environment: ``TWINKLE_DISABLED_PATCHES=CompileDecoderLayers,Bf16Adapters`` switches patches
off for every model (same as ``TransformersModel(disabled_patches=[...])``), and
``TWINKLE_ENABLED_PATCHES=Fp8FrozenGemms`` switches ones that are off by default on
(``TransformersModel(enabled_patches=[...])``).

Example::

    model = TransformersModel(model_id=..., torch_dtype="bfloat16", disabled_patches=["CompileDecoderLayers"])
    model.fast_path_patches  # ['FusedLinearCrossEntropy', 'Bf16Adapters', ...]
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Mapping

from twinkle.data_format.output import ModelOutput
from twinkle.patch.varlen import IMPLEMENTATION as VARLEN

logger = logging.getLogger("twinkle.patch")

#: Attribute on the (unwrapped) transformers model holding the fast-path flags.
_FLAGS_ATTR = "_twinkle_fast_path"
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


# ---------------------------------------------------------------------- model helpers
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
    flags = base.__dict__.setdefault(_FLAGS_ATTR, {})
    flags[name] = value


def get_flag(model: Any, name: str, default: Any = None) -> Any:
    """A flag set by a patch (``None``/``default`` when unset)."""
    return unwrap(model).__dict__.get(_FLAGS_ATTR, {}).get(name, default)


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
    if not isinstance(head, torch.nn.Linear) or decoder_of(base) is None:
        return None
    return head


def decoder_of(model: Any) -> Any:
    """The decoder stack (``model.model`` for transformers causal LMs) or ``None``."""
    base = unwrap(model)
    prefix = getattr(base, "base_model_prefix", "model")
    decoder = getattr(base, prefix, None)
    return decoder if decoder is not None and decoder is not base else None


def model_device(model: Any) -> Any:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def decoder_layers(model: Any) -> list[Any]:
    """The repeated decoder layers (the first non-empty ``layers`` ModuleList)."""
    import torch

    for module in unwrap(model).modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return list(layers)
    return []


# ---------------------------------------------------------------------- patches
def _registry() -> Any:
    from twinkle.runtime import get_registry

    return get_registry()


def _names_from_env(variable: str) -> list[str]:
    raw = os.environ.get(variable, "")
    return [name.strip() for name in raw.split(",") if name.strip()]


def disabled_from_env() -> set[str]:
    """Names in ``TWINKLE_DISABLED_PATCHES`` (comma separated)."""
    return set(_names_from_env("TWINKLE_DISABLED_PATCHES"))


def enabled_from_env() -> list[str]:
    """Names in ``TWINKLE_ENABLED_PATCHES`` (comma separated): patches added to the chosen ones."""
    return _names_from_env("TWINKLE_ENABLED_PATCHES")


def _patch_name(instance: Any) -> str:
    return getattr(instance, "name", "") or type(instance).__name__


def resolve_patches(
    patches: Iterable[Any] | None = None, disabled: Iterable[str] | None = (), enabled: Iterable[Any] | None = ()
) -> list[Any]:
    """Patch instances to apply: ``patches`` (names, classes or instances) or every enabled-by-default one.

    Args:
        patches: an explicit list; ``None`` means every registered patch with
            ``enabled_by_default = True``.
        disabled: names to leave out (plus ``TWINKLE_DISABLED_PATCHES``); ``None`` is none.
        enabled: patches to add to those (names, classes or instances; plus
            ``TWINKLE_ENABLED_PATCHES``), for the ones that are off by default:
            ``enabled=["Fp8FrozenGemms"]`` is the default fast path plus FP8.

    Raises:
        ComponentNotFoundError: an unknown name in ``patches``, ``disabled`` or ``enabled`` (lists
            the registered ones).
    """
    registry = _registry()
    disabled, enabled = disabled or (), enabled or ()
    off = set(disabled) | disabled_from_env()
    for name in off:
        if ("patch", name) not in registry:
            registry.resolve("patch", name)  # raises with the list of registered patches
    chosen: list[Any] = []
    if patches is None:
        for name in registry.names("patch"):
            if name in off:
                continue
            cls = registry.resolve("patch", name)
            if getattr(cls, "enabled_by_default", False):
                chosen.append(cls())
        patches = ()
    for item in [*patches, *enabled, *enabled_from_env()]:
        if isinstance(item, str):
            item = registry.resolve("patch", item)
        instance = item() if isinstance(item, type) else item
        name = _patch_name(instance)
        if name not in off and name not in {_patch_name(p) for p in chosen}:
            chosen.append(instance)
    chosen.sort(key=lambda p: getattr(p, "order", 100))
    return chosen


def apply_patches(model: Any, patches: Iterable[Any]) -> list[str]:
    """Apply each patch that :meth:`~twinkle.patch.base.Patch.applies_to` the model; returns their names.

    Patches are idempotent: TransformersModel calls this after loading and after each
    ``add_adapter_to_model`` (LoRA patches act on the new adapter's layers then).
    """
    applied: list[str] = []
    for patch in patches:
        name = getattr(patch, "name", "") or type(patch).__name__
        try:
            if not patch.applies_to(model):
                continue
            patch.apply(model)
        except Exception as exc:  # a broken optional kernel must not stop training
            logger.warning(
                "patch %s could not be applied (%s: %s); continuing without it", name, type(exc).__name__, exc
            )
            continue
        applied.append(name)
    set_flag(model, "applied", sorted(set(get_flag(model, "applied", [])) | set(applied)))
    return applied


# ---------------------------------------------------------------------- forward
class HiddenStatesOutput(ModelOutput):
    """Model outputs without materialized logits: ``hidden_states`` plus the LM head.

    Losses that know the fused path (CrossEntropyLoss, :func:`twinkle.loss.base.token_logps`)
    read ``hidden_states`` and ``lm_head_weight``; anything that asks for ``logits`` gets them
    computed on first access (and cached), so every other loss and metric keeps working.
    ``predictions`` (argmax ids) are filled by the fused cross-entropy for accuracy metrics.
    """

    def _logits(self) -> Any:
        import torch

        logits = dict.get(self, "logits")
        if logits is None:
            hidden = dict.__getitem__(self, "hidden_states")
            weight = dict.__getitem__(self, "lm_head_weight")
            bias = dict.get(self, "lm_head_bias")
            # outside a training forward (e.g. forward_only's return_logits) build no graph
            with torch.set_grad_enabled(torch.is_grad_enabled() and hidden.requires_grad):
                logits = torch.nn.functional.linear(hidden, weight, bias)
            dict.__setitem__(self, "logits", logits)
        return logits

    def __getitem__(self, key: str) -> Any:
        if key == "logits":
            return self._logits()
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        if key == "logits":
            return self._logits()
        return dict.get(self, key, default)

    def __contains__(self, key: object) -> bool:
        return key == "logits" or dict.__contains__(self, key)

    @property
    def logits_materialized(self) -> bool:
        """Whether someone asked for the full logits."""
        return dict.get(self, "logits") is not None


def uses_fused_head(outputs: Any) -> bool:
    """Whether ``outputs`` carries hidden states and the LM head instead of computed logits."""
    return isinstance(outputs, HiddenStatesOutput) and not outputs.logits_materialized


def causal_masks(model: Any, seq_len: int) -> dict[str, None] | None:
    """``{layer_type: None}`` for a batch of whole rows without padding, where the model takes that.

    Without a mask, transformers builds one from ``position_ids``: it reads on the host whether
    the rows are packed (a wait for the GPU in every forward), and while a CUDA graph is being
    captured, where it cannot read, it materializes a ``[T, T]`` mask, which takes sdpa off its
    causal flash kernel. Rows that are each one whole sequence need no mask at all: passing the
    per-layer-type mapping of ``None`` (transformers' own "masks already prepared" form) gives
    sdpa's and flash attention's ``is_causal``. ``None`` (build as usual) unless the attention is
    sdpa or flash attention, every layer attends causally over ``seq_len`` tokens (full, or a
    sliding window at least that long), and the decoder's module builds masks with
    ``create_causal_mask`` (the models that accept the mapping).
    """
    import sys

    config = getattr(model, "config", None)
    types = getattr(config, "layer_types", None)
    attn = str(getattr(config, "_attn_implementation", "") or "")
    if not types or not (attn in ("sdpa", VARLEN) or attn.startswith("flash_attention")):
        return None
    window = getattr(config, "sliding_window", None)
    for kind in set(types):
        if kind != "full_attention" and not (kind == "sliding_attention" and window and seq_len <= window):
            return None
    decoder = decoder_of(model)
    module = sys.modules.get(type(decoder).__module__) if decoder is not None else None
    if module is None or not hasattr(module, "create_causal_mask"):
        return None
    return dict.fromkeys(types)


def run_model(model: Any, model_inputs: Mapping[str, Any]) -> ModelOutput:
    """Run the model: logits normally, :class:`HiddenStatesOutput` when ``FusedLinearCrossEntropy`` is on.

    Args:
        model: the (possibly peft-wrapped) transformers causal LM.
        model_inputs: keyword arguments of the model's forward.

    Returns:
        A ModelOutput with ``logits``, or a HiddenStatesOutput.
    """
    if not get_flag(model, "fused_linear_ce", False):
        return ModelOutput(logits=model(**model_inputs).logits)
    head = lm_head_of(model)
    decoder = decoder_of(model)
    if head is None or decoder is None:
        return ModelOutput(logits=model(**model_inputs).logits)
    hidden = decoder(**model_inputs).last_hidden_state
    return HiddenStatesOutput(hidden_states=hidden, lm_head_weight=head.weight, lm_head_bias=head.bias)


def cross_entropy_sum(inputs: Mapping[str, Any], outputs: Any, label_smoothing: float = 0.0) -> Any:
    """Summed token cross-entropy from a :class:`HiddenStatesOutput` (``None`` if it has logits instead).

    Also stores ``outputs['predictions']`` (argmax ids, ``-1`` where ignored; computed in
    the same pass) so accuracy metrics need no logits.

    Example::

        loss_sum = cross_entropy_sum(batch, outputs)  # None -> use outputs["logits"]
    """
    if not uses_fused_head(outputs):
        return None
    from twinkle.patch.fused_linear_ce import linear_cross_entropy

    loss, preds = linear_cross_entropy(
        dict.__getitem__(outputs, "hidden_states"),
        dict.__getitem__(outputs, "lm_head_weight"),
        inputs["shift_labels"],
        bias=dict.get(outputs, "lm_head_bias"),
        label_smoothing=label_smoothing,
        return_predictions=True,
        num_labels=inputs.get("num_label_tokens"),
    )
    dict.__setitem__(outputs, "predictions", preds)
    return loss


def token_logps_from_hidden(inputs: Mapping[str, Any], outputs: Any) -> Any:
    """Per-token label log-probs ``[B, T]`` from a :class:`HiddenStatesOutput` (``None`` if it has logits)."""
    if not uses_fused_head(outputs):
        return None
    from twinkle.patch.fused_linear_ce import linear_token_logps

    return linear_token_logps(
        dict.__getitem__(outputs, "hidden_states"),
        dict.__getitem__(outputs, "lm_head_weight"),
        inputs["shift_labels"],
        bias=dict.get(outputs, "lm_head_bias"),
    )


# ---------------------------------------------------------------------- optimizer
def optimizer_kwargs(model: Any, factory: Any, params: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Optimizer arguments with the fast path's defaults added (``fused=True`` for Adam/AdamW on CUDA).

    Only when the ``FusedOptimizer`` patch is on, the user gave neither ``fused`` nor
    ``foreach``, and every parameter is a floating CUDA tensor.
    """
    if not get_flag(model, "fused_optimizer", False) or "fused" in kwargs or "foreach" in kwargs:
        return kwargs
    try:
        import torch
    except ImportError:
        return kwargs
    if factory not in (torch.optim.AdamW, torch.optim.Adam):
        return kwargs
    flat = [p for group in params for p in (group["params"] if isinstance(group, Mapping) else [group])]
    if flat and all(p.is_cuda and p.is_floating_point() for p in flat):
        return {**kwargs, "fused": True}
    return kwargs
