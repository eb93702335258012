"""The Triton kernel of :mod:`twinkle.patch.multi_lora` (imports triton: load it only through that module)."""

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
    Y,
    stride_yt,
    stride_yo,
    TILE_ADAPTER,
    TILE_START,
    TILE_END,
    N_OUT,
    K,
    BT: tl.constexpr,
    BO: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """``Y[t, o] = sum_k X[t, k] * W[a(t), o, k]`` for one tile of tokens of one segment (SGMV).

    Program ``(i, j)`` takes tile ``i`` of the tile table (its adapter index, first and one past
    last token; a tile never crosses a segment) and output columns ``j * BO ...``: the rows of
    ``X`` it reads all belong to one adapter, so the product is one ``[BT, K] x [K, BO]`` tile
    GEMM on that adapter's weight, as in Punica's SGMV. Tokens outside every tile are not
    written. ``UPCAST``: float32 dots (Triton's CPU interpreter multiplies bf16 tiles wrongly);
    ``IEEE``: float32 products without TF32 (float32 inputs on a GPU).
    """
    pid = tl.program_id(0)
    pid_o = tl.program_id(1)
    a = tl.load(TILE_ADAPTER + pid).to(tl.int64)
    start = tl.load(TILE_START + pid)
    end = tl.load(TILE_END + pid)
    t = start + tl.arange(0, BT)
    t_ok = t < end
    o = pid_o * BO + tl.arange(0, BO)
    o_ok = o < N_OUT
    acc = tl.zeros([BT, BO], dtype=tl.float32)
    w_base = W + a * stride_wa
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < K
        x = tl.load(
            X + t[:, None].to(tl.int64) * stride_xt + k[None, :] * stride_xk,
            mask=t_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_base + o[None, :] * stride_wo + k[:, None] * stride_wk, mask=k_ok[:, None] & o_ok[None, :], other=0.0
        )
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    tl.store(
        Y + t[:, None].to(tl.int64) * stride_yt + o[None, :] * stride_yo,
        acc.to(Y.dtype.element_ty),
        mask=t_ok[:, None] & o_ok[None, :],
    )
