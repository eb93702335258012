"""Chunked linear cross-entropy: the LM head and the token loss in one pass, without full logits.

A causal LM's last step, ``logits = hidden @ W.T`` followed by a float32 cross-entropy, holds
``[tokens, vocab]`` logits in bf16 *and* float32 (plus their gradient) at once: for 16k tokens
and Qwen's 152k vocabulary that is 5 GB + 10 GB + 10 GB. :func:`linear_cross_entropy` walks
the tokens in chunks; for each chunk it computes the logits (same bf16 matmul as the plain
path), the float32 log-sum-exp and the loss, and the gradients of the hidden states and of the
weight right away, so that backward only scales them. Peak extra memory is one chunk of
logits. The numbers are the plain path's: each token's row of logits is computed whole, in
the same dtype, so the result is exact up to the order of float32 sums.

:func:`linear_token_logps` is the same idea for per-token log-probabilities (RL losses): it
keeps only the log-sum-exp and recomputes the chunk's logits in backward.

**LoRA on the LM head.** Both take an optional low-rank term ``lora=(A, B, scaling)`` (``A``
``[r, H]``, ``B`` ``[V, r]``): each chunk's logits are ``h W^T (+ bias) + scaling (h A^T) B^T``
and ``A``, ``B`` get their gradients (``W`` stays what it is: frozen when it needs none). The
rank-``r`` products are ``[rows, r]``, so the peak stays one chunk of logits. Several adapters'
heads over one packed pass are several calls, one per token range
(:func:`head_ranges`), so a token only meets its own adapter's ``A`` and ``B``.

:class:`FusedLinearCrossEntropy` is the patch that switches a model's cross-entropy onto this
path (see :mod:`twinkle.patch.fastpath`).
"""

from __future__ import annotations

import math
from typing import Any

from twinkle.data_format.features import IGNORE_INDEX
from twinkle.patch import triton_ce
from twinkle.patch.base import Patch
from twinkle.patch.kernel_config import kernel_config
from twinkle.patch.model_walk import lm_head_of, set_flag

# How many rows one chunk holds: ``kernel_config().lce_chunk_bytes`` (512 MiB; env
# TWINKLE_LCE_CHUNK_BYTES) of float32 logits. 512 MiB gives 512 tokens of a 152k vocabulary (a
# 0.16 GB bf16 buffer, rounded down to a power of two); on an H200 (0.5B LoRA, 16k tokens) it was
# as fast as 1 GiB (1024 tokens) and 0.3 GiB lighter at peak. When the LM head itself trains (full
# fine-tuning) ``lce_weight_grad_chunk_bytes`` (2 GiB; TWINKLE_LCE_WEIGHT_GRAD_CHUNK_BYTES): every
# chunk adds its weight gradient into one float32 ``[vocab, hidden]`` buffer, and at 512 rows that
# read-modify-write (1.1 GB for Qwen2.5-0.5B's head) took longer than the chunk's matmul; 2048
# rows of a 152k vocabulary (a 0.6 GB bf16 buffer) do a quarter of those passes.


def _chunk_rows(num_rows: int, vocab: int, chunk_rows: int | None, weight_grad: bool = False) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
        return chunk_rows
    config = kernel_config()
    budget = config.lce_weight_grad_chunk_bytes if weight_grad else config.lce_chunk_bytes
    rows = max(1, budget // (4 * vocab))
    # Equal chunks (a power of two where possible) keep compiled kernels to one shape.
    rows = 1 << int(math.log2(rows))
    return min(rows, max(1, num_rows))


def _ce_chunk(logits: Any, labels: Any, label_smoothing: float) -> tuple[Any, Any]:
    """Loss sum and argmax ids of one chunk; overwrites ``logits`` ([n, V], model dtype) with d(loss)/d(logits).

    Writing the gradient into the logits buffer keeps one ``[n, V]`` buffer per chunk.
    """
    import torch

    logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))
    vocab = logits32.shape[-1]
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(logits32, dim=-1)
    target = torch.gather(logits32, 1, safe.unsqueeze(1)).squeeze(1)
    nll = lse - target
    probs = torch.exp(logits32 - lse.unsqueeze(1))
    onehot = torch.arange(vocab, device=logits.device).unsqueeze(0) == safe.unsqueeze(1)
    if label_smoothing > 0.0:
        smooth = lse - logits32.mean(dim=-1)
        loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
        grad = probs - label_smoothing / vocab - (1.0 - label_smoothing) * onehot.to(probs.dtype)
    else:
        loss = nll
        grad = probs - onehot.to(probs.dtype)
    loss = torch.where(valid, loss, torch.zeros_like(loss)).sum()
    grad = torch.where(valid.unsqueeze(1), grad, torch.zeros_like(grad))
    pred = torch.argmax(logits32, dim=-1)
    logits.copy_(grad)
    return loss, pred


_COMPILED: dict[str, Any] = {}
_KERNELS = ("auto", "triton", "inductor", "eager")


def chunk_kernel(device_type: str) -> str:
    """Which implementation computes a chunk's loss and gradient: ``triton``, ``inductor`` or ``eager``.

    ``kernel_config().lce_kernel`` picks one (env ``TWINKLE_LCE_KERNEL``; default ``auto``: the
    Triton kernel of :mod:`twinkle.patch.triton_ce` on CUDA when triton imports, else the chunk
    function compiled by inductor on CUDA, eager on other devices; ``lce_compile=False`` makes
    ``auto`` and ``inductor`` eager). ``triton`` on CPU needs ``TRITON_INTERPRET=1``.
    """
    config = kernel_config()
    choice = str(config.lce_kernel).strip().lower() or "auto"
    if choice not in _KERNELS:
        raise ValueError(
            f"TWINKLE_LCE_KERNEL={choice!r}: choose one of {', '.join(_KERNELS)} (kernel_config().lce_kernel)"
        )
    if not config.lce_compile and choice in ("auto", "inductor"):
        return "eager"
    if choice == "auto":
        if device_type != "cuda":
            return "eager"
        return "triton" if triton_ce.available() else "inductor"
    if choice == "inductor" and device_type != "cuda":
        return "eager"
    if choice == "triton" and not triton_ce.available():
        raise ValueError("TWINKLE_LCE_KERNEL=triton, but triton does not import: pip install triton, or unset it")
    return choice


def _chunk_fn(kernel: str) -> Any:
    """The PyTorch chunk function for ``kernel`` (see :func:`chunk_kernel`): compiled for ``inductor``, else eager."""
    if kernel != "inductor":
        return _ce_chunk
    fn = _COMPILED.get("ce")
    if fn is None:
        import torch

        fn = torch.compile(_ce_chunk, dynamic=False)
        _COMPILED["ce"] = fn
    return fn


_FP32_OUT_ADDMM: dict[str, bool] = {}


def _accumulate_weight_grad(grad_w: Any, a: Any, b: Any) -> None:
    """``grad_w += a @ b`` with ``grad_w`` float32 and ``a``/``b`` half precision.

    On CUDA, cuBLAS accumulates straight into the float32 buffer (``addmm`` with
    ``out_dtype=float32``, no half-precision product and no extra pass); elsewhere, or where
    torch lacks that overload, the half product is added to the buffer.
    """
    import torch

    if a.is_cuda and a.dtype != torch.float32 and _FP32_OUT_ADDMM.get("ok", True):
        try:
            torch.addmm(grad_w, a, b, out_dtype=torch.float32, out=grad_w)
            _FP32_OUT_ADDMM["ok"] = True
            return
        except (TypeError, RuntimeError):  # RuntimeError covers NotImplemented kernels too
            _FP32_OUT_ADDMM["ok"] = False
    grad_w.add_(a @ b)


def _linear(hidden: Any, weight: Any, bias: Any, lora: Any = None) -> Any:
    """``hidden @ weight.T (+ bias)``, plus ``scaling (hidden A^T) B^T`` when ``lora = (A, B, scaling)``."""
    import torch

    out = hidden @ weight.t()
    out = out if bias is None else torch.add(out, bias)
    return out if lora is None else _add_low_rank(out, hidden, lora)


def _add_low_rank(logits: Any, hidden: Any, lora: Any) -> Any:
    """``logits += scaling (hidden A^T) B^T`` in place, in ``logits``' dtype; returns ``logits``."""
    weight_a, weight_b, scaling = lora
    low = hidden.to(logits.dtype) @ weight_a.to(logits.dtype).t()  # [rows, r]
    return logits.addmm_(low, weight_b.to(logits.dtype).t(), alpha=scaling)


def _low_rank_grads(grad_logits: Any, hidden: Any, lora: Any, grad_a: Any, grad_b: Any) -> Any:
    """For ``d(loss)/d(logits) = G`` of one chunk: adds ``(G B)^T h`` to ``grad_a`` and ``G^T (h A^T)`` to
    ``grad_b`` (float32 buffers, or ``None``; the caller scales them by ``s`` once at the end) and
    returns this chunk's ``dh = s (G B) A``.

    ``logits = ... + s (h A^T) B^T``: ``dB = s G^T (h A^T)``, ``dA = s (G B)^T h``. The products are
    ``[rows, r]``, ``[r, H]``, ``[V, r]``: no second chunk-sized buffer.
    """
    weight_a, weight_b, scaling = lora
    dtype = grad_logits.dtype
    h = hidden.to(dtype)
    a, b = weight_a.to(dtype), weight_b.to(dtype)
    grad_low = grad_logits @ b  # [rows, r]
    if grad_b is not None:
        _accumulate_weight_grad(grad_b, grad_logits.t(), h @ a.t())
    if grad_a is not None:
        _accumulate_weight_grad(grad_a, grad_low.t(), h)
    return (grad_low @ a).mul_(scaling)


def _linear_into(hidden: Any, weight: Any, bias: Any, buffer: Any) -> tuple[Any, Any]:
    """``hidden @ weight.T (+ bias)`` written into ``buffer`` (allocated on first use); returns (result, buffer)."""
    import torch

    rows = hidden.shape[0]
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != hidden.dtype):
        return _linear(hidden, weight, bias), buffer  # mixed dtypes: torch's own promotion
    if buffer is None:
        buffer = torch.empty(rows, weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    out = buffer[:rows]
    if bias is None:
        torch.mm(hidden, weight.t(), out=out)
    else:
        torch.addmm(bias, hidden, weight.t(), out=out)
    return out, buffer


def head_ranges(num_tokens: int, lora_segments: Any) -> list[tuple[int, int, Any]]:
    """``(start, end, lora)`` ranges covering ``[0, num_tokens)``: each segment's ``(A, B, scaling)``, ``None`` in gaps.

    ``lora_segments``: ``(start, end, A, B, scaling)`` over the flattened tokens, in order, not
    overlapping (the LoRA heads of a packed multi-adapter pass, one per adapter segment).
    """
    ranges: list[tuple[int, int, Any]] = []
    pos = 0
    for start, end, weight_a, weight_b, scaling in lora_segments:
        start, end = max(int(start), pos), min(int(end), num_tokens)
        if end <= start:
            continue
        if start > pos:
            ranges.append((pos, start, None))
        ranges.append((start, end, (weight_a, weight_b, float(scaling))))
        pos = end
    if pos < num_tokens or not ranges:
        ranges.append((pos, num_tokens, None))
    return ranges


def _check_lora(lora: Any, lora_segments: Any, hidden: Any, weight: Any, what: str) -> None:
    if lora is not None and lora_segments is not None:
        raise ValueError(f"{what}: pass lora= or lora_segments=, not both")
    for term in [lora] if lora is not None else [seg[2:] for seg in lora_segments or ()]:
        weight_a, weight_b, _ = term
        if weight_a.shape[-1] != hidden.shape[-1] or weight_b.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{what}: LoRA A {tuple(weight_a.shape)} / B {tuple(weight_b.shape)} do not fit hidden size "
                f"{hidden.shape[-1]} and vocabulary {weight.shape[0]} (A is [r, H], B is [V, r])"
            )


class _LinearCrossEntropyFunction:
    """``torch.autograd.Function`` built lazily (torch is imported only when used)."""

    _fn: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls._fn is None:
            import torch

            class LinearCrossEntropy(torch.autograd.Function):
                @staticmethod
                def forward(ctx, hidden, weight, bias, labels, label_smoothing, chunk_rows, lora_a, lora_b, scaling):  # type: ignore[override]
                    n, _ = hidden.shape
                    want_h = ctx.needs_input_grad[0]
                    want_w = ctx.needs_input_grad[1]
                    rows = _chunk_rows(n, weight.shape[0], chunk_rows, weight_grad=want_w)
                    want_b = bias is not None and ctx.needs_input_grad[2]
                    lora = None if lora_a is None else (lora_a, lora_b, scaling)
                    want_la = lora is not None and ctx.needs_input_grad[6]
                    want_lb = lora is not None and ctx.needs_input_grad[7]
                    grad_la = torch.zeros(lora_a.shape, dtype=torch.float32, device=lora_a.device) if want_la else None
                    grad_lb = torch.zeros(lora_b.shape, dtype=torch.float32, device=lora_b.device) if want_lb else None
                    grad_h = torch.empty_like(hidden) if want_h else None
                    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
                    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
                    preds = torch.empty(n, dtype=torch.long, device=hidden.device)
                    kernel = chunk_kernel(hidden.device.type)
                    if kernel == "triton":  # per-row losses, summed once at the end
                        ce_chunk_ = triton_ce.ce_chunk_
                        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
                    else:  # a running sum from the PyTorch chunk function
                        chunk, losses = _chunk_fn(kernel), None
                        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                    buffer = None  # one [rows, V] buffer for every chunk: two are never alive at once
                    for start in range(0, n, rows):
                        h = hidden[start : start + rows]
                        y = labels[start : start + rows]
                        grad_logits, buffer = _linear_into(h, weight, bias, buffer)
                        if lora is not None:
                            grad_logits = _add_low_rank(grad_logits, h, lora)
                        # after these calls grad_logits holds d(loss)/d(logits)
                        if losses is not None:
                            ce_chunk_(
                                grad_logits,
                                y,
                                label_smoothing,
                                losses[start : start + rows],
                                preds[start : start + rows],
                            )
                        else:
                            fn = chunk if h.shape[0] == rows else _ce_chunk
                            loss, pred = fn(grad_logits, y, label_smoothing)
                            total += loss
                            preds[start : start + rows] = pred
                        if want_h and grad_h.dtype == grad_logits.dtype:  # into grad_h's rows: no temporary, no copy
                            torch.mm(grad_logits, weight.to(grad_logits.dtype), out=grad_h[start : start + rows])
                        elif want_h:
                            grad_h[start : start + rows] = grad_logits @ weight.to(grad_logits.dtype)
                        if want_w:
                            _accumulate_weight_grad(grad_w, grad_logits.t(), h.to(grad_logits.dtype))
                        if want_b:
                            grad_b += grad_logits.float().sum(0)
                        if lora is not None and (want_h or want_la or want_lb):
                            dh_low = _low_rank_grads(grad_logits, h, lora, grad_la, grad_lb)
                            if want_h:
                                grad_h[start : start + rows] += dh_low.to(grad_h.dtype)
                    if losses is not None:
                        total = losses.sum()
                    for grad in (grad_la, grad_lb):
                        if grad is not None:
                            grad.mul_(scaling)
                    ctx.save_for_backward(grad_h, grad_w, grad_b, grad_la, grad_lb)
                    ctx.param_dtypes = (
                        weight.dtype,
                        None if bias is None else bias.dtype,
                        None if lora is None else lora_a.dtype,
                        None if lora is None else lora_b.dtype,
                    )
                    ctx.mark_non_differentiable(preds)
                    return total, preds

                @staticmethod
                def backward(ctx, grad_out, _grad_preds):  # type: ignore[override]
                    if getattr(ctx, "consumed", False):
                        raise RuntimeError(
                            "linear_cross_entropy: a second backward through the same loss (retain_graph=True) "
                            "is not supported: its saved gradients are scaled in place by the first; compute the "
                            "loss again, or switch the fused head off (disabled_patches=['FusedLinearCrossEntropy'])"
                        )
                    ctx.consumed = True
                    grad_h, grad_w, grad_b, grad_la, grad_lb = ctx.saved_tensors
                    w_dtype, b_dtype, la_dtype, lb_dtype = ctx.param_dtypes
                    scale = grad_out.float()
                    # in place: no second [tokens, H] / [V, H] buffer at the start of the backward
                    dh = grad_h.mul_(scale.to(grad_h.dtype)) if grad_h is not None else None
                    dw = grad_w.mul_(scale).to(w_dtype) if grad_w is not None else None
                    db = grad_b.mul_(scale).to(b_dtype) if grad_b is not None else None
                    dla = grad_la.mul_(scale).to(la_dtype) if grad_la is not None else None
                    dlb = grad_lb.mul_(scale).to(lb_dtype) if grad_lb is not None else None
                    return dh, dw, db, None, None, None, dla, dlb, None

            cls._fn = LinearCrossEntropy
        return cls._fn


def linear_cross_entropy(
    hidden: Any,
    weight: Any,
    labels: Any,
    *,
    bias: Any = None,
    label_smoothing: float = 0.0,
    chunk_rows: int | None = None,
    return_predictions: bool = False,
    num_labels: int | None = None,
    lora: Any = None,
    lora_segments: Any = None,
) -> Any:
    """Sum over tokens of ``cross_entropy(hidden @ weight.T + bias, labels)`` without full logits.

    Args:
        hidden: ``[..., H]`` hidden states (any leading shape; flattened).
        weight: ``[V, H]`` LM-head weight (the embedding when tied).
        labels: ``[...]`` target ids, ``-100`` = ignored; same leading shape as ``hidden``.
        bias: optional ``[V]`` LM-head bias.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
        chunk_rows: tokens per chunk (default: as many as fit in ``kernel_config().lce_chunk_bytes``
            of float32 logits, 512 MiB; ``lce_weight_grad_chunk_bytes``, 2 GiB, when ``weight``
            needs a gradient; :mod:`twinkle.patch.kernel_config`).
        return_predictions: also return the argmax id of every token (``-1`` where the
            label is ignored), computed in the same pass, for accuracy metrics.
        num_labels: the number of labels that are not ``-100``, when the caller knows it
            (counting them here waits for the GPU to finish the work queued before).
        lora: ``(A, B, scaling)``: LoRA on the head, ``logits += scaling (h A^T) B^T`` for every token
            (``A`` ``[r, H]``, ``B`` ``[V, r]``; both get gradients).
        lora_segments: ``(start, end, A, B, scaling)`` over the flattened tokens instead: each
            range its own adapter's head (:func:`head_ranges`; tokens outside any get none).

    Returns:
        A float32 scalar tensor: the summed loss, differentiable w.r.t. ``hidden``, ``weight``,
        ``bias`` and the LoRA ``A`` / ``B``; with ``return_predictions``, ``(loss, predictions)``.

    Raises:
        ValueError: shapes that do not fit together.

    Example::

        loss = linear_cross_entropy(h, model.lm_head.weight, shift_labels)
        (loss / (shift_labels != -100).sum()).backward()
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on the "
            "token dimensions; pass labels shaped like hidden without its last dimension"
        )
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: hidden size {hidden.shape[-1]} != weight's {weight.shape[-1]} (weight is [V, H])"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    _check_lora(lora, lora_segments, hidden, weight, "linear_cross_entropy")
    import torch

    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if lora_segments is not None:
        ranges = head_ranges(h.shape[0], lora_segments)
        if len(ranges) > 1:  # one call per adapter's range: a token meets only its own A and B
            parts = [
                linear_cross_entropy(
                    h[s:e],
                    weight,
                    y[s:e],
                    bias=bias,
                    label_smoothing=label_smoothing,
                    chunk_rows=chunk_rows,
                    return_predictions=True,
                    lora=term,
                )
                for s, e, term in ranges
            ]
            loss = torch.stack([part[0] for part in parts]).sum()
            if not return_predictions:
                return loss
            return loss, torch.cat([part[1] for part in parts]).reshape(labels.shape)
        lora = ranges[0][2]
    keep = y != IGNORE_INDEX
    num_kept = int(keep.sum()) if num_labels is None else int(num_labels)
    filtered = num_kept < y.shape[0] * 7 // 8  # many ignored tokens (prompts, padding): skip their logits
    if filtered:
        h, y = h[keep], y[keep]
    weight_a, weight_b, scaling = lora if lora is not None else (None, None, 0.0)
    loss, preds = _LinearCrossEntropyFunction.get().apply(
        h, weight, bias, y, float(label_smoothing), chunk_rows, weight_a, weight_b, float(scaling)
    )
    if not return_predictions:
        return loss
    if filtered:
        full = torch.full(labels.reshape(-1).shape, -1, dtype=torch.long, device=preds.device)
        full[keep] = preds
        preds = full
    else:
        preds = preds.masked_fill(~keep, -1)
    return loss, preds.reshape(labels.shape)


class _LinearLogpsFunction:
    _fn: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls._fn is None:
            import torch

            class LinearTokenLogps(torch.autograd.Function):
                @staticmethod
                def forward(ctx, hidden, weight, bias, labels, chunk_rows, lora_a, lora_b, scaling):  # type: ignore[override]
                    n = hidden.shape[0]
                    lora = None if lora_a is None else (lora_a, lora_b, scaling)
                    rows = _chunk_rows(n, weight.shape[0], chunk_rows)
                    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
                    lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
                    valid = labels != IGNORE_INDEX
                    safe = torch.where(valid, labels, torch.zeros_like(labels))
                    for start in range(0, n, rows):
                        logits32 = _linear(hidden[start : start + rows], weight, bias, lora).float()
                        lse = torch.logsumexp(logits32, dim=-1)
                        target = torch.gather(logits32, 1, safe[start : start + rows].unsqueeze(1)).squeeze(1)
                        out[start : start + rows] = target - lse
                        lse_all[start : start + rows] = lse
                    out = out * valid
                    ctx.save_for_backward(hidden, weight, bias, safe, valid, lse_all, lora_a, lora_b)
                    ctx.rows = rows
                    ctx.scaling = scaling
                    return out

                @staticmethod
                def backward(ctx, grad_out):  # type: ignore[override]
                    hidden, weight, bias, safe, valid, lse_all, lora_a, lora_b = ctx.saved_tensors
                    rows = ctx.rows
                    n = hidden.shape[0]
                    want_h, want_w, want_b = ctx.needs_input_grad[:3]
                    lora = None if lora_a is None else (lora_a, lora_b, ctx.scaling)
                    want_la = lora is not None and ctx.needs_input_grad[5]
                    want_lb = lora is not None and ctx.needs_input_grad[6]
                    dla = torch.zeros(lora_a.shape, dtype=torch.float32, device=lora_a.device) if want_la else None
                    dlb = torch.zeros(lora_b.shape, dtype=torch.float32, device=lora_b.device) if want_lb else None
                    dh = torch.empty_like(hidden) if want_h else None
                    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
                    db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
                    g_all = grad_out.float() * valid
                    vocab = weight.shape[0]
                    for start in range(0, n, rows):
                        sl = slice(start, start + rows)
                        h = hidden[sl]
                        logits32 = _linear(h, weight, bias, lora).float()
                        probs = torch.exp(logits32 - lse_all[sl].unsqueeze(1))
                        onehot = torch.arange(vocab, device=h.device).unsqueeze(0) == safe[sl].unsqueeze(1)
                        # d logp_target / d logits = onehot - probs
                        grad_logits = ((onehot.to(probs.dtype) - probs) * g_all[sl].unsqueeze(1)).to(h.dtype)
                        if want_h:
                            dh[sl] = grad_logits @ weight
                        if want_w:
                            dw += (grad_logits.t() @ h).float()
                        if want_b:
                            db += grad_logits.float().sum(0)
                        if lora is not None and (want_h or want_la or want_lb):
                            dh_low = _low_rank_grads(grad_logits, h, lora, dla, dlb)
                            if want_h:
                                dh[sl] += dh_low.to(dh.dtype)
                    for grad in (dla, dlb):
                        if grad is not None:
                            grad.mul_(ctx.scaling)
                    return (
                        dh,
                        None if dw is None else dw.to(weight.dtype),
                        None if db is None else db.to(bias.dtype),
                        None,
                        None,
                        None if dla is None else dla.to(lora_a.dtype),
                        None if dlb is None else dlb.to(lora_b.dtype),
                        None,
                    )

            cls._fn = LinearTokenLogps
        return cls._fn


def linear_token_logps(
    hidden: Any,
    weight: Any,
    labels: Any,
    *,
    bias: Any = None,
    chunk_rows: int | None = None,
    lora: Any = None,
    lora_segments: Any = None,
) -> Any:
    """Per-token ``log_softmax(hidden @ weight.T + bias)[labels]`` without full logits (0 where ignored).

    Args:
        hidden: ``[..., H]`` hidden states.
        weight: ``[V, H]`` LM-head weight.
        labels: ``[...]`` target ids (``-100`` = ignored).
        bias: optional ``[V]`` bias.
        chunk_rows: tokens per chunk (default: from ``kernel_config().lce_chunk_bytes``).
        lora, lora_segments: LoRA on the head, as in :func:`linear_cross_entropy`.

    Returns:
        float32 ``[...]`` log-probabilities, differentiable (backward recomputes each chunk's logits).

    Example::

        logps = linear_token_logps(h, lm_head.weight, shift_labels)  # [B, T]
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"linear_token_logps: hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on the "
            "token dimensions"
        )
    _check_lora(lora, lora_segments, hidden, weight, "linear_token_logps")
    import torch

    shape = labels.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    ranges = [(0, h.shape[0], lora)] if lora_segments is None else head_ranges(h.shape[0], lora_segments)
    parts = []
    for start, end, term in ranges:  # one call per adapter's range: a token meets only its own A and B
        weight_a, weight_b, scaling = term if term is not None else (None, None, 0.0)
        parts.append(
            _LinearLogpsFunction.get().apply(
                h[start:end], weight, bias, y[start:end], chunk_rows, weight_a, weight_b, float(scaling)
            )
        )
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.reshape(shape)


class FusedLinearCrossEntropy(Patch):
    """Compute the LM head and the cross-entropy together, in chunks (:func:`linear_cross_entropy`).

    Applying it marks the model so that TransformersModel asks the decoder for the last
    hidden states instead of logits, and the loss (through the output's
    :meth:`~twinkle.patch.fastpath.HiddenStatesOutput.label_cross_entropy_sum`) never
    materializes ``[tokens, vocab]`` float32 logits.
    Exact: same matmul dtype, float32 softmax, per-token rows computed whole.

    Example::

        TransformersModel(..., disabled_patches=["FusedLinearCrossEntropy"])  # plain logits
    """

    name = "FusedLinearCrossEntropy"
    enabled_by_default = True

    def applies_to(self, model: Any) -> bool:
        """Causal LMs with a linear ``lm_head`` (what :func:`lm_head_of` finds)."""
        return lm_head_of(model) is not None

    def apply(self, model: Any) -> None:
        """Mark ``model`` so the forward returns hidden states for the fused loss."""
        set_flag(model, "fused_linear_ce", True)

    def revert(self, model: Any) -> None:
        """Back to plain logits."""
        set_flag(model, "fused_linear_ce", False)
