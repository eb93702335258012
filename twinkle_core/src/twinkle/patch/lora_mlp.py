"""FusedLoraMLP: a LoRA SwiGLU MLP whose LoRA work rides on the passes the MLP makes anyway.

With :class:`~twinkle.patch.lora_fast.MergedLoraForward` every LoRA projection is one GEMM on
its merged weight, and what LoRA still costs is the memory traffic of its low-rank products. In
a SwiGLU MLP (``down(silu(gate(x)) * up(x))``) most of it is over the widest tensors of the
layer, ``[tokens, intermediate]`` (310 MB each for a 7B layer at 8k tokens): the down
projection reads ``h = silu(gate) * up`` once more in forward for ``h A_down^T``, backward
rebuilds ``h`` from ``gate`` and ``up`` (it is not kept) and reads it for ``A_down``'s gradient,
and the gate and up gradients are read again for ``grad @ B`` and ``B``'s gradient.

This patch runs the whole MLP as one autograd function over two Triton kernels
(:mod:`twinkle.patch.triton_lora`) and three GEMMs each way:

* forward: ``[gate | up] = x [W_gate'; W_up']^T`` as one GEMM on the stacked merged weights;
  one kernel writes ``h`` and computes ``h A_down^T`` from the same registers; ``out = h
  W_down'^T``.
* backward: ``grad_h = grad W_down'`` (GEMM); ``grad B_down`` and ``grad @ B_down`` in one pass
  over ``grad`` (``twinkle::lora_grads``); one kernel reads ``grad_h``, ``gate`` and ``up`` once,
  writes the gate and up gradients side by side and, from the same registers, ``A_down``'s
  gradient (``h`` recomputed, never written), both ``B`` gradients and both ``grad @ B``;
  ``grad_x = [d_gate | d_up] [W_gate'; W_up']`` (one GEMM); ``A_gate``/``A_up``'s gradients in
  one pass over ``x``.

Same arithmetic as the merged path (each product rounded where the merged path rounds it, sums
in float32); it keeps what the merged path with :class:`~twinkle.patch.checkpointing.RecomputeSwiGLU`
keeps (``gate``, ``up``, the merged weights), never ``h``.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

from twinkle.patch.base import Patch

_FUSED_ATTR = "_twinkle_fused_lora_mlp"
#: The forward the fused one falls back to (per call); RecomputeSwiGLU replaces it instead of ``forward``.
FALLBACK_ATTR = "_twinkle_mlp_fallback"


def _fused_case(mlp: Any, x: Any) -> tuple[list[tuple[Any, Any, Any, float]], bool] | None:
    """``([gate, up, down] adapters, keep_merged)`` when ``mlp(x)`` can run fused, else ``None``."""
    import torch

    from twinkle.patch.lora_fast import _MERGED_ATTR, _merge_pays, _plain_adapter

    if not torch.is_grad_enabled():
        return None
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    modes = {getattr(layer, _MERGED_ATTR, None) for layer in layers}
    if len(modes) != 1 or None in modes:
        return None
    members = [_plain_adapter(layer, x) for layer in layers]
    if any(m is None for m in members):
        return None
    (gate, a_g, b_g, _), (up, a_u, b_u, _), (down, _, _, _) = members
    if gate.bias is not None or up.bias is not None or down.bias is not None:
        return None
    if gate.weight.shape != up.weight.shape or a_g.shape != a_u.shape or b_g.shape != b_u.shape:
        return None
    keep = modes.pop() == "keep"
    tokens = x.numel() // x.shape[-1]
    if not (_merge_pays(x, [gate, up], keep) and _merge_pays(x, [down], keep, tokens=tokens)):
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
        x, keep, (s_g, s_u, s_d), w_g.weight, w_u.weight, w_d.weight, a_g, a_u, a_d, b_g, b_u, b_d
    )


class _FusedLoraMLPFunction:
    """``down(silu(gate(x)) * up(x))`` for three merged LoRA projections (torch built on first use).

    ``apply(x, keep_merged, (s_gate, s_up, s_down), W_gate, W_up, W_down, A_gate, A_up, A_down,
    B_gate, B_up, B_down)``; gradients for ``x`` and the six LoRA weights.
    """

    _fn: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls._fn is None:
            import torch

            from twinkle.patch import triton_lora

            triton_lora.register()
            ops = torch.ops.twinkle

            def merged_weights(w_g, w_u, w_d, a_g, a_u, a_d, b_g, b_u, b_d, scalings, scale_b):
                # forward scales B, a backward rebuild A: the same product, but a compiled graph
                # would otherwise dedupe the two and keep the forward's merged weights alive
                s_g, s_u, s_d = scalings if scale_b else (1.0, 1.0, 1.0)
                t_g, t_u, t_d = (1.0, 1.0, 1.0) if scale_b else scalings
                stacked = torch.cat([torch.addmm(w_g, b_g * s_g, a_g * t_g), torch.addmm(w_u, b_u * s_u, a_u * t_u)])
                return stacked, torch.addmm(w_d, b_d * s_d, a_d * t_d)

            class FusedLoraMLP(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x, keep_merged, scalings, w_g, w_u, w_d, a_g, a_u, a_d, b_g, b_u, b_d):  # type: ignore[override]
                    s_g, s_u, s_d = scalings
                    rank = a_g.shape[0]
                    flat = x.reshape(-1, x.shape[-1])
                    w_gu, w_down = merged_weights(w_g, w_u, w_d, a_g, a_u, a_d, b_g, b_u, b_d, scalings, True)
                    gate_up = flat @ w_gu.t()  # [tokens, 2 * intermediate]: gate, then up
                    low = flat @ torch.cat([a_g, a_u]).t()  # one pass over x for both
                    low = low * s_g if s_g == s_u else torch.cat([low[:, :rank] * s_g, low[:, rank:] * s_u], -1)
                    hidden, low_d = ops.swiglu_low(gate_up, a_d.contiguous())
                    low_d = (low_d * s_d).to(x.dtype)
                    out = hidden @ w_down.t()
                    ctx.scalings, ctx.x_shape = scalings, x.shape
                    kept = (w_gu, w_down) if keep_merged else (None, None)
                    ctx.save_for_backward(flat, gate_up, low, low_d, *kept, w_g, w_u, w_d, a_g, a_u, a_d, b_g, b_u, b_d)
                    return out.view(*x.shape[:-1], out.shape[-1])

                @staticmethod
                def backward(ctx, grad):  # type: ignore[override]
                    flat, gate_up, low, low_d, w_gu, w_down, *weights = ctx.saved_tensors
                    w_g, w_u, w_d, a_g, a_u, a_d, b_g, b_u, b_d = weights
                    s_g, s_u, s_d = ctx.scalings
                    rank, dtype = a_g.shape[0], flat.dtype
                    if w_gu is None:
                        w_gu, w_down = merged_weights(w_g, w_u, w_d, a_g, a_u, a_d, b_g, b_u, b_d, ctx.scalings, False)
                    g = grad.reshape(-1, grad.shape[-1]).contiguous()
                    grad_h = g @ w_down
                    gb_d, grad_b_d = ops.lora_grads(g, low_d, b_d.contiguous())
                    d_gate_up, grad_a_d, grad_b_g, grad_b_u, gb_g, gb_u = ops.swiglu_lora_grads(
                        grad_h, gate_up, (gb_d * s_d).to(dtype), low, b_g.contiguous(), b_u.contiguous()
                    )
                    grad_x = (d_gate_up @ w_gu).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
                    grad_a_gu = (
                        torch.cat([gb_g * s_g, gb_u * s_u], -1).to(dtype).t() @ flat
                    )  # [2r, in], one pass over x
                    return (
                        grad_x,
                        None,
                        None,
                        None,
                        None,
                        None,
                        grad_a_gu[:rank],
                        grad_a_gu[rank:],
                        grad_a_d.t().to(dtype),
                        grad_b_g.to(dtype),
                        grad_b_u.to(dtype),
                        grad_b_d.to(dtype),
                    )

            cls._fn = FusedLoraMLP
        return cls._fn


class FusedLoraMLP(Patch):
    """A LoRA SwiGLU MLP as three GEMMs and two Triton passes each way (see the module docstring).

    Applies to SwiGLU MLPs (:data:`~twinkle.patch.checkpointing.SWIGLU_MLPS`, SiLU activation)
    whose gate, up and down projections are LoRA layers on
    :class:`~twinkle.patch.lora_fast.MergedLoraForward`'s path; per call it runs where each of
    them would merge (and otherwise leaves the MLP its previous forward: unmerged LoRA, other
    adapter setups, no gradients).

    Args:
        kernel: ``"auto"`` (default): on CUDA when triton imports; ``True`` also elsewhere (CPU runs
            the kernels under Triton's interpreter: tests only); ``False``: never.

    Example::

        TransformersModel(..., disabled_patches=["FusedLoraMLP"])  # each projection its own merged GEMM
    """

    name = "FusedLoraMLP"
    enabled_by_default = True
    order = 23

    def __init__(self, kernel: str | bool = "auto") -> None:
        if kernel not in ("auto", True, False):
            raise ValueError(f"FusedLoraMLP: kernel must be 'auto', True or False, got {kernel!r}")
        self.kernel = kernel

    def mlps(self, model: Any) -> list[Any]:
        """The SwiGLU MLPs whose three projections are merged lean LoRA layers."""
        from twinkle.patch.checkpointing import swiglu_mlps
        from twinkle.patch.lora_fast import _LEAN_ATTR, _MERGED_ATTR

        found = []
        for mlp in swiglu_mlps(model):
            layers = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
            if not _is_silu(getattr(mlp, "act_fn", None)):
                continue
            if all(getattr(layer, _LEAN_ATTR, False) and getattr(layer, _MERGED_ATTR, None) for layer in layers):
                found.append(mlp)
        return found

    def applies_to(self, model: Any) -> bool:
        """Such MLPs, on CUDA (``kernel="auto"``) with triton available."""
        from twinkle.patch import triton_lora
        from twinkle.patch.fastpath import model_device

        if self.kernel is False or (self.kernel == "auto" and model_device(model).type != "cuda"):
            return False
        return triton_lora.available() and bool(self.mlps(model))

    def apply(self, model: Any) -> None:
        """Give each such MLP the fused forward (idempotent); its previous forward stays the fallback."""
        from twinkle.patch import triton_lora
        from twinkle.patch.lora_fast import _MergedLoraFunction

        triton_lora.register()
        _MergedLoraFunction.get()
        _FusedLoraMLPFunction.get()  # built here, not on first use inside a compiled layer (a graph break)
        for mlp in self.mlps(model):
            if getattr(mlp, _FUSED_ATTR, False):
                continue
            setattr(mlp, FALLBACK_ATTR, mlp.forward)
            mlp.forward = MethodType(_fused_forward, mlp)
            setattr(mlp, _FUSED_ATTR, True)

    def revert(self, model: Any) -> None:
        """The previous forward again."""
        from twinkle.patch.checkpointing import swiglu_mlps

        for mlp in swiglu_mlps(model):
            if getattr(mlp, _FUSED_ATTR, False):
                fallback = mlp.__dict__.pop(FALLBACK_ATTR)
                if getattr(fallback, "__func__", None) is type(mlp).forward:
                    del mlp.forward  # the class's own forward
                else:
                    mlp.forward = fallback
                setattr(mlp, _FUSED_ATTR, False)


def _is_silu(act: Any) -> bool:
    """``torch.nn.SiLU`` or transformers' ``SiLUActivation`` (``hidden_act="silu"``; its forward is ``F.silu``)."""
    import torch

    if isinstance(act, torch.nn.SiLU):
        return True
    cls = type(act)
    return cls.__name__ == "SiLUActivation" and cls.__module__.startswith("transformers.")


def is_fused(mlp: Any) -> bool:
    """Whether :class:`FusedLoraMLP` gave ``mlp`` its forward."""
    return bool(getattr(mlp, _FUSED_ATTR, False))
