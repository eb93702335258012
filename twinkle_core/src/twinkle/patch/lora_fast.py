"""Fast LoRA: adapters in the base model's half dtype and a lean ``Linear`` forward.

peft keeps LoRA weights in float32 by default (``autocast_adapter_dtype=True``), so every
adapted layer of a bf16 model casts its input to float32, runs two float32 matmuls and casts
back; and its forward walks adapters, dropout and variant checks in Python. The two patches
here remove that work:

* :class:`Bf16Adapters` stores LoRA weights in the base layer's dtype (bf16/fp16). This is a
  precision choice, not an identity: it is what "plain HF+PEFT, bf16 adapters" does, and the
  AdamW update then runs on bf16 weights.
* :class:`FusedLoraLinear` gives each ``peft.tuners.lora.Linear`` a forward of three calls,
  ``y = linear(x, W, b) + linear(linear(x, A) * scaling, B)``: the scaling multiplies the
  rank-r activations instead of the ``out_features``-wide product, there is no dropout,
  dtype-cast or adapter loop, and inside a compiled decoder layer (``CompileDecoderLayers``)
  the add fuses into whatever consumes ``y`` (RoPE, SiLU*up, the residual) instead of
  writing and re-reading the sum. It applies per call only to the plain case (one active
  vanilla adapter, no dropout, not merged, same dtypes) and falls back to peft's forward
  otherwise; the math is peft's (``scaling`` moves across a linear map), rounding differs
  only in the order of the scaling.
* :class:`MergedLoraForward` makes that forward, for batches with enough tokens, one GEMM on a
  merged weight ``W + s B A`` with LoRA's own low-rank gradients (decision 0008).
"""

from __future__ import annotations

from types import MethodType
from typing import Any

from twinkle.patch.base import Patch

_LEAN_ATTR = "_twinkle_lean_forward"
_MERGED_ATTR = "_twinkle_merged"


def lora_linear_layers(model: Any) -> list[Any]:
    """Every ``peft.tuners.lora.Linear`` module in ``model`` (empty without peft)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


class Bf16Adapters(Patch):
    """Store LoRA weights in the base layer's half dtype (bf16/fp16) instead of float32.

    Applies when the model's weights are bf16 or fp16. The Parameter objects stay the same
    (only their data changes dtype), so optimizers built afterwards see half-precision
    weights; build the optimizer after adding adapters (the usual order).

    Example::

        TransformersModel(..., torch_dtype="bfloat16", disabled_patches=["Bf16Adapters"])  # peft's fp32 adapters
    """

    name = "Bf16Adapters"
    enabled_by_default = True
    order = 10

    def applies_to(self, model: Any) -> bool:
        """Half-precision base weights and at least one LoRA layer."""
        import torch

        half = (torch.bfloat16, torch.float16)
        return any(layer.get_base_layer().weight.dtype in half for layer in lora_linear_layers(model))

    def apply(self, model: Any) -> None:
        """Cast every ``lora_A``/``lora_B`` weight to the dtype of its base layer (if that is half)."""
        import torch

        for layer in lora_linear_layers(model):
            dtype = layer.get_base_layer().weight.dtype
            if dtype not in (torch.bfloat16, torch.float16):
                continue
            for container in (layer.lora_A, layer.lora_B):
                for sub in container.values():
                    for param in sub.parameters():
                        if param.dtype != dtype:
                            param.data = param.data.to(dtype)


def _lean_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """``y = x W^T + b + scaling * (x A^T) B^T`` in two calls; peft's forward for anything else."""
    import torch

    fallback = self._twinkle_peft_forward
    if args or kwargs or self.disable_adapters or self.merged:
        return fallback(x, *args, **kwargs)
    active = self.active_adapters
    if len(active) != 1:
        return fallback(x, *args, **kwargs)
    name = active[0]
    if name not in self.lora_A or name in getattr(self, "lora_variant", {}):
        return fallback(x, *args, **kwargs)
    if not isinstance(self.lora_dropout[name], torch.nn.Identity):
        return fallback(x, *args, **kwargs)
    base = self.get_base_layer()
    if type(base) is not torch.nn.Linear or getattr(self, "lora_bias", {}).get(name, False):
        return fallback(x, *args, **kwargs)
    weight_a = self.lora_A[name].weight
    weight_b = self.lora_B[name].weight
    if not (x.dtype == base.weight.dtype == weight_a.dtype == weight_b.dtype):
        return fallback(x, *args, **kwargs)
    merged = getattr(self, _MERGED_ATTR, None)
    if merged and _merge_pays(x, base, keep=merged == "keep"):
        scaling = self.scaling[name]
        if not torch.is_grad_enabled():  # forward only (log-probs, eval): no x A^T to keep
            return torch.nn.functional.linear(x, torch.addmm(base.weight, weight_b * scaling, weight_a), base.bias)
        fn = _MergedLoraFunction.get()
        return fn.apply(x, base.weight, base.bias, weight_a, weight_b, float(scaling), merged == "keep")
    result = torch.nn.functional.linear(x, base.weight, base.bias)
    # scaling on the rank-r activations (r columns, not out_features); the add is left as a plain
    # add so that, in compiled layers, inductor fuses it into the consumer (RoPE, SiLU*up, residual)
    low_rank = torch.nn.functional.linear(x, weight_a) * self.scaling[name]
    return result + torch.nn.functional.linear(low_rank, weight_b)


def _merge_pays(x: Any, base: Any, keep: bool) -> bool:
    """Whether ``x (W + s B A)^T`` moves fewer bytes than ``x W^T + s (x A^T) B^T`` for this call.

    Unmerged, LoRA writes and re-reads a ``[tokens, out]`` product in forward and a
    ``[tokens, in]`` one in backward; merged, it writes and reads an ``[out, in]`` weight once per
    forward (and again in backward when the merged weight is not kept). So merging pays from
    ``out * in / (out + in)`` tokens when training (about 1.8k-3k for a 7B layer), twice that
    when the merged weight is recomputed, and from ``in`` tokens without gradients. The base
    weight and bias must be frozen (the merged path gives no gradient for them).
    """
    import torch

    weight = base.weight
    if weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    out_f, in_f = weight.shape
    tokens = x.numel() // max(1, in_f)
    if not torch.is_grad_enabled():
        return tokens >= in_f
    threshold = out_f * in_f / (out_f + in_f)
    return tokens >= (threshold if keep else 2 * threshold)


class _MergedLoraFunction:
    """``y = x (W + s B A)^T + b`` with LoRA's low-rank gradients (built lazily: torch on first use).

    Forward merges the adapter into a copy of the frozen weight (one ``addmm`` over the weight,
    which for a layer of 8k tokens is smaller than its activations) and runs one GEMM, so no
    ``[tokens, out]`` rank-r product is written and re-read. Backward: ``grad_x = grad @ W_merged``
    (one GEMM, no rank-r input gradient to add), ``grad_B = s grad^T (x A^T)`` and
    ``grad_A = s (grad B)^T x``: the same low-rank gradients as the unmerged path, never the
    ``[out, in]`` weight gradient.
    """

    _fn: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls._fn is None:
            import torch

            class MergedLora(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x, weight, bias, weight_a, weight_b, scaling, keep_merged):  # type: ignore[override]
                    merged = torch.addmm(weight, weight_b * scaling, weight_a)
                    out = torch.nn.functional.linear(x, merged, bias)
                    flat = x.reshape(-1, x.shape[-1])
                    low = (flat @ weight_a.t()) * scaling
                    ctx.scaling = scaling
                    ctx.x_shape = x.shape
                    ctx.save_for_backward(flat, weight, weight_a, weight_b, low, merged if keep_merged else None)
                    return out

                @staticmethod
                def backward(ctx, grad):  # type: ignore[override]
                    flat, weight, weight_a, weight_b, low, merged = ctx.saved_tensors
                    scaling = ctx.scaling
                    g = grad.reshape(-1, grad.shape[-1])
                    grad_x = None
                    if ctx.needs_input_grad[0]:
                        if merged is None:
                            # scaled on A here, on B in forward: otherwise a compiled graph
                            # dedupes the two addmm's and keeps the forward's merged weight
                            merged = torch.addmm(weight, weight_b, weight_a * scaling)
                        grad_x = (g @ merged).view(ctx.x_shape)
                    gb = (g @ weight_b) * scaling
                    grad_b = g.t() @ low
                    grad_a = gb.t() @ flat
                    return grad_x, None, None, grad_a, grad_b, None, None

            cls._fn = MergedLora
        return cls._fn


class FusedLoraLinear(Patch):
    """A lean forward for peft LoRA ``Linear`` layers (see the module docstring).

    Example::

        TransformersModel(..., disabled_patches=["FusedLoraLinear"])  # peft's own forward
    """

    name = "FusedLoraLinear"
    enabled_by_default = True
    order = 20

    def applies_to(self, model: Any) -> bool:
        """Models with peft LoRA ``Linear`` layers."""
        return bool(lora_linear_layers(model))

    def apply(self, model: Any) -> None:
        """Give each LoRA Linear the lean forward (idempotent)."""
        for layer in lora_linear_layers(model):
            if getattr(layer, _LEAN_ATTR, False):
                continue
            layer._twinkle_peft_forward = layer.forward
            layer.forward = MethodType(_lean_forward, layer)
            setattr(layer, _LEAN_ATTR, True)

    def revert(self, model: Any) -> None:
        """Back to peft's forward."""
        for layer in lora_linear_layers(model):
            if getattr(layer, _LEAN_ATTR, False):
                del layer.forward
                del layer._twinkle_peft_forward
                setattr(layer, _LEAN_ATTR, False)


class MergedLoraForward(Patch):
    """LoRA through a merged weight: ``x (W + s B A)^T`` in one GEMM, LoRA's own low-rank gradients.

    The unmerged LoRA update writes a ``[tokens, out_features]`` rank-r product and adds it in
    forward, and a ``[tokens, in_features]`` one in backward: at 8k tokens that traffic is most
    of what LoRA costs over the frozen layer. Merging the adapter into a bf16 copy of the frozen
    weight (``addmm(W, s B, A)``, cheaper than those products once a batch has more tokens than
    ``out * in / (out + in)``) leaves one GEMM each way; the adapter's gradients are computed
    from ``x A^T`` and ``grad B`` exactly as before, never through the ``[out, in]`` weight
    gradient. Takes effect through :class:`FusedLoraLinear`'s forward, per call, only where it
    pays (see :func:`_merge_pays`); small batches stay unmerged.

    Numerics: the merged weight is rounded to the model's dtype once, which moves the output by
    about one bf16 rounding step (the unmerged path rounds the base and LoRA products and their
    sum); exact in float32 (CPU test).

    Args:
        keep_merged: keep the merged weight for backward (the default) instead of rebuilding it
            there. Keeping costs one bf16 copy of the adapted weights of every layer whose
            activations are held (about 0.84 GiB per 7B layer, 12 GiB for the model; none beyond
            one layer under gradient checkpointing, and ActivationCheckpointing counts it);
            rebuilding costs that memory nothing and, on an H200, all of the speed: 7B layer at 8k
            tokens 14.77 ms kept, 15.50 rebuilt, 15.44 unmerged, 13.53 without adapters.

    Example::

        TransformersModel(..., disabled_patches=["MergedLoraForward"])  # the unmerged LoRA product
    """

    name = "MergedLoraForward"
    enabled_by_default = True
    order = 21

    def __init__(self, keep_merged: bool = True) -> None:
        self.keep_merged = keep_merged

    def applies_to(self, model: Any) -> bool:
        """Models whose LoRA layers run :class:`FusedLoraLinear`'s forward."""
        return any(getattr(layer, _LEAN_ATTR, False) for layer in lora_linear_layers(model))

    def apply(self, model: Any) -> None:
        """Mark each lean LoRA layer to merge (the choice is made per call)."""
        from twinkle.patch.fastpath import set_flag

        mode = "keep" if self.keep_merged else "recompute"
        kept = 0
        for layer in lora_linear_layers(model):
            if getattr(layer, _LEAN_ATTR, False):
                setattr(layer, _MERGED_ATTR, mode)
                weight = layer.get_base_layer().weight
                kept += weight.numel() * weight.element_size() if self.keep_merged else 0
        # ActivationCheckpointing counts the kept merged weights with the activations
        set_flag(model, "kept_merged_bytes", kept)

    def revert(self, model: Any) -> None:
        """Back to the unmerged LoRA product."""
        from twinkle.patch.fastpath import set_flag

        for layer in lora_linear_layers(model):
            layer.__dict__.pop(_MERGED_ATTR, None)
        set_flag(model, "kept_merged_bytes", 0)
