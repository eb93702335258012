"""FusedLoraMLP: a LoRA SwiGLU MLP as one function equals the per-projection merged path.

With pointwise torch ops (the default) and with its two Triton SwiGLU kernels; on CPU the Triton
kernels run under the interpreter (the root conftest sets ``TRITON_INTERPRET=1`` without an
NVIDIA device), in float32; on the H200 the same tests run compiled.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from fastpath_test_utils import forward_backward, tiny_qwen2_config  # noqa: E402
from twinkle.patch import lora_mlp, triton_lora  # noqa: E402
from twinkle.patch.checkpointing import RecomputeSwiGLU, swiglu_mlps  # noqa: E402
from twinkle.patch.kernel_config import KernelConfig, kernel_config, kernel_settings  # noqa: E402
from twinkle.patch.lora_fast import FusedLoraLinear, MergedLoraForward  # noqa: E402
from twinkle.patch.lora_mlp import FusedLoraMLP  # noqa: E402

needs_triton = pytest.mark.skipif(not triton_lora.available(), reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 model: tf32 tensor cores in the kernels on a GPU, exact float32 in the interpreter
TOL = dict(rtol=2e-2, atol=2e-2) if DEVICE == "cuda" else dict(rtol=1e-4, atol=1e-5)


def _lora_qwen2(dropout: float = 0.0, keep_merged: bool = True, grad_kernel: bool = False, **lora):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_qwen2_config(), dtype=torch.float32, attn_implementation="sdpa")
    config = peft.LoraConfig(
        **{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora},
        lora_dropout=dropout,
        init_lora_weights=False,
    )
    model = peft.get_peft_model(model, config).to(DEVICE)
    FusedLoraLinear().apply(model)
    MergedLoraForward(keep_merged=keep_merged, grad_kernel=grad_kernel, merge_kernel=grad_kernel).apply(model)
    return model


def _ids(tokens: int = 200):
    return torch.randint(0, 512, (2, tokens // 2), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _count_fused(monkeypatch) -> list[int]:
    calls = []
    fn = lora_mlp._FusedLoraMLPFunction.get()
    real = fn.apply

    def counting(x, *args):
        calls.append(x.shape[-2])
        return real(x, *args)

    monkeypatch.setattr(fn, "apply", counting)
    return calls


def _rel(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _assert_same(got, want):
    # norm-relative: float32 sums in another order (one GEMM over [gate | up] instead of two,
    # the kernels' tiles) move single elements of large gradients by more than an elementwise rtol
    bound = 2e-2 if DEVICE == "cuda" else 1e-5
    assert _rel(got[0], want[0]) < bound
    assert _rel(got[1], want[1]) < bound
    assert got[2].keys() == want[2].keys() and all("lora_" in n for n in got[2])
    for name in want[2]:
        assert _rel(got[2][name], want[2][name]) < bound, name


@pytest.mark.parametrize(
    ("keep_merged", "kernels"),
    [
        (True, None),
        (False, None),
        pytest.param(True, "grad", marks=needs_triton),
        pytest.param(True, "backward", marks=needs_triton),
        pytest.param(False, "backward", marks=needs_triton),
        pytest.param(True, "all", marks=needs_triton),
    ],
)
def test_fused_mlp_equals_per_projection(monkeypatch, keep_merged, kernels):
    # kernels: None (cuBLAS, pointwise torch ops), "grad" (twinkle::lora_grads and ::lora_merge, the
    # SwiGLU backward's default: the kernel on CUDA, torch ops on CPU), "backward" (+ the
    # twinkle::swiglu_backward kernel), "all" (+ the fused SwiGLU kernels)
    model = _lora_qwen2(keep_merged=keep_merged, grad_kernel=kernels is not None)
    ids = _ids()
    want = forward_backward(model, ids)
    backward_kernel = {None: False, "grad": "auto", "backward": True, "all": False}[kernels]
    patch = FusedLoraMLP(swiglu_kernels=kernels == "all", backward_kernel=backward_kernel)
    assert patch.applies_to(model)
    assert len(patch.mlps(model)) == model.config.num_hidden_layers
    patch.apply(model)
    calls = _count_fused(monkeypatch)
    got = forward_backward(model, ids)
    assert calls == [100] * model.config.num_hidden_layers
    modes = {getattr(mlp, lora_mlp._SWIGLU_MODE_ATTR) for mlp in patch.mlps(model)}
    auto = "backward" if DEVICE == "cuda" else "torch"
    assert modes == {{None: "torch", "grad": auto, "backward": "backward", "all": "fused"}[kernels]}
    _assert_same(got, want)


@pytest.mark.parametrize("kernels", [None, pytest.param("backward", marks=needs_triton)])
def test_scalings_differ_between_projections(monkeypatch, kernels):
    # rank_pattern / alpha_pattern: gate, up and down with their own scaling (ranks of gate and up equal);
    # with the kernels, lora_grads sums gate/up unscaled and each member's scaling is applied after
    model = _lora_qwen2(
        grad_kernel=kernels is not None, alpha_pattern={"gate_proj": 2, "up_proj": 16, "down_proj": 4}
    )
    mlp = swiglu_mlps(model)[0]
    assert (
        len({mlp.gate_proj.scaling["default"], mlp.up_proj.scaling["default"], mlp.down_proj.scaling["default"]}) == 3
    )
    ids = _ids()
    want = forward_backward(model, ids)
    FusedLoraMLP(backward_kernel=kernels is not None).apply(model)
    calls = _count_fused(monkeypatch)
    got = forward_backward(model, ids)
    assert calls
    _assert_same(got, want)


def test_falls_back_where_it_does_not_apply(monkeypatch):
    model = _lora_qwen2()
    FusedLoraMLP().apply(model)
    calls = _count_fused(monkeypatch)
    forward_backward(model, _ids(8))  # 4 tokens a row: merging does not pay, so neither does the fused MLP
    with torch.no_grad():
        model(_ids())  # no gradients: each projection's merged forward
    assert calls == []
    # gate and up of different ranks: per projection
    model = _lora_qwen2(rank_pattern={"up_proj": 2})
    FusedLoraMLP().apply(model)
    calls = _count_fused(monkeypatch)
    forward_backward(model, _ids())
    assert calls == []
    # dropout: peft's forward for every projection, so no MLP is fused at all
    model = _lora_qwen2(dropout=0.1)
    assert FusedLoraMLP().mlps(model) != []  # the layers are lean; dropout is decided per call
    FusedLoraMLP().apply(model)
    calls = _count_fused(monkeypatch)
    model.train()
    forward_backward(model, _ids())
    assert calls == []


def test_recompute_swiglu_becomes_the_fallback_and_reverts():
    model = _lora_qwen2()
    mlp = swiglu_mlps(model)[0]
    recompute, fused = RecomputeSwiGLU(), FusedLoraMLP()
    ids = _ids()
    want = forward_backward(model, ids)
    recompute.apply(model)  # as TransformersModel applies patches before the adapter exists
    fused.apply(model)
    recompute.apply(model)  # idempotent
    assert lora_mlp.is_fused(mlp) and mlp.forward.__func__ is lora_mlp._fused_forward
    assert mlp._twinkle_mlp_fallback.__func__.__name__ == "_swiglu_forward"
    _assert_same(forward_backward(model, ids), want)
    fused.revert(model)
    assert mlp.forward.__func__.__name__ == "_swiglu_forward"
    fused.apply(model)
    recompute.revert(model)
    assert mlp._twinkle_mlp_fallback.__func__ is type(mlp).forward
    fused.revert(model)
    assert "forward" not in mlp.__dict__ and not lora_mlp.is_fused(mlp)
    _assert_same(forward_backward(model, ids), want)


@pytest.mark.parametrize("backward_kernel", ["auto", pytest.param(True, marks=needs_triton)])
def test_fused_mlp_traces_whole_under_compile(backward_kernel):
    model = _lora_qwen2()
    ids = _ids()
    want = forward_backward(model, ids)
    FusedLoraMLP(backward_kernel=backward_kernel).apply(model)
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    for layer in model.base_model.model.model.layers:
        layer.compile(backend=counter, fullgraph=True)  # a graph break would raise
    got = forward_backward(model, ids)
    torch._dynamo.reset()
    assert counter.frame_count == 1  # one graph, reused by every layer
    _assert_same(got, want)


def test_swiglu_kernels_need_triton(monkeypatch):
    model = _lora_qwen2()
    monkeypatch.setattr(triton_lora, "available", lambda: False)
    assert FusedLoraMLP().applies_to(model)
    assert not FusedLoraMLP(swiglu_kernels=True).applies_to(model)
    patch = FusedLoraMLP(backward_kernel=True)  # asked for, but no triton: the torch ops
    patch.apply(model)
    assert {getattr(mlp, lora_mlp._SWIGLU_MODE_ATTR) for mlp in patch.mlps(model)} == {"torch"}


def test_backward_kernel_choice(monkeypatch):
    with kernel_settings(swiglu_backward_kernel="0"):
        assert FusedLoraMLP().backward_kernel is False
        assert FusedLoraMLP(backward_kernel="auto").backward_kernel == "auto"
    with kernel_settings(swiglu_backward_kernel="sometimes"):
        with pytest.raises(ValueError, match="FusedLoraMLP: backward_kernel must be 'auto', True or False"):
            FusedLoraMLP()
    monkeypatch.setenv("TWINKLE_SWIGLU_BACKWARD_KERNEL", "off")  # the environment sets the default
    with kernel_settings(KernelConfig.from_env()):
        assert FusedLoraMLP().backward_kernel is False


@needs_triton
@pytest.mark.parametrize(("tokens", "cols", "block"), [(37, 200, 64), (64, 128, 1024), (5, 1000, 256)])
@pytest.mark.parametrize("strided", [False, True])
def test_swiglu_backward_kernel_equals_autograd(tokens, cols, block, strided, monkeypatch):
    monkeypatch.setattr(kernel_config(), "swiglu_bwd_block", block)  # several column blocks, a ragged last one
    triton_lora.register()
    gen = torch.Generator().manual_seed(tokens + cols)
    wide = torch.randn(tokens, 2 * cols + (24 if strided else 0), generator=gen).to(DEVICE)
    gate_up = wide[:, : 2 * cols]  # a strided view when a GEMM wrote it into a wider buffer
    grad_h = torch.randn(tokens, cols, generator=gen).to(DEVICE)
    if strided:  # the op as a compiled graph calls it: any layout of grad_h
        grad_h = grad_h.t().contiguous().t()
    d_gate_up, hidden = torch.ops.twinkle.swiglu_backward(grad_h, gate_up)
    gate = gate_up[:, :cols].clone().requires_grad_(True)
    up = gate_up[:, cols:].clone().requires_grad_(True)
    want_h = torch.nn.functional.silu(gate) * up
    want_h.backward(grad_h)
    assert d_gate_up.shape == (tokens, 2 * cols) and hidden.shape == (tokens, cols)
    exact = dict(rtol=1e-5, atol=1e-6)  # float32 pointwise arithmetic on both sides, no tensor cores
    torch.testing.assert_close(hidden, want_h.detach(), **exact)
    torch.testing.assert_close(d_gate_up[:, :cols], gate.grad, **exact)
    torch.testing.assert_close(d_gate_up[:, cols:], up.grad, **exact)


@needs_triton
def test_swiglu_backward_kernel_bf16_rounds_once():
    gen = torch.Generator().manual_seed(5)
    gate_up = torch.randn(48, 2 * 300, generator=gen).to(DEVICE, torch.bfloat16)
    grad_h = torch.randn(48, 300, generator=gen).to(DEVICE, torch.bfloat16)
    d_gate_up, hidden = triton_lora.swiglu_backward(grad_h, gate_up)
    g, u, gh = gate_up[:, :300].float(), gate_up[:, 300:].float(), grad_h.float()
    sig = torch.sigmoid(g)
    want = torch.cat([gh * u * sig * (1 + g * (1 - sig)), gh * g * sig], -1).to(torch.bfloat16)
    assert d_gate_up.dtype == hidden.dtype == torch.bfloat16
    # float32 inside, one rounding: at most one bf16 step from the torch ops' result
    torch.testing.assert_close(d_gate_up, want, rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(hidden, (g * sig * u).to(torch.bfloat16), rtol=8e-3, atol=1e-6)


@needs_triton
@pytest.mark.parametrize(
    ("tokens", "cols", "rank", "programs"), [(70, 200, 8, 264), (256, 384, 16, 1), (33, 130, 4, 3)]
)
def test_swiglu_kernels_equal_torch(tokens, cols, rank, programs, monkeypatch):
    monkeypatch.setattr(kernel_config(), "lora_target_programs", programs)  # several tiles per program both ways
    gen = torch.Generator().manual_seed(tokens)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    gate_up, a_d = rand(tokens, 2 * cols), rand(rank, cols)
    hidden, low_d = triton_lora.swiglu_low(gate_up, a_d)
    gate = gate_up[:, :cols].clone().requires_grad_(True)
    up = gate_up[:, cols:].clone().requires_grad_(True)
    want_h = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(hidden, want_h.detach(), **TOL)
    torch.testing.assert_close(low_d, want_h.detach() @ a_d.t(), **TOL)

    grad_h, gb_d, low, b_g, b_u = (
        rand(tokens, cols),
        rand(tokens, 3),
        rand(tokens, 2 * rank),
        rand(cols, rank),
        rand(cols, rank),
    )
    d, da, dbg, dbu, gbg, gbu = triton_lora.swiglu_lora_grads(grad_h, gate_up, gb_d, low, b_g, b_u)
    want_h.backward(grad_h)
    assert d.shape == (tokens, 2 * cols) and da.shape == (cols, 3) and gbg.shape == (tokens, rank)
    torch.testing.assert_close(d[:, :cols], gate.grad, **TOL)
    torch.testing.assert_close(d[:, cols:], up.grad, **TOL)
    torch.testing.assert_close(da, want_h.detach().t() @ gb_d, **TOL)
    torch.testing.assert_close(dbg, gate.grad.t() @ low[:, :rank], **TOL)
    torch.testing.assert_close(dbu, up.grad.t() @ low[:, rank:], **TOL)
    torch.testing.assert_close(gbg, gate.grad @ b_g, **TOL)
    torch.testing.assert_close(gbu, up.grad @ b_u, **TOL)


@needs_triton
def test_swiglu_kernels_bf16():
    gen = torch.Generator().manual_seed(3)
    gate_up = torch.randn(96, 2 * 160, generator=gen).to(DEVICE, torch.bfloat16)
    a_d = torch.randn(8, 160, generator=gen).to(DEVICE, torch.bfloat16)
    hidden, low_d = triton_lora.swiglu_low(gate_up, a_d)
    g, u = gate_up[:, :160].float(), gate_up[:, 160:].float()
    want = (torch.nn.functional.silu(g) * u).to(torch.bfloat16)
    assert hidden.dtype == torch.bfloat16
    torch.testing.assert_close(hidden, want, rtol=1e-2, atol=1e-2)  # one rounding of the float32 product
    torch.testing.assert_close(low_d, hidden.float() @ a_d.float().t(), rtol=1e-2, atol=5e-2)
