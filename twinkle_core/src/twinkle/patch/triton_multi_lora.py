"""The Triton launches of the segmented LoRA ops (:mod:`twinkle.patch.multi_lora`) and their autotuning.

:mod:`twinkle.patch.multi_lora` registers ``twinkle::segment_matmul`` and
``twinkle::segment_weight_grad``; with ``kernel="triton"`` they call into this module:

* :func:`launch_matmul`: ``out[t] = s_a x[t] @ weights[a]^T`` over a table of ``BLOCK_T``-token
  tiles, one launch of :func:`twinkle.patch._multi_lora_kernels.segment_matmul` (Punica's SGMV
  shape). On CUDA the first launch of each shape times :data:`MATMUL_CONFIGS` and keeps the
  fastest (``TWINKLE_MULTI_LORA_AUTOTUNE=0`` turns that off); every configuration computes the
  same float32 sums, so tuning never changes a result;
* :func:`launch_weight_grad`: per adapter slot ``s_a sum p[t]^T q[t]`` over its ``CHUNK_T``-token
  chunks: float32 partials per chunk, then their sum per slot in chunk order (deterministic, no
  atomics).

The tile sizes here (:data:`BLOCK_T`, :data:`CHUNK_T`) also size the layout tables that
:mod:`twinkle.patch.multi_lora` builds. Import is lazy: nothing here imports triton until a
launch (:func:`triton_available` says whether one can run). On CPU the kernels run under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI checks them.
"""

from __future__ import annotations

import functools
import os
from typing import Any

__all__ = [
    "BLOCK_K",
    "BLOCK_O",
    "BLOCK_T",
    "CHUNK_T",
    "MATMUL_CONFIGS",
    "REDUCE_BLOCK",
    "launch_matmul",
    "launch_weight_grad",
    "matmul_with",
    "triton_available",
]

#: Tokens per tile of the segment kernel, and output columns / reduction depth per program.
BLOCK_T = 64
BLOCK_O = 64
BLOCK_K = 64
#: Tokens per chunk of a weight gradient (one float32 partial each), and elements per program of their sum.
CHUNK_T = 512
REDUCE_BLOCK = 1024


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


#: Candidate ``(sub-tile tokens, output columns per program, warps, stages)`` of the segment kernel on
#: CUDA (the first is the untuned default). None changes the arithmetic: each output element is
#: the same float32 sum over ``K`` in ``BLOCK_K`` steps, so the choice never changes a result.
MATMUL_CONFIGS = (
    (64, 64, 4, 3),
    (32, 64, 4, 3),
    (16, 64, 4, 3),
    (32, 64, 4, 4),
    (64, 128, 8, 3),
    (16, 64, 2, 4),
)
#: Tuned choices: (out columns, K, dtype, weight strides' order, scaled) -> index into MATMUL_CONFIGS.
_TUNED: dict[tuple[Any, ...], int] = {}


def _autotune_enabled() -> bool:
    """Whether the segment kernel's launch is tuned on CUDA (env ``TWINKLE_MULTI_LORA_AUTOTUNE=0`` turns it off)."""
    return os.environ.get("TWINKLE_MULTI_LORA_AUTOTUNE", "1") != "0" and not _interpreting()


def launch_matmul(x: Any, weights: Any, scale: Any, tiles: Any, out: Any) -> None:
    """``out[t] = s_a x[t] @ weights[a]^T`` over ``tiles`` (``weights``: ``[n, N, K]``, any strides).

    On CUDA the first launch of each shape times :data:`MATMUL_CONFIGS` and keeps the fastest
    (results are the same for all of them); on CPU (Triton's interpreter) the default runs.
    """
    n_out = weights.shape[1]
    if tiles.shape[1] == 0 or n_out == 0:
        return
    if not (_autotune_enabled() and x.is_cuda):
        matmul_with(0, x, weights, scale, tiles, out)
        return
    key = (n_out, weights.shape[2], x.dtype, weights.stride(1) > weights.stride(2), scale is not None, x.device)
    choice = _TUNED.get(key)
    if choice is None:
        from triton.testing import do_bench

        times = []
        for i in range(len(MATMUL_CONFIGS)):
            try:
                times.append(do_bench(lambda i=i: matmul_with(i, x, weights, scale, tiles, out), warmup=5, rep=20))
            except Exception:  # a configuration that does not fit this device (shared memory, registers)
                times.append(float("inf"))
        choice = _TUNED[key] = min(range(len(times)), key=times.__getitem__)
    matmul_with(choice, x, weights, scale, tiles, out)


def matmul_with(config: int, x: Any, weights: Any, scale: Any, tiles: Any, out: Any) -> None:
    """One launch of the segment kernel with :data:`MATMUL_CONFIGS` ``[config]``."""
    import torch

    from twinkle.patch._multi_lora_kernels import segment_matmul

    sub, block_o, warps, stages = MATMUL_CONFIGS[config]
    n_out, k = weights.shape[1], weights.shape[2]
    block_o = max(16, min(block_o, _next_pow2(n_out)))
    grid = (tiles.shape[1] * (BLOCK_T // sub), -(-n_out // block_o))
    segment_matmul[grid](
        x,
        x.stride(0),
        x.stride(1),
        weights,
        weights.stride(0),
        weights.stride(1),
        weights.stride(2),
        scale if scale is not None else x,
        out,
        out.stride(0),
        out.stride(1),
        tiles[0],
        tiles[1],
        tiles[2],
        n_out,
        k,
        TILE=BLOCK_T,
        BT=sub,
        BO=block_o,
        BK=max(16, min(BLOCK_K, _next_pow2(k))),
        HAS_SCALE=scale is not None,
        UPCAST=_interpreting(),
        IEEE=x.dtype == torch.float32,
        num_warps=warps,
        num_stages=stages,
    )


def launch_weight_grad(p: Any, q: Any, scale: Any, chunks: Any, ranges: Any, slots: int) -> Any:
    """``[slots, N, K]`` float32: per slot ``s_a sum p[t]^T q[t]`` over its chunks (two launches)."""
    import torch

    from twinkle.patch._multi_lora_kernels import reduce_chunks, segment_outer

    n, k = p.shape[1], q.shape[1]
    part = torch.empty(chunks.shape[1], n, k, dtype=torch.float32, device=p.device)
    block_n = max(16, min(BLOCK_O, _next_pow2(n)))
    block_k = max(16, min(BLOCK_K, _next_pow2(k)))
    segment_outer[(chunks.shape[1], -(-n // block_n), -(-k // block_k))](
        p,
        p.stride(0),
        p.stride(1),
        q,
        q.stride(0),
        q.stride(1),
        part,
        chunks[1],
        chunks[2],
        n,
        k,
        BT=BLOCK_T,
        BN=block_n,
        BK=block_k,
        UPCAST=_interpreting(),
        IEEE=p.dtype == torch.float32,
    )
    out = torch.empty(slots, n, k, dtype=torch.float32, device=p.device)
    reduce_chunks[(slots, -(-(n * k) // REDUCE_BLOCK))](
        part,
        out,
        scale if scale is not None else part,
        ranges[0],
        ranges[1],
        n * k,
        BLOCK=REDUCE_BLOCK,
        HAS_SCALE=scale is not None,
    )
    return out


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
