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


@triton.jit
def _sum_partials(PART, N_PART, N_ROWS, OUT, R, SCALE, block, BP: tl.constexpr, BROWS: tl.constexpr, BR: tl.constexpr):
    """``OUT[rows] = SCALE * sum_p PART[p, rows, :R]`` for a block of ``BROWS`` rows, rounded once.

    ``BP`` partials are loaded at a time (one ``[BP, BROWS, BR]`` tile), so a long sum is a few
    wide loads rather than ``N_PART`` dependent ones.
    """
    rows = block * BROWS + tl.arange(0, BROWS)
    r = tl.arange(0, BR)
    p = tl.arange(0, BP)
    ok = rows < N_ROWS
    acc = tl.zeros([BROWS, BR], dtype=tl.float32)
    for p0 in range(0, N_PART, BP):
        parts = p0 + p
        offs = (parts[:, None, None] * N_ROWS + rows[None, :, None]) * BR + r[None, None, :]
        mask = (parts[:, None, None] < N_PART) & ok[None, :, None]
        acc += tl.sum(tl.load(PART + offs, mask=mask, other=0.0), axis=0)
    out = (acc * SCALE).to(OUT.dtype.element_ty)
    tl.store(OUT + rows[:, None] * R + r[None, :], out, mask=ok[:, None] & (r[None, :] < R))


@triton.jit
def lora_grads_finish(
    PART_GB,
    PART_DB,
    GB,
    DB,
    N_TOK,
    N_OUT,
    P_GB,
    P_DB,
    R,
    SCALE,
    BLOCKS_GB,
    BP: tl.constexpr,
    BROWS: tl.constexpr,
    BR: tl.constexpr,
):
    """Both results of :func:`lora_grad_partials` from its partials, in one launch.

    Programs below ``BLOCKS_GB`` sum ``PART_GB`` (``[P_GB, N_TOK, BR]``) into ``GB`` (``[N_TOK, R]``),
    the others ``PART_DB`` (``[P_DB, N_OUT, BR]``) into ``DB`` (``[N_OUT, R]``); each times ``SCALE``
    (LoRA's scaling, so the forward keeps ``x A^T`` unscaled) and rounded once to the outputs' dtype.
    """
    pid = tl.program_id(0)
    if pid < BLOCKS_GB:
        _sum_partials(PART_GB, P_GB, N_TOK, GB, R, SCALE, pid, BP, BROWS, BR)
    else:
        _sum_partials(PART_DB, P_DB, N_OUT, DB, R, SCALE, pid - BLOCKS_GB, BP, BROWS, BR)


@triton.jit
def swiglu_forward_low(
    GATE_UP,
    stride_gu,
    H,
    A,
    PART_LOW,
    N_TOK,
    N_COL,
    R,
    T_PER_PROG,
    C_PER_PROG,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BR: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``H = silu(gate) * up`` for a ``[T_PER_PROG, C_PER_PROG]`` block, and its share of ``H @ A^T``.

    ``GATE_UP``: ``[N_TOK, 2 * N_COL]`` with row stride ``stride_gu``, ``gate`` then ``up`` (one
    GEMM's output). ``H``: ``[N_TOK, N_COL]`` contiguous, in their dtype (the product rounded
    once, from float32). ``A``: ``[R, N_COL]``, the down projection's LoRA ``A``.
    ``PART_LOW[pid_c]`` (``[N_TOK, BR]`` float32) receives the rows of this program's token range
    summed over its column range, from ``H`` as stored; the host sums over programs.
    """
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = tl.arange(0, BR)
    r_ok = r < R
    t_begin = pid_t * T_PER_PROG
    t_end = tl.minimum(t_begin + T_PER_PROG, N_TOK)
    c_begin = pid_c * C_PER_PROG
    c_end = tl.minimum(c_begin + C_PER_PROG, N_COL)
    for t0 in range(t_begin, t_end, BT):
        t = t0 + tl.arange(0, BT)
        t_ok = t < t_end
        acc = tl.zeros([BT, BR], dtype=tl.float32)
        for c0 in range(c_begin, c_end, BC):
            c = c0 + tl.arange(0, BC)
            c_ok = c < c_end
            mask = t_ok[:, None] & c_ok[None, :]
            offs = t[:, None] * stride_gu + c[None, :]
            gate = tl.load(GATE_UP + offs, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(GATE_UP + N_COL + offs, mask=mask, other=0.0).to(tl.float32)
            h = (gate * tl.sigmoid(gate) * up).to(H.dtype.element_ty)
            tl.store(H + t[:, None] * N_COL + c[None, :], h, mask=mask)
            a = tl.load(A + r[None, :] * N_COL + c[:, None], mask=c_ok[:, None] & r_ok[None, :], other=0.0)
            if UPCAST:
                acc += tl.dot(h.to(tl.float32), a.to(tl.float32))
            else:
                acc += tl.dot(h, a)
        tl.store(PART_LOW + (pid_c * N_TOK + t[:, None]) * BR + r[None, :], acc, mask=t_ok[:, None])


@triton.jit
def swiglu_backward(GH, GATE_UP, stride_gu, D, H, N_COL, BC: tl.constexpr):
    """The SwiGLU backward of one row's ``BC`` columns: the gate and up gradients side by side, and ``h``.

    Reads ``GH`` (``[tokens, N_COL]`` contiguous, the gradient of ``h = silu(gate) * up``) and
    ``GATE_UP`` (``[tokens, 2 * N_COL]`` with row stride ``stride_gu``: ``gate``, then ``up``) once.
    Writes ``D`` (``[tokens, 2 * N_COL]``: ``d_gate``, then ``d_up``) and ``H`` (``[tokens, N_COL]``, for
    the down projection's ``A`` gradient), each rounded once from float32, in the arithmetic of
    the pointwise torch ops it replaces.
    """
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    ok = c < N_COL
    gate = tl.load(GATE_UP + row * stride_gu + c, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GATE_UP + row * stride_gu + N_COL + c, mask=ok, other=0.0).to(tl.float32)
    gh = tl.load(GH + row * N_COL + c, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dtype = D.dtype.element_ty
    tl.store(H + row * N_COL + c, (up * silu).to(dtype), mask=ok)
    tl.store(D + row * (2 * N_COL) + c, (gh * up * sig * (1.0 + gate * (1.0 - sig))).to(dtype), mask=ok)
    tl.store(D + row * (2 * N_COL) + N_COL + c, (gh * silu).to(dtype), mask=ok)


@triton.jit
def swiglu_backward_lora(
    GH,
    GATE_UP,
    stride_gu,
    D,
    GBD,
    LOW,
    stride_low,
    BG,
    BU,
    PART_DA,
    PART_DBG,
    PART_DBU,
    PART_GBG,
    PART_GBU,
    N_TOK,
    N_COL,
    R,
    RD,
    T_PER_PROG,
    C_PER_PROG,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BR: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The SwiGLU backward with every LoRA product of the MLP that reads its tensors, in one pass.

    Reads ``GH`` (the gradient of ``h = silu(gate) * up``, ``[N_TOK, N_COL]`` contiguous) and
    ``GATE_UP`` (as for :func:`swiglu_forward_low`) once. Writes ``D`` (``[N_TOK, 2 * N_COL]``: the gate
    gradient, then the up gradient, in the input dtype). Per program, float32 partials it owns:

    * ``PART_DA[pid_t]`` ``[N_COL, BR]``: ``h^T @ GBD``, the down projection's ``A`` gradient
      (transposed; ``GBD`` is ``s_down * grad_out @ B_down``, ``[N_TOK, RD]``), ``h`` recomputed
      here rather than kept or written;
    * ``PART_DBG``/``PART_DBU[pid_t]`` ``[N_COL, BR]``: ``d_gate^T @ low_gate``, ``d_up^T @ low_up``
      (``LOW``: ``[N_TOK, 2R]`` with row stride ``stride_low``, the scaled rank-r activations of
      gate, then up): their ``B`` gradients;
    * ``PART_GBG``/``PART_GBU[pid_c]`` ``[N_TOK, BR]``: ``d_gate @ B_gate``, ``d_up @ B_up``
      (``BG``/``BU``: ``[N_COL, R]``), which give their ``A`` gradients.

    The products use the gradients as stored (rounded to the input dtype), as separate kernels
    reading them back would.
    """
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = tl.arange(0, BR)
    r_ok = r < R
    rd_ok = r < RD
    t_begin = pid_t * T_PER_PROG
    t_end = tl.minimum(t_begin + T_PER_PROG, N_TOK)
    c_begin = pid_c * C_PER_PROG
    c_end = tl.minimum(c_begin + C_PER_PROG, N_COL)
    dtype = D.dtype.element_ty
    for c0 in range(c_begin, c_end, BC):
        c = c0 + tl.arange(0, BC)
        c_ok = c < c_end
        b_mask = c_ok[:, None] & r_ok[None, :]
        bg = tl.load(BG + c[:, None] * R + r[None, :], mask=b_mask, other=0.0)
        bu = tl.load(BU + c[:, None] * R + r[None, :], mask=b_mask, other=0.0)
        if UPCAST:
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        acc_da = tl.zeros([BC, BR], dtype=tl.float32)
        acc_dbg = tl.zeros([BC, BR], dtype=tl.float32)
        acc_dbu = tl.zeros([BC, BR], dtype=tl.float32)
        for t0 in range(t_begin, t_end, BT):
            t = t0 + tl.arange(0, BT)
            t_ok = t < t_end
            mask = t_ok[:, None] & c_ok[None, :]
            offs = t[:, None] * stride_gu + c[None, :]
            gate = tl.load(GATE_UP + offs, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(GATE_UP + N_COL + offs, mask=mask, other=0.0).to(tl.float32)
            gh = tl.load(GH + t[:, None] * N_COL + c[None, :], mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            h = (silu * up).to(dtype)
            d_up = (gh * silu).to(dtype)
            d_gate = (gh * up * sig * (1.0 + gate * (1.0 - sig))).to(dtype)
            d_offs = t[:, None] * (2 * N_COL) + c[None, :]
            tl.store(D + d_offs, d_gate, mask=mask)
            tl.store(D + N_COL + d_offs, d_up, mask=mask)
            row_mask = t_ok[:, None] & r_ok[None, :]
            gbd = tl.load(GBD + t[:, None] * RD + r[None, :], mask=t_ok[:, None] & rd_ok[None, :], other=0.0)
            low_g = tl.load(LOW + t[:, None] * stride_low + r[None, :], mask=row_mask, other=0.0)
            low_u = tl.load(LOW + t[:, None] * stride_low + R + r[None, :], mask=row_mask, other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
                d_up = d_up.to(tl.float32)
                d_gate = d_gate.to(tl.float32)
                gbd = gbd.to(tl.float32)
                low_g = low_g.to(tl.float32)
                low_u = low_u.to(tl.float32)
            acc_da += tl.dot(tl.trans(h), gbd)
            acc_dbg += tl.dot(tl.trans(d_gate), low_g)
            acc_dbu += tl.dot(tl.trans(d_up), low_u)
            gbg = tl.dot(d_gate, bg)
            gbu = tl.dot(d_up, bu)
            gbg_ptr = PART_GBG + (pid_c * N_TOK + t[:, None]) * BR + r[None, :]
            gbu_ptr = PART_GBU + (pid_c * N_TOK + t[:, None]) * BR + r[None, :]
            if c0 != c_begin:
                gbg += tl.load(gbg_ptr, mask=t_ok[:, None], other=0.0)
                gbu += tl.load(gbu_ptr, mask=t_ok[:, None], other=0.0)
            tl.store(gbg_ptr, gbg, mask=t_ok[:, None])
            tl.store(gbu_ptr, gbu, mask=t_ok[:, None])
        part = (pid_t * N_COL + c[:, None]) * BR + r[None, :]
        tl.store(PART_DA + part, acc_da, mask=c_ok[:, None])
        tl.store(PART_DBG + part, acc_dbg, mask=c_ok[:, None])
        tl.store(PART_DBU + part, acc_dbu, mask=c_ok[:, None])


@triton.jit
def lora_merge_tile(
    W,
    B,
    A,
    OUT,
    ROW0,
    N_OUT,
    N_IN,
    R,
    SCALE,
    BO: tl.constexpr,
    BI: tl.constexpr,
    BR: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``OUT[ROW0 + o, i] = W[o, i] + SCALE (B @ A)[o, i]`` for one ``[BO, BI]`` tile, in one pass over ``W``.

    ``W``: ``[N_OUT, N_IN]``; ``B``: ``[N_OUT, R]``; ``A``: ``[R, N_IN]``; all contiguous;
    ``SCALE``: LoRA's scaling. The rank-r product is summed and scaled in float32 and added to
    ``W`` before the one rounding to ``OUT``'s dtype, as cuBLAS's ``addmm(W, B, A, alpha=SCALE)``
    does; ``OUT`` may hold several merged weights stacked by rows (``ROW0``).
    """
    o = tl.program_id(0) * BO + tl.arange(0, BO)
    i = tl.program_id(1) * BI + tl.arange(0, BI)
    r = tl.arange(0, BR)
    o_ok = o < N_OUT
    i_ok = i < N_IN
    r_ok = r < R
    w = tl.load(W + o[:, None] * N_IN + i[None, :], mask=o_ok[:, None] & i_ok[None, :], other=0.0)
    b = tl.load(B + o[:, None] * R + r[None, :], mask=o_ok[:, None] & r_ok[None, :], other=0.0)
    a = tl.load(A + r[:, None] * N_IN + i[None, :], mask=r_ok[:, None] & i_ok[None, :], other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
        a = a.to(tl.float32)
    merged = w.to(tl.float32) + tl.dot(b, a) * SCALE
    out = OUT + (ROW0 + o[:, None]) * N_IN + i[None, :]
    tl.store(out, merged.to(OUT.dtype.element_ty), mask=o_ok[:, None] & i_ok[None, :])
