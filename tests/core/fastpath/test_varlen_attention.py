"""VarlenAttention: packed sequences attend within themselves, exactly as a block-diagonal causal mask does."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from fastpath_test_utils import make_rows, tiny_qwen2_config  # noqa: E402
from twinkle.model.transformers_model import TransformersModel  # noqa: E402
from twinkle.patch import varlen  # noqa: E402
from twinkle.patch.fastpath import unwrap  # noqa: E402

F = torch.nn.functional
LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0}


def _block_causal_mask(lengths):
    total = sum(lengths)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(total)
    return (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])


def _qkv(lengths, heads=4, kv_heads=2, dim=16, seed=0, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return [
        torch.randn(total, h, dim, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
        for h in (heads, kv_heads, kv_heads)
    ]


@pytest.mark.parametrize("lengths", [[1, 7, 3, 12], [9], [2, 2, 2, 2, 2, 1]])
def test_packed_attention_equals_the_block_masked_dense_attention(lengths):
    q, k, v = _qkv(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = varlen.packed_attention(q, k, v, cu, max(lengths), scaling=0.3)
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=_block_causal_mask(lengths),
        scale=0.3,
        enable_gqa=True,
    )[0].transpose(0, 1)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, v], grad)
    want = torch.autograd.grad(ref, [q, k, v], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32; torch 2.11's CPU kernels differ by 1e-6
    # and the first sequence alone: nothing leaks in from the others
    first = lengths[0]
    alone = F.scaled_dot_product_attention(
        q[:first].transpose(0, 1)[None], k[:first].transpose(0, 1)[None], v[:first].transpose(0, 1)[None],
        is_causal=True, scale=0.3, enable_gqa=True,
    )[0].transpose(0, 1)  # fmt: skip
    torch.testing.assert_close(out[:first], alone, rtol=1e-5, atol=1e-6)


def test_the_attention_function_leaves_unpacked_batches_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = 2
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 6, 8, generator=gen)
    k, v = torch.randn(2, 2, 6, 8, generator=gen), torch.randn(2, 2, 6, 8, generator=gen)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    out, _ = varlen.varlen_attention_forward(module, q, k, v, mask, scaling=0.5)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.5)
    torch.testing.assert_close(out, want)
    # boundaries with a mask (or a batch of two rows) are not taken as packed either
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    out, _ = varlen.varlen_attention_forward(module, q, k, v, mask, scaling=0.5, cu_seq_lens_q=cu, max_length_q=3)
    torch.testing.assert_close(out, want)
    # a packed row whose sliding window would bind inside a sequence is refused, not attended wrongly
    packed = [t[:1] for t in (q, k, v)]
    with pytest.raises(ValueError, match="sliding window of 4 tokens"):
        varlen.varlen_attention_forward(module, *packed, None, cu_seq_lens_q=cu, max_length_q=6, sliding_window=4)


def _model(config, patches=None, lora=True, **kwargs):
    model = TransformersModel(config=config, torch_dtype="float32", device="cpu", seed=7, patches=patches, **kwargs)
    if lora:
        model.add_adapter_to_model("default", dict(LORA))
    return model


def test_packed_training_takes_the_varlen_path_without_a_mask(tiny_config, monkeypatch):
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    fast = _model(tiny_config)
    assert "VarlenAttention" in fast.fast_path_patches
    assert unwrap(fast.model).config._attn_implementation == varlen.IMPLEMENTATION
    assert tiny_config._attn_implementation != varlen.IMPLEMENTATION  # the caller's config is not the model's
    padded = _model(tiny_config, patches=[])  # transformers' sdpa with padding masks
    fast.set_processor("PaddingFreeProcessor")
    calls = []
    real = varlen.packed_attention

    def counting(query, key, value, cu_seq_lens, max_length, **kwargs):
        calls.append((cu_seq_lens.tolist(), max_length))
        return real(query, key, value, cu_seq_lens, max_length, **kwargs)

    def no_mask(*args, **kwargs):
        raise AssertionError("a packed batch built a [T, T] mask")

    monkeypatch.setattr(varlen, "packed_attention", counting)
    monkeypatch.setattr(qwen2, "create_causal_mask", no_mask)
    rows = make_rows(5, seed=3)
    lengths = [len(r["input_ids"]) for r in rows]
    out_fast = fast.forward_backward(inputs=rows)
    monkeypatch.undo()
    out_padded = padded.forward_backward(inputs=rows)
    assert len(calls) == tiny_config.num_hidden_layers
    assert calls[0] == ([0, *torch.tensor(lengths).cumsum(0).tolist()], max(lengths))
    assert out_fast["num_tokens"] == out_padded["num_tokens"]
    assert out_fast["loss"] == pytest.approx(out_padded["loss"], rel=1e-5)
    for a, b in zip(fast.state_of().params, padded.state_of().params):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_packed_batches_train_like_the_block_mask(tiny_config):
    """Against transformers' own packed path (the mask read from position_ids), several steps."""
    fast = _model(tiny_config)
    masked = _model(tiny_config, disabled_patches=["VarlenAttention"])
    assert "VarlenAttention" not in masked.fast_path_patches
    assert unwrap(masked.model).config._attn_implementation == "sdpa"
    for model in (fast, masked):
        model.set_processor("PaddingFreeProcessor")
        model.set_optimizer("AdamW", lr=1e-2)
    rows = make_rows(12, seed=5)
    for step in range(3):
        batch = rows[step * 4 : step * 4 + 4]
        a, b = fast.forward_backward(inputs=batch), masked.forward_backward(inputs=batch)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        fast.clip_grad_and_step(max_grad_norm=1.0)
        masked.clip_grad_and_step(max_grad_norm=1.0)
    for p, q in zip(fast.state_of().params, masked.state_of().params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    # evaluation and log-probs take the same path
    a, b = fast.forward_only(rows[:5]), masked.forward_only(rows[:5])
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for x, y in zip(a["logps"], b["logps"]):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5)


def test_models_without_layer_types_take_the_varlen_path_too(monkeypatch):
    """Llama builds one mask with create_causal_mask (no per-layer-type mapping): the mask function builds none."""
    from transformers import LlamaConfig
    from transformers.masking_utils import sdpa_mask

    shape = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    config = LlamaConfig(**shape, vocab_size=512, max_position_embeddings=256)
    model = _model(config, lora=False)
    plain = _model(config, patches=[], lora=False)
    assert "VarlenAttention" in model.fast_path_patches
    rows = make_rows(4, seed=8)
    separate = plain.forward_only(rows)
    calls, masks = [], []
    real = varlen.packed_attention
    monkeypatch.setattr(varlen, "packed_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr("transformers.masking_utils.sdpa_mask", lambda *a, **k: masks.append(1) or sdpa_mask(*a, **k))
    model.set_processor("PaddingFreeProcessor")
    packed = model.forward_only(rows)
    assert len(calls) == config.num_hidden_layers and not masks
    assert packed["loss"] == pytest.approx(separate["loss"], rel=1e-5)
    masks.clear()
    model.set_processor("InputProcessor")
    assert model.forward_only(rows)["loss"] == pytest.approx(separate["loss"], rel=1e-5)
    assert masks, "padded batches still get sdpa's masks"
    # Mistral: a sliding window on every layer and no layer types: keeps sdpa and its masks
    from transformers import MistralConfig

    mistral = _model(MistralConfig(**shape, vocab_size=512, sliding_window=16), lora=False)
    assert "VarlenAttention" not in mistral.fast_path_patches


def test_the_patch_reverts_and_skips_models_it_cannot_serve(tiny_config):
    model = _model(tiny_config, lora=False)
    patch = varlen.VarlenAttention()
    patch.revert(model.model)
    assert unwrap(model.model).config._attn_implementation == "sdpa"
    patch.apply(model.model)
    patch.apply(model.model)  # idempotent
    assert unwrap(model.model).config._attn_implementation == varlen.IMPLEMENTATION
    sliding = _model(tiny_qwen2_config(use_sliding_window=True, sliding_window=8, max_window_layers=0), lora=False)
    assert "VarlenAttention" not in sliding.fast_path_patches  # a window binds inside a sequence: keep masks
    eager = _model(tiny_config, lora=False, attn_implementation="eager")
    assert "VarlenAttention" not in eager.fast_path_patches


@pytest.mark.gpu
def test_varlen_kernel_matches_per_sequence_attention_bf16_cuda():
    assert varlen._varlen_kernel() is not None, "this torch has no torch.nn.attention.varlen"
    lengths = [700, 1, 333, 2048, 64, 900]
    q, k, v = _qkv(lengths, heads=14, kv_heads=2, dim=64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    out = varlen.packed_attention(q, k, v, cu, max(lengths), scaling=64**-0.5)
    ref_inputs = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref = varlen.packed_attention(*ref_inputs, cu, max(lengths), scaling=64**-0.5)  # fp32: per-sequence sdpa
    assert out.dtype == torch.bfloat16 and out.shape == q.shape

    def rel(a, b):
        return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())

    assert rel(out, ref) < 1e-2
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, [q, k, v], grad.bfloat16())
    want = torch.autograd.grad(ref, ref_inputs, grad)
    for a, b in zip(got, want):
        assert rel(a, b) < 2e-2


@pytest.mark.gpu
def test_packed_fast_path_matches_padded_plain_bf16_cuda():
    """Compiled layers with the varlen kernel inside, packed, against the plain padded path."""
    config = tiny_qwen2_config(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    models = []
    for patches, processor in ((None, "PaddingFreeProcessor"), (["Bf16Adapters"], "InputProcessor")):
        model = TransformersModel(config=config, torch_dtype="bfloat16", device="cuda", seed=3, patches=patches)
        model.add_adapter_to_model("default", {**LORA, "init_lora_weights": False})
        model.set_processor(processor)
        model.set_optimizer("AdamW", lr=1e-4)
        models.append(model)
    fast, plain = models
    assert {"VarlenAttention", "CompileDecoderLayers"} <= set(fast.fast_path_patches)
    for step in range(3):
        rows = make_rows(6, seed=10 + step, vocab=4096, min_len=20, max_len=300)
        a, b = fast.forward_backward(inputs=rows), plain.forward_backward(inputs=rows)
        assert a["num_tokens"] == b["num_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2)
        fast.clip_grad_and_step(max_grad_norm=1.0)
        plain.clip_grad_and_step(max_grad_norm=1.0)
