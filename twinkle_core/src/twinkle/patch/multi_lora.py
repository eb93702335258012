"""Batched multi-adapter LoRA: one forward/backward holds token segments of several adapters.

A service trains many tenants' LoRA adapters on one frozen base model. Run one adapter at a
time and every tenant's step pays the base GEMMs of its own small batch; run them together and
the base GEMMs run once for all tokens. This module does the latter on a peft model that
already holds the adapters (``TransformersModel.add_adapter_to_model`` for each tenant):

* the tokens of one pass are one packed row (``PaddingFreeProcessor``: no padding, varlen
  attention keeps each sequence to itself) in which each adapter owns contiguous
  **segments** ``(adapter, start, end)``;
* inside :func:`adapter_segments`, every peft ``lora.Linear`` runs its frozen base layer only
  (peft's ``disable_adapters`` path: one GEMM over all tokens) and a forward hook adds, to each
  segment, that segment's adapter's ``scaling * (x A^T) B^T`` (**segmented LoRA**). Adapters
  of different ranks and different target modules share a pass: a layer that an adapter does
  not target leaves its segments' rows unchanged.

Two implementations of the segmented update, same arithmetic (per token: ``x A_a^T`` then
``(. * s_a) B_a^T``, float32 accumulation):

* ``torch``: one pair of matmuls per segment; works everywhere, and for a few long segments
  these are the best GEMMs there are;
* ``triton``: Punica's SGMV / S-LoRA shape of kernel (:func:`segment_matmul`): the adapters'
  ``A`` (and ``s B``) stacked, rank-padded with zeros, into ``[n, r_max, in]``
  (``[n, out, r_max]``), and one launch per product over a table of token tiles, each tile
  inside one segment and so multiplying by one adapter's weight. Backward: the input gradient
  is the same kernel on the transposed stack; the weight gradients are one GEMM per segment.
  It runs on CUDA and, for tests, on CPU under ``TRITON_INTERPRET=1``.

Token log-probabilities and losses come from the hidden states in chunks
(:func:`twinkle.patch.fused_linear_ce.linear_token_logps` / ``linear_cross_entropy`` through
the model's loss components), never from full-vocabulary logits;
:mod:`twinkle.model.multi_adapter` runs such passes on a ``TransformersModel``.

Example::

    with adapter_segments(peft_model, [("alice", 0, 700), ("bob", 700, 1000)]):
        hidden = decoder(input_ids=ids, position_ids=pos, ...).last_hidden_state
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Any, Iterator, Sequence

from twinkle.patch.kernel_config import kernel_config
from twinkle.patch.lora_common import lora_linear_layers

#: The marker attribute of a LoRA layer that carries the segment hook.
_HOOK_ATTR = "_twinkle_multi_lora_hook"
#: Tokens per tile and output columns per program of the segment kernel.
BLOCK_T = 64
BLOCK_O = 64
BLOCK_K = 64
KERNELS = ("auto", "torch", "triton")

_PLAN: contextvars.ContextVar[Any] = contextvars.ContextVar("twinkle_multi_lora_plan", default=None)


class SegmentPlan:
    """The segments of one pass, and per set of adapters the tile table of the Triton kernel.

    Args:
        segments: ``(adapter_name, start, end)`` over the flattened tokens of the pass, in
            order and not overlapping; tokens outside every segment get no LoRA update.
        num_tokens: the tokens of the pass.
        kernel: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton on CUDA when it imports,
            else torch); ``kernel_config().multi_lora_kernel`` (env ``TWINKLE_MULTI_LORA_KERNEL``)
            sets the default.

    Raises:
        ValueError: segments out of order, overlapping, empty or past ``num_tokens``; an unknown kernel.
    """

    def __init__(self, segments: Sequence[tuple[str, int, int]], num_tokens: int, kernel: str | None = None) -> None:
        pos = 0
        checked = []
        for name, start, end in segments:
            start, end = int(start), int(end)
            if start < pos or end <= start or end > num_tokens:
                raise ValueError(
                    f"adapter segments must be in order, non-empty, non-overlapping and within {num_tokens} tokens; "
                    f"got ({name!r}, {start}, {end}) after token {pos}"
                )
            checked.append((str(name), start, end))
            pos = end
        self.segments = checked
        self.num_tokens = int(num_tokens)
        kernel = (kernel or kernel_config().multi_lora_kernel).strip().lower()
        if kernel not in KERNELS:
            raise ValueError(f"multi-adapter LoRA kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
        self.kernel = kernel
        self._tiles: dict[tuple[Any, ...], Any] = {}

    @property
    def adapters(self) -> list[str]:
        """The adapters of the pass, in order of first appearance."""
        return list(dict.fromkeys(name for name, _, _ in self.segments))

    def kernel_for(self, x: Any) -> str:
        """The implementation for input ``x``: the plan's choice, ``auto`` resolved by device."""
        if self.kernel != "auto":
            return self.kernel
        return "triton" if x.is_cuda and triton_available() else "torch"

    def tiles(self, present: tuple[str, ...], device: Any) -> tuple[Any, bool]:
        """``(int32 [3, tiles] table of (adapter index, start, end), covers every token)`` for these adapters."""
        key = (present, str(device))
        cached = self._tiles.get(key)
        if cached is None:
            import torch

            index = {name: i for i, name in enumerate(present)}
            rows: list[tuple[int, int, int]] = []
            covered = 0
            for name, start, end in self.segments:
                if name not in index:
                    continue
                covered += end - start
                for t0 in range(start, end, BLOCK_T):
                    rows.append((index[name], t0, min(t0 + BLOCK_T, end)))
            table = torch.tensor(rows, dtype=torch.int32).t().contiguous().to(device)
            cached = (table, covered == self.num_tokens)
            self._tiles[key] = cached
        return cached


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether triton imports (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a triton that does not match the installed torch
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _launch_segment_matmul(x: Any, weights: Any, table: Any, out: Any) -> None:
    """``out[t] = x[t] @ weights[a(t)]^T`` for the tokens of ``table``'s tiles (see :func:`segment_matmul`)."""
    import torch

    from twinkle.patch._multi_lora_kernels import segment_matmul

    n_out, k = weights.shape[1], weights.shape[2]
    block_o = max(16, min(BLOCK_O, _next_pow2(n_out)))
    block_k = max(16, min(BLOCK_K, _next_pow2(k)))
    grid = (table.shape[1], -(-n_out // block_o))
    if grid[0] == 0:
        return
    segment_matmul[grid](
        x,
        x.stride(0),
        x.stride(1),
        weights,
        weights.stride(0),
        weights.stride(1),
        weights.stride(2),
        out,
        out.stride(0),
        out.stride(1),
        table[0],
        table[1],
        table[2],
        n_out,
        k,
        BT=BLOCK_T,
        BO=block_o,
        BK=block_k,
        UPCAST=_interpreting(),
        IEEE=x.dtype == torch.float32,
    )


class _SegmentMatmulFunction:
    """``torch.autograd.Function`` built lazily (torch is imported only when used)."""

    _fn: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls._fn is None:
            import torch

            class SegmentMatmul(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x, weights, table, covers, segments):  # type: ignore[override]
                    alloc = torch.empty if covers else torch.zeros
                    out = alloc(x.shape[0], weights.shape[1], dtype=x.dtype, device=x.device)
                    _launch_segment_matmul(x, weights, table, out)
                    ctx.save_for_backward(x, weights, table)
                    ctx.covers = covers
                    ctx.segments = segments
                    return out

                @staticmethod
                def backward(ctx, grad):  # type: ignore[override]
                    x, weights, table = ctx.saved_tensors
                    grad = grad.contiguous()
                    dx = dw = None
                    if ctx.needs_input_grad[0]:
                        alloc = torch.empty if ctx.covers else torch.zeros
                        dx = alloc(x.shape, dtype=x.dtype, device=x.device)
                        _launch_segment_matmul(grad, weights.transpose(1, 2), table, dx)
                    if ctx.needs_input_grad[1]:
                        dw = torch.zeros(weights.shape, dtype=torch.float32, device=weights.device)
                        for index, start, end in ctx.segments:
                            dw[index] += (grad[start:end].t() @ x[start:end]).float()
                        dw = dw.to(weights.dtype)
                    return dx, dw, None, None, None

            cls._fn = SegmentMatmul
        return cls._fn


def segment_matmul(
    x: Any, weights: Any, segments: Sequence[tuple[int, int, int]], *, kernel: str = "torch", table: Any = None
) -> Any:
    """``y[t] = x[t] @ weights[a]^T`` for every token ``t`` of a segment ``(a, start, end)``; 0 elsewhere.

    Args:
        x: ``[T, K]``.
        weights: ``[n, N, K]`` (one ``[N, K]`` weight per adapter index).
        segments: ``(adapter index, start, end)``, in order, not overlapping.
        kernel: ``"torch"`` (a matmul per segment) or ``"triton"`` (one SGMV launch; CUDA, or
            CPU under ``TRITON_INTERPRET=1``).
        table: the tile table for ``"triton"`` (default: built from ``segments``).

    Returns:
        ``[T, N]``, differentiable in ``x`` and ``weights``.

    Example::

        y = segment_matmul(x, torch.stack([w0, w1]), [(0, 0, 5), (1, 5, 12)])
    """
    import torch

    covered = sum(end - start for _, start, end in segments)
    if kernel == "triton":
        if table is None:
            rows = [(a, t0, min(t0 + BLOCK_T, end)) for a, start, end in segments for t0 in range(start, end, BLOCK_T)]
            table = torch.tensor(rows, dtype=torch.int32).reshape(-1, 3).t().contiguous().to(x.device)
        segs = tuple((int(a), int(s), int(e)) for a, s, e in segments)
        return _SegmentMatmulFunction.get().apply(x, weights, table, covered == x.shape[0], segs)
    pieces = []
    pos = 0
    for a, start, end in segments:
        if start > pos:
            pieces.append(x.new_zeros(start - pos, weights.shape[1]))
        pieces.append(x[start:end] @ weights[a].t())
        pos = end
    if pos < x.shape[0]:
        pieces.append(x.new_zeros(x.shape[0] - pos, weights.shape[1]))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# ---------------------------------------------------------------------- the LoRA layers
def _adapter_weights(layer: Any, name: str) -> tuple[Any, Any, float]:
    """``(A, B, scaling)`` of a vanilla LoRA adapter of ``layer``; raises for what this pass cannot run."""
    import torch

    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(name, False):
        raise ValueError(
            f"multi-adapter LoRA: adapter {name!r} uses a LoRA variant (DoRA, ...) or a LoRA bias; "
            "the batched pass runs vanilla LoRA only"
        )
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        raise ValueError(
            f"multi-adapter LoRA: adapter {name!r} has lora_dropout > 0; the batched pass runs adapters without dropout"
        )
    return layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])


def lora_delta(layer: Any, x: Any, plan: SegmentPlan) -> Any:
    """The segmented low-rank update of ``layer`` for ``x`` (``[..., in]``); ``None`` if no pass adapter targets it.

    Per token of a segment of adapter ``a``: ``((x A_a^T) * s_a) B_a^T``; zero for other tokens.
    """
    import torch

    present = tuple(name for name in plan.adapters if name in layer.lora_A)
    if not present:
        return None
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] != plan.num_tokens:
        raise ValueError(
            f"multi-adapter LoRA: a layer got {flat.shape[0]} tokens in a pass planned for {plan.num_tokens}; "
            "pack the pass as one row (PaddingFreeProcessor)"
        )
    weights = [_adapter_weights(layer, name) for name in present]
    dtype = weights[0][0].dtype
    if flat.dtype != dtype:  # peft's float32 adapters on a half model: compute in the adapters' dtype
        flat = flat.to(dtype)
    index = {name: i for i, name in enumerate(present)}
    segments = [(index[name], start, end) for name, start, end in plan.segments if name in index]
    kernel = plan.kernel_for(flat)
    if kernel == "torch":
        pieces = []
        pos = 0
        for a, start, end in segments:
            if start > pos:
                pieces.append(flat.new_zeros(start - pos, layer.out_features))
            weight_a, weight_b, scaling = weights[a]
            low = torch.nn.functional.linear(flat[start:end], weight_a) * scaling
            pieces.append(torch.nn.functional.linear(low, weight_b))
            pos = end
        if pos < flat.shape[0]:
            pieces.append(flat.new_zeros(flat.shape[0] - pos, layer.out_features))
        delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    else:
        rank = max(w[0].shape[0] for w in weights)
        stack_a = torch.stack([torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0])) for a, _, _ in weights])
        stack_b = torch.stack([torch.nn.functional.pad(b * s, (0, rank - b.shape[1])) for _, b, s in weights])
        table, _ = plan.tiles(present, flat.device)
        low = segment_matmul(flat, stack_a, segments, kernel="triton", table=table)
        delta = segment_matmul(low, stack_b, segments, kernel="triton", table=table)
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


def _segment_hook(module: Any, args: tuple[Any, ...], output: Any) -> Any:
    plan = _PLAN.get()
    if plan is None or not args:
        return None
    delta = lora_delta(module, args[0], plan)
    if delta is None:
        return None
    return output + delta.to(output.dtype)


def install(model: Any) -> int:
    """Give every peft LoRA ``Linear`` of ``model`` the segment hook (idempotent); returns the layers hooked now.

    The hook does nothing outside :func:`adapter_segments`, so single-adapter training keeps its path.
    """
    added = 0
    for layer in lora_linear_layers(model):
        if getattr(layer, _HOOK_ATTR, None) is None:
            setattr(layer, _HOOK_ATTR, layer.register_forward_hook(_segment_hook))
            added += 1
    return added


def uninstall(model: Any) -> None:
    """Remove the segment hooks again."""
    for layer in lora_linear_layers(model):
        handle = layer.__dict__.pop(_HOOK_ATTR, None)
        if handle is not None:
            handle.remove()


@contextlib.contextmanager
def adapter_segments(
    model: Any,
    segments: Sequence[tuple[str, int, int]] | SegmentPlan,
    num_tokens: int | None = None,
    *,
    kernel: str | None = None,
) -> Iterator[SegmentPlan]:
    """A context in which ``model``'s forward runs each segment's tokens through that segment's adapter.

    Args:
        model: a peft model (or one containing peft LoRA layers) holding every named adapter.
        segments: ``(adapter_name, start, end)`` over the flattened tokens of the pass (one
            packed row), or a :class:`SegmentPlan`.
        num_tokens: the tokens of the pass (default: the end of the last segment).
        kernel: see :class:`SegmentPlan`.

    Inside, LoRA layers run their base layer once for all tokens (peft's adapters-disabled
    path; the adapters' ``requires_grad`` is left as it is) and the segment hook adds each
    segment's own low-rank update. Gradients reach each adapter's weights from its own tokens only.

    Raises:
        ValueError: bad segments; an adapter that the model does not hold.
    """
    plan = segments if isinstance(segments, SegmentPlan) else None
    if plan is None:
        segments = list(segments)
        total = num_tokens if num_tokens is not None else (segments[-1][2] if segments else 0)
        plan = SegmentPlan(segments, total, kernel)
    layers = lora_linear_layers(model)
    known = {name for layer in layers for name in layer.lora_A}
    missing = [name for name in plan.adapters if name not in known]
    if missing:
        raise ValueError(f"multi-adapter LoRA: the model holds no adapter named {', '.join(map(repr, missing))}")
    install(model)
    # peft's adapters-disabled path runs the base layer only; set directly (peft's enable_adapters(False)
    # would also switch off every adapter's requires_grad)
    before = [layer._disable_adapters for layer in layers]
    # compiled decoder layers (CompileDecoderLayers) run eagerly here: the segments are host data that a
    # compiled layer would guard on and recompile for, pass after pass
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None)]
    token = _PLAN.set(plan)
    try:
        for layer in layers:
            layer._disable_adapters = True
        for module, _ in compiled:
            module._compiled_call_impl = None
        yield plan
    finally:
        _PLAN.reset(token)
        for layer, flag in zip(layers, before):
            layer._disable_adapters = flag
        for module, impl in compiled:
            module._compiled_call_impl = impl


def active_plan() -> SegmentPlan | None:
    """The plan of the pass running now (inside :func:`adapter_segments`), else ``None``."""
    return _PLAN.get()
