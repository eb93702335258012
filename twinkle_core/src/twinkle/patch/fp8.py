"""Fp8FrozenGemms: a LoRA model's frozen base GEMMs in FP8 (opt-in, not exact).

A LoRA step spends most of its time in two GEMMs per projection: the forward ``x W^T`` and the
input gradient ``g W``. ``W`` is frozen, so it has no weight gradient. In bf16 these GEMMs run at
the H200's power cap. ``benchmarks/fp8_headroom.py`` measured a 7B layer's GEMMs at 11.55 ms in
bf16, 6.77 ms in FP8 and 7.47 ms including the activation quantization (decision 0016).

With this patch, each LoRA ``Linear`` whose base weight is frozen runs:

* forward: ``y = dequant(quant(x) @ quant(W)^T) + b + s (x A^T) B^T``;
* backward: ``grad_x = dequant(quant(g) @ quant(W))``, plus LoRA's bf16 term.

The quantization is e4m3 with one float32 scale per row. The activation and gradient rows are
tokens. The weight rows are output channels for the forward and input channels for the backward.
The weight is quantized once, in both layouts, and again whenever it changes. The layer's output
is the float32 accumulator times both scales, rounded to bf16 (``torch._scaled_mm``). The adapter
itself stays in bf16, with peft's gradients (:class:`~twinkle.patch.lora_fast.FusedLoraLinear`'s
unmerged path).

**Not exact.** One FP8 GEMM is about 3.7e-2 off in relative error, against 1.7e-3 for bf16. That is
why the patch is off by default and its name says FP8. Switch it on by name:

    TransformersModel(..., torch_dtype="bfloat16", enabled_patches=["Fp8FrozenGemms"])
    # or for every model of a process: TWINKLE_ENABLED_PATCHES=Fp8FrozenGemms

It takes the layers over from ``MergedLoraForward`` and ``FusedLoraMLP``. Those need the bf16
merged weight. Requirements:

* bf16 weights;
* both dimensions multiples of 16, and at least ``Fp8FrozenGemms.min_features`` (default
  ``kernel_config().fp8_min_features``, 1024; env ``TWINKLE_FP8_MIN_FEATURES``): smaller GEMMs
  lose more to the quantization passes and the lost merged path than FP8 saves (a 0.5B LoRA
  step ran 0.84x as fast with all its layers in FP8);
* a CUDA device of compute capability 8.9 or newer (Ada, Hopper), or the CPU, where PyTorch
  implements the same ``_scaled_mm``, which is how CI checks it;
* plain tensors: weights sharded by FSDP2 (DTensors) keep bf16.

The FP8 copies take one byte per weight each, two in all: as much memory again as the bf16 base.
Before each forward of the model, the copies of a weight that changed are rebuilt. That covers a
weight changed in place, replaced, or moved by ``model.to(...)``. The check is skipped when the
whole model is one compiled graph.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from twinkle.patch.base import Patch
from twinkle.patch.kernel_config import kernel_config
from twinkle.patch.lora_common import FP8_ATTR, LEAN_ATTR, MERGED_ATTR, count_kept_merged, lora_linear_layers
from twinkle.patch.model_walk import decoder_of, get_flag, set_flag, unwrap

logger = logging.getLogger("twinkle.patch")

#: The largest finite e4m3 value: a row's largest magnitude is scaled to it.
E4M3_MAX = 448.0


def quantize_rows(t: Any) -> tuple[Any, Any]:
    """``t`` (2-D) as row-major e4m3 values and ``[rows, 1]`` float32 scales, ``t ~= values * scales``.

    Each row's largest magnitude maps to 448, so nothing overflows. An all-zero row gets a tiny
    scale and zeros. The values are contiguous even when ``t`` is a transposed view: elementwise
    ops keep their input's layout, and ``_scaled_mm`` on CUDA rejects a first operand that is not
    row-major or a second that is not column-major.
    """
    import torch

    amax = t.abs().amax(-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    values = (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return values.contiguous(), scale


class Fp8Weight:
    """The FP8 copies of one frozen ``[out, in]`` weight, rebuilt when the weight changes.

    ``forward``: ``W^T`` as ``[in, out]`` e4m3 with ``[1, out]`` scales, the second operand of
    ``x @ W^T``. ``backward``: ``W`` as ``[out, in]`` e4m3 with ``[1, in]`` scales, the second operand
    of ``g @ W``. Both are column-major views, which is the layout ``_scaled_mm`` requires on CUDA.
    They are made here, outside any compiled graph, so they reach ``_scaled_mm`` as graph inputs
    with their strides fixed. (On the H200 the first version failed with ``mat2 must be col_major``:
    it quantized ``W^T`` as a transposed view, whose values kept the view's layout, so transposing
    them back gave a row-major operand; decision 0016. The CPU ``_scaled_mm`` accepts any layout.)
    """

    def __init__(self, source: Any) -> None:
        """``source``: the frozen weight, or the ``Linear`` holding it (then a replaced weight is followed)."""
        self.source = source
        self.refresh(force=True)

    @property
    def weight(self) -> Any:
        return getattr(self.source, "weight", self.source)

    def refresh(self, force: bool = False) -> bool:
        """Quantize again if the weight changed (in place, moved or replaced) since the last time."""
        import torch

        w = self.weight
        stamp = (id(w), w.data_ptr(), w._version, w.device)
        if not force and stamp == self._stamp:
            return False
        with torch.no_grad():
            values, scale = quantize_rows(w.detach())  # [out, in] row-major: a scale per output channel
            self.forward = (values.t(), scale.reshape(1, -1))
            values_t, scale_t = quantize_rows(w.detach().t())  # [in, out] row-major: per input channel
            self.backward = (values_t.t(), scale_t.reshape(1, -1))
        self._stamp = stamp
        return True

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in (self.forward, self.backward) for t in pair)


class _Fp8LinearFunction:
    """``x W^T`` and its input gradient ``g W`` as row-scaled FP8 GEMMs (torch on first use).

    ``apply(x, w_t, w_t_scale, w, w_scale)``: :class:`Fp8Weight`'s column-major operands and their
    scales. It returns no gradient for the weight, which is frozen.
    """

    _fn: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls._fn is None:
            import torch

            class Fp8Linear(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x, w_t, w_t_scale, w, w_scale):  # type: ignore[override]
                    x_values, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
                    out = torch._scaled_mm(x_values, w_t, scale_a=x_scale, scale_b=w_t_scale, out_dtype=x.dtype)
                    ctx.save_for_backward(w, w_scale)
                    ctx.x_shape = x.shape
                    return out.view(*x.shape[:-1], out.shape[-1])

                @staticmethod
                def backward(ctx, grad):  # type: ignore[override]
                    w, w_scale = ctx.saved_tensors
                    grad_x = None
                    if ctx.needs_input_grad[0]:
                        g_values, g_scale = quantize_rows(grad.reshape(-1, grad.shape[-1]))
                        grad_x = torch._scaled_mm(g_values, w, scale_a=g_scale, scale_b=w_scale, out_dtype=grad.dtype)
                        grad_x = grad_x.view(ctx.x_shape)
                    return grad_x, None, None, None, None

            cls._fn = Fp8Linear
        return cls._fn


def fp8_linear(x: Any, fp8: Fp8Weight, bias: Any = None) -> Any:
    """``x W^T + b`` through ``fp8``'s copies of ``W`` (see the module docstring)."""
    out = _Fp8LinearFunction.get().apply(x, *fp8.forward, *fp8.backward)
    return out if bias is None else out + bias


@functools.cache
def _cpu_row_scaled_mm() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes row-wise scales (2.13 does; 2.11 asserts per-tensor)."""
    import torch

    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    b = torch.ones(16, 16).to(torch.float8_e4m3fn).t()
    try:
        torch._scaled_mm(a, b, scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _supported_device(device: Any) -> bool:
    """CUDA sm89+ (Ada, Hopper, Blackwell), or the CPU where its ``_scaled_mm`` scales rows."""
    import torch

    if device.type == "cpu":
        return _cpu_row_scaled_mm()
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return False


class Fp8FrozenGemms(Patch):
    """Frozen base GEMMs of LoRA layers in FP8 (see the module docstring). Off by default: not exact.

    Example::

        TransformersModel(..., torch_dtype="bfloat16", enabled_patches=["Fp8FrozenGemms"])
    """

    name = "Fp8FrozenGemms"
    enabled_by_default = False
    order = 24  # after MergedLoraForward and FusedLoraMLP, whose layers it takes over
    #: Layers with fewer input or output features keep the exact merged path: their GEMMs are too
    #: small for FP8 to win back the activation quantization and the lost merge (decision 0017).
    #: ``None``: ``kernel_config().fp8_min_features`` (1024; env ``TWINKLE_FP8_MIN_FEATURES``), read per call.
    min_features: int | None = None

    def __init__(self, min_features: int | None = None) -> None:
        if min_features is not None:
            self.min_features = min_features

    def features_needed(self) -> int:
        """The smallest input/output width of a layer this patch takes (:attr:`min_features`)."""
        return self.min_features if self.min_features is not None else kernel_config().fp8_min_features

    def layers(self, model: Any) -> list[Any]:
        """Lean LoRA layers of a frozen bf16 ``[out, in]`` base weight, both multiples of 16, >= min_features."""
        import torch

        found, minimum = [], self.features_needed()
        for layer in lora_linear_layers(model):
            base = layer.get_base_layer()
            weight = getattr(base, "weight", None)
            if not getattr(layer, LEAN_ATTR, False) or type(base) is not torch.nn.Linear:
                continue
            if weight.requires_grad or weight.dtype != torch.bfloat16 or not _supported_device(weight.device):
                continue
            if type(weight.data) is not torch.Tensor:  # sharded (FSDP2's DTensor) or another subclass
                continue
            if weight.shape[0] % 16 or weight.shape[1] % 16 or min(weight.shape) < minimum:
                continue
            found.append(layer)
        return found

    def applies_to(self, model: Any) -> bool:
        """Models with such layers (:class:`~twinkle.patch.lora_fast.FusedLoraLinear` applied).

        Asked for by name, the patch says once why a model with LoRA layers gets none in FP8.
        """
        if self.layers(model):
            return True
        lora = lora_linear_layers(model)
        if lora and not get_flag(model, "fp8_none_warned"):
            set_flag(model, "fp8_none_warned", True)
            weight = lora[0].get_base_layer().weight
            logger.warning(
                "Fp8FrozenGemms takes none of the %d LoRA layers, so they stay exact bf16. It needs FusedLoraLinear "
                "on, frozen bf16 weights on CUDA of compute capability 8.9+ (or a CPU whose _scaled_mm scales rows), "
                "and layers of at least %d features (TWINKLE_FP8_MIN_FEATURES: smaller layers run faster exact). "
                "First layer: %s %s on %s",
                len(lora),
                self.features_needed(),
                tuple(weight.shape),
                str(weight.dtype).replace("torch.", ""),
                weight.device,
            )
        return False

    def apply(self, model: Any) -> None:
        """Give each such layer its FP8 copies; refresh them before every forward of the model."""
        _Fp8LinearFunction.get()  # built here, not on first use inside a compiled layer
        for layer in self.layers(model):
            fp8 = getattr(layer, FP8_ATTR, None)
            base = layer.get_base_layer()
            if fp8 is None or fp8.source is not base:
                setattr(layer, FP8_ATTR, Fp8Weight(base))
            layer.__dict__.pop(MERGED_ATTR, None)  # the merged path would bypass the FP8 weights
        count_kept_merged(model)  # fewer merged weights kept now
        copies = [getattr(layer, FP8_ATTR) for layer in lora_linear_layers(model) if hasattr(layer, FP8_ATTR)]
        set_flag(model, "fp8_weights", copies)
        if get_flag(model, "fp8_refresh_hook") is None:
            # on the decoder: TransformersModel's fused head calls it directly; any other forward
            # of the model runs it too (the top-level model when there is no plain decoder)
            entry = decoder_of(model) or unwrap(model)
            hook = entry.register_forward_pre_hook(lambda module, args: _refresh(model))
            set_flag(model, "fp8_refresh_hook", hook)

    def revert(self, model: Any) -> None:
        """The bf16 path again (MergedLoraForward marks its layers on the next apply)."""
        for layer in lora_linear_layers(model):
            layer.__dict__.pop(FP8_ATTR, None)
        hook = get_flag(model, "fp8_refresh_hook")
        if hook is not None:
            hook.remove()
        set_flag(model, "fp8_refresh_hook", None)
        set_flag(model, "fp8_weights", [])


def _refresh(model: Any) -> None:
    """Before a forward: quantize again the weights that changed since their FP8 copies were made.

    Skipped inside a graph that ``torch.compile`` traces (a whole compiled model): there, call
    ``Fp8Weight.refresh`` yourself after changing a base weight. TransformersModel compiles decoder
    layers one by one, so the hook runs eagerly before them.
    """
    import torch

    if torch.compiler.is_compiling():
        return
    for fp8 in get_flag(model, "fp8_weights", []):
        fp8.refresh()
