"""The Triton kernels of :mod:`twinkle.patch.multi_lora` (imports triton: load it only through
:mod:`twinkle.patch.triton_multi_lora`, which launches and tunes them).

Three kernels in the manner of Punica's SGMV (S-LoRA): every program reads its adapter index
from a small device table, so one launch serves every segment of a pass, whatever its layout.

* :func:`segment_matmul`: ``Y[t] = s_a X[t] W_a^T`` over a table of token tiles (the LoRA
  shrink ``x A^T``, expand ``low B^T`` and both input-gradient products);
* :func:`segment_outer`: float32 partials ``sum_t P[t]^T Q[t]`` over chunks of one segment
  (the weight gradients), one partial per chunk, no atomics;
* :func:`reduce_chunks`: per adapter slot, the sum of its chunks' partials in chunk order
  (deterministic), times the slot's scale.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def segment_matmul(
    X,
    stride_xt,
    stride_xk,
    W,
    stride_wa,
    stride_wo,
    stride_wk,
    S,
    Y,
    stride_yt,
    stride_yo,
    TILE_ADAPTER,
    TILE_START,
    TILE_END,
    N_OUT,
    K,
    TILE: tl.constexpr,
    BT: tl.constexpr,
    BO: tl.constexpr,
    BK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """``Y[t, o] = s_a sum_k X[t, k] W[a, o, k]`` for one tile of tokens of one segment (SGMV).

    Program ``(i, j)`` takes sub-tile ``i % (TILE // BT)`` (``BT`` tokens) of tile ``i // (TILE // BT)``
    of the tile table (adapter slot, first and one past last token; a tile of at most ``TILE``
    tokens never crosses a segment) and output columns ``j * BO ...``. The sub-tile size, ``BO``,
    warps and stages only split the work: every output element is the same sum in the same
    order whatever they are (the tuner of :mod:`twinkle.patch.triton_multi_lora` picks them). A tile
    of slot ``-1`` (tokens of no adapter of this layer) stores zeros without reading ``X``, so a NaN
    there reaches no product; padding tiles (``start == end``) store nothing. ``UPCAST``: float32
    dots (Triton's CPU interpreter multiplies bf16 tiles wrongly); ``IEEE``: float32 products
    without TF32 (float32 inputs on a GPU).
    """
    pid = tl.program_id(0)
    pid_o = tl.program_id(1)
    tile = pid // (TILE // BT)
    a = tl.load(TILE_ADAPTER + tile)
    start = tl.load(TILE_START + tile) + (pid % (TILE // BT)) * BT
    end = tl.minimum(tl.load(TILE_END + tile), start + BT)
    a64 = tl.maximum(a, 0).to(tl.int64)
    t = start + tl.arange(0, BT)
    t_in = t < end
    t_ok = t_in & ((t * 0 + a) >= 0)  # vector masks (the interpreter takes no scalar ones)
    o = pid_o * BO + tl.arange(0, BO)
    o_ok = o < N_OUT
    o_read = o_ok & ((o * 0 + a) >= 0)
    acc = tl.zeros([BT, BO], dtype=tl.float32)
    w_base = W + a64 * stride_wa
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < K
        x = tl.load(
            X + t[:, None].to(tl.int64) * stride_xt + k[None, :] * stride_xk,
            mask=t_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_base + o[None, :] * stride_wo + k[:, None] * stride_wk,
            mask=k_ok[:, None] & o_read[None, :],
            other=0.0,
        )
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_SCALE:
        acc = acc * tl.load(S + a64)  # slot 0 for an invalid tile, whose acc is 0
    tl.store(
        Y + t[:, None].to(tl.int64) * stride_yt + o[None, :] * stride_yo,
        acc.to(Y.dtype.element_ty),
        mask=t_in[:, None] & o_ok[None, :],
    )


@triton.jit
def segment_outer(
    P,
    stride_pt,
    stride_pn,
    Q,
    stride_qt,
    stride_qk,
    OUT,
    CHUNK_START,
    CHUNK_END,
    N,
    K,
    BT: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """``OUT[c, n, k] = sum_{t in chunk c} P[t, n] Q[t, k]`` in float32 (``OUT`` is ``[chunks, N, K]``, contiguous).

    Program ``(c, i, j)``: chunk ``c`` of the chunk table (tokens of one segment), rows
    ``i * BN ...`` and columns ``j * BK ...`` of the partial. A padding chunk (``start == end``)
    stores zeros.
    """
    c = tl.program_id(0)
    pn = tl.program_id(1)
    pk = tl.program_id(2)
    start = tl.load(CHUNK_START + c)
    end = tl.load(CHUNK_END + c)
    n = pn * BN + tl.arange(0, BN)
    k = pk * BK + tl.arange(0, BK)
    n_ok = n < N
    k_ok = k < K
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for t0 in range(start, end, BT):
        t = t0 + tl.arange(0, BT)
        t_ok = t < end
        p = tl.load(
            P + t[None, :].to(tl.int64) * stride_pt + n[:, None] * stride_pn,
            mask=n_ok[:, None] & t_ok[None, :],
            other=0.0,
        )
        q = tl.load(
            Q + t[:, None].to(tl.int64) * stride_qt + k[None, :] * stride_qk,
            mask=t_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        if IEEE:
            acc += tl.dot(p, q, input_precision="ieee")
        else:
            acc += tl.dot(p, q)
    base = OUT + c.to(tl.int64) * N * K
    tl.store(base + n[:, None] * K + k[None, :], acc, mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def reduce_chunks(
    PART,
    OUT,
    S,
    RANGE_START,
    RANGE_END,
    NK,
    BLOCK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    """``OUT[a] = s_a sum_{c in [start_a, end_a)} PART[c]`` over flattened ``[N * K]`` blocks, chunks in order."""
    a = tl.program_id(0)
    pb = tl.program_id(1)
    lo = tl.load(RANGE_START + a)
    hi = tl.load(RANGE_END + a)
    idx = pb * BLOCK + tl.arange(0, BLOCK)
    ok = idx < NK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    ptr = PART + lo.to(tl.int64) * NK + idx
    for _ in range(lo, hi):
        acc += tl.load(ptr, mask=ok, other=0.0)
        ptr += NK
    if HAS_SCALE:
        acc = acc * tl.load(S + a)
    tl.store(OUT + a.to(tl.int64) * NK + idx, acc, mask=ok)
