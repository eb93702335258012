"""What the LoRA patches share: the markers they leave on layers and the low-rank arithmetic.

:mod:`~twinkle.patch.lora_fast` (lean and merged LoRA ``Linear``), :mod:`~twinkle.patch.lora_mlp`
(the fused LoRA SwiGLU MLP), :mod:`~twinkle.patch.fp8` (FP8 frozen GEMMs) and
:mod:`~twinkle.patch.checkpointing` (SwiGLU recompute) each read what the others did to a layer.
They do that through the attribute names here (the *markers*) and the helpers below, never
through each other's internals, so none of those modules imports another.

Markers on a peft ``lora.Linear``:

* :data:`LEAN_ATTR`: ``FusedLoraLinear`` gave it the lean forward;
* :data:`MERGED_ATTR`: ``"keep"`` / ``"recompute"`` when ``MergedLoraForward`` merges it per call;
* :data:`GRAD_KERNEL_ATTR`, :data:`MERGE_KERNEL_ATTR`: whether its merged path runs
  ``twinkle::lora_grads`` / ``twinkle::lora_merge``;
* :data:`FP8_ATTR`: its :class:`~twinkle.patch.fp8.Fp8Weight` (``Fp8FrozenGemms``).

On a SwiGLU MLP: :data:`FUSED_MLP_ATTR` (``FusedLoraMLP`` gave it its forward, see
:func:`is_fused_mlp`) and :data:`MLP_FALLBACK_ATTR` (the forward that one falls back to).
"""

from __future__ import annotations

from typing import Any

from twinkle.patch import triton_lora
from twinkle.patch.model_walk import model_device, set_flag

LEAN_ATTR = "_twinkle_lean_forward"
FP8_ATTR = "_twinkle_fp8"
MERGED_ATTR = "_twinkle_merged"
GRAD_KERNEL_ATTR = "_twinkle_lora_grad_kernel"
MERGE_KERNEL_ATTR = "_twinkle_lora_merge_kernel"
FUSED_MLP_ATTR = "_twinkle_fused_lora_mlp"
MLP_FALLBACK_ATTR = "_twinkle_mlp_fallback"

__all__ = [
    "FP8_ATTR",
    "FUSED_MLP_ATTR",
    "GRAD_KERNEL_ATTR",
    "LEAN_ATTR",
    "MERGED_ATTR",
    "MERGE_KERNEL_ATTR",
    "MLP_FALLBACK_ATTR",
    "cat",
    "count_kept_merged",
    "is_fused_mlp",
    "layer_kernels",
    "lora_linear_layers",
    "low_rank_grads",
    "merge",
    "merge_pays",
    "plain_adapter",
    "scale_columns",
    "uniform_scaling",
    "use_kernel",
]


def lora_linear_layers(model: Any) -> list[Any]:
    """Every ``peft.tuners.lora.Linear`` module in ``model`` (empty without peft), in ``model.modules()`` order.

    The walk does not descend into a LoRA layer: its children are its base layer and its
    adapters' ``A``/``B``/dropout modules, never another LoRA layer (peft does not nest them). With
    many adapters those children are most of the model's modules (0.5B with 8 adapters: 5,529
    modules, 168 LoRA layers), and the multi-adapter pass looks its layers up on every pass.
    """
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return []
    found, seen, stack = [], set(), [model]
    while stack:  # pre-order, children in order: the order of model.modules()
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, LoraLinear):
            found.append(module)
            continue
        stack.extend(child for child in reversed(module._modules.values()) if child is not None)
    return found


def is_fused_mlp(mlp: Any) -> bool:
    """Whether :class:`~twinkle.patch.lora_mlp.FusedLoraMLP` gave ``mlp`` its forward."""
    return bool(getattr(mlp, FUSED_MLP_ATTR, False))


def plain_adapter(layer: Any, x: Any) -> tuple[Any, Any, Any, float] | None:
    """``(base, A, B, scaling)`` when ``layer(x)`` is the plain LoRA case; ``None`` for peft's forward.

    Plain: adapters enabled and not merged, one active vanilla adapter without dropout or LoRA
    bias, an ``nn.Linear`` base, and ``x``, the base weight and the adapter in one dtype.
    """
    import torch

    if layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    base = layer.get_base_layer()
    if type(base) is not torch.nn.Linear or getattr(layer, "lora_bias", {}).get(name, False):
        return None
    weight_a = layer.lora_A[name].weight
    weight_b = layer.lora_B[name].weight
    if not (x.dtype == base.weight.dtype == weight_a.dtype == weight_b.dtype):
        return None
    return base, weight_a, weight_b, float(layer.scaling[name])


def merge_pays(x: Any, bases: list[Any], keep: bool, tokens: int | None = None) -> bool:
    """Whether ``x (W + s B A)^T`` moves fewer bytes than ``x W^T + s (x A^T) B^T`` for this call.

    ``bases`` are the base ``Linear`` layers that would share one merged GEMM (one layer, or a
    group reading the same input), taken together as one ``[sum(out), in]`` weight. ``tokens``:
    the rows of the call (default: ``x``'s, when ``x`` is the layers' input).

    Unmerged, LoRA writes and re-reads a ``[tokens, out]`` product in forward and a
    ``[tokens, in]`` one in backward; merged, it writes and reads an ``[out, in]`` weight once per
    forward (and again in backward when the merged weight is not kept). So merging pays from
    ``out * in / (out + in)`` tokens when training (about 1.8k-3k for a 7B layer), twice that
    when the merged weight is recomputed, and from ``in`` tokens without gradients. The base
    weights and biases must be frozen (the merged path gives no gradient for them).
    """
    import torch

    for base in bases:
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return False
    in_f = bases[0].weight.shape[1]
    out_f = sum(base.weight.shape[0] for base in bases)
    if tokens is None:
        tokens = x.numel() // max(1, in_f)
    if not torch.is_grad_enabled():
        return tokens >= in_f
    threshold = out_f * in_f / (out_f + in_f)
    return tokens >= (threshold if keep else 2 * threshold)


def cat(tensors: list[Any], dim: int = 0) -> Any:
    """``torch.cat`` that returns a single tensor as it is (no copy)."""
    import torch

    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def scale_columns(low: Any, scalings: tuple[float, ...], ranks: tuple[int, ...]) -> Any:
    """``low`` (``[tokens, sum(r)]``) with each member's ``r`` columns times its scaling."""
    if len(set(scalings)) == 1:
        return low * scalings[0]
    return cat([part * s for part, s in zip(low.split(list(ranks), -1), scalings)], -1)


def low_rank_grads(g: Any, low: Any, weight_b: Any, kernel: bool, scale: float = 1.0) -> tuple[Any, Any]:
    """``(s g @ B, s g^T @ low)``: ``[tokens, r]`` and ``[out, r]``, in ``g``'s dtype.

    ``low`` is the unscaled ``x A^T``; ``s`` LoRA's scaling, so the first is what ``A``'s gradient
    multiplies ``x`` by and the second is ``B``'s gradient. ``kernel``: one pass over ``g`` for both
    and a second launch that sums, scales and rounds them (``twinkle::lora_grads``); otherwise two
    cuBLAS calls.
    """
    import torch

    if kernel:
        return torch.ops.twinkle.lora_grads(g.contiguous(), low.contiguous(), weight_b.contiguous(), float(scale))
    gb, grad_b = g @ weight_b, g.t() @ low
    return (gb, grad_b) if scale == 1.0 else (gb * scale, grad_b * scale)


def layer_kernels(layer: Any) -> tuple[bool, bool]:
    """``(grad, merge)``: whether ``layer`` uses ``twinkle::lora_grads`` and ``twinkle::lora_merge``."""
    return getattr(layer, GRAD_KERNEL_ATTR, False), getattr(layer, MERGE_KERNEL_ATTR, False)


def merge(
    weights: list[Any], weights_b: list[Any], weights_a: list[Any], kernel: bool, scales: list[float] | None = None
) -> Any:
    """``[W_1 + s_1 B_1 A_1; ...]`` stacked by rows (``s_i``: ``scales``, default 1): one pass over
    each ``W`` with ``kernel`` (``twinkle::lora_merge``, the scaling applied inside it), else
    ``addmm`` (which copies ``W`` into its output first)."""
    import torch

    scales = [1.0] * len(weights) if scales is None else [float(s) for s in scales]
    if kernel:
        return torch.ops.twinkle.lora_merge(
            [w.contiguous() for w in weights],
            [b.contiguous() for b in weights_b],
            [a.contiguous() for a in weights_a],
            scales,
        )
    return cat([torch.addmm(w, b, a, alpha=s) for w, b, a, s in zip(weights, weights_b, weights_a, scales)])


def uniform_scaling(scalings: tuple[float, ...]) -> float | None:
    """The one scaling of a group's members, or ``None`` when they differ."""
    return scalings[0] if len(set(scalings)) == 1 else None


def use_kernel(model: Any, choice: str | bool) -> bool:
    """Whether to run a ``twinkle::`` kernel for ``model`` (registering them): ``"auto"`` on CUDA with triton."""
    if choice is False:
        return False
    if choice == "auto" and model_device(model).type != "cuda":
        return False
    if not triton_lora.available():
        return False
    triton_lora.register()
    return True


def count_kept_merged(model: Any) -> int:
    """Record (and return) the bytes of the merged weights kept for backward: one copy of each base
    weight on the kept merged path. ActivationCheckpointing counts them with the activations."""
    kept = 0
    for layer in lora_linear_layers(model):
        if getattr(layer, MERGED_ATTR, None) == "keep":
            weight = layer.get_base_layer().weight
            kept += weight.numel() * weight.element_size()
    set_flag(model, "kept_merged_bytes", kept)
    return kept
