"""On a CUDA GPU, the whole fast path (compiled layers, fused CE, bf16/lean LoRA, fused AdamW) matches
the plain path within bf16 tolerance. Skipped without a GPU (``gpu`` marker)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from fastpath_test_utils import tiny_qwen2_config  # noqa: E402

pytestmark = pytest.mark.gpu

F = torch.nn.functional


def _rel(a, b):
    return float((a.float() - b.float()).norm() / (b.float().norm() + 1e-12))


def test_fused_linear_ce_bf16_cuda_matches_plain():
    from twinkle.patch.fused_linear_ce import linear_cross_entropy

    gen = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 3000, 256, 32000
    hidden = torch.randn(n, h, device="cuda", generator=gen).bfloat16().requires_grad_(True)
    weight = (0.05 * torch.randn(v, h, device="cuda", generator=gen)).bfloat16().requires_grad_(True)
    labels = torch.randint(0, v, (n,), device="cuda", generator=gen)
    labels[::7] = -100
    ref = F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref / 1000, [hidden, weight])
    out = linear_cross_entropy(hidden, weight, labels, chunk_rows=512)  # 5 full chunks + a 440-row tail
    grads = torch.autograd.grad(out / 1000, [hidden, weight])
    assert abs(float(out.detach()) - float(ref.detach())) / float(ref.detach()) < 1e-3
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        assert _rel(got, want) < 1e-2


def _pair(lora: bool):
    from twinkle.model.transformers_model import TransformersModel

    config = tiny_qwen2_config(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4, tie_word_embeddings=False
    )
    models = []
    # fast: every default patch; plain: peft's forward, eager layers, logits + F.cross_entropy, same bf16 adapters
    for patches in (None, ["Bf16Adapters"]):
        model = TransformersModel(config=config, torch_dtype="bfloat16", device="cuda", seed=3, patches=patches)
        if lora:
            model.add_adapter_to_model(
                "default",
                {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": False},
            )
        model.set_optimizer("AdamW", lr=1e-4)
        models.append(model)
    return models


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_fast_path_matches_plain_bf16(lora):
    fast, plain = _pair(lora)
    expected = {
        "FusedLinearCrossEntropy",
        "CompileDecoderLayers",
        "FusedOptimizer",
        "ActivationCheckpointing",
        "RecomputeSwiGLU",
    }
    if lora:
        expected |= {"Bf16Adapters", "FusedLoraLinear", "MergedLoraForward"}  # 1024 tokens: merged
    assert expected <= set(fast.fast_path_patches)
    assert fast.state_of().optimizer.defaults.get("fused") is True
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(3):
        ids = torch.randint(0, 4096, (4, 256), generator=gen)
        batch = {"input_ids": ids, "labels": ids}
        out_fast = fast.forward_backward(inputs=batch)
        out_plain = plain.forward_backward(inputs=batch)
        losses.append((out_fast["loss"], out_plain["loss"]))
        assert out_fast["loss"] == pytest.approx(out_plain["loss"], rel=1e-2)
        if step == 0:
            g_fast = [p.grad for p in fast.state_of().params]
            g_plain = [p.grad for p in plain.state_of().params]
            assert len(g_fast) == len(g_plain) > 0
            for a, b in zip(g_fast, g_plain):
                assert (a is None) == (b is None)
                if a is not None and float(b.float().norm()) > 0:
                    assert _rel(a, b) < 5e-2
        fast.clip_grad_and_step(max_grad_norm=1.0)
        plain.clip_grad_and_step(max_grad_norm=1.0)
    print("losses fast/plain:", losses)
