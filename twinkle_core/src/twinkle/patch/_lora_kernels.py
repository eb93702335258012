"""The Triton kernel of :mod:`twinkle.patch.triton_lora` (imports triton: load it only through that module)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lora_grad_partials(
    G,
    stride_g,
    LOW,
    B,
    PART_GB,
    PART_DB,
    N_TOK,
    N_OUT,
    R,
    T_PER_PROG,
    O_PER_PROG,
    BT: tl.constexpr,
    BO: tl.constexpr,
    BR: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One ``[T_PER_PROG, O_PER_PROG]`` block of ``G``, read once, for both low-rank products.

    ``PART_GB[pid_o]`` (``[N_TOK, BR]`` float32) receives this block's share of ``G @ B``: the rows of
    its T range summed over its O range. ``PART_DB[pid_t]`` (``[N_OUT, BR]`` float32) receives its share
    of ``G^T @ LOW``: the rows of its O range summed over its T range. Each program owns its slices
    of both, so there are no atomics; the host sums the partials over programs. ``UPCAST``: float32
    dots (Triton's CPU interpreter multiplies bf16 tiles wrongly; on a GPU the tiles go to the
    tensor cores in their own dtype).
    """
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    r = tl.arange(0, BR)
    r_ok = r < R
    t_begin = pid_t * T_PER_PROG
    t_end = tl.minimum(t_begin + T_PER_PROG, N_TOK)
    o_begin = pid_o * O_PER_PROG
    o_end = tl.minimum(o_begin + O_PER_PROG, N_OUT)
    for o0 in range(o_begin, o_end, BO):
        o = o0 + tl.arange(0, BO)
        o_ok = o < o_end
        b = tl.load(B + o[:, None] * R + r[None, :], mask=o_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        acc_db = tl.zeros([BO, BR], dtype=tl.float32)
        for t0 in range(t_begin, t_end, BT):
            t = t0 + tl.arange(0, BT)
            t_ok = t < t_end
            g = tl.load(G + t[:, None] * stride_g + o[None, :], mask=t_ok[:, None] & o_ok[None, :], other=0.0)
            low = tl.load(LOW + t[:, None] * R + r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0)
            if UPCAST:
                g = g.to(tl.float32)
                low = low.to(tl.float32)
            acc_db += tl.dot(tl.trans(g), low)
            gb = tl.dot(g, b)
            gb_ptr = PART_GB + (pid_o * N_TOK + t[:, None]) * BR + r[None, :]
            if o0 != o_begin:
                gb += tl.load(gb_ptr, mask=t_ok[:, None], other=0.0)
            tl.store(gb_ptr, gb, mask=t_ok[:, None])
        db_ptr = PART_DB + (pid_t * N_OUT + o[:, None]) * BR + r[None, :]
        tl.store(db_ptr, acc_db, mask=o_ok[:, None])
