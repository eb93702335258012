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
"""

from __future__ import annotations

from types import MethodType
from typing import Any

from twinkle.patch.base import Patch

_LEAN_ATTR = "_twinkle_lean_forward"


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
    result = torch.nn.functional.linear(x, base.weight, base.bias)
    # scaling on the rank-r activations (r columns, not out_features); the add is left as a plain
    # add so that, in compiled layers, inductor fuses it into the consumer (RoPE, SiLU*up, residual)
    low_rank = torch.nn.functional.linear(x, weight_a) * self.scaling[name]
    return result + torch.nn.functional.linear(low_rank, weight_b)


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
