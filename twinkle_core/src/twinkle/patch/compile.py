"""CompileDecoderLayers: regional ``torch.compile`` of each decoder layer.

Compiling the repeated layer (not the whole model) compiles once and reuses the code for
every layer, so the first step costs seconds, not minutes. Inductor fuses the memory-bound
work between the matmuls into a few Triton kernels: RMSNorm, RoPE, SwiGLU, residual adds,
dtype casts and the LoRA epilogues, in forward and backward, and removes most of the
per-op Python and launch overhead. Attention stays on sdpa's flash kernel and matmuls on
cuBLAS. The decoder's final norm is compiled too: eager, transformers' RMSNorm keeps a float32
copy of its input for backward (56 MiB for 16k tokens of a 896-wide model), inductor's only
the bf16 input and the per-row scale. Numerics: inductor may reorder float32 reductions
(RMSNorm variance); results agree with eager within bf16 rounding.
"""

from __future__ import annotations

import logging
from typing import Any

from twinkle.patch.base import Patch
from twinkle.patch.kernel_config import kernel_config
from twinkle.patch.model_walk import decoder_layers, decoder_of, model_device

logger = logging.getLogger("twinkle.patch")
_COMPILED_ATTR = "_twinkle_compiled"


class CompileDecoderLayers(Patch):
    """``layer.compile()`` on each decoder layer of a model on CUDA.

    Args:
        mode: ``torch.compile`` mode (default ``None``: inductor's default; ``kernel_config().compile_mode``,
            env ``TWINKLE_COMPILE_MODE``).
        dynamic: ``torch.compile(dynamic=...)`` (default ``None``: static first, dynamic after
            a shape change, so padding-free batches of varying length compile twice at most).

    Example::

        TransformersModel(..., disabled_patches=["CompileDecoderLayers"])  # eager layers
    """

    name = "CompileDecoderLayers"
    enabled_by_default = True
    order = 90

    def __init__(self, mode: str | None = None, dynamic: bool | None = None) -> None:
        self.mode = mode if mode is not None else (kernel_config().compile_mode or None)
        self.dynamic = dynamic

    def applies_to(self, model: Any) -> bool:
        """CUDA models with repeated decoder layers (CPU compile needs a C++ toolchain and long builds)."""
        return model_device(model).type == "cuda" and bool(decoder_layers(model))

    def apply(self, model: Any) -> None:
        """Mark each decoder layer and the final norm for compilation (each compiles at its first call)."""
        import torch

        # One compiled graph serves every layer; allow recompiles for a few shapes per layer.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for layer in _compiled_modules(model):
            if getattr(layer, _COMPILED_ATTR, False):
                continue
            layer.compile(mode=self.mode, dynamic=self.dynamic)
            setattr(layer, _COMPILED_ATTR, True)

    def revert(self, model: Any) -> None:
        """Run the layers eagerly again."""
        for layer in _compiled_modules(model):
            if getattr(layer, _COMPILED_ATTR, False):
                layer._compiled_call_impl = None
                setattr(layer, _COMPILED_ATTR, False)


def _compiled_modules(model: Any) -> list[Any]:
    """The decoder layers, then the decoder's final norm (``decoder.norm``) when it has one."""
    import torch

    modules = decoder_layers(model)
    norm = getattr(decoder_of(model), "norm", None)
    if isinstance(norm, torch.nn.Module) and not isinstance(norm, torch.nn.Identity):
        modules.append(norm)
    return modules
