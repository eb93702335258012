"""LigerKernels: Liger's Triton RMSNorm, SwiGLU and RoPE kernels, when liger-kernel is installed.

Optional (``pip install liger-kernel``; CUDA only) and off by default: the fast path's
``CompileDecoderLayers`` already fuses these ops. Switch it on with
``TransformersModel(enabled_patches=["LigerKernels"])`` or use it without compilation
(``disabled_patches=["CompileDecoderLayers"]``). Liger's own fused linear cross-entropy is
left off: ``FusedLinearCrossEntropy`` does that job inside the Loss protocol.

Liger patches the model's transformers classes globally (module attributes of
``transformers.models.<type>.modeling_<type>``) as well as the loaded instance, so it
affects models of the same type built later in the same process.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from twinkle.patch.base import Patch
from twinkle.patch.model_walk import get_flag, model_device, set_flag, unwrap


def liger_available() -> bool:
    """Whether ``liger_kernel`` can be imported (without importing it)."""
    return importlib.util.find_spec("liger_kernel") is not None


class LigerKernels(Patch):
    """Apply Liger's RMSNorm / SwiGLU / RoPE kernels to a supported model on CUDA.

    Args:
        rms_norm: replace RMSNorm.
        swiglu: replace the SwiGLU MLP.
        rope: replace rotary embeddings.

    Example::

        TransformersModel(..., patches=["FusedLinearCrossEntropy", "LigerKernels"])
    """

    name = "LigerKernels"
    enabled_by_default = False
    order = 50

    def __init__(self, rms_norm: bool = True, swiglu: bool = True, rope: bool = True) -> None:
        self.options = {"rms_norm": rms_norm, "swiglu": swiglu, "rope": rope}

    def applies_to(self, model: Any) -> bool:
        """liger-kernel installed, model on CUDA and of a type Liger supports."""
        if not liger_available() or model_device(model).type != "cuda":
            return False
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        return getattr(unwrap(model).config, "model_type", None) in MODEL_TYPE_TO_APPLY_LIGER_FN

    def apply(self, model: Any) -> None:
        """Patch the model instance (and its classes) with Liger's kernels."""
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        base = unwrap(model)
        if get_flag(base, "liger", False):
            return
        _apply_liger_kernel_to_instance(base, fused_linear_cross_entropy=False, cross_entropy=False, **self.options)
        set_flag(base, "liger", True)
