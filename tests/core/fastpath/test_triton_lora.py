"""twinkle::lora_grads: LoRA's ``grad @ B`` and ``grad^T @ (x A^T)`` from one pass over ``grad``.

On CPU the Triton kernel runs under the interpreter (the root conftest sets ``TRITON_INTERPRET=1``
without an NVIDIA device); on the H200 the same tests run compiled.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from fastpath_test_utils import FP32_UNIT_ROUNDOFF, TF32_UNIT_ROUNDOFF, matmul_bound  # noqa: E402
from twinkle.patch import triton_lora  # noqa: E402
from twinkle.patch.kernel_config import kernel_config  # noqa: E402
from twinkle.patch.lora_fast import FusedLoraLinear, GroupedLoraProjections, MergedLoraForward  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_lora.available(), reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    ("tokens", "out_f", "rank", "programs", "scale"),
    [
        (300, 200, 8, 264, 1.0),
        (1024, 520, 24, 264, 2.0),
        (64, 128, 16, 264, 0.5),
        (700, 900, 8, 1, 1.0),
        (2048, 384, 16, 4, 4.0),
        (4096, 256, 8, 264, 2.0),  # 64 partials of the B gradient: summed 16 at a time
    ],
)
def test_lora_grads_equal_the_two_products(tokens, out_f, rank, programs, scale, monkeypatch):
    # programs=1 or 4: each program loops over several tiles both ways (partials kept per program)
    monkeypatch.setattr(kernel_config(), "lora_target_programs", programs)
    gen = torch.Generator().manual_seed(tokens + out_f)
    grad = torch.randn(tokens, out_f, generator=gen).to(DEVICE)
    low = torch.randn(tokens, rank, generator=gen).to(DEVICE)
    weight_b = torch.randn(out_f, rank, generator=gen).to(DEVICE)
    gb, grad_b = triton_lora.lora_grads(grad, low, weight_b, scale)
    assert gb.dtype == grad_b.dtype == torch.float32
    assert gb.shape == (tokens, rank) and grad_b.shape == (out_f, rank)
    # each side within its dot products' rounding bound (TF32 inputs on the GPU's tensor cores,
    # float32 sums in another order in the interpreter), plus the one rounding of the scaling
    unit_in = TF32_UNIT_ROUNDOFF if DEVICE == "cuda" else 0.0
    for got, a, b in ((gb, grad, weight_b), (grad_b, grad.t(), low)):
        bound = 2 * scale * (matmul_bound(a, b, unit_in) + FP32_UNIT_ROUNDOFF * (a @ b).abs())
        assert bool(((got - scale * (a @ b)).abs() <= bound).all())


def test_lora_grads_bf16_and_a_strided_gradient():
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(512, 400, generator=gen).to(DEVICE, torch.bfloat16)
    grad = wide[:, :300]  # rows 400 apart, as a slice of a group's gradient is
    low = torch.randn(512, 8, generator=gen).to(DEVICE, torch.bfloat16)
    weight_b = torch.randn(300, 8, generator=gen).to(DEVICE, torch.bfloat16)
    gb, grad_b = triton_lora.lora_grads(grad, low, weight_b, 0.25)
    assert gb.dtype == grad_b.dtype == torch.bfloat16  # summed in float32, scaled, rounded once
    torch.testing.assert_close(gb.float(), 0.25 * (grad.float() @ weight_b.float()), rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(grad_b.float(), 0.25 * (grad.float().t() @ low.float()), rtol=1e-2, atol=2e-2)


def _lora_mlp(alpha_pattern=None):
    torch.manual_seed(0)

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = torch.nn.Linear(32, 96, bias=False)
            self.up_proj = torch.nn.Linear(32, 96, bias=False)
            self.down_proj = torch.nn.Linear(96, 32, bias=False)

        def forward(self, x):
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    model = peft.get_peft_model(
        MLP().requires_grad_(False),
        peft.LoraConfig(
            r=8,
            lora_alpha=16,
            alpha_pattern=alpha_pattern or {},
            target_modules=["gate_proj", "up_proj", "down_proj"],
            init_lora_weights=False,
        ),
    )
    FusedLoraLinear().apply(model)
    return model.to(DEVICE)


@pytest.mark.parametrize(
    ("grouped", "alpha_pattern"),
    [
        (None, None),
        (False, None),
        (True, None),
        # each projection its own scaling: the kernels sum unscaled, the scalings applied per member after
        (None, {"gate_proj": 4, "up_proj": 32, "down_proj": 8}),
        (True, {"gate_proj": 4, "up_proj": 32, "down_proj": 8}),
    ],
)
def test_merged_lora_backward_through_the_kernel(grouped, alpha_pattern):
    x = torch.randn(4, 100, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def grads(kernel):
        model = _lora_mlp(alpha_pattern)
        MergedLoraForward(grad_kernel=kernel, merge_kernel=kernel).apply(model)
        if grouped is not None:  # grouped: stacked or one GEMM per member
            GroupedLoraProjections(stack=grouped).apply(model)
        assert model.base_model.model.gate_proj._twinkle_lora_grad_kernel is kernel
        assert model.base_model.model.gate_proj._twinkle_lora_merge_kernel is kernel
        model(x).sin().sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    want, got = grads(False), grads(True)
    assert len(got) == 6
    # float32 model: tf32 tensor cores in the kernels on a GPU (single elements of the A gradients,
    # sums over 400 tokens, moved by more than 2e-2 there), exact float32 in the interpreter; so the
    # error is bounded relative to each gradient's norm
    bound = 2e-2 if DEVICE == "cuda" else 1e-5
    for name in want:
        err = (got[name].double() - want[name].double()).norm() / want[name].double().norm()
        assert err < bound, (name, err.item())


def test_grad_kernel_choice():
    assert MergedLoraForward(grad_kernel="0").grad_kernel is False
    assert MergedLoraForward(grad_kernel="auto").grad_kernel == "auto"
    model = _lora_mlp()
    MergedLoraForward(grad_kernel="auto").apply(model)  # 'auto': the kernel on CUDA only
    assert model.base_model.model.gate_proj._twinkle_lora_grad_kernel is (DEVICE == "cuda")
    with pytest.raises(ValueError, match="grad_kernel must be 'auto', True or False"):
        MergedLoraForward(grad_kernel="sometimes")
    with pytest.raises(ValueError, match="merge_kernel must be 'auto', True or False"):
        MergedLoraForward(merge_kernel="sometimes")
    assert MergedLoraForward(merge_kernel="off").merge_kernel is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_merge_equals_addmm(dtype):
    gen = torch.Generator().manual_seed(2)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    # two members stacked by rows, shapes off the 128 tile, ranks 8 and 4
    weights, bs, as_ = [rand(200, 72), rand(130, 72)], [rand(200, 8), rand(130, 4)], [rand(8, 72), rand(4, 72)]
    got = triton_lora.lora_merge(weights, bs, as_, [2.0, 0.5])
    assert got.shape == (330, 72) and got.dtype == dtype
    want = torch.cat([(w.double() + s * b.double() @ a.double()) for w, b, a, s in zip(weights, bs, as_, [2.0, 0.5])])
    if dtype == torch.float32 and DEVICE == "cpu":
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    else:  # one rounding of the float32 sum (tf32 products on a GPU for float32)
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=5e-2)


def test_zero_scaling_gives_zero_lora_grads():
    # lora_alpha 0 for gate and up (one group, one scaling: 0.0, which is not "no scaling")
    x = torch.randn(2, 80, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    model = _lora_mlp({"gate_proj": 0, "up_proj": 0})
    MergedLoraForward(grad_kernel=True, merge_kernel=True).apply(model)
    GroupedLoraProjections(stack=True).apply(model)
    model(x).sin().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    zero = [n for n in grads if "gate_proj" in n or "up_proj" in n]
    assert len(zero) == 4
    assert all(torch.count_nonzero(grads[n]) == 0 for n in zero)
    assert all(torch.count_nonzero(grads[n]) > 0 for n in grads if "down_proj" in n)
