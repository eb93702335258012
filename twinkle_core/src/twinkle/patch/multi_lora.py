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
  segment, that segment's adapter's ``((x A^T) s) B^T`` (**segmented LoRA**).

**Compiled layers, no recompiles.** The segmented update is two calls of one custom op,
``twinkle::segment_matmul`` (with ``register_fake`` and ``register_autograd``; its backward
calls it again and ``twinkle::segment_weight_grad``). Everything that describes a pass reaches
it as tensors, set on each LoRA layer at :func:`adapter_segments` entry:

* the adapters' ``A`` stacked into ``[n_cap, r_cap, in]``, their ``B`` into ``[n_cap, out, r_cap]``,
  and their scalings into a float32 ``[n_cap]`` (slot ``i`` is the pass's ``i``-th adapter);
* the layout: int32 tables of segments ``(slot, start, end)``, of ``BLOCK_T``-token tiles
  covering every token, of ``CHUNK_T``-token chunks of the segments (weight gradients) sorted
  by slot, and each slot's range of chunks.

Their shapes depend only on the pass's token count ``T`` and two buckets, ``n_cap`` (adapters,
next power of two, at least 8) and ``r_cap`` (largest rank, next power of two, at least 8); the
table sizes are ``ceil(T / BLOCK_T) + 2 s_cap + 1`` and ``ceil(T / CHUNK_T) + s_cap`` with
``s_cap`` the segment bucket (next power of two, at least 8). So a compiled decoder layer
(``CompileDecoderLayers``) traces the pass once and replays it for any layout of the same
bucket: other segment boundaries, other tenants, other ranks within ``r_cap`` (test:
``torch._dynamo`` counts no recompile over three layouts). A pass of another total length
changes ``T``: ``torch.compile``'s automatic dynamic shapes then recompile the layer once with
``T`` symbolic, after which no length recompiles (the same as the single-adapter path's
padding-free batches). The first multi-adapter pass after single-adapter ones compiles the
layer once more (the adapters-disabled branch and the hook's state are guarded), and the two
graphs are then both cached.

**Ranks and target sets.** Adapters of different ranks share a pass: each is padded with zero
rows of ``A`` and zero columns of ``B`` to ``r_cap`` (exact: the padded rank columns of the low-rank
activations meet zero columns of ``B``, and their gradients are dropped by the pad's backward).
An adapter that does not target a layer gets slot ``-1`` in that layer's tables: its tokens get
no update there (exactly zero, ``x`` is not read).

**Tenant isolation.** Each token is multiplied by its own adapter's weights only, and each
adapter's weight gradient sums over its own tokens only (no dense masked product that would
multiply another tenant's NaN by 0), so a NaN or inf in one tenant's rows or weights never
reaches another tenant's outputs or gradients (test).

Two implementations of the op, same arithmetic (float32 accumulation):

* ``torch`` (CPU; ``kernel="torch"``): a matmul per segment, looping over the segment table
  on the host (on CUDA that reads the table back: a sync per call, a fallback only); outside
  ``torch.compile`` the LoRA layers call it through a plain ``autograd.Function`` (the same
  functions, no custom-op dispatch per call);
* ``triton``: one launch per product over the tile table (Punica's SGMV shape: each tile of
  ``BLOCK_T`` tokens lies in one segment and multiplies by one adapter's weight), and for the
  weight gradients float32 partials per chunk (:func:`~twinkle.patch._multi_lora_kernels.segment_outer`)
  summed per slot in chunk order (deterministic, no atomics). It runs on CUDA and, for tests,
  on CPU under ``TRITON_INTERPRET=1``. Its launches and their autotuning live in
  :mod:`twinkle.patch.triton_multi_lora`, the kernels in :mod:`twinkle.patch._multi_lora_kernels`.

Token log-probabilities and losses come from the hidden states in chunks
(:func:`twinkle.patch.fused_linear_ce.linear_token_logps` / ``linear_cross_entropy`` through
the model's loss components), never from full-vocabulary logits, LoRA on the LM head included
(:func:`lora_head_terms`: each segment's own adapter's low-rank term, added chunk by chunk);
:mod:`twinkle.model.multi_adapter` runs such passes on a ``TransformersModel``.

Example::

    with adapter_segments(peft_model, [("alice", 0, 700), ("bob", 700, 1000)]):
        hidden = decoder(input_ids=ids, position_ids=pos, ...).last_hidden_state
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Iterator, Sequence

from twinkle.patch.kernel_config import kernel_config
from twinkle.patch.lora_common import lora_linear_layers
from twinkle.patch.triton_multi_lora import BLOCK_T, CHUNK_T, launch_matmul, launch_weight_grad, triton_available

#: The marker attribute of a LoRA layer that carries the segment hook.
_HOOK_ATTR = "_twinkle_multi_lora_hook"
#: The per-pass state of a LoRA layer: ``None``, or the tensors of :func:`_segmented_delta`.
_STATE_ATTR = "_twinkle_multi_lora_state"
#: The token count of the pass a layer's state was built for (checked eagerly, not read when compiled).
_TOKENS_ATTR = "_twinkle_multi_lora_tokens"
#: The smallest buckets of adapters, ranks and segments (see the module docstring).
MIN_SLOTS = 8
MIN_RANK = 8
MIN_SEGMENTS = 8
KERNELS = ("auto", "torch", "triton")

_PLAN: contextvars.ContextVar[Any] = contextvars.ContextVar("twinkle_multi_lora_plan", default=None)


def _bucket(n: int, least: int) -> int:
    """The next power of two ``>= max(n, least)``."""
    return _next_pow2(max(int(n), least))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _layout_rows(
    segments: Sequence[tuple[int, int, int]], num_tokens: int, slots: int
) -> tuple[list[list[int]], list[list[int]], list[list[int]], list[list[int]]]:
    """The four tables of a layout as Python rows: segments, tiles, chunks, per-slot chunk ranges.

    ``segments``: ``(slot, start, end)`` in order (slot ``-1``: no update). Sizes are padded to
    the buckets of the module docstring, so they depend on ``num_tokens`` and ``len(segments)``'s
    bucket only.
    """
    s_cap = _bucket(len(segments), MIN_SEGMENTS)
    segs = [list(seg) for seg in segments] + [[-1, 0, 0]] * (s_cap - len(segments))
    tiles: list[list[int]] = []
    pos = 0
    pieces = []
    for slot, start, end in segments:
        if start > pos:
            pieces.append((-1, pos, start))
        pieces.append((slot, start, end))
        pos = end
    if pos < num_tokens:
        pieces.append((-1, pos, num_tokens))
    for slot, start, end in pieces:
        for t0 in range(start, end, BLOCK_T):
            tiles.append([slot, t0, min(t0 + BLOCK_T, end)])
    tile_cap = -(-num_tokens // BLOCK_T) + 2 * s_cap + 1
    tiles += [[-1, 0, 0]] * (tile_cap - len(tiles))
    chunks = []
    for slot, start, end in sorted((seg for seg in segments if seg[0] >= 0), key=lambda seg: seg[0]):
        for t0 in range(start, end, CHUNK_T):
            chunks.append([slot, t0, min(t0 + CHUNK_T, end)])
    ranges = [[0, 0] for _ in range(slots)]
    for i, (slot, _, _) in enumerate(chunks):
        if ranges[slot][1] == 0:
            ranges[slot][0] = i
        ranges[slot][1] = i + 1
    chunk_cap = -(-num_tokens // CHUNK_T) + s_cap
    chunks += [[0, 0, 0]] * (chunk_cap - len(chunks))
    return segs, tiles, chunks, ranges


def _to_device(tensor: Any, device: Any) -> Any:
    """A small host tensor on ``device`` (to CUDA through pinned memory: the copy does not wait for the GPU)."""
    import torch

    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _layout_tensors(
    segments: Sequence[tuple[int, int, int]], num_tokens: int, slots: int, device: Any
) -> tuple[Any, Any, Any, Any]:
    """``(segs [3, s_cap], tiles [3, tile_cap], chunks [3, chunk_cap], ranges [2, slots])``, int32 on ``device``."""
    import torch

    segs, tiles, chunks, ranges = _layout_rows(segments, num_tokens, slots)
    # one host-to-device copy of the four tables, then separate contiguous tensors
    flat = torch.tensor(
        [v for rows in (segs, tiles, chunks) for col in range(3) for v in (r[col] for r in rows)]
        + [v for col in range(2) for v in (r[col] for r in ranges)],
        dtype=torch.int32,
    )
    flat = _to_device(flat, device)
    sizes = [3 * len(segs), 3 * len(tiles), 3 * len(chunks), 2 * len(ranges)]
    parts = flat.split(sizes)
    segs, tiles, chunks, ranges = (
        parts[0].view(3, -1).clone(),
        parts[1].view(3, -1).clone(),
        parts[2].view(3, -1).clone(),
        parts[3].view(2, -1).clone(),
    )
    # the tile and chunk counts follow the token count in steps of BLOCK_T / CHUNK_T tokens: symbolic from
    # the first trace, so that a new token count recompiles once (x's length), not again at the next step
    torch._dynamo.maybe_mark_dynamic(tiles, 1)
    torch._dynamo.maybe_mark_dynamic(chunks, 1)
    return segs, tiles, chunks, ranges


class SegmentPlan:
    """The segments of one pass, and per set of adapters present in a layer its layout tensors.

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
        self._layouts: dict[tuple[Any, ...], Any] = {}

    @property
    def adapters(self) -> list[str]:
        """The adapters of the pass, in order of first appearance (their slots in the stacked weights)."""
        return list(dict.fromkeys(name for name, _, _ in self.segments))

    @property
    def slots(self) -> int:
        """``n_cap``: the adapter slots of the stacked weights (the adapters' bucket)."""
        return _bucket(len(self.adapters), MIN_SLOTS)

    def kernel_for(self, x: Any) -> str:
        """The implementation for tensor ``x`` (or a device): the plan's choice, ``auto`` resolved by device."""
        if self.kernel != "auto":
            return self.kernel
        cuda = getattr(x, "is_cuda", None)
        if cuda is None:
            cuda = getattr(x, "type", str(x)) == "cuda"
        return "triton" if cuda and triton_available() else "torch"

    def layout(self, present: tuple[bool, ...], device: Any) -> tuple[Any, Any, Any, Any]:
        """The layout tensors (see :func:`_layout_tensors`) for a layer holding the adapters flagged in ``present``."""
        key = (present, str(device))
        cached = self._layouts.get(key)
        if cached is None:
            index = {name: i for i, name in enumerate(self.adapters)}
            segments = [(index[n] if present[index[n]] else -1, s, e) for n, s, e in self.segments]
            cached = _layout_tensors(segments, self.num_tokens, self.slots, device)
            self._layouts[key] = cached
        return cached


# ---------------------------------------------------------------------- the custom ops
def _torch_matmul(x: Any, weights: Any, scale: Any, segs: Any) -> Any:
    out = x.new_zeros(x.shape[0], weights.shape[1])
    for slot, start, end in segs.t().tolist():
        if slot < 0 or end <= start:
            continue
        if end > x.shape[0]:
            raise ValueError(f"multi-adapter LoRA: a segment ends at token {end} of a {x.shape[0]}-token input")
        y = x[start:end] @ weights[slot].t()
        out[start:end] = y * scale[slot] if scale is not None else y
    return out


def _torch_weight_grad(p: Any, q: Any, scale: Any, segs: Any, slots: int) -> Any:
    import torch

    out = torch.zeros(slots, p.shape[1], q.shape[1], dtype=torch.float32, device=p.device)
    for slot, start, end in segs.t().tolist():
        if slot < 0 or end <= start:
            continue
        out[slot] += p[start:end].t().float() @ q[start:end].float()
    if scale is not None:
        out *= scale[:, None, None]
    return out


@functools.lru_cache(maxsize=1)
def _ops() -> tuple[Any, Any]:
    """Register ``twinkle::segment_matmul`` and ``twinkle::segment_weight_grad`` (once; torch only, triton on use)."""
    import torch

    def matmul(
        x: Any, weights: Any, scale: Any, segs: Any, tiles: Any, chunks: Any, ranges: Any, transpose: bool, kernel: str
    ) -> Any:
        w = weights.transpose(1, 2) if transpose else weights
        if kernel == "triton":
            out = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
            launch_matmul(x, w, scale, tiles, out)
            return out
        return _torch_matmul(x, w, scale, segs)

    matmul_op = torch.library.custom_op(
        "twinkle::segment_matmul",
        matmul,
        mutates_args=(),
        schema=(
            "(Tensor x, Tensor weights, Tensor? scale, Tensor segs, Tensor tiles, Tensor chunks, Tensor ranges, "
            "bool transpose, str kernel) -> Tensor"
        ),
    )

    @matmul_op.register_fake
    def _(x, weights, scale, segs, tiles, chunks, ranges, transpose, kernel):  # type: ignore[no-untyped-def]
        return x.new_empty(x.shape[0], weights.shape[2] if transpose else weights.shape[1])

    def weight_grad(p: Any, q: Any, scale: Any, segs: Any, chunks: Any, ranges: Any, slots: int, kernel: str) -> Any:
        if kernel == "triton":
            return launch_weight_grad(p, q, scale, chunks, ranges, slots)
        return _torch_weight_grad(p, q, scale, segs, slots)

    grad_op = torch.library.custom_op(
        "twinkle::segment_weight_grad",
        weight_grad,
        mutates_args=(),
        schema=(
            "(Tensor p, Tensor q, Tensor? scale, Tensor segs, Tensor chunks, Tensor ranges, int slots, str kernel) "
            "-> Tensor"
        ),
    )

    @grad_op.register_fake
    def _(p, q, scale, segs, chunks, ranges, slots, kernel):  # type: ignore[no-untyped-def]
        return p.new_empty(slots, p.shape[1], q.shape[1], dtype=torch.float32)

    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        x, weights, scale, segs, tiles, chunks, ranges, transpose, kernel = inputs
        ctx.save_for_backward(x, weights, scale, segs, tiles, chunks, ranges)
        ctx.transpose = transpose
        ctx.kernel = kernel

    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        x, weights, scale, segs, tiles, chunks, ranges = ctx.saved_tensors
        grad = grad.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # y = s x W^T -> dx = s grad W (and the transposed form the other way round)
            dx = matmul_op(grad, weights, scale, segs, tiles, chunks, ranges, not ctx.transpose, ctx.kernel)
        if ctx.needs_input_grad[1]:
            # dW_a = s_a sum grad^T x over the adapter's tokens ([N, K]); transposed W_a is [K, N]
            p, q = (x, grad) if ctx.transpose else (grad, x)
            dw = grad_op(p, q, scale, segs, chunks, ranges, weights.shape[0], ctx.kernel).to(weights.dtype)
        return dx, dw, None, None, None, None, None, None, None

    matmul_op.register_autograd(backward, setup_context=setup_context)
    return matmul_op, grad_op


def segment_matmul(x: Any, weights: Any, segments: Sequence[tuple[int, int, int]], *, kernel: str = "torch") -> Any:
    """``y[t] = x[t] @ weights[a]^T`` for every token ``t`` of a segment ``(a, start, end)``; 0 elsewhere.

    Args:
        x: ``[T, K]``.
        weights: ``[n, N, K]`` (one ``[N, K]`` weight per adapter index).
        segments: ``(adapter index, start, end)``, in order, not overlapping.
        kernel: ``"torch"`` (a matmul per segment) or ``"triton"`` (one SGMV launch; CUDA, or
            CPU under ``TRITON_INTERPRET=1``).

    Returns:
        ``[T, N]``, differentiable in ``x`` and ``weights`` (through ``twinkle::segment_matmul``).

    Example::

        y = segment_matmul(x, torch.stack([w0, w1]), [(0, 0, 5), (1, 5, 12)])
    """
    matmul_op, _ = _ops()
    segs, tiles, chunks, ranges = _layout_tensors(list(segments), x.shape[0], weights.shape[0], x.device)
    return matmul_op(x, weights, None, segs, tiles, chunks, ranges, False, kernel)


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


def _layer_state(layer: Any, plan: SegmentPlan, rank_cap: int, cache: dict[Any, Any]) -> tuple[Any, ...] | None:
    """The tensors of ``layer``'s segmented update in this pass (see the module docstring), or ``None``."""
    import torch

    names = plan.adapters
    present = tuple(name in layer.lora_A for name in names)
    if not any(present):
        return None
    weights = {name: _adapter_weights(layer, name) for name, here in zip(names, present) if here}
    first_a = next(iter(weights.values()))[0]
    dtype, device = first_a.dtype, first_a.device
    in_f, out_f = first_a.shape[1], layer.lora_B[next(iter(weights))].weight.shape[0]
    key = ("zeros", in_f, out_f, dtype, str(device))
    if key not in cache:
        cache[key] = (
            torch.zeros(rank_cap, in_f, dtype=dtype, device=device),
            torch.zeros(out_f, rank_cap, dtype=dtype, device=device),
        )
    zero_a, zero_b = cache[key]
    stack_a, stack_b, scalings = [], [], []
    for name in names:
        if name not in weights:
            stack_a.append(zero_a)
            stack_b.append(zero_b)
            scalings.append(0.0)
            continue
        weight_a, weight_b, scaling = weights[name]
        rank = weight_a.shape[0]
        weight_a, weight_b = weight_a.to(dtype), weight_b.to(dtype)
        if rank < rank_cap:  # zero rows of A and columns of B: exact, and their gradients are dropped
            weight_a = torch.nn.functional.pad(weight_a, (0, 0, 0, rank_cap - rank))
            weight_b = torch.nn.functional.pad(weight_b, (0, rank_cap - rank))
        stack_a.append(weight_a)
        stack_b.append(weight_b)
        scalings.append(scaling)
    pad = plan.slots - len(names)
    stack_a += [zero_a] * pad
    stack_b += [zero_b] * pad
    scalings += [0.0] * pad
    scale_key = ("scale", tuple(scalings), str(device))
    if scale_key not in cache:
        cache[scale_key] = _to_device(torch.tensor(scalings, dtype=torch.float32), device)
    segs, tiles, chunks, ranges = plan.layout(present, device)
    return (
        torch.stack(stack_a),
        torch.stack(stack_b),
        cache[scale_key],
        segs,
        tiles,
        chunks,
        ranges,
        plan.kernel_for(device),
    )


@functools.lru_cache(maxsize=1)
def _eager_torch_segment_matmul() -> Any:
    """``twinkle::segment_matmul`` with the ``torch`` kernel as a plain ``autograd.Function`` (eager mode only).

    The same functions as the op's ``torch`` implementation and its registered backward
    (:func:`_torch_matmul` forward and for the input gradient, :func:`_torch_weight_grad` for the
    weight gradient), so the same numbers to the bit (test), without the ``torch.library``
    dispatch a custom op pays on every eager call, six calls per LoRA layer per pass (two
    forward, four backward): 1-5% of a CPU step of the tiny model with eight adapters
    (``benchmarks/results/http_service-20261208-cpu.md``). Compiled layers keep the op (what
    ``torch.compile`` traces), and the ``triton`` kernel always runs through it.
    """
    import torch

    class SegmentMatmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, weights: Any, scale: Any, segs: Any) -> Any:  # type: ignore[override]
            ctx.save_for_backward(x, weights, segs)
            ctx.scale = scale
            return _torch_matmul(x, weights, scale, segs)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:  # type: ignore[override]
            x, weights, segs = ctx.saved_tensors
            grad = grad.contiguous()
            dx = dw = None
            if ctx.needs_input_grad[0]:  # y = s x W^T -> dx = s grad W
                dx = _torch_matmul(grad, weights.transpose(1, 2), ctx.scale, segs)
            if ctx.needs_input_grad[1]:  # dW_a = s_a sum grad^T x over the adapter's tokens
                dw = _torch_weight_grad(grad, x, ctx.scale, segs, weights.shape[0]).to(weights.dtype)
            return dx, dw, None, None

    return SegmentMatmul


def _segmented_delta(x: Any, state: tuple[Any, ...]) -> Any:
    """``((x A_a^T) s_a) B_a^T`` per token of adapter slot ``a``'s segments, 0 elsewhere (two op calls)."""
    import torch

    stack_a, stack_b, scale, segs, tiles, chunks, ranges, kernel = state
    flat = x.reshape(-1, x.shape[-1])
    if flat.dtype != stack_a.dtype:  # peft's float32 adapters on a half model: compute in the adapters' dtype
        flat = flat.to(stack_a.dtype)
    if kernel == "torch" and not torch.compiler.is_compiling():
        eager = _eager_torch_segment_matmul()
        low = eager.apply(flat, stack_a, scale, segs)
        delta = eager.apply(low, stack_b, None, segs)
    else:
        op = torch.ops.twinkle.segment_matmul
        low = op(flat, stack_a, scale, segs, tiles, chunks, ranges, False, kernel)
        delta = op(low, stack_b, None, segs, tiles, chunks, ranges, False, kernel)
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


def _segment_hook(module: Any, args: tuple[Any, ...], output: Any) -> Any:
    state = getattr(module, _STATE_ATTR, None)
    if state is None or not args:
        return None
    import torch

    if not torch.compiler.is_compiling():
        x = args[0]
        tokens = x.numel() // x.shape[-1]
        if tokens != getattr(module, _TOKENS_ATTR, tokens):
            raise ValueError(
                f"multi-adapter LoRA: a layer got {tokens} tokens in a pass planned for "
                f"{getattr(module, _TOKENS_ATTR)}; pack the pass as one row (PaddingFreeProcessor)"
            )
    return output + _segmented_delta(args[0], state).to(output.dtype)


def install(model: Any, layers: Sequence[Any] | None = None) -> int:
    """Give every peft LoRA ``Linear`` of ``model`` the segment hook (idempotent); returns the layers hooked now.

    The hook does nothing outside :func:`adapter_segments` (its state is ``None``), so
    single-adapter training keeps its path. ``layers``: ``lora_linear_layers(model)`` when the
    caller has it already.
    """
    _ops()  # registered here, not on first use inside a compiled layer
    added = 0
    for layer in lora_linear_layers(model) if layers is None else layers:
        if getattr(layer, _HOOK_ATTR, None) is None:
            setattr(layer, _STATE_ATTR, None)
            setattr(layer, _HOOK_ATTR, layer.register_forward_hook(_segment_hook))
            added += 1
    return added


def uninstall(model: Any) -> None:
    """Remove the segment hooks again."""
    for layer in lora_linear_layers(model):
        handle = layer.__dict__.pop(_HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
        layer.__dict__.pop(_STATE_ATTR, None)
        layer.__dict__.pop(_TOKENS_ATTR, None)


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
    segment's own low-rank update. The adapters' weights are stacked at entry (under the grad
    mode of the caller: enter it with gradients on to train), so change no adapter weight
    inside. Compiled decoder layers stay compiled. Gradients reach each adapter's weights from
    its own tokens only.

    Raises:
        ValueError: bad segments; an adapter that the model does not hold; a LoRA variant,
            LoRA bias or dropout.
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
    install(model, layers)
    ranks = [layer.lora_A[name].weight.shape[0] for layer in layers for name in plan.adapters if name in layer.lora_A]
    rank_cap = _bucket(max(ranks, default=1), MIN_RANK)
    cache: dict[Any, Any] = {}
    states = [_layer_state(layer, plan, rank_cap, cache) for layer in layers]
    # peft's adapters-disabled path runs the base layer only; set directly (peft's enable_adapters(False)
    # would also switch off every adapter's requires_grad)
    before = [layer._disable_adapters for layer in layers]
    token = _PLAN.set(plan)
    try:
        for layer, state in zip(layers, states):
            layer._disable_adapters = True
            setattr(layer, _STATE_ATTR, state)
            setattr(layer, _TOKENS_ATTR, plan.num_tokens)
        yield plan
    finally:
        _PLAN.reset(token)
        for layer, flag in zip(layers, before):
            layer._disable_adapters = flag
            setattr(layer, _STATE_ATTR, None)
            layer.__dict__.pop(_TOKENS_ATTR, None)


def active_plan() -> SegmentPlan | None:
    """The plan of the pass running now (inside :func:`adapter_segments`), else ``None``."""
    return _PLAN.get()


def lora_head_terms(layer: Any, num_tokens: int) -> tuple[tuple[int, int, Any, Any, float], ...] | None:
    """The low-rank terms of a peft LoRA LM head for the chunked head, or ``None`` when they cannot be.

    Returns ``(start, end, A, B, scaling)`` over the pass's flattened tokens
    (:func:`twinkle.patch.fused_linear_ce.head_ranges`): inside :func:`adapter_segments`, one per
    segment whose adapter targets the head (the same segments as every other layer: a token only
    meets its own adapter's ``A`` and ``B``); outside, the active adapter over every token; ``()``
    when no adapter applies (adapters disabled, or merged into the base weight). ``None`` (the
    caller computes full logits through peft's forward) for what the chunked head does not run:
    several active adapters, a LoRA variant or bias, dropout while training, a non-``Linear`` base.
    """
    import torch

    plan = active_plan()
    if plan is not None:
        if plan.num_tokens != num_tokens:
            return None
        terms = []
        for name, start, end in plan.segments:
            if name in layer.lora_A:
                weight_a, weight_b, scaling = _adapter_weights(layer, name)
                terms.append((start, end, weight_a, weight_b, scaling))
        return tuple(terms)
    if layer.disable_adapters or layer.merged:
        return ()
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if not active:
        return ()
    if len(active) > 1 or type(layer.get_base_layer()) is not torch.nn.Linear:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(name, False):
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, torch.nn.Identity) and dropout.training and getattr(dropout, "p", 1.0) > 0:
        return None
    return ((0, num_tokens, layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])),)
