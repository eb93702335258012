"""LoRA's two low-rank gradient products from one pass over the output gradient (Triton).

The merged LoRA backward (:class:`twinkle.patch.lora_fast.MergedLoraForward`) needs, besides
the input gradient, ``grad @ B`` (for ``A``'s gradient) and ``grad^T @ (x A^T)`` (``B``'s
gradient). Each is a rank-r product over the whole ``[tokens, out]`` gradient and so as two
cuBLAS calls reads that gradient twice: for a 7B MLP's gate/up at 8k tokens 620 MB each time.
:func:`lora_grads` reads it once: every program of one kernel
(:mod:`twinkle.patch._lora_kernels`) takes a ``[tokens, out]`` block and computes both
products' share of it on tensor cores, writing float32 partials that it owns (no atomics),
which a sum over programs finishes.

It is registered as the custom op ``twinkle::lora_grads`` (``torch.library.triton_op``), so
compiled decoder layers call it inside their graphs. Import is lazy: nothing imports triton
until the first call (:func:`available` says whether it can run). On CPU it runs under Triton's
interpreter (``TRITON_INTERPRET=1``), which is how CI checks it.
"""

# no ``from __future__ import annotations``: triton_op reads the custom op's schema from real annotations
import functools
import os
from typing import Any

#: Rows (tokens) and columns (outputs) of one tile; warps per program.
BLOCK_T = int(os.environ.get("TWINKLE_LORA_GRAD_BLOCK_T", "64"))
BLOCK_O = int(os.environ.get("TWINKLE_LORA_GRAD_BLOCK_O", "128"))
NUM_WARPS = int(os.environ.get("TWINKLE_LORA_GRAD_WARPS", "4"))
#: Programs to aim for (about two per H200 SM).
TARGET_PROGRAMS = 264


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the kernel can run: triton imports (:func:`twinkle.patch.triton_ce.available`) and
    ``torch.library.triton_op`` exists."""
    from twinkle.patch import triton_ce

    if not triton_ce.available():
        return False
    try:
        from torch.library import triton_op, wrap_triton  # noqa: F401
    except ImportError:  # torch older than 2.6
        return False
    return True


def _split(tiles_t: int, tiles_o: int) -> tuple[int, int]:
    """Tiles per program along tokens and outputs: about TARGET_PROGRAMS programs, blocks near square."""
    per_prog = max(1, (tiles_t * tiles_o) // TARGET_PROGRAMS)
    along_t = 1
    while along_t * along_t < per_prog and along_t < tiles_t:
        along_t *= 2
    along_o = max(1, per_prog // along_t)
    return min(along_t, tiles_t), min(along_o, tiles_o)


@functools.lru_cache(maxsize=1)
def _op() -> Any:
    import torch
    from torch.library import triton_op, wrap_triton

    from twinkle.patch._lora_kernels import lora_grad_partials

    Tensor = torch.Tensor

    @triton_op("twinkle::lora_grads", mutates_args=())
    def lora_grads_op(grad: Tensor, low: Tensor, weight_b: Tensor) -> tuple[Tensor, Tensor]:
        tokens, out_f = grad.shape
        rank = low.shape[1]
        block_r = max(16, _next_pow2(rank))
        tiles_t = -(-tokens // BLOCK_T)
        tiles_o = -(-out_f // BLOCK_O)
        along_t, along_o = _split(tiles_t, tiles_o)
        progs_t, progs_o = -(-tiles_t // along_t), -(-tiles_o // along_o)
        part_gb = torch.empty(progs_o, tokens, block_r, dtype=torch.float32, device=grad.device)
        part_db = torch.empty(progs_t, out_f, block_r, dtype=torch.float32, device=grad.device)
        wrap_triton(lora_grad_partials)[(progs_t, progs_o)](
            grad,
            grad.stride(0),
            low,
            weight_b,
            part_gb,
            part_db,
            tokens,
            out_f,
            rank,
            along_t * BLOCK_T,
            along_o * BLOCK_O,
            BT=BLOCK_T,
            BO=BLOCK_O,
            BR=block_r,
            UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
            num_warps=NUM_WARPS,
        )
        return part_gb.sum(0)[:, :rank], part_db.sum(0)[:, :rank]

    return lora_grads_op


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def register() -> None:
    """Register ``torch.ops.twinkle.lora_grads`` (imports triton); idempotent."""
    _op()


def lora_grads(grad: Any, low: Any, weight_b: Any) -> tuple[Any, Any]:
    """``(grad @ weight_b, grad^T @ low)`` in float32, reading ``grad`` once.

    Args:
        grad: ``[tokens, out]`` (bf16/fp16/fp32, unit stride along ``out``).
        low: ``[tokens, r]``, the rank-r activations ``x A^T`` (same dtype).
        weight_b: ``[out, r]``, LoRA's ``B`` (block-diagonal for a group of projections).

    Returns:
        ``[tokens, r]`` and ``[out, r]`` float32 tensors.

    Example::

        gb, grad_b = lora_grads(grad, x @ A.t() * scaling, B)  # grad_A = (gb * scaling).t() @ x
    """
    if grad.stride(1) != 1:
        grad = grad.contiguous()
    return _op()(grad, low.contiguous(), weight_b.contiguous())
