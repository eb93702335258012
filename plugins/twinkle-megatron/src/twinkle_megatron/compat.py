"""The shims megatron-core needs on CPU, and without Transformer Engine: one module, reversible.

megatron-core is written for CUDA. Version 0.16 builds ``GPTModel`` and runs forward and
backward on CPU tensors over a gloo process group with two shims, plus two for when
Transformer Engine is not installed:

1. ``torch.cuda.current_device`` returns ``"cpu"`` (CPU only). megatron-core passes
   ``device=torch.cuda.current_device()`` when it allocates buffers; ``"cpu"`` makes those
   allocations land on the CPU.
2. The RNG tracker is initialized with ``inference_rng_tracker=True`` (CPU only; see
   :func:`seed_model_parallel`): the training tracker forks ``torch.cuda`` RNG states,
   which a CPU build of torch does not have.
3. ``megatron.core.transformer.moe.moe_utils.te_general_gemm`` is defined as ``None`` when
   Transformer Engine is missing (any device). 0.16 only defines it when TE imports, and
   the router's gating linear reads it unconditionally; ``None`` selects its plain
   ``torch.mm`` path, which is what it means.
4. ``megatron.core.transformer.multi_latent_attention.HAVE_TE`` is set to ``False`` when
   Transformer Engine is missing (any device; multi-latent attention, DeepSeek-V2/V3 only).
   That module sets ``HAVE_TE = True`` whenever ``megatron.core.extensions.transformer_engine``
   imports, and without TE that module still imports, with ``MagicMock`` stand-ins for the TE
   classes; ``MLASelfAttention.__init__`` then calls ``isinstance(linear_proj, TELinear)``
   with a mock and raises ``TypeError``. ``False`` is the truth, and skips only TE-specific
   fp8 handling.

Megatron's distributed optimizer and pipeline schedules need CUDA; on CPU Twinkle drives
the megatron model with a plain torch optimizer instead (see :mod:`twinkle_megatron.model`).

Use :func:`megatron_on_device` around building and running megatron models; it applies
only what the device needs and :func:`restore` (or leaving the context) puts every patched
attribute back.

Example::

    with megatron_on_device("cpu"):
        ...  # build and train a megatron-core model on CPU
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Any, Iterator

_lock = threading.Lock()
#: (object, attribute, original value or _MISSING) for each patch in force, applied in order.
_patches: list[tuple[Any, str, Any]] = []
_depth = 0
_MISSING = object()


def _patch(obj: Any, name: str, value: Any) -> None:
    _patches.append((obj, name, getattr(obj, name, _MISSING)))
    setattr(obj, name, value)


def _cpu_current_device() -> str:
    """Stands in for ``torch.cuda.current_device`` on CPU: megatron allocates on ``"cpu"``."""
    return "cpu"


def apply(device_type: str) -> None:
    """Apply the shims ``device_type`` ('cpu' or 'cuda') needs; counted, so nested calls are fine.

    Args:
        device_type: ``"cpu"`` applies shims 1-4, ``"cuda"`` only 3 and 4 (when TE is missing).

    Raises:
        ValueError: an unknown device type.
    """
    global _depth
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"megatron shims: device_type must be 'cpu' or 'cuda', got {device_type!r}")
    import torch

    with _lock:
        _depth += 1
        if _depth > 1:
            return
        from megatron.core.transformer.moe import moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):
            _patch(moe_utils, "te_general_gemm", None)
        from megatron.core.extensions import transformer_engine as te_extension
        from megatron.core.transformer import multi_latent_attention

        if not te_extension.HAVE_TE and multi_latent_attention.HAVE_TE:
            _patch(multi_latent_attention, "HAVE_TE", False)
        if device_type == "cpu":
            _patch(torch.cuda, "current_device", _cpu_current_device)


def restore() -> None:
    """Undo :func:`apply` (the last matching call puts every original attribute back)."""
    global _depth
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        if _depth:
            return
        while _patches:
            obj, name, original = _patches.pop()
            if original is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, original)


def active() -> bool:
    """Whether shims are in force right now."""
    return _depth > 0


@contextlib.contextmanager
def megatron_on_device(device_type: str) -> Iterator[None]:
    """Context manager form of :func:`apply` / :func:`restore`."""
    apply(device_type)
    try:
        yield
    finally:
        restore()


def seed_model_parallel(seed: int, device_type: str) -> None:
    """Seed megatron's RNG tracker (``model_parallel_cuda_manual_seed``) for ``device_type``.

    On CPU the inference tracker is used (shim 2): it keeps named RNG states without
    touching ``torch.cuda``. Dropout inside megatron layers is 0 for Twinkle's models, so
    the tracker only matters for weight initialization.
    """
    import torch
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {}
    if "force_reset_rng" in inspect.signature(model_parallel_cuda_manual_seed).parameters:
        kwargs["force_reset_rng"] = True  # a second model in the same process re-seeds
    if device_type == "cpu":
        kwargs["inference_rng_tracker"] = True
    model_parallel_cuda_manual_seed(seed, **kwargs)
