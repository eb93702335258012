"""FusedLoraMLP: a LoRA SwiGLU MLP as one autograd function, three GEMMs each way.

With :class:`~twinkle.patch.lora_fast.MergedLoraForward` every LoRA projection is one GEMM on
its merged weight, and an MLP ``down(silu(gate(x)) * up(x))`` runs five: gate and up forward,
then in backward two input-gradient GEMMs whose ``[tokens, hidden]`` results are added, each
with its own low-rank passes. This patch runs the MLP as one function:

* forward: ``[gate | up] = x [W_gate'; W_up']^T``, one GEMM on the stacked merged weights (in a
  compiled layer the merges write straight into the stack); ``h = silu(gate) * up`` (one
  pointwise kernel in a compiled layer); ``x [A_gate; A_up]^T`` in one pass over ``x``; ``out =
  h W_down'^T``.
* backward: ``grad_h = grad W_down'``; one pass (``twinkle::swiglu_backward``, a Triton kernel, on
  CUDA; pointwise torch ops elsewhere) rebuilds ``h`` (never kept: what
  :class:`~twinkle.patch.checkpointing.RecomputeSwiGLU` does) and writes the gate and up
  gradients side by side, so that ``grad_x = [d_gate | d_up] [W_gate'; W_up']`` is one GEMM with
  no sum to add, and ``grad @ B`` and the ``B`` gradients of both take one pass over them
  (``twinkle::lora_grads``, block-diagonal ``B``); ``A_gate``/``A_up``'s gradients in one pass over ``x``.

On a 7B layer at 8k tokens the GEMMs of a layer took 0.49 ms less this way (decision 0010), and
the one-pass SwiGLU backward another 0.35 ms against inductor's two kernels (decision 0011).
``FusedLoraMLP(swiglu_kernels=True)`` instead computes the SwiGLU together with the LoRA
products over its tensors in two Triton kernels (:mod:`twinkle.patch.triton_lora`: ``h A_down^T``
from the registers that write ``h``; ``A_down``'s gradient, both ``B`` gradients and ``grad @ B``
from those of the SwiGLU backward), which would save their reads, but these kernels are slower
than inductor's pointwise kernels plus the separate passes, so they are off.

Same arithmetic as the per-projection merged path, to float32 summation order; exact in float32
on CPU (test_lora_mlp.py).
"""

from __future__ import annotations

from types import MethodType
from typing import Any

from twinkle.patch import triton_lora
from twinkle.patch.base import Patch
from twinkle.patch.kernel_config import kernel_choice
from twinkle.patch.lora_common import (
    FUSED_MLP_ATTR,
    LEAN_ATTR,
    MERGED_ATTR,
    MLP_FALLBACK_ATTR,
    is_fused_mlp,
    layer_kernels,
    low_rank_grads,
    merge,
    merge_pays,
    plain_adapter,
    scale_columns,
    uniform_scaling,
    use_kernel,
)
from twinkle.patch.model_walk import swiglu_mlps

#: How the MLP's SwiGLU runs: "torch", "backward" (twinkle::swiglu_backward) or "fused" (see _FusedLoraMLPFunction).
_SWIGLU_MODE_ATTR = "_twinkle_swiglu_mode"
#: The forward the fused one falls back to (per call); RecomputeSwiGLU replaces it instead of ``forward``.
FALLBACK_ATTR = MLP_FALLBACK_ATTR
#: Whether :class:`FusedLoraMLP` gave an MLP its forward (also :func:`twinkle.patch.lora_common.is_fused_mlp`).
is_fused = is_fused_mlp


def _fused_case(mlp: Any, x: Any) -> tuple[list[tuple[Any, Any, Any, float]], bool] | None:
    """``([gate, up, down] adapters, keep_merged)`` when ``mlp(x)`` can run fused, else ``None``."""
    import torch

    if not torch.is_grad_enabled():
        return None
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    modes = {getattr(layer, MERGED_ATTR, None) for layer in layers}
    if len(modes) != 1 or None in modes:
        return None
    members = [plain_adapter(layer, x) for layer in layers]
    if any(m is None for m in members):
        return None
    (gate, a_g, b_g, _), (up, a_u, b_u, _), (down, _, _, _) = members
    if gate.bias is not None or up.bias is not None or down.bias is not None:
        return None
    if gate.weight.shape != up.weight.shape or a_g.shape != a_u.shape or b_g.shape != b_u.shape:
        return None
    keep = modes.pop() == "keep"
    tokens = x.numel() // x.shape[-1]
    if not (merge_pays(x, [gate, up], keep) and merge_pays(x, [down], keep, tokens=tokens)):
        return None
    return members, keep


def _fused_forward(self: Any, x: Any) -> Any:
    """The MLP through :class:`_FusedLoraMLPFunction` where it applies; the previous forward otherwise."""
    case = _fused_case(self, x)
    if case is None:
        return getattr(self, FALLBACK_ATTR)(x)
    members, keep = case
    (w_g, a_g, b_g, s_g), (w_u, a_u, b_u, s_u), (w_d, a_d, b_d, s_d) = members
    return _FusedLoraMLPFunction.get().apply(
        x,
        keep,
        *layer_kernels(self.gate_proj),
        getattr(self, _SWIGLU_MODE_ATTR, "torch"),
        (s_g, s_u, s_d),
        w_g.weight,
        w_u.weight,
        w_d.weight,
        a_g,
        a_u,
        a_d,
        b_g,
        b_u,
        b_d,
    )


class _FusedLoraMLPFunction:
    """``down(silu(gate(x)) * up(x))`` for three merged LoRA projections (torch built on first use).

    ``apply(x, keep_merged, grad_kernel, merge_kernel, swiglu, (s_gate, s_up, s_down), W_gate,
    W_up, W_down, A_gate, A_up, A_down, B_gate, B_up, B_down)``; gradients for ``x`` and the six LoRA
    weights. ``grad_kernel``: ``grad @ B`` and the ``B`` gradients through ``twinkle::lora_grads``;
    ``merge_kernel``: the merged weights through ``twinkle::lora_merge``; ``swiglu``: how the
    SwiGLU runs: ``"torch"`` (pointwise torch ops, which a compiled layer fuses), ``"backward"``
    (forward as ``"torch"``, the backward through ``twinkle::swiglu_backward``) or ``"fused"`` (it
    and its LoRA products through ``twinkle::swiglu_low`` and ``twinkle::swiglu_lora_grads``).
    """

    _fn: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls._fn is None:
            import torch

            def merged_weights(w_g, w_u, w_d, a_g, a_u, a_d, b_g, b_u, b_d, scalings, in_merge, kernel):
                # forward scales inside the merge, a backward rebuild scales A first: the same
                # product, but a compiled graph would otherwise dedupe the two and keep the
                # forward's merged weights alive
                s_g, s_u, s_d = scalings
                if in_merge:
                    stacked = merge([w_g, w_u], [b_g, b_u], [a_g, a_u], kernel, [s_g, s_u])
                    return stacked, merge([w_d], [b_d], [a_d], kernel, [s_d])
                stacked = merge([w_g, w_u], [b_g, b_u], [a_g * s_g, a_u * s_u], kernel)
                return stacked, merge([w_d], [b_d], [a_d * s_d], kernel)

            class FusedLoraMLP(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x, keep_merged, grad_kernel, merge_kernel, swiglu, scalings, *tensors):  # type: ignore[override]
                    w_g, w_u, w_d, a_g, a_u, a_d, b_g, b_u, b_d = tensors
                    cols = w_g.shape[0]
                    flat = x.reshape(-1, x.shape[-1])
                    w_gu, w_down = merged_weights(*tensors, scalings, True, merge_kernel)
                    gate_up = flat @ w_gu.t()  # [tokens, 2 * intermediate]: gate, then up
                    low = flat @ torch.cat([a_g, a_u]).t()  # unscaled, as low_d: backward applies s
                    if swiglu == "fused":
                        hidden, low_d = torch.ops.twinkle.swiglu_low(gate_up, a_d.contiguous())
                        low_d = low_d.to(x.dtype)
                    else:
                        gate, up = gate_up[:, :cols].float(), gate_up[:, cols:].float()
                        hidden = (torch.nn.functional.silu(gate) * up).to(x.dtype)
                        low_d = hidden @ a_d.t()
                    out = hidden @ w_down.t()
                    ctx.scalings, ctx.x_shape, ctx.cols = scalings, x.shape, cols
                    ctx.grad_kernel, ctx.merge_kernel, ctx.swiglu = grad_kernel, merge_kernel, swiglu
                    kept = (w_gu, w_down) if keep_merged else (None, None)
                    ctx.save_for_backward(flat, gate_up, low, low_d, *kept, *tensors)
                    return out.view(*x.shape[:-1], out.shape[-1])

                @staticmethod
                def backward(ctx, grad):  # type: ignore[override]
                    flat, gate_up, low, low_d, w_gu, w_down, *tensors = ctx.saved_tensors
                    w_g, w_u, w_d, a_g, a_u, a_d, b_g, b_u, b_d = tensors
                    s_g, s_u, s_d = ctx.scalings
                    rank, cols, dtype = a_g.shape[0], ctx.cols, flat.dtype
                    if w_gu is None:
                        w_gu, w_down = merged_weights(*tensors, ctx.scalings, False, ctx.merge_kernel)
                    g = grad.reshape(-1, grad.shape[-1])
                    grad_h = g @ w_down
                    gb_d, grad_b_d = low_rank_grads(g, low_d, b_d, ctx.grad_kernel, s_d)
                    gb_d = gb_d.to(dtype)
                    if ctx.swiglu == "fused":
                        scaled_low = scale_columns(low, (s_g, s_u), (rank, rank))
                        d_gate_up, grad_a_d, grad_b_g, grad_b_u, gb_g, gb_u = torch.ops.twinkle.swiglu_lora_grads(
                            grad_h, gate_up, gb_d, scaled_low, b_g.contiguous(), b_u.contiguous()
                        )
                        grad_a_d = grad_a_d.t()
                        gb_gu = scale_columns(torch.cat([gb_g, gb_u], -1), (s_g, s_u), (rank, rank))
                    else:
                        if ctx.swiglu == "backward":  # one kernel: h rebuilt, both gradients side by side
                            d_gate_up, hidden = torch.ops.twinkle.swiglu_backward(grad_h, gate_up)
                        else:
                            # pointwise ops (inductor: two kernels). h is built from sigmoid here, F.silu in
                            # forward: the same value, but a compiled graph would otherwise dedupe the two
                            # and keep forward's h for backward
                            gate, up = gate_up[:, :cols].float(), gate_up[:, cols:].float()
                            sig = torch.sigmoid(gate)
                            silu = gate * sig
                            hidden = (up * silu).to(dtype)
                            gh = grad_h.float()
                            d_gate = gh * up * sig * (1.0 + gate * (1.0 - sig))
                            d_gate_up = torch.cat([d_gate.to(dtype), (gh * silu).to(dtype)], -1)
                        grad_a_d = gb_d.t() @ hidden  # [r, intermediate]
                        scale = uniform_scaling((s_g, s_u))
                        gb_gu, grad_b_gu = low_rank_grads(
                            d_gate_up, low, torch.block_diag(b_g, b_u), ctx.grad_kernel, 1.0 if scale is None else scale
                        )  # one pass over both gradients
                        grad_b_g, grad_b_u = grad_b_gu[:cols, :rank], grad_b_gu[cols:, rank:]
                        if scale is None:
                            grad_b_g, grad_b_u = grad_b_g * s_g, grad_b_u * s_u
                            gb_gu = scale_columns(gb_gu, (s_g, s_u), (rank, rank))
                    grad_x = (d_gate_up @ w_gu).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
                    grad_a_gu = gb_gu.to(dtype).t() @ flat  # one pass over x
                    grads = (grad_a_gu[:rank], grad_a_gu[rank:], grad_a_d, grad_b_g, grad_b_u, grad_b_d)
                    return (grad_x, *([None] * 8), *(t.to(dtype) for t in grads))  # 5 flags, 3 frozen weights

            cls._fn = FusedLoraMLP
        return cls._fn


class FusedLoraMLP(Patch):
    """A LoRA SwiGLU MLP as one autograd function: three GEMMs each way (see the module docstring).

    Applies to SwiGLU MLPs (:data:`~twinkle.patch.model_walk.SWIGLU_MLPS`, SiLU activation)
    whose gate, up and down projections are LoRA layers on
    :class:`~twinkle.patch.lora_fast.MergedLoraForward`'s path; per call it runs where each of
    them would merge (and otherwise leaves the MLP its previous forward: unmerged LoRA, other
    adapter setups, no gradients). ``grad @ B`` and the ``B`` gradients go through
    ``twinkle::lora_grads`` where ``MergedLoraForward`` chose it.

    Args:
        backward_kernel: the SwiGLU backward in one Triton pass (:func:`twinkle.patch.triton_lora.swiglu_backward`:
            ``h`` and both gradients from one read of ``gate``, ``up`` and ``grad_h``) instead of the
            two kernels inductor makes of the same ops. ``"auto"`` (default:
            ``kernel_config().swiglu_backward_kernel``, env ``TWINKLE_SWIGLU_BACKWARD_KERNEL``): on
            CUDA when triton imports; ``True`` also elsewhere (CPU runs it under Triton's
            interpreter: tests only); ``False``: never.
        swiglu_kernels: the SwiGLU and the LoRA products over its tensors in two Triton kernels
            (:func:`twinkle.patch.triton_lora.swiglu_low`, :func:`~twinkle.patch.triton_lora.swiglu_lora_grads`)
            instead of pointwise torch ops that inductor fuses. Off by default: on the H200 they
            were slower than inductor's kernels plus the separate low-rank passes (7B layer 17.01
            vs 14.80 ms; decision 0010). Needs triton.

    Example::

        TransformersModel(..., disabled_patches=["FusedLoraMLP"])  # each projection its own merged GEMM
    """

    name = "FusedLoraMLP"
    enabled_by_default = True
    order = 23

    def __init__(self, swiglu_kernels: bool = False, backward_kernel: str | bool | None = None) -> None:
        self.swiglu_kernels = bool(swiglu_kernels)
        self.backward_kernel = kernel_choice(
            "backward_kernel", backward_kernel, "swiglu_backward_kernel", "FusedLoraMLP"
        )

    def mlps(self, model: Any) -> list[Any]:
        """The SwiGLU MLPs whose three projections are merged lean LoRA layers."""
        found = []
        for mlp in swiglu_mlps(model):
            layers = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
            if not _is_silu(getattr(mlp, "act_fn", None)):
                continue
            if all(getattr(layer, LEAN_ATTR, False) and getattr(layer, MERGED_ATTR, None) for layer in layers):
                found.append(mlp)
        return found

    def applies_to(self, model: Any) -> bool:
        """Such MLPs (and triton, for ``swiglu_kernels``)."""
        if self.swiglu_kernels and not triton_lora.available():
            return False
        return bool(self.mlps(model))

    def apply(self, model: Any) -> None:
        """Give each such MLP the fused forward (idempotent); its previous forward stays the fallback."""
        if self.swiglu_kernels:
            triton_lora.register()
            swiglu = "fused"
        else:
            swiglu = "backward" if use_kernel(model, self.backward_kernel) else "torch"
        _FusedLoraMLPFunction.get()  # built here, not on first use inside a compiled layer (a graph break)
        for mlp in self.mlps(model):
            setattr(mlp, _SWIGLU_MODE_ATTR, swiglu)
            if getattr(mlp, FUSED_MLP_ATTR, False):
                continue
            setattr(mlp, FALLBACK_ATTR, mlp.forward)
            mlp.forward = MethodType(_fused_forward, mlp)
            setattr(mlp, FUSED_MLP_ATTR, True)

    def revert(self, model: Any) -> None:
        """The previous forward again."""
        for mlp in swiglu_mlps(model):
            if getattr(mlp, FUSED_MLP_ATTR, False):
                fallback = mlp.__dict__.pop(FALLBACK_ATTR)
                if getattr(fallback, "__func__", None) is type(mlp).forward:
                    del mlp.forward  # the class's own forward
                else:
                    mlp.forward = fallback
                mlp.__dict__.pop(_SWIGLU_MODE_ATTR, None)
                setattr(mlp, FUSED_MLP_ATTR, False)


def _is_silu(act: Any) -> bool:
    """``torch.nn.SiLU`` or transformers' ``SiLUActivation`` (``hidden_act="silu"``; its forward is ``F.silu``)."""
    import torch

    if isinstance(act, torch.nn.SiLU):
        return True
    cls = type(act)
    return cls.__name__ == "SiLUActivation" and cls.__module__.startswith("transformers.")
