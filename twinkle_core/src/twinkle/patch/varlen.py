"""VarlenAttention: a padding-free (packed) batch attends within each of its sequences, with no mask.

``PaddingFreeProcessor`` packs a batch's sequences into one row, with ``position_ids`` that
restart at each sequence and ``cu_seq_lens_q/k`` (their boundaries). With transformers' sdpa,
the model then reads the boundaries back from ``position_ids`` on the host and builds a
``[T, T]`` block-diagonal mask: memory and FLOPs for every pair of tokens in the row, and sdpa
leaves its flash kernel for one that takes a mask. This patch gives the model an attention
function (``twinkle_varlen``, registered with transformers' ``AttentionInterface``) that takes
the boundaries instead:

* on CUDA, in fp16/bf16: ``torch.nn.attention.varlen.varlen_attn`` (torch's flash kernel over
  cumulative lengths): each sequence attends causally to itself only, no mask, no padding;
* elsewhere (CPU, float32, a torch without ``varlen_attn``, attention dropout): sdpa once per
  sequence, which is still exact and attends over ``sum(len_i^2)`` pairs instead of ``T^2``.

Batches without boundaries (padded batches, whole rows) go to transformers' own sdpa function
with its masks, so nothing else changes. The patch applies to models on sdpa whose layers all
attend fully (no sliding window), whose decoder builds masks with ``create_causal_mask``.

Example::

    model = TransformersModel(model_id=...)            # on by default
    model.set_processor("PaddingFreeProcessor")        # packed batches now take the varlen path
    TransformersModel(..., disabled_patches=["VarlenAttention"])  # transformers' block mask instead
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
from typing import Any, Iterator, Mapping

from twinkle.patch.base import Patch
from twinkle.patch.model_walk import decoder_of, unwrap

#: The name the attention function and its mask function are registered under in transformers.
IMPLEMENTATION = "twinkle_varlen"
_PREVIOUS_ATTR = "_twinkle_attn_before_varlen"


_NOT_LOOKED_UP = object()
_kernel: Any = _NOT_LOOKED_UP


def _varlen_kernel() -> tuple[Any, dict[str, Any], bool, bool] | None:
    """``(varlen_attn, causal keyword arguments, takes scale, takes enable_gqa)``, or ``None`` without it.

    Its keywords changed between torch releases (2.10: ``is_causal``; 2.11: ``window_size=(-1, 0)``
    and ``scale``; 2.12: ``enable_gqa``, which 2.11's flash kernel does without: given fewer key and
    value heads it shares them, H200 test), so they are read from its signature, once: at
    :func:`register_attention`, outside any compiled code (a plain global read there).
    """
    global _kernel
    if _kernel is _NOT_LOOKED_UP:
        _kernel = _look_up_kernel()
    return _kernel


def _look_up_kernel() -> tuple[Any, dict[str, Any], bool, bool] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "scale" in params, "enable_gqa" in params


def _segments(cu_seq_lens: Any) -> list[tuple[int, int]]:
    bounds = [int(b) for b in cu_seq_lens.tolist()]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def packed_attention(
    query: Any,
    key: Any,
    value: Any,
    cu_seq_lens: Any,
    max_length: int,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> Any:
    """Causal attention of packed sequences, each over its own tokens only.

    Args:
        query: ``[T, Hq, D]``, the sequences one after another.
        key, value: ``[T, Hkv, D]`` (``Hq`` a multiple of ``Hkv``: grouped-query attention).
        cu_seq_lens: int32 ``[N + 1]``, where each sequence starts, then ``T``.
        max_length: the longest sequence.
        scaling: the softmax scale (default ``D ** -0.5``).
        dropout: attention dropout probability (training only; takes the per-sequence path).

    Returns:
        ``[T, Hq, D]``.

    Example::

        out = packed_attention(q, k, v, torch.tensor([0, 5, 12], dtype=torch.int32), 7)
    """
    import torch

    groups = query.shape[1] // key.shape[1]
    kernel = _varlen_kernel()
    if (
        kernel is not None
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and value.shape[-1] == query.shape[-1]  # not e.g. DeepSeek's MLA, whose values are narrower
        and not dropout
    ):
        varlen_attn, causal, takes_scale, takes_gqa = kernel
        default_scale = query.shape[-1] ** -0.5
        if takes_scale or scaling is None or abs(scaling - default_scale) <= 1e-12 * default_scale:
            kwargs = dict(causal)
            if takes_scale and scaling is not None:
                kwargs["scale"] = scaling
            if groups > 1 and takes_gqa:
                kwargs["enable_gqa"] = True  # before 2.12 the flash kernel takes fewer key/value heads as they are
            cu = cu_seq_lens.to(device=query.device, dtype=torch.int32)
            return varlen_attn(query, key, value, cu, cu, int(max_length), int(max_length), **kwargs)
    # one sdpa call per sequence ([1, H, len, D] each): exact on any device and dtype
    outs = []
    for start, end in _segments(cu_seq_lens):
        out = torch.nn.functional.scaled_dot_product_attention(
            query[start:end].transpose(0, 1).unsqueeze(0),
            key[start:end].transpose(0, 1).unsqueeze(0),
            value[start:end].transpose(0, 1).unsqueeze(0),
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=groups > 1,
        )
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def varlen_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention interface: packed sequences through :func:`packed_attention`, the rest to sdpa.

    ``query``: ``[B, Hq, T, D]``, ``key``/``value``: ``[B, Hkv, T, D]``. The varlen path takes a
    batch of one packed row with ``cu_seq_lens_q`` among the keyword arguments (the model
    passes them through to each attention call), no mask and causal self-attention (keys share
    the queries' boundaries, as in training, where there is no cache); returns
    ``([B, T, Hq, D], None)`` as transformers' functions do.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if cu is None or attention_mask is not None or not causal or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    max_length = kwargs.get("max_length_q") or query.shape[2]
    window = kwargs.get("sliding_window")
    if window is not None and window < max_length:
        raise ValueError(
            f"twinkle_varlen: a sliding window of {window} tokens binds inside a packed sequence of {max_length}; "
            "switch VarlenAttention off for this model (disabled_patches=['VarlenAttention'])"
        )
    out = packed_attention(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu,
        max_length,
        scaling=scaling,
        dropout=dropout,
    )
    return out.unsqueeze(0), None


#: Set while a packed batch runs on ``twinkle_varlen``: the mask function then builds nothing.
_PACKED = contextvars.ContextVar("twinkle_varlen_packed", default=False)


def _varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """sdpa's mask function, except during a packed forward, where the boundaries replace the mask."""
    from transformers.masking_utils import sdpa_mask

    return None if _PACKED.get() else sdpa_mask(*args, **kwargs)


def register_attention() -> str:
    """Register :func:`varlen_attention_forward` (and sdpa's masks) as ``twinkle_varlen`` with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    _varlen_kernel()  # looked up here, not while a layer is being compiled
    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, varlen_attention_forward)
    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(IMPLEMENTATION, _varlen_mask)
    return IMPLEMENTATION


@contextlib.contextmanager
def _packed_forward() -> Iterator[None]:
    token = _PACKED.set(True)
    try:
        yield
    finally:
        _PACKED.reset(token)


def causal_masks(model: Any, seq_len: int) -> dict[str, None] | None:
    """``{layer_type: None}`` for a batch of whole rows without padding, where the model takes that.

    Without a mask, transformers builds one from ``position_ids``: it reads on the host whether
    the rows are packed (a wait for the GPU in every forward), and while a CUDA graph is being
    captured, where it cannot read, it materializes a ``[T, T]`` mask, which takes sdpa off its
    causal flash kernel. Rows that are each one whole sequence need no mask at all: passing the
    per-layer-type mapping of ``None`` (transformers' own "masks already prepared" form) gives
    sdpa's and flash attention's ``is_causal``. ``None`` (build as usual) unless the attention is
    sdpa or flash attention, every layer attends causally over ``seq_len`` tokens (full, or a
    sliding window at least that long), and the decoder's module builds masks with
    ``create_causal_mask`` (the models that accept the mapping).
    """
    config = getattr(model, "config", None)
    types = getattr(config, "layer_types", None)
    attn = str(getattr(config, "_attn_implementation", "") or "")
    if not types or not (attn in ("sdpa", IMPLEMENTATION) or attn.startswith("flash_attention")):
        return None
    window = getattr(config, "sliding_window", None)
    for kind in set(types):
        if kind != "full_attention" and not (kind == "sliding_attention" and window and seq_len <= window):
            return None
    decoder = decoder_of(model)
    module = sys.modules.get(type(decoder).__module__) if decoder is not None else None
    if module is None or not hasattr(module, "create_causal_mask"):
        return None
    return dict.fromkeys(types)


def packed_inputs(model: Any, batch: Mapping[str, Any], model_inputs: dict[str, Any]) -> Any:
    """Route a packed batch (``cu_seq_lens_q`` in ``batch``) to varlen attention; returns the context to run in.

    Flash-attention implementations and ``twinkle_varlen`` get the boundaries (``cu_seq_lens_q/k``,
    ``max_length_q/k``) in ``model_inputs``. On ``twinkle_varlen`` no mask is built either: models
    that take transformers' per-layer-type mapping get one of ``None`` (no host read of the
    positions); for the others the returned context makes the mask function build nothing.

    Example::

        with packed_inputs(model, batch, model_inputs):
            out = model(**model_inputs)
    """
    attn = str(getattr(getattr(unwrap(model), "config", None), "_attn_implementation", "") or "")
    if "flash" in attn or attn == IMPLEMENTATION:
        for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            model_inputs[key] = batch[key]
    if attn != IMPLEMENTATION or "attention_mask" in model_inputs:
        return contextlib.nullcontext()
    masks = causal_masks(model, batch["max_length_q"])
    if masks is not None:
        model_inputs["attention_mask"] = masks
        return contextlib.nullcontext()
    return _packed_forward()


class VarlenAttention(Patch):
    """Packed (padding-free) batches attend within each sequence: no ``[T, T]`` mask, no cross-sequence FLOPs.

    On CUDA in half precision through torch's ``varlen_attn`` (flash attention over cumulative
    sequence lengths), elsewhere through one sdpa call per sequence; batches that are not packed
    keep transformers' sdpa path. Exact: the same softmax over the same keys per token (CPU test:
    equal to the block-masked dense attention and to each sequence run alone).

    Example::

        TransformersModel(..., disabled_patches=["VarlenAttention"])  # transformers' block mask instead
    """

    name = "VarlenAttention"
    enabled_by_default = True
    order = 10

    def applies_to(self, model: Any) -> bool:
        """Models on sdpa (or already on this patch) whose layers all attend fully, with a mask-building decoder."""
        base = unwrap(model)
        config = getattr(base, "config", None)
        if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", IMPLEMENTATION):
            return False
        types = getattr(config, "layer_types", None)
        if types is not None and any(kind != "full_attention" for kind in types):
            return False
        if types is None and getattr(config, "sliding_window", None):  # e.g. Mistral's 4096 on every layer
            return False
        decoder = decoder_of(base)
        module = sys.modules.get(type(decoder).__module__) if decoder is not None else None
        return module is not None and hasattr(module, "create_causal_mask") and hasattr(base, "set_attn_implementation")

    def apply(self, model: Any) -> None:
        """Switch the model's attention to ``twinkle_varlen`` (idempotent)."""
        base = unwrap(model)
        if base.config._attn_implementation == IMPLEMENTATION:
            return
        previous = base.config._attn_implementation
        base.set_attn_implementation(register_attention())
        if base.config._attn_implementation != IMPLEMENTATION:
            raise RuntimeError(f"{type(base).__name__} kept attention {base.config._attn_implementation!r}")
        base.__dict__[_PREVIOUS_ATTR] = previous

    def revert(self, model: Any) -> None:
        """Back to the attention the model had before (sdpa)."""
        base = unwrap(model)
        previous = base.__dict__.pop(_PREVIOUS_ATTR, None)
        if previous is not None and base.config._attn_implementation == IMPLEMENTATION:
            base.set_attn_implementation(previous)
