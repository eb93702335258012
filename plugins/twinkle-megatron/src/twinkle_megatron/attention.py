"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for megatron's local layers.

Without Transformer Engine, megatron-core's local ``DotProductAttention`` materializes the
``[batch, heads, seq, seq]`` scores, runs an unfused (or apex-fused) softmax over them and
keeps the probabilities for backward: memory quadratic in the sequence and a few seconds per
step at 7B. :class:`SdpaAttention` hands the same computation to torch's SDPA, which picks a
flash or memory-efficient kernel on CUDA and a fused CPU kernel otherwise.

Masks: ``attention_mask=None`` means "causal only" (the flash path, ``is_causal=True``); a
boolean ``[b, 1, sq, sk]`` mask (True = blocked, megatron's convention) is passed to SDPA
inverted, with each query allowed to see itself: a padding row whose keys are all blocked then
attends to itself instead of giving NaN (its loss is ignored, but NaN would poison the gradients).

Anything SDPA cannot express exactly (attention bias, packed-sequence params, query-key layer
scaling, sliding windows, softmax offsets) falls back to megatron's own implementation (given
the causal mask when the batch passed none).
"""

from __future__ import annotations

from typing import Any

_SDPA: type | None = None


def sdpa_attention_class() -> type:
    """The :class:`SdpaAttention` class (built on first use: megatron-core is imported lazily)."""
    global _SDPA
    if _SDPA is None:
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        class SdpaAttention(DotProductAttention):
            """megatron's ``DotProductAttention`` computed by torch SDPA (see the module docstring)."""

            def _exact_with_sdpa(self, attention_bias: Any, packed_seq_params: Any) -> bool:
                config = self.config
                return (
                    attention_bias is None
                    and packed_seq_params is None
                    and self.softmax_offset is None
                    and not config.apply_query_key_layer_scaling
                    and config.window_size is None
                )

            def forward(
                self,
                query: Any,
                key: Any,
                value: Any,
                attention_mask: Any,
                attn_mask_type: Any = None,
                attention_bias: Any = None,
                packed_seq_params: Any = None,
            ) -> Any:
                import torch
                from torch.nn.functional import scaled_dot_product_attention

                if not self._exact_with_sdpa(attention_bias, packed_seq_params):
                    if attention_mask is None:  # "causal only": megatron's attention wants the mask itself
                        sq, sk = query.shape[0], key.shape[0]
                        attention_mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).triu(1)[None, None]
                    return super().forward(
                        query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
                    )
                seq, batch = query.shape[0], query.shape[1]
                # [s, b, heads, dim] -> [b, heads, s, dim]
                q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
                groups = q.shape[1] // k.shape[1]
                if groups > 1:
                    k = k.repeat_interleave(groups, dim=1)
                    v = v.repeat_interleave(groups, dim=1)
                mask = None
                if attention_mask is not None:
                    eye = torch.eye(seq, k.shape[2], dtype=torch.bool, device=attention_mask.device)
                    mask = ~attention_mask | eye
                dropout = self.attention_dropout.p if self.training else 0.0
                context = scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=self.softmax_scale
                )
                # [b, heads, s, dim] -> [s, b, heads * dim]
                return context.permute(2, 0, 1, 3).reshape(seq, batch, -1)

        _SDPA = SdpaAttention
    return _SDPA
