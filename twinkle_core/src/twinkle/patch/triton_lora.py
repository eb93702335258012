"""LoRA's two low-rank gradient products from one pass over the output gradient (Triton).

The merged LoRA backward (:class:`twinkle.patch.lora_fast.MergedLoraForward`) needs, besides
the input gradient, ``grad @ B`` (for ``A``'s gradient) and ``grad^T @ (x A^T)`` (``B``'s
gradient). Each is a rank-r product over the whole ``[tokens, out]`` gradient and so as two
cuBLAS calls reads that gradient twice: for a 7B MLP's gate/up at 8k tokens 620 MB each time.
:func:`lora_grads` reads it once: every program of one kernel
(:mod:`twinkle.patch._lora_kernels`) takes a ``[tokens, out]`` block and computes both
products' share of it on tensor cores, writing float32 partials that it owns (no atomics),
which a sum over programs finishes.

:func:`lora_merge` builds merged LoRA weights in one pass over ``W``. The same module holds the
kernels of :class:`twinkle.patch.lora_mlp.FusedLoraMLP`: :func:`swiglu_backward` (its default
backward on CUDA: ``h`` and both SwiGLU gradients from one read of ``gate``, ``up`` and
``grad_h``) and, behind ``swiglu_kernels=True``, :func:`swiglu_low` (``h = silu(gate) * up`` and
``h A_down^T`` from one read of ``gate`` and ``up``) and :func:`swiglu_lora_grads` (the SwiGLU
backward with the gate/up ``B`` gradients, their ``grad @ B`` and ``A_down``'s gradient from one
read of ``grad_h``, ``gate`` and ``up``).

Each is registered as a custom op (``twinkle::lora_grads``, ``twinkle::lora_merge``,
``twinkle::swiglu_backward``, ``twinkle::swiglu_low``, ``twinkle::swiglu_lora_grads``;
``torch.library.triton_op``), so compiled decoder layers call them inside their graphs. Import
is lazy: nothing imports triton until the first call (:func:`available` says whether they can
run). On CPU they run under Triton's interpreter (``TRITON_INTERPRET=1``), as opaque custom ops,
which is how CI checks them.
"""

# no ``from __future__ import annotations``: triton_op reads the custom op's schema from real annotations
import functools
import os
from typing import Any

from twinkle.patch import triton_ce
from twinkle.patch.kernel_config import kernel_config

# Tiles and warps are fields of :func:`~twinkle.patch.kernel_config.kernel_config`, read each time
# an op runs (eagerly; a compiled graph keeps those it was traced with):
#   lora_grad_block_t / _block_o / _warps (64, 128, 4): tokens x outputs per tile of lora_grads;
#   lora_target_programs (264): programs to aim for (about two per H200 SM);
#   lora_merge_block_o / _block_i / _warps (32, 256, 4): rows x columns of W per tile of lora_merge.
#     Wide, short tiles on 4 warps keep it at HBM speed: 142 us for a 7B [gate; up] against 209
#     with 128-square tiles on 8 warps and 130 for a plain copy (benchmarks/lora_merge.py,
#     decision 0015);
#   swiglu_block_t / _block_c / _warps (32, 128, 8): tiles of swiglu_low and swiglu_lora_grads;
#   swiglu_bwd_block / _warps (1024, 4): columns of one program of swiglu_backward (one row each).

#: Rows of one program of the kernel that sums the partials (:func:`lora_grads`), and partials it loads at once.
FINISH_ROWS = 32
FINISH_PARTS = 16


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the kernel can run: triton imports (:func:`twinkle.patch.triton_ce.available`) and
    ``torch.library.triton_op`` exists."""
    if not triton_ce.available():
        return False
    try:
        from torch.library import triton_op, wrap_triton  # noqa: F401
    except ImportError:  # torch older than 2.6
        return False
    return True


def _split(tiles_t: int, tiles_o: int, target_programs: int) -> tuple[int, int]:
    """Tiles per program along tokens and outputs: about ``target_programs`` programs, blocks near square."""
    per_prog = max(1, (tiles_t * tiles_o) // target_programs)
    along_t = 1
    while along_t * along_t < per_prog and along_t < tiles_t:
        along_t *= 2
    along_o = max(1, per_prog // along_t)
    return min(along_t, tiles_t), min(along_o, tiles_o)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _define(name: str, fake: Any) -> Any:
    """Decorator: ``fn`` as the custom op ``name``.

    A ``torch.library.triton_op``, so that compiled graphs see (and inductor schedules) the
    kernel; under Triton's interpreter (CPU tests) an opaque ``custom_op`` with ``fake`` for its
    output shapes instead, since the interpreter cannot be traced with fake tensors.
    """

    def wrap(fn: Any) -> Any:
        from torch.library import custom_op, triton_op

        if not _interpreting():
            return triton_op(name, mutates_args=())(fn)
        op = custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        return op

    return wrap


def _launch(kernel: Any) -> Any:
    """``kernel`` as the ops launch it: through ``wrap_triton`` (traceable), or itself under the interpreter."""
    if _interpreting():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def _empty(shape: tuple[int, ...], like: Any, dtype: Any = None) -> Any:
    return like.new_empty(shape, dtype=dtype or like.dtype)


@functools.lru_cache(maxsize=1)
def _op() -> Any:
    import torch

    from twinkle.patch._lora_kernels import lora_grad_partials, lora_grads_finish

    Tensor = torch.Tensor

    def fake(grad: Tensor, low: Tensor, weight_b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        return _empty((grad.shape[0], low.shape[1]), grad), _empty((grad.shape[1], low.shape[1]), grad)

    @_define("twinkle::lora_grads", fake)
    def lora_grads_op(grad: Tensor, low: Tensor, weight_b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        config = kernel_config()
        block_t, block_o = config.lora_grad_block_t, config.lora_grad_block_o
        tokens, out_f = grad.shape
        rank = low.shape[1]
        block_r = max(16, _next_pow2(rank))
        tiles_t = -(-tokens // block_t)
        tiles_o = -(-out_f // block_o)
        along_t, along_o = _split(tiles_t, tiles_o, config.lora_target_programs)
        progs_t, progs_o = -(-tiles_t // along_t), -(-tiles_o // along_o)
        part_gb = torch.empty(progs_o, tokens, block_r, dtype=torch.float32, device=grad.device)
        part_db = torch.empty(progs_t, out_f, block_r, dtype=torch.float32, device=grad.device)
        _launch(lora_grad_partials)[(progs_t, progs_o)](
            grad,
            grad.stride(0),
            low,
            weight_b,
            part_gb,
            part_db,
            tokens,
            out_f,
            rank,
            along_t * block_t,
            along_o * block_o,
            BT=block_t,
            BO=block_o,
            BR=block_r,
            UPCAST=_interpreting(),
            num_warps=config.lora_grad_warps,
        )
        gb = _empty((tokens, rank), grad)
        grad_b = _empty((out_f, rank), grad)
        blocks_gb, blocks_db = -(-tokens // FINISH_ROWS), -(-out_f // FINISH_ROWS)
        _launch(lora_grads_finish)[(blocks_gb + blocks_db,)](
            part_gb,
            part_db,
            gb,
            grad_b,
            tokens,
            out_f,
            progs_o,
            progs_t,
            rank,
            float(scale),
            blocks_gb,
            BP=min(FINISH_PARTS, _next_pow2(max(progs_o, progs_t))),
            BROWS=FINISH_ROWS,
            BR=block_r,
        )
        return gb, grad_b

    return lora_grads_op


@functools.lru_cache(maxsize=1)
def _swiglu_ops() -> tuple[Any, Any]:
    import torch

    from twinkle.patch._lora_kernels import swiglu_backward_lora, swiglu_forward_low

    Tensor = torch.Tensor
    f32 = torch.float32

    def fake_low(gate_up: Tensor, weight_a: Tensor) -> tuple[Tensor, Tensor]:
        tokens, cols = gate_up.shape[0], gate_up.shape[1] // 2
        return _empty((tokens, cols), gate_up), _empty((tokens, weight_a.shape[0]), gate_up, f32)

    def fake_grads(grad_h, gate_up, gb_down, low, weight_bg, weight_bu):  # type: ignore[no-untyped-def]
        tokens, cols = gate_up.shape[0], gate_up.shape[1] // 2
        rank, rank_d = weight_bg.shape[1], gb_down.shape[1]
        return (
            _empty((tokens, 2 * cols), gate_up),
            _empty((cols, rank_d), gate_up, f32),
            _empty((cols, rank), gate_up, f32),
            _empty((cols, rank), gate_up, f32),
            _empty((tokens, rank), gate_up, f32),
            _empty((tokens, rank), gate_up, f32),
        )

    @_define("twinkle::swiglu_low", fake_low)
    def swiglu_low_op(gate_up: Tensor, weight_a: Tensor) -> tuple[Tensor, Tensor]:
        config = kernel_config()
        block_t, block_c = config.swiglu_block_t, config.swiglu_block_c
        tokens, cols = gate_up.shape[0], gate_up.shape[1] // 2
        rank = weight_a.shape[0]
        block_r = max(16, _next_pow2(rank))
        tiles_t, tiles_c = -(-tokens // block_t), -(-cols // block_c)
        # rows outermost: each program keeps its rows' low-rank sums in registers, so few
        # programs along the columns (their partials are what the host sums)
        progs_c = max(1, min(tiles_c, config.lora_target_programs // tiles_t))
        along_c = -(-tiles_c // progs_c)
        progs_c = -(-tiles_c // along_c)
        hidden = torch.empty(tokens, cols, dtype=gate_up.dtype, device=gate_up.device)
        part_low = torch.empty(progs_c, tokens, block_r, dtype=torch.float32, device=gate_up.device)
        _launch(swiglu_forward_low)[(tiles_t, progs_c)](
            gate_up,
            gate_up.stride(0),
            hidden,
            weight_a,
            part_low,
            tokens,
            cols,
            rank,
            block_t,
            along_c * block_c,
            BT=block_t,
            BC=block_c,
            BR=block_r,
            UPCAST=_interpreting(),
            num_warps=config.swiglu_warps,
        )
        return hidden, part_low.sum(0)[:, :rank]

    @_define("twinkle::swiglu_lora_grads", fake_grads)
    def swiglu_lora_grads_op(
        grad_h: Tensor, gate_up: Tensor, gb_down: Tensor, low: Tensor, weight_bg: Tensor, weight_bu: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        config = kernel_config()
        block_t, block_c = config.swiglu_block_t, config.swiglu_block_c
        tokens, cols = gate_up.shape[0], gate_up.shape[1] // 2
        rank, rank_d = weight_bg.shape[1], gb_down.shape[1]
        block_r = max(16, _next_pow2(max(rank, rank_d)))
        tiles_t, tiles_c = -(-tokens // block_t), -(-cols // block_c)
        along_t, along_c = _split(tiles_t, tiles_c, config.lora_target_programs)
        progs_t, progs_c = -(-tiles_t // along_t), -(-tiles_c // along_c)
        dev, f32 = gate_up.device, torch.float32
        d_gate_up = torch.empty(tokens, 2 * cols, dtype=gate_up.dtype, device=dev)
        part_da, part_dbg, part_dbu = (torch.empty(progs_t, cols, block_r, dtype=f32, device=dev) for _ in range(3))
        part_gbg, part_gbu = (torch.empty(progs_c, tokens, block_r, dtype=f32, device=dev) for _ in range(2))
        _launch(swiglu_backward_lora)[(progs_t, progs_c)](
            grad_h,
            gate_up,
            gate_up.stride(0),
            d_gate_up,
            gb_down,
            low,
            low.stride(0),
            weight_bg,
            weight_bu,
            part_da,
            part_dbg,
            part_dbu,
            part_gbg,
            part_gbu,
            tokens,
            cols,
            rank,
            rank_d,
            along_t * block_t,
            along_c * block_c,
            BT=block_t,
            BC=block_c,
            BR=block_r,
            UPCAST=_interpreting(),
            num_warps=config.swiglu_warps,
        )
        return (
            d_gate_up,
            part_da.sum(0)[:, :rank_d],
            part_dbg.sum(0)[:, :rank],
            part_dbu.sum(0)[:, :rank],
            part_gbg.sum(0)[:, :rank],
            part_gbu.sum(0)[:, :rank],
        )

    return swiglu_low_op, swiglu_lora_grads_op


@functools.lru_cache(maxsize=1)
def _swiglu_backward_op() -> Any:
    import torch

    from twinkle.patch._lora_kernels import swiglu_backward

    Tensor = torch.Tensor

    def fake(grad_h: Tensor, gate_up: Tensor) -> tuple[Tensor, Tensor]:
        return _empty(gate_up.shape, gate_up), _empty(grad_h.shape, gate_up)

    @_define("twinkle::swiglu_backward", fake)
    def swiglu_backward_op(grad_h: Tensor, gate_up: Tensor) -> tuple[Tensor, Tensor]:
        tokens, cols = grad_h.shape
        grad_h = grad_h.contiguous()  # the kernel reads rows of grad_h at stride cols
        if gate_up.stride(1) != 1:  # and gate_up at its own row stride
            gate_up = gate_up.contiguous()
        d_gate_up = torch.empty(tokens, 2 * cols, dtype=gate_up.dtype, device=gate_up.device)
        hidden = torch.empty(tokens, cols, dtype=gate_up.dtype, device=gate_up.device)
        if tokens:
            config = kernel_config()
            _launch(swiglu_backward)[(tokens, -(-cols // config.swiglu_bwd_block))](
                grad_h,
                gate_up,
                gate_up.stride(0),
                d_gate_up,
                hidden,
                cols,
                BC=config.swiglu_bwd_block,
                num_warps=config.swiglu_bwd_warps,
            )
        return d_gate_up, hidden

    return swiglu_backward_op


@functools.lru_cache(maxsize=1)
def _merge_op() -> Any:
    import torch

    from twinkle.patch._lora_kernels import lora_merge_tile

    Tensor = torch.Tensor

    def fake(weights: list[Tensor], weights_b: list[Tensor], weights_a: list[Tensor], scales: list[float]) -> Tensor:
        return _empty((sum(w.shape[0] for w in weights), weights[0].shape[1]), weights[0])

    @_define("twinkle::lora_merge", fake)
    def lora_merge_op(
        weights: list[Tensor], weights_b: list[Tensor], weights_a: list[Tensor], scales: list[float]
    ) -> Tensor:
        n_in = weights[0].shape[1]
        out = torch.empty(sum(w.shape[0] for w in weights), n_in, dtype=weights[0].dtype, device=weights[0].device)
        config = kernel_config()
        block_o, block_i = config.lora_merge_block_o, config.lora_merge_block_i
        row0 = 0
        for weight, weight_b, weight_a, scale in zip(weights, weights_b, weights_a, scales):
            n_out, rank = weight_b.shape
            grid = (-(-n_out // block_o), -(-n_in // block_i))
            _launch(lora_merge_tile)[grid](
                weight,
                weight_b,
                weight_a,
                out,
                row0,
                n_out,
                n_in,
                rank,
                float(scale),
                BO=block_o,
                BI=block_i,
                BR=max(16, _next_pow2(rank)),
                UPCAST=_interpreting(),
                num_warps=config.lora_merge_warps,
            )
            row0 += n_out
        return out

    return lora_merge_op


def lora_merge(
    weights: list[Any], weights_b: list[Any], weights_a: list[Any], scales: list[float] | None = None
) -> Any:
    """``[W_1 + s_1 B_1 A_1; W_2 + s_2 B_2 A_2; ...]``: merged LoRA weights stacked by rows, one pass over each ``W``.

    ``torch.addmm(W, B, A)`` into a new tensor costs two passes in PyTorch (``W`` copied into the
    output, then cuBLAS reads and rewrites it to accumulate); this reads ``W`` once and writes the
    merged weight once, with the rank-r product summed and scaled in float32 and one rounding (as
    ``addmm(W, B, A, alpha=s)``).

    Args:
        weights: ``[out_i, in]`` frozen weights (one dtype and width).
        weights_b: ``[out_i, r_i]``, LoRA ``B``.
        weights_a: ``[r_i, in]``, LoRA ``A``.
        scales: each adapter's scaling ``s_i`` (default 1.0 each), applied inside the kernel.

    Example::

        merged = lora_merge([w_gate, w_up], [b_gate, b_up], [a_gate, a_up], [s, s])  # [2 * inter, hidden]
    """
    scales = [1.0] * len(weights) if scales is None else [float(s) for s in scales]
    return _merge_op()(
        [w.contiguous() for w in weights],
        [b.contiguous() for b in weights_b],
        [a.contiguous() for a in weights_a],
        scales,
    )


def swiglu_low(gate_up: Any, weight_a: Any) -> tuple[Any, Any]:
    """``h = silu(gate) * up`` and ``h @ weight_a^T`` (float32), reading ``gate`` and ``up`` once.

    Args:
        gate_up: ``[tokens, 2 * intermediate]``, ``gate`` then ``up`` (one GEMM's output).
        weight_a: ``[r, intermediate]``, the down projection's LoRA ``A``.

    Returns:
        ``h`` (``[tokens, intermediate]``, ``gate_up``'s dtype) and ``[tokens, r]`` float32.

    Example::

        hidden, low = swiglu_low(x @ torch.cat([w_gate, w_up]).t(), a_down)  # low = hidden @ a_down.t()
    """
    return _swiglu_ops()[0](gate_up.contiguous(), weight_a.contiguous())


def swiglu_lora_grads(
    grad_h: Any, gate_up: Any, gb_down: Any, low: Any, weight_bg: Any, weight_bu: Any
) -> tuple[Any, ...]:
    """The SwiGLU backward and the MLP's LoRA products over its tensors, in one pass.

    Args:
        grad_h: ``[tokens, intermediate]``, the gradient of ``h = silu(gate) * up``.
        gate_up: as for :func:`swiglu_low`.
        gb_down: ``[tokens, r_down]``, ``s_down * grad_out @ B_down``.
        low: ``[tokens, 2r]``, ``[s_gate x A_gate^T, s_up x A_up^T]``.
        weight_bg, weight_bu: ``[intermediate, r]``, LoRA ``B`` of gate and up.

    Returns:
        ``d_gate_up`` (``[tokens, 2 * intermediate]``: the gate gradient, then the up gradient),
        then float32 ``h^T @ gb_down`` (``[intermediate, r_down]``), ``d_gate^T @ low_gate`` and
        ``d_up^T @ low_up`` (``[intermediate, r]``), ``d_gate @ B_gate`` and ``d_up @ B_up``
        (``[tokens, r]``).
    """
    return _swiglu_ops()[1](
        grad_h.contiguous(),
        gate_up.contiguous(),
        gb_down.contiguous(),
        low.contiguous(),
        weight_bg.contiguous(),
        weight_bu.contiguous(),
    )


def swiglu_backward(grad_h: Any, gate_up: Any) -> tuple[Any, Any]:
    """The SwiGLU backward in one pass: ``([d_gate | d_up], h)`` for ``h = silu(gate) * up``.

    Inductor compiles the same pointwise torch ops into two kernels (``h`` for the down
    projection's ``A`` gradient, and the two gradients through a ``cat`` that loads the inputs
    once per output half); this reads ``grad_h``, ``gate`` and ``up`` once and writes the three
    results.

    Args:
        grad_h: ``[tokens, intermediate]``, the gradient of ``h``.
        gate_up: ``[tokens, 2 * intermediate]``, ``gate`` then ``up`` (one GEMM's output).

    Returns:
        ``d_gate_up`` (``[tokens, 2 * intermediate]``, the gate gradient then the up gradient) and
        ``h`` (``[tokens, intermediate]``), both in ``gate_up``'s dtype.

    Example::

        d_gate_up, hidden = swiglu_backward(grad_out @ w_down, gate_up)
    """
    return _swiglu_backward_op()(grad_h, gate_up)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def register() -> None:
    """Register ``torch.ops.twinkle.lora_grads`` and the SwiGLU ops (imports triton); idempotent."""
    _op()
    _merge_op()
    _swiglu_ops()
    _swiglu_backward_op()


def lora_grads(grad: Any, low: Any, weight_b: Any, scale: float = 1.0) -> tuple[Any, Any]:
    """``(s grad @ weight_b, s grad^T @ low)`` in ``grad``'s dtype, reading ``grad`` once.

    One kernel takes a ``[tokens, out]`` block per program and writes float32 partials of both
    products; a second sums them, multiplies by ``scale`` and rounds once.

    Args:
        grad: ``[tokens, out]`` (bf16/fp16/fp32, unit stride along ``out``).
        low: ``[tokens, r]``, the rank-r activations ``x A^T`` (same dtype; unscaled).
        weight_b: ``[out, r]``, LoRA's ``B`` (block-diagonal for a group of projections).
        scale: LoRA's scaling ``s``.

    Returns:
        ``[tokens, r]`` and ``[out, r]`` tensors in ``grad``'s dtype.

    Example::

        gb, grad_b = lora_grads(grad, x @ A.t(), B, scaling)  # grad_A = gb.t() @ x
    """
    if grad.stride(1) != 1:
        grad = grad.contiguous()
    return _op()(grad, low.contiguous(), weight_b.contiguous(), float(scale))
