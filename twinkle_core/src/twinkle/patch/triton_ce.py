"""One Triton kernel for a chunk of the fused linear cross-entropy: loss, argmax and gradient.

:func:`twinkle.patch.fused_linear_ce.linear_cross_entropy` computes ``[rows, vocab]`` logits
per chunk and needs, per row, the float32 log-sum-exp, the loss, the argmax (for accuracy
metrics) and the gradient ``softmax - onehot`` written over the logits. Compiled by inductor
that is a reduction kernel (log-sum-exp, gather, argmax) and a pointwise kernel, and the
reduction runs at about 1 TB/s on an H200. :func:`ce_chunk_` does it in one kernel
(:mod:`twinkle.patch._ce_kernels`), one program per row: pass 1 streams the row once
for the running max, the rescaled sum of exponentials, the argmax and (with label smoothing)
the sum of logits; pass 2 streams it again and writes the gradient in place. Both passes read
bf16 and compute in float32, like the eager chunk function
(:func:`twinkle.patch.fused_linear_ce._ce_chunk`) it replaces; results agree with it up to the
order of float32 sums. On an H200 (512 rows of Qwen's 152k vocabulary) it takes about half the
time of the inductor pair (``benchmarks/ce_kernel.py``).

Import is lazy: nothing here imports triton until :func:`ce_chunk_` runs (:func:`available`
says whether it can). On CPU the kernel runs under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how CI checks it against the eager function.
"""

from __future__ import annotations

import functools
from typing import Any

from twinkle.data_format.features import IGNORE_INDEX
from twinkle.patch.kernel_config import kernel_config

# Vocabulary columns per loop iteration and warps per program (one program per row):
# kernel_config().ce_block (4096; env TWINKLE_CE_BLOCK) and .ce_warps (8; TWINKLE_CE_WARPS), read per call.


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether triton imports (the kernel needs it; CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a triton that does not match the installed torch
        return False
    return True


def _kernel() -> Any:
    from twinkle.patch._ce_kernels import ce_rows  # imports triton

    return ce_rows


def ce_chunk_(logits: Any, labels: Any, label_smoothing: float, loss_out: Any, pred_out: Any) -> None:
    """Per-row loss and argmax of ``logits`` into ``loss_out``/``pred_out``; ``logits`` becomes its gradient.

    Args:
        logits: ``[n, V]`` logits (bf16/fp16/fp32, unit stride along V), overwritten with
            ``d(sum of losses)/d(logits)``.
        labels: ``[n]`` integer ids, ``-100`` = ignored (loss 0, gradient 0).
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
        loss_out: ``[n]`` float32, receives each row's loss (0 where ignored; NaN for an id
            outside ``[0, V)``).
        pred_out: ``[n]`` int64, receives each row's argmax (the first one on ties, like torch).

    Example::

        logits = hidden @ weight.t()
        ce_chunk_(logits, labels, 0.0, losses, preds)  # logits now holds the gradient
    """
    n, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("ce_chunk_: logits must have unit stride along the vocabulary")
    if n == 0:
        return
    config = kernel_config()
    _kernel()[(n,)](
        logits,
        logits.stride(0),
        labels,
        loss_out,
        pred_out,
        vocab,
        float(label_smoothing),
        IGNORE_INDEX,
        BLOCK=config.ce_block,
        SMOOTH=label_smoothing > 0.0,
        num_warps=config.ce_warps,
    )
