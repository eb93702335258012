"""Fast LoRA: adapters in the base model's half dtype and a lean ``Linear`` forward.

peft keeps LoRA weights in float32 by default (``autocast_adapter_dtype=True``), so every
adapted layer of a bf16 model casts its input to float32, runs two float32 matmuls and casts
back; and its forward walks adapters, dropout and variant checks in Python. The two patches
here remove that work:

* :class:`Bf16Adapters` stores LoRA weights in the base layer's dtype (bf16/fp16). This is a
  precision choice, not an identity: it is what "plain HF+PEFT, bf16 adapters" does, and the
  AdamW update then runs on bf16 weights.
* :class:`FusedLoraLinear` gives each ``peft.tuners.lora.Linear`` a forward of three calls,
  ``y = linear(x, W, b) + linear(linear(x, A) * scaling, B)``: the scaling multiplies the
  rank-r activations instead of the ``out_features``-wide product, there is no dropout,
  dtype-cast or adapter loop, and inside a compiled decoder layer (``CompileDecoderLayers``)
  the add fuses into whatever consumes ``y`` (RoPE, SiLU*up, the residual) instead of
  writing and re-reading the sum. It applies per call only to the plain case (one active
  vanilla adapter, no dropout, not merged, same dtypes) and falls back to peft's forward
  otherwise; the math is peft's (``scaling`` moves across a linear map), rounding differs
  only in the order of the scaling.
* :class:`MergedLoraForward` makes that forward, for batches with enough tokens, one GEMM on a
  merged weight ``W + s B A`` with LoRA's own low-rank gradients (decision 0008).
"""

from __future__ import annotations

from types import MethodType
from typing import Any

from twinkle.patch.base import Patch
from twinkle.patch.fp8 import fp8_linear
from twinkle.patch.kernel_config import kernel_choice
from twinkle.patch.lora_common import (
    FP8_ATTR,
    GRAD_KERNEL_ATTR,
    LEAN_ATTR,
    MERGE_KERNEL_ATTR,
    MERGED_ATTR,
    cat,
    count_kept_merged,
    layer_kernels,
    lora_linear_layers,
    low_rank_grads,
    merge,
    merge_pays,
    plain_adapter,
    scale_columns,
    uniform_scaling,
    use_kernel,
)
from twinkle.patch.model_walk import set_flag

_GROUP_ATTR = "_twinkle_group"  # on a group's first layer: the other layers that read its input
_GROUP_OUT_ATTR = "_twinkle_group_out"  # on the others: (input, output) left by the first
_GROUP_STACK_ATTR = "_twinkle_group_stack"  # on a group's first layer: one GEMM on the stacked weights


class Bf16Adapters(Patch):
    """Store LoRA weights in the base layer's half dtype (bf16/fp16) instead of float32.

    Applies when the model's weights are bf16 or fp16. The Parameter objects stay the same
    (only their data changes dtype), so optimizers built afterwards see half-precision
    weights; build the optimizer after adding adapters (the usual order).

    Example::

        TransformersModel(..., torch_dtype="bfloat16", disabled_patches=["Bf16Adapters"])  # peft's fp32 adapters
    """

    name = "Bf16Adapters"
    enabled_by_default = True
    order = 10

    def applies_to(self, model: Any) -> bool:
        """Half-precision base weights and at least one LoRA layer."""
        import torch

        half = (torch.bfloat16, torch.float16)
        return any(layer.get_base_layer().weight.dtype in half for layer in lora_linear_layers(model))

    def apply(self, model: Any) -> None:
        """Cast every ``lora_A``/``lora_B`` weight to the dtype of its base layer (if that is half)."""
        import torch

        for layer in lora_linear_layers(model):
            dtype = layer.get_base_layer().weight.dtype
            if dtype not in (torch.bfloat16, torch.float16):
                continue
            for container in (layer.lora_A, layer.lora_B):
                for sub in container.values():
                    for param in sub.parameters():
                        if param.dtype != dtype:
                            param.data = param.data.to(dtype)


def _lean_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """``y = x W^T + b + scaling * (x A^T) B^T`` in two calls; peft's forward for anything else.

    With :class:`MergedLoraForward` the product runs through the merged weight where that pays,
    with :class:`~twinkle.patch.fp8.Fp8FrozenGemms` the base product in FP8,
    and with :class:`GroupedLoraProjections` the first layer of a group (``q_proj`` of q/k/v,
    ``gate_proj`` of gate/up) computes every member's output from the same input in one GEMM
    and leaves the others theirs (``_twinkle_group_out``), which they return when called next
    with that same input.
    """
    import torch

    fallback = self._twinkle_peft_forward
    if args or kwargs:
        return fallback(x, *args, **kwargs)
    pending = getattr(self, _GROUP_OUT_ATTR, None)
    if pending is not None:
        setattr(self, _GROUP_OUT_ATTR, None)
        if pending[0] is x:
            return pending[1]
    plain = plain_adapter(self, x)
    if plain is None:
        return fallback(x)
    merged = getattr(self, MERGED_ATTR, None)
    if merged:
        keep = merged == "keep"
        followers = getattr(self, _GROUP_ATTR, None)
        if followers:
            members = [plain, *(plain_adapter(layer, x) for layer in followers)]
            if all(m is not None for m in members) and merge_pays(x, [m[0] for m in members], keep):
                stack = getattr(self, _GROUP_STACK_ATTR, False)
                outs = _merged_lora(x, members, keep, layer_kernels(self), stack)
                for layer, out in zip(followers, outs[1:]):
                    setattr(layer, _GROUP_OUT_ATTR, (x, out))
                return outs[0]
        if merge_pays(x, [plain[0]], keep):
            return _merged_lora(x, [plain], keep, layer_kernels(self))[0]
    base, weight_a, weight_b, scaling = plain
    fp8 = getattr(self, FP8_ATTR, None)
    if fp8 is not None:
        result = fp8_linear(x, fp8, base.bias)
    else:
        result = torch.nn.functional.linear(x, base.weight, base.bias)
    # scaling on the rank-r activations (r columns, not out_features); the add is left as a plain
    # add so that, in compiled layers, inductor fuses it into the consumer (RoPE, SiLU*up, residual)
    low_rank = torch.nn.functional.linear(x, weight_a) * scaling
    return result + torch.nn.functional.linear(low_rank, weight_b)


def _merged_lora(
    x: Any,
    members: list[tuple[Any, Any, Any, float]],
    keep: bool,
    kernels: tuple[bool, bool] = (False, False),
    stack: bool = True,
) -> tuple[Any, ...]:
    """Each member's ``x (W_i + s_i B_i A_i)^T + b_i`` on its merged weight, one output per member.

    ``members`` are :func:`plain_adapter` tuples of layers that read ``x``. ``stack``: one GEMM on
    the stacked merged weights (the outputs are views of one ``[..., sum(out)]`` result); otherwise
    one GEMM per member, the low-rank work over ``x`` still shared. ``kernels``: ``(grad, merge)``,
    the low-rank gradients through ``twinkle::lora_grads`` and the merged weights through
    ``twinkle::lora_merge`` (:mod:`twinkle.patch.triton_lora`).
    """
    import torch

    bases = [m[0] for m in members]
    biases = [base.bias for base in bases]
    if not torch.is_grad_enabled():  # forward only (log-probs, eval): no x A^T to keep
        merged = [merge([base.weight], [b], [a], kernels[1], [s]) for base, a, b, s in members]
        if not stack or len(members) == 1:
            return tuple(torch.nn.functional.linear(x, w, bias) for w, bias in zip(merged, biases))
        out = torch.nn.functional.linear(x, cat(merged), _stacked_bias(biases, [base.weight for base in bases]))
    else:
        fn = _MergedLoraFunction.get()
        out = fn.apply(
            x,
            keep,
            *kernels,
            stack or len(members) == 1,
            tuple(m[3] for m in members),
            *(base.weight for base in bases),
            *biases,
            *(m[1] for m in members),
            *(m[2] for m in members),
        )
        if not stack and len(members) > 1:
            return out
    if len(members) == 1:
        return (out,)
    return out.split([base.weight.shape[0] for base in bases], -1)


def _stacked_bias(biases: list[Any], weights: list[Any]) -> Any:
    """The members' biases stacked (zeros for a member without one); ``None`` when none has one."""

    if all(b is None for b in biases):
        return None
    return cat([b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)])


class _MergedLoraFunction:
    """``y_i = x (W_i + s_i B_i A_i)^T + b_i`` with LoRA's low-rank gradients (torch on first use).

    One LoRA layer, or several reading the same input (q/k/v, gate/up). Forward merges each
    adapter into a copy of its frozen weight (one ``addmm`` over the weight, which for a layer of
    8k tokens is smaller than its activations) and runs the base GEMM on it, so no ``[tokens,
    out]`` rank-r product is written and re-read. Backward: ``grad_x = grad @ W_merged`` (no
    rank-r input gradient to add), ``grad_B_i = s_i grad_i^T (x A_i^T)`` and ``grad_A_i = s_i
    (grad_i B_i)^T x``: the same low-rank gradients as the unmerged path, never the ``[out, in]``
    weight gradient. For a group, ``x`` is read once for all members' ``x A^T`` and once for all
    ``A`` gradients, and ``stack`` chooses between one GEMM on the stacked merged weights each way
    (one output, ``[..., sum(out)]``; in a compiled layer inductor writes the merges straight into
    the stack; ``B`` block-diagonal) and one GEMM per member (an output each; the input gradients
    accumulated inside cuBLAS, ``addmm``).

    ``apply(x, keep_merged, grad_kernel, merge_kernel, stack, scalings, *weights, *biases, *lora_As,
    *lora_Bs)``, ``n`` of each; ``grad_kernel`` computes ``grad B`` and the ``B`` gradients in one
    pass over ``grad`` (``twinkle::lora_grads``, :mod:`twinkle.patch.triton_lora`) instead of two
    cuBLAS calls, ``merge_kernel`` each merged weight in one pass over ``W`` (``twinkle::lora_merge``).
    """

    _fn: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls._fn is None:
            import torch

            class MergedLora(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x, keep_merged, grad_kernel, merge_kernel, stack, scalings, *tensors):  # type: ignore[override]
                    n = len(scalings)
                    weights, biases = tensors[:n], tensors[n : 2 * n]
                    weights_a, weights_b = tensors[2 * n : 3 * n], tensors[3 * n :]
                    adapters = list(zip(weights, weights_a, weights_b, scalings))
                    if stack:
                        merged = [merge(list(weights), list(weights_b), list(weights_a), merge_kernel, scalings)]
                        outs = (torch.nn.functional.linear(x, merged[0], _stacked_bias(list(biases), list(weights))),)
                    else:
                        merged = [merge([w], [b], [a], merge_kernel, [s]) for w, a, b, s in adapters]
                        outs = tuple(torch.nn.functional.linear(x, w, bias) for w, bias in zip(merged, biases))
                    flat = x.reshape(-1, x.shape[-1])
                    ranks = tuple(a.shape[0] for a in weights_a)
                    low = flat @ cat(list(weights_a)).t()  # unscaled: backward applies s where it sums
                    ctx.scalings, ctx.ranks, ctx.stack = scalings, ranks, stack
                    ctx.grad_kernel, ctx.merge_kernel = grad_kernel, merge_kernel
                    ctx.x_shape, ctx.kept = x.shape, len(merged) if keep_merged else 0
                    kept = merged if keep_merged else []
                    ctx.save_for_backward(flat, low, *kept, *weights, *weights_a, *weights_b)
                    return outs[0] if stack else outs

                @staticmethod
                def backward(ctx, *grads):  # type: ignore[override]
                    flat, low, *rest = ctx.saved_tensors
                    scalings, ranks = ctx.scalings, ctx.ranks
                    n = len(scalings)
                    merged, rest = rest[: ctx.kept], rest[ctx.kept :]
                    weights, weights_a, weights_b = rest[:n], rest[n : 2 * n], rest[2 * n :]
                    dtype = flat.dtype
                    if ctx.stack:
                        gs = [grads[0].reshape(-1, grads[0].shape[-1])]
                    else:  # an output nobody used has no gradient: zeros for its part
                        gs = [
                            g.reshape(-1, g.shape[-1]) if g is not None else flat.new_zeros(flat.shape[0], w.shape[0])
                            for g, w in zip(grads, weights)
                        ]
                    grad_x = None
                    if ctx.needs_input_grad[0]:
                        if not merged:
                            # scaled on A here, inside the merge in forward: otherwise a compiled
                            # graph dedupes the two merges and keeps the forward's merged weight
                            scaled_a = [a * s for a, s in zip(weights_a, scalings)]
                            if ctx.stack:
                                merged = [merge(list(weights), list(weights_b), scaled_a, ctx.merge_kernel)]
                            else:
                                merged = [
                                    merge([w], [b], [a], ctx.merge_kernel)
                                    for w, b, a in zip(weights, weights_b, scaled_a)
                                ]
                        acc = gs[0] @ merged[0]
                        for g, w in zip(gs[1:], merged[1:]):
                            acc = torch.addmm(acc, g, w)
                        grad_x = acc.view(ctx.x_shape)
                    if ctx.stack:
                        block_b = weights_b[0] if n == 1 else torch.block_diag(*weights_b)
                        scale = uniform_scaling(scalings)  # None: the members differ, scaled one by one below
                        gb, grad_b = low_rank_grads(
                            gs[0], low, block_b, ctx.grad_kernel, 1.0 if scale is None else scale
                        )
                        # [sum(out), sum(r)]: member i's block on the diagonal
                        grads_b, row, col = [], 0, 0
                        for w, r, s in zip(weights, ranks, scalings):
                            block = grad_b[row : row + w.shape[0], col : col + r]
                            grads_b.append(block if scale is not None else block * s)
                            row, col = row + w.shape[0], col + r
                        if scale is None:
                            gb = scale_columns(gb, scalings, ranks)
                    else:
                        parts = [
                            low_rank_grads(g, piece, b, ctx.grad_kernel, s)
                            for g, piece, b, s in zip(gs, low.split(list(ranks), -1), weights_b, scalings)
                        ]
                        gb = cat([part[0] for part in parts], -1)
                        grads_b = [part[1] for part in parts]
                    grad_a = gb.to(dtype).t() @ flat  # [sum(r), in]
                    grads_a = list(grad_a.split(list(ranks)))
                    return (grad_x, None, None, None, None, None, *([None] * (2 * n)), *grads_a, *grads_b)

            cls._fn = MergedLora
        return cls._fn


class FusedLoraLinear(Patch):
    """A lean forward for peft LoRA ``Linear`` layers (see the module docstring).

    Example::

        TransformersModel(..., disabled_patches=["FusedLoraLinear"])  # peft's own forward
    """

    name = "FusedLoraLinear"
    enabled_by_default = True
    order = 20

    def applies_to(self, model: Any) -> bool:
        """Models with peft LoRA ``Linear`` layers."""
        return bool(lora_linear_layers(model))

    def apply(self, model: Any) -> None:
        """Give each LoRA Linear the lean forward (idempotent)."""
        for layer in lora_linear_layers(model):
            if getattr(layer, LEAN_ATTR, False):
                continue
            layer._twinkle_peft_forward = layer.forward
            layer.forward = MethodType(_lean_forward, layer)
            setattr(layer, LEAN_ATTR, True)

    def revert(self, model: Any) -> None:
        """Back to peft's forward."""
        for layer in lora_linear_layers(model):
            if getattr(layer, LEAN_ATTR, False):
                del layer.forward
                del layer._twinkle_peft_forward
                setattr(layer, LEAN_ATTR, False)


class MergedLoraForward(Patch):
    """LoRA through a merged weight: ``x (W + s B A)^T`` in one GEMM, LoRA's own low-rank gradients.

    The unmerged LoRA update writes a ``[tokens, out_features]`` rank-r product and adds it in
    forward, and a ``[tokens, in_features]`` one in backward: at 8k tokens that traffic is most
    of what LoRA costs over the frozen layer. Merging the adapter into a bf16 copy of the frozen
    weight (``addmm(W, s B, A)``, cheaper than those products once a batch has more tokens than
    ``out * in / (out + in)``) leaves one GEMM each way; the adapter's gradients are computed
    from ``x A^T`` and ``grad B`` exactly as before, never through the ``[out, in]`` weight
    gradient. Takes effect through :class:`FusedLoraLinear`'s forward, per call, only where it
    pays (see :func:`merge_pays`); small batches stay unmerged.

    Numerics: the merged weight is rounded to the model's dtype once, which moves the output by
    about one bf16 rounding step (the unmerged path rounds the base and LoRA products and their
    sum); exact in float32 (CPU test).

    Args:
        keep_merged: keep the merged weight for backward (the default) instead of rebuilding it
            there. Keeping costs one bf16 copy of the adapted weights of every layer whose
            activations are held (about 0.43 GiB per 7B layer, 12 GiB for the model; none beyond
            one layer under gradient checkpointing, and ActivationCheckpointing counts it);
            rebuilding costs that memory nothing and, on an H200, all of the speed: 7B layer at 8k
            tokens 14.77 ms kept, 15.50 rebuilt, 15.44 unmerged, 13.53 without adapters.
        grad_kernel: compute ``grad B`` and the ``B`` gradients in one pass over the output
            gradient (:mod:`twinkle.patch.triton_lora`) instead of two cuBLAS calls. ``"auto"``
            (default: ``kernel_config().lora_grad_kernel``, env ``TWINKLE_LORA_GRAD_KERNEL``): on CUDA
            when triton imports; ``True`` also elsewhere (CPU runs it under Triton's interpreter:
            tests only); ``False``: never.
        merge_kernel: build each merged weight in one pass over ``W`` (``twinkle::lora_merge``)
            instead of ``addmm``, which copies ``W`` into its output and then rewrites it: half the
            traffic of the merge. Same choices (``lora_merge_kernel``, ``TWINKLE_LORA_MERGE_KERNEL``).

    Example::

        TransformersModel(..., disabled_patches=["MergedLoraForward"])  # the unmerged LoRA product
    """

    name = "MergedLoraForward"
    enabled_by_default = True
    order = 21

    def __init__(
        self, keep_merged: bool = True, grad_kernel: str | bool | None = None, merge_kernel: str | bool | None = None
    ) -> None:
        self.keep_merged = keep_merged
        self.grad_kernel = kernel_choice("grad_kernel", grad_kernel, "lora_grad_kernel", "MergedLoraForward")
        self.merge_kernel = kernel_choice("merge_kernel", merge_kernel, "lora_merge_kernel", "MergedLoraForward")

    def applies_to(self, model: Any) -> bool:
        """Models whose LoRA layers run :class:`FusedLoraLinear`'s forward."""
        return any(getattr(layer, LEAN_ATTR, False) for layer in lora_linear_layers(model))

    def apply(self, model: Any) -> None:
        """Mark each lean LoRA layer to merge (the choice is made per call)."""
        mode = "keep" if self.keep_merged else "recompute"
        grad_kernel = use_kernel(model, self.grad_kernel)
        merge_kernel = use_kernel(model, self.merge_kernel)
        _MergedLoraFunction.get()  # built here, not on first use inside a compiled layer (a graph break)
        for layer in lora_linear_layers(model):
            if getattr(layer, LEAN_ATTR, False):
                setattr(layer, MERGED_ATTR, mode)
                setattr(layer, GRAD_KERNEL_ATTR, grad_kernel)
                setattr(layer, MERGE_KERNEL_ATTR, merge_kernel)
        count_kept_merged(model)

    def revert(self, model: Any) -> None:
        """Back to the unmerged LoRA product."""
        for layer in lora_linear_layers(model):
            layer.__dict__.pop(MERGED_ATTR, None)
            layer.__dict__.pop(GRAD_KERNEL_ATTR, None)
            layer.__dict__.pop(MERGE_KERNEL_ATTR, None)
        set_flag(model, "kept_merged_bytes", 0)


class GroupedLoraProjections(Patch):
    """The LoRA projections that read one input (q/k/v, gate/up) computed together, each way.

    With :class:`MergedLoraForward`, every LoRA ``Linear`` is one GEMM on its merged weight, and
    each member of ``q_proj``/``k_proj``/``v_proj`` (``gate_proj``/``up_proj``) still makes its
    own passes over their shared input ``x``: one for ``x A^T`` in forward, one for ``A``'s
    gradient in backward. This patch makes the first member (``q_proj``, ``gate_proj``) compute
    the whole group: ``x A^T`` and ``A``'s gradient for all members in one pass over ``x`` each,
    the input gradients accumulated in one buffer (``addmm``), and with ``stack=True`` also one
    GEMM each way on the members' stacked merged weights (in a compiled layer the merges write
    straight into the stack; ``grad B`` and the ``B`` gradients then take one pass over the
    group's gradient). The other members find their output left for them and return it (when
    called with the same input tensor; anything else runs their own forward).

    Applies per call where every member is the plain LoRA case and merging the whole group pays
    (:func:`merge_pays` on the stacked weight); numerically the same products as the members'
    own merged GEMMs (CPU test: float64-equal to the unmerged path).

    Args:
        stack: one GEMM on the stacked merged weights (default ``False``: one per member, so each
            output is its own contiguous tensor; the stacked GEMM measured slower on a 7B layer,
            15.19 vs 14.68 ms, decision 0009: its outputs are strided views into RoPE and
            attention).

    Example::

        TransformersModel(..., enabled_patches=["GroupedLoraProjections"])  # switch it on by name
    """

    name = "GroupedLoraProjections"
    enabled_by_default = False
    order = 22
    #: Sibling attributes called in this order with the same input by a module's forward.
    GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

    def __init__(self, stack: bool = False) -> None:
        self.stack = stack

    def groups(self, model: Any) -> list[list[Any]]:
        """Each group of merged lean LoRA layers that share a parent and an input width."""
        found = []
        for module in model.modules():
            for names in self.GROUPS:
                members = [getattr(module, name, None) for name in names]
                if not all(getattr(m, MERGED_ATTR, None) and getattr(m, LEAN_ATTR, False) for m in members):
                    continue
                bases = [m.get_base_layer() for m in members]
                if len({b.weight.shape[1] for b in bases}) == 1 and len({b.weight.dtype for b in bases}) == 1:
                    found.append(members)
        return found

    def applies_to(self, model: Any) -> bool:
        """Models with at least one group of layers on :class:`MergedLoraForward`'s path."""
        return bool(self.groups(model))

    def apply(self, model: Any) -> None:
        """Give each group's first layer the others (the choice to group is made per call)."""
        for leader, *followers in self.groups(model):
            setattr(leader, _GROUP_ATTR, tuple(followers))
            setattr(leader, _GROUP_STACK_ATTR, self.stack)
            for layer in followers:
                setattr(layer, _GROUP_OUT_ATTR, None)

    def revert(self, model: Any) -> None:
        """Each projection its own GEMM again."""
        for layer in lora_linear_layers(model):
            layer.__dict__.pop(_GROUP_ATTR, None)
            layer.__dict__.pop(_GROUP_STACK_ATTR, None)
            layer.__dict__.pop(_GROUP_OUT_ATTR, None)
