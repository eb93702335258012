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
from twinkle.patch.fused_linear_ce import head_ranges, linear_cross_entropy, linear_token_logps
from twinkle.patch.model_walk import (
    PLAIN_HEAD_MODEL_TYPES,
    decoder_layers,
    decoder_of,
    get_flag,
    lm_head_lora_of,
    lm_head_of,
    model_device,
    set_flag,
    unwrap,
)
from twinkle.patch.multi_lora import lora_head_terms
from twinkle.patch.varlen import causal_masks

logger = logging.getLogger("twinkle.patch")

#: Names that live in :mod:`twinkle.patch.model_walk` (model walking) and :mod:`twinkle.patch.varlen`
#: (``causal_masks``), kept importable from here.
__all__ = [
    "PLAIN_HEAD_MODEL_TYPES",
    "HiddenStatesOutput",
    "apply_patches",
    "causal_masks",
    "cross_entropy_sum",
    "decoder_layers",
    "decoder_of",
    "disabled_from_env",
    "enabled_from_env",
    "get_flag",
    "lm_head_lora_of",
    "lm_head_of",
    "model_device",
    "optimizer_kwargs",
    "resolve_patches",
    "run_model",
    "set_flag",
    "token_logps_from_hidden",
    "unwrap",
    "uses_fused_head",
]


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

    Losses get what they need from the output object itself, never from this package: its
    :meth:`label_logps` and :meth:`label_cross_entropy_sum` (declared by
    :class:`~twinkle.data_format.output.ModelOutput`, where they return ``None``) compute the
    token log-probabilities and the summed cross-entropy from ``hidden_states`` and
    ``lm_head_weight`` in chunks (:mod:`twinkle.patch.fused_linear_ce`). Anything that asks for
    ``logits`` gets them computed on first access (and cached), so every other loss and metric
    keeps working. ``predictions`` (argmax ids) are filled by the fused cross-entropy for accuracy
    metrics.

    ``lm_head_lora`` (optional): LoRA on the LM head as ``(start, end, A, B, scaling)`` terms over
    the flattened tokens (:func:`twinkle.patch.multi_lora.lora_head_terms`); every path above adds
    each range's own low-rank term, the chunked ones chunk by chunk.
    """

    def _logits(self) -> Any:
        import torch

        logits = dict.get(self, "logits")
        if logits is None:
            hidden = dict.__getitem__(self, "hidden_states")
            weight = dict.__getitem__(self, "lm_head_weight")
            bias = dict.get(self, "lm_head_bias")
            terms = dict.get(self, "lm_head_lora") or ()
            needs_grad = hidden.requires_grad or any(t[2].requires_grad or t[3].requires_grad for t in terms)
            # outside a training forward (e.g. forward_only's return_logits) build no graph
            with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
                logits = torch.nn.functional.linear(hidden, weight, bias)
                if terms:  # each range's own adapter (out of place: autograd sees one sum)
                    flat = hidden.reshape(-1, hidden.shape[-1])
                    pieces = []
                    for start, end, term in head_ranges(flat.shape[0], terms):
                        if term is None:
                            pieces.append(flat.new_zeros(end - start, logits.shape[-1], dtype=logits.dtype))
                            continue
                        weight_a, weight_b, scaling = term
                        low = flat[start:end].to(weight_a.dtype) @ weight_a.t()
                        pieces.append((scaling * (low @ weight_b.t())).to(logits.dtype))
                    logits = logits + torch.cat(pieces).reshape(logits.shape)
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

    def label_logps(self, labels: Any) -> Any:
        """Per-token ``log_softmax(logits)[labels]`` ``[B, T]`` float32 from the hidden states, in chunks
        (0 where the label is -100); ``None`` once the full logits exist (then they are cheaper)."""
        if self.logits_materialized:
            return None
        return linear_token_logps(
            dict.__getitem__(self, "hidden_states"),
            dict.__getitem__(self, "lm_head_weight"),
            labels,
            bias=dict.get(self, "lm_head_bias"),
            lora_segments=dict.get(self, "lm_head_lora"),
        )

    def label_cross_entropy_sum(self, labels: Any, label_smoothing: float = 0.0, num_labels: Any = None) -> Any:
        """Summed token cross-entropy of ``labels`` from the hidden states, in chunks; ``None`` once the
        full logits exist. Also stores ``self['predictions']`` (argmax ids, ``-1`` where ignored;
        computed in the same pass) so accuracy metrics need no logits."""
        if self.logits_materialized:
            return None
        loss, preds = linear_cross_entropy(
            dict.__getitem__(self, "hidden_states"),
            dict.__getitem__(self, "lm_head_weight"),
            labels,
            bias=dict.get(self, "lm_head_bias"),
            label_smoothing=label_smoothing,
            return_predictions=True,
            num_labels=num_labels,
            lora_segments=dict.get(self, "lm_head_lora"),
        )
        dict.__setitem__(self, "predictions", preds)
        return loss

    def token_slice(self, start: int, end: int) -> HiddenStatesOutput:
        """The outputs of tokens ``[start, end)`` of a packed ``[1, T]`` pass (LoRA head terms clipped to them)."""
        hidden = dict.__getitem__(self, "hidden_states")
        out = HiddenStatesOutput(
            hidden_states=hidden[:, start:end],
            lm_head_weight=dict.__getitem__(self, "lm_head_weight"),
            lm_head_bias=dict.get(self, "lm_head_bias"),
        )
        terms = dict.get(self, "lm_head_lora")
        if terms:
            if hidden.shape[0] != 1:
                raise ValueError("HiddenStatesOutput.token_slice: a LoRA head's terms slice a packed [1, T] pass only")
            dict.__setitem__(
                out,
                "lm_head_lora",
                tuple(
                    (max(s, start) - start, min(e, end) - start, a, b, scaling)
                    for s, e, a, b, scaling in terms
                    if min(e, end) > max(s, start)
                ),
            )
        return out


def uses_fused_head(outputs: Any) -> bool:
    """Whether ``outputs`` carries hidden states and the LM head instead of computed logits."""
    return isinstance(outputs, HiddenStatesOutput) and not outputs.logits_materialized


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
    lora_head = lm_head_lora_of(model)
    terms = None
    if lora_head is not None:  # LoRA on the head: its adapters' low-rank terms join the chunked head
        ids = model_inputs.get("input_ids")
        tokens = ids.numel() if ids is not None else model_inputs["inputs_embeds"].shape[:-1].numel()
        terms = lora_head_terms(lora_head, tokens)
        if terms is None:
            return ModelOutput(logits=model(**model_inputs).logits)
    hidden = decoder(**model_inputs).last_hidden_state
    out = HiddenStatesOutput(hidden_states=hidden, lm_head_weight=head.weight, lm_head_bias=head.bias)
    if terms:
        dict.__setitem__(out, "lm_head_lora", terms)
    return out


def cross_entropy_sum(inputs: Mapping[str, Any], outputs: Any, label_smoothing: float = 0.0) -> Any:
    """Summed token cross-entropy from a :class:`HiddenStatesOutput` (``None`` if it has logits instead).

    The same as ``outputs.label_cross_entropy_sum(inputs["shift_labels"], ...)``, which losses call.

    Example::

        loss_sum = cross_entropy_sum(batch, outputs)  # None -> use outputs["logits"]
    """
    if not uses_fused_head(outputs):
        return None
    return outputs.label_cross_entropy_sum(
        inputs["shift_labels"], label_smoothing=label_smoothing, num_labels=inputs.get("num_label_tokens")
    )


def token_logps_from_hidden(inputs: Mapping[str, Any], outputs: Any) -> Any:
    """Per-token label log-probs ``[B, T]`` from a :class:`HiddenStatesOutput` (``None`` if it has logits).

    The same as ``outputs.label_logps(inputs["shift_labels"])``, which losses call.
    """
    if not uses_fused_head(outputs):
        return None
    return outputs.label_logps(inputs["shift_labels"])


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
