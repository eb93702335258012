"""RecomputeSwiGLU: same loss and gradients, and the MLP's product is no longer kept for backward."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from fastpath_test_utils import tiny_qwen2_config  # noqa: E402
from twinkle.patch.checkpointing import RecomputeSwiGLU, swiglu_mlps  # noqa: E402


def _lora_model(seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_qwen2_config(), attn_implementation="sdpa")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return peft.get_peft_model(model, config)


def _step(model, ids):
    """Loss, LoRA gradients and the bytes autograd kept for backward."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes() if t.device.type != "meta" else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved)


def test_same_numbers_and_less_kept_for_backward():
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    plain, patched = _lora_model(), _lora_model()
    patch = RecomputeSwiGLU()
    assert not patch.applies_to(patched)  # CUDA only by default
    assert swiglu_mlps(patched) and all(type(m).__name__ == "Qwen2MLP" for m in swiglu_mlps(patched))
    patch.apply(patched)
    loss_p, grads_p, kept_p = _step(plain, ids)
    loss_r, grads_r, kept_r = _step(patched, ids)
    torch.testing.assert_close(loss_r, loss_p, rtol=0, atol=0)
    assert grads_r.keys() == grads_p.keys() and any("mlp.down_proj.lora_A" in k for k in grads_r)
    for name in grads_p:
        torch.testing.assert_close(grads_r[name], grads_p[name], rtol=1e-6, atol=1e-7, msg=name)
    # eager autograd keeps gate, silu(gate), up and the product; the patch keeps gate and up
    config = tiny_qwen2_config()
    product = ids.numel() * config.intermediate_size * 4  # float32
    assert kept_p - kept_r >= config.num_hidden_layers * product


def test_recompute_traces_under_torch_compile_and_reverts():
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    plain, patched = _lora_model(), _lora_model()
    RecomputeSwiGLU().apply(patched)
    compiled = torch.compile(patched, backend="aot_eager")
    loss_p, grads_p, _ = _step(plain, ids)
    loss_c = compiled(input_ids=ids, labels=ids).loss
    loss_c.backward()
    torch.testing.assert_close(loss_c.detach(), loss_p, rtol=1e-6, atol=1e-6)
    got = {n.replace("_orig_mod.", ""): p.grad for n, p in compiled.named_parameters() if p.grad is not None}
    for name in grads_p:
        torch.testing.assert_close(got[name], grads_p[name], rtol=1e-5, atol=1e-6, msg=name)
    RecomputeSwiGLU().revert(patched)
    assert all("forward" not in vars(m) for m in swiglu_mlps(patched))
