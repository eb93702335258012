"""Helpers shared by the fast-path tests (imported by module name; pytest puts this folder on sys.path)."""

from __future__ import annotations

from twinkle.testing import TINY_MODEL_SHAPE, random_token_rows


def tiny_qwen2_config(**overrides):
    """A small Qwen2 config (2 layers, GQA, tied embeddings unless overridden)."""
    from transformers import Qwen2Config

    fields = dict(
        TINY_MODEL_SHAPE,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        use_sliding_window=False,
    )
    fields.update(overrides)
    return Qwen2Config(**fields)


def make_rows(n: int, seed: int = 0, vocab: int = 512, min_len: int = 5, max_len: int = 20) -> list[dict]:
    """Encoded rows of varying length with a masked prompt."""
    return random_token_rows(n, seed, vocab=vocab, min_len=min_len, max_len=max_len)


def forward_backward(model, ids):
    """``(logits, input-embedding gradient, {trainable name: gradient})`` of ``model(ids).sin().sum()``.

    The input embeddings are fed as a leaf that needs a gradient, so every layer's input gradient
    is exercised even with frozen embeddings.
    """
    for p in model.parameters():
        p.grad = None
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, use_cache=False).logits
    out.sin().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), embeds.grad.clone(), grads


# ------------------------------------------------------------------ tolerances from the arithmetic
FP32_UNIT_ROUNDOFF = 2.0**-24
"""u for float32 round-to-nearest: one rounding changes a value by at most a factor (1 + u)."""

TF32_UNIT_ROUNDOFF = 2.0**-11
"""u of TF32 (10 mantissa bits), the rounding of a matmul's inputs on CUDA tensor cores."""


def gamma(k: int, unit: float = FP32_UNIT_ROUNDOFF) -> float:
    """Higham's gamma_k = k u / (1 - k u): a length-k dot product computed in any summation order
    (FMA or not, any number of threads, any SIMD width) differs from the exact one by at most
    ``gamma_k * sum(|a_i b_i|)``.
    """
    ku = k * unit
    assert ku < 0.5, f"reduction of {k} terms too long for the bound at u={unit}"
    return ku / (1.0 - ku)


def matmul_bound(a, b, input_unit: float = 0.0):
    """Elementwise bound on ``|(a @ b) computed - exact|``: ``(2 u_in + gamma_k) |a| @ |b|``.

    ``input_unit`` is the relative rounding of each operand before the products (TF32 on a GPU),
    0 where the products are formed from the fp32 values themselves. Two implementations that
    each meet it differ by at most twice this.
    """
    k = a.shape[-1]
    return (2 * input_unit + gamma(k)) * (a.abs() @ b.abs())


def backward_rtol(config, tokens: int) -> float:
    """Norm-wise relative bound on how two fp32 gradients of the same loss may differ.

    Each gradient is a chain of reductions; the fast path and the plain path reorder every one
    of them (chunked head, fused projections, merged weights). A reduction of at most ``k``
    terms contributes gamma_k relative error, and the errors of a chain add up to first order:
    forward and backward each run the layers' 7 projections and 2 attention products plus the
    head, so the chain is ``2 (9 L + 1)`` reductions long, ``k`` the longest reduction
    (vocabulary, hidden, intermediate or the tokens of a batch). For the tiny test model
    (vocab 512, 2 layers) this is 38 * gamma_512 = 1.2e-3; measured differences are ~4e-7.
    """
    k = max(config.vocab_size, config.hidden_size, config.intermediate_size, tokens)
    return 2 * (9 * config.num_hidden_layers + 1) * gamma(k)


def optimizer_step_bounds(optimizer, param, grad, grad_error):
    """Elementwise bounds on what one optimizer step may differ by when the gradient it was given
    differs by at most ``grad_error`` (elementwise) around ``grad``, from the same prior state.

    Returns ``{name: bound}``: for Adam/AdamW the moments it keeps, which are linear (``exp_avg``
    moves by ``(1 - beta1) d``) or nearly so (``exp_avg_sq`` by ``(1 - beta2) (2 |g| d + d^2)``)
    in the gradient; for plain SGD the parameter's ``update``, ``lr d``. Adam's update itself is
    not compared: it normalizes a gradient near zero to its sign, so rounding noise there is an
    lr-sized step either way, while the moments it is computed from carry the information.
    """
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    if "betas" in group:
        beta1, beta2 = group["betas"]
        return {
            "exp_avg": (1 - beta1) * grad_error,
            "exp_avg_sq": (1 - beta2) * (2 * grad.abs() * grad_error + grad_error**2),
        }
    if group.get("momentum", 0) == 0:
        return {"update": float(group["lr"]) * grad_error}
    raise NotImplementedError(f"no step bounds for {type(optimizer).__name__} with momentum")
