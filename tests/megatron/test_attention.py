"""SdpaAttention (torch SDPA as megatron's core attention) against megatron's own DotProductAttention."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def attention(megatron_cpu):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType
    from twinkle_megatron import compat
    from twinkle_megatron.attention import sdpa_attention_class

    compat.seed_model_parallel(0, "cpu")
    config = TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    return sdpa_attention_class()(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def _qkv(seq: int = 6, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(seq, batch, 4, 8, generator=g),
        torch.randn(seq, batch, 2, 8, generator=g),
        torch.randn(seq, batch, 2, 8, generator=g),
    )


def test_sdpa_equals_megatrons_attention_causal_and_padded(attention) -> None:
    q, k, v = _qkv()
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)[None, None].expand(2, 1, 6, 6)
    padded = causal | torch.tensor([[0] * 6, [0] * 4 + [1] * 2], dtype=torch.bool)[:, None, None, :]
    ours_none, ours_causal, ours_padded = (
        attention(q, k, v, None),
        attention(q, k, v, causal),
        attention(q, k, v, padded),
    )
    # megatron's own local attention on the same module (its forward, bypassing the SDPA override)
    base = type(attention).__mro__[1]
    ref_causal, ref_padded = base.forward(attention, q, k, v, causal), base.forward(attention, q, k, v, padded)
    assert (ours_none - ours_causal).abs().max() < 1e-6  # no mask = causal
    assert (ours_causal - ref_causal).abs().max() < 1e-5
    assert (ours_padded - ref_padded)[:4].abs().max() < 1e-5  # real query rows (the padded ones are ignored)
    assert torch.isfinite(ours_padded).all()


def test_fallback_to_megatron_gets_the_causal_mask_when_the_batch_passed_none(attention) -> None:
    q, k, v = _qkv()
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)[None, None].expand(2, 1, 6, 6)
    expected = attention(q, k, v, causal)
    attention.config.apply_query_key_layer_scaling = True  # a setting SDPA does not express: megatron's path
    try:
        assert (attention(q, k, v, None) - expected).abs().max() < 1e-5
    finally:
        attention.config.apply_query_key_layer_scaling = False
