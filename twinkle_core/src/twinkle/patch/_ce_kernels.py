"""Triton kernels of :mod:`twinkle.patch.triton_ce` (this module imports triton; import it lazily)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ce_rows(
    logits_ptr,
    row_stride,
    labels_ptr,
    loss_ptr,
    pred_ptr,
    vocab,
    eps,
    ignore_index,
    BLOCK: tl.constexpr,
    SMOOTH: tl.constexpr,
):
    """Row ``program_id`` of a ``[rows, vocab]`` chunk: loss and argmax (pass 1), then the gradient (pass 2).

    One program per row was as fast as fewer programs looping over rows (tried: 132 to 528 programs,
    to keep pass 2's re-read in L2) and simpler.
    """
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    label = tl.load(labels_ptr + row).to(tl.int32)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < vocab)
    # pass 1: running max, rescaled sum of exp, first argmax, sum of logits
    run_max = -float("inf")
    run_sum = 0.0
    best = -float("inf")
    best_idx = 0
    total = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(base + cols, mask=mask, other=-float("inf")).to(tl.float32)
        blk_max = tl.max(x, axis=0)
        blk_arg = tl.argmax(x, axis=0)
        best_idx = tl.where(blk_max > best, start + blk_arg, best_idx)
        best = tl.maximum(best, blk_max)
        new_max = tl.maximum(run_max, blk_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        run_max = new_max
        if SMOOTH:
            total += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = run_max + tl.log(run_sum)
    target = tl.load(base + tl.where(in_range, label, 0)).to(tl.float32)
    loss = lse - target
    if SMOOTH:
        loss = (1.0 - eps) * loss + eps * (lse - total / vocab)
    # an id outside the vocabulary gives a NaN loss (visible) rather than a wrong number
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(pred_ptr + row, best_idx.to(tl.int64))
    # pass 2: d(loss)/d(logits) = softmax - eps / V - (1 - eps) * onehot, zero for ignored rows
    keep = tl.where(valid, 1.0, 0.0)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse)
        if SMOOTH:
            grad = grad - eps / vocab
        grad = tl.where(cols == label, grad - (1.0 - eps), grad) * keep
        tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)
