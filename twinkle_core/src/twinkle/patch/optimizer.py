"""FusedOptimizer: Adam/AdamW with ``fused=True`` on CUDA (one multi-tensor kernel per step)."""

from __future__ import annotations

from typing import Any

from twinkle.patch.base import Patch
from twinkle.patch.model_walk import model_device, set_flag


class FusedOptimizer(Patch):
    """Build Adam/AdamW with ``fused=True`` when every trained parameter is on CUDA.

    torch's default ``foreach`` implementation launches a handful of kernels per parameter
    group step; ``fused=True`` does the whole update in one kernel over all parameters and
    has the same math. TransformersModel.set_optimizer asks
    :func:`twinkle.patch.fastpath.optimizer_kwargs`, which adds ``fused=True`` unless the
    user passed ``fused`` or ``foreach`` themselves. Gradient clipping already uses torch's
    ``foreach`` norm on CUDA.

    Example::

        TransformersModel(..., disabled_patches=["FusedOptimizer"])
    """

    name = "FusedOptimizer"
    enabled_by_default = True

    def applies_to(self, model: Any) -> bool:
        """Models on a CUDA device."""
        return model_device(model).type == "cuda"

    def apply(self, model: Any) -> None:
        """Mark the model so set_optimizer adds ``fused=True``."""
        set_flag(model, "fused_optimizer", True)

    def revert(self, model: Any) -> None:
        """Optimizers built afterwards use torch's defaults."""
        set_flag(model, "fused_optimizer", False)
