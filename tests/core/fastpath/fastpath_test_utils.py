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
