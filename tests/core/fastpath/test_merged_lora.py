"""MergedLoraForward: ``x (W + s B A)^T`` with LoRA's low-rank gradients equals the unmerged LoRA (CPU, float64)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from twinkle.patch.lora_common import merge_pays as _merge_pays  # noqa: E402
from twinkle.patch.lora_fast import FusedLoraLinear, MergedLoraForward, lora_linear_layers  # noqa: E402


def _lora_net(bias: bool = True):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 24, bias=bias), torch.nn.GELU(), torch.nn.Linear(24, 12, bias=bias))
    net = net.double().requires_grad_(False)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False)
    model = peft.get_peft_model(net, config)
    FusedLoraLinear().apply(model)
    return model


def _run(model, x):
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(x.requires_grad)
    out = model(x)
    out.sin().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return out.detach(), (x.grad.clone() if x.grad is not None else None), grads


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_merged_equals_unmerged(keep, bias, input_grad):
    model = _lora_net(bias)
    x = torch.randn(3, 40, 16, dtype=torch.double, requires_grad=input_grad)  # 120 tokens: merging pays
    want = _run(model, x)
    patch = MergedLoraForward(keep_merged=keep)
    assert patch.applies_to(model)
    patch.apply(model)
    got = _run(model, x)
    torch.testing.assert_close(got[0], want[0])
    if input_grad:
        torch.testing.assert_close(got[1], want[1])
    else:
        assert got[1] is None
    assert len(got[2]) == 4  # lora_A and lora_B of both layers; base weights stay without gradient
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w)
    patch.revert(model)
    assert all(not hasattr(layer, "_twinkle_merged") for layer in lora_linear_layers(model))


def test_merged_forward_without_gradients():
    model = _lora_net()
    x = torch.randn(3, 40, 16, dtype=torch.double)
    with torch.no_grad():
        want = model(x)
        MergedLoraForward().apply(model)
        got = model(x)
    torch.testing.assert_close(got, want)


def test_merged_path_traces_whole_under_compile():
    model = _lora_net()
    x = torch.randn(2, 64, 16, dtype=torch.double, requires_grad=True)
    want = _run(model, x)
    MergedLoraForward().apply(model)
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    model.compile(backend=counter, fullgraph=True)  # a graph break would raise
    got = _run(model, x)
    torch._dynamo.reset()
    assert counter.frame_count == 1
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w)


def test_merging_only_where_it_moves_fewer_bytes():
    base = [torch.nn.Linear(3584, 18944, bias=False).requires_grad_(False)]  # 7B gate_proj: 3014 tokens
    few, many = torch.empty(1, 2048, 3584, device="meta"), torch.empty(4, 2048, 3584, device="meta")
    assert not _merge_pays(few, base, keep=True) and _merge_pays(many, base, keep=True)
    assert not _merge_pays(torch.empty(1, 4096, 3584, device="meta"), base, keep=False)  # recompute: 6028
    with torch.no_grad():  # no backward: pays from in_features tokens
        assert _merge_pays(torch.empty(1, 3584, 3584, device="meta"), base, keep=True)
        assert not _merge_pays(torch.empty(1, 3583, 3584, device="meta"), base, keep=True)
    # a group is one [sum(out), in] weight: 7B gate + up pay from 3291 tokens, gate alone from 3014
    group = base + [torch.nn.Linear(3584, 18944, bias=False).requires_grad_(False)]
    assert _merge_pays(torch.empty(1, 3100, 3584, device="meta"), base, keep=True)
    assert not _merge_pays(torch.empty(1, 3100, 3584, device="meta"), group, keep=True)
    group[1].weight.requires_grad_(True)  # one trained base weight in a group: not merged
    assert not _merge_pays(many, group, keep=True)
    base[0].weight.requires_grad_(True)  # a trained base weight needs its own gradient: never merged
    assert not _merge_pays(many, base, keep=True)


def test_patch_needs_the_lean_forward():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0"]))
    assert not MergedLoraForward().applies_to(model)  # FusedLoraLinear not applied
    FusedLoraLinear().apply(model)
    assert MergedLoraForward().applies_to(model)


@pytest.mark.gpu
def test_merged_bf16_cuda_within_rounding_of_unmerged():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1024, 2816)).to("cuda", torch.bfloat16).requires_grad_(False)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False)
    model = peft.get_peft_model(net, config)
    FusedLoraLinear().apply(model)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    x = torch.randn(4, 1024, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    want = _run(model, x)
    MergedLoraForward().apply(model)
    got = _run(model, x)

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    assert rel(got[0], want[0]) < 1e-2
    assert rel(got[1], want[1]) < 1e-2
    for g, w in zip(got[2], want[2]):
        assert rel(g, w) < 2e-2
