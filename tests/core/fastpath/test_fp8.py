"""Fp8FrozenGemms: LoRA's frozen base GEMMs in row-scaled FP8 (CPU: PyTorch's own _scaled_mm; GPU test below)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from fastpath_test_utils import make_rows, tiny_qwen2_config  # noqa: E402
from twinkle.patch.fp8 import E4M3_MAX, Fp8FrozenGemms, Fp8Weight, _cpu_row_scaled_mm, fp8_linear, quantize_rows  # noqa: E402
from twinkle.patch.kernel_config import KernelConfig, kernel_settings  # noqa: E402
from twinkle.patch.lora_fast import FusedLoraLinear, MergedLoraForward, lora_linear_layers  # noqa: E402

# torch 2.11's CPU _scaled_mm takes per-tensor scales only (the GPU image has it); 2.13 scales rows
cpu_scaled_mm = pytest.mark.skipif(not _cpu_row_scaled_mm(), reason="CPU _scaled_mm without row scales")

LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0, "init_lora_weights": False}


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_quantize_rows_keeps_every_value_within_e4m3_precision():
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(32, 256, generator=gen) * torch.logspace(-3, 2, 32).unsqueeze(1)).bfloat16()
    t[5] = 0.0
    values, scale = quantize_rows(t)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (32, 1) and scale.dtype == torch.float32
    back = values.float() * scale
    assert torch.isfinite(back).all() and (back[5] == 0).all()
    # e4m3 keeps 3 mantissa bits: within 1/16 of each value, plus the subnormal step near zero
    assert ((back - t.float()).abs() <= t.float().abs() / 16 + scale * 2.0**-9).all()
    # each row's largest magnitude is the largest e4m3 value
    rows = [r for r in range(32) if r != 5]
    assert torch.equal(values.float().abs().amax(-1)[rows], torch.full((31,), E4M3_MAX))


@cpu_scaled_mm
def test_fp8_linear_is_the_linear_map_within_fp8_error_not_bf16():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 64, generator=gen).bfloat16().requires_grad_(True)
    weight = (torch.randn(48, 64, generator=gen) * 0.05).bfloat16()
    bias = torch.randn(48, generator=gen).bfloat16()
    grad = torch.randn(3, 40, 48, generator=gen).bfloat16()

    out = fp8_linear(x, Fp8Weight(weight), bias)
    out.backward(grad)
    want = torch.nn.functional.linear(x.detach().float(), weight.float(), bias.float())
    want_grad = grad.float() @ weight.float()
    assert out.dtype == torch.bfloat16 and out.shape == (3, 40, 48)
    for got, ref in ((out.detach(), want), (x.grad, want_grad)):
        error = _rel(got, ref)
        assert 2e-3 < error < 6e-2  # FP8's error: well above one bf16 rounding, well below noise


def test_fp8_weight_quantizes_again_only_when_the_weight_changes():
    weight = torch.randn(32, 16).bfloat16()
    fp8 = Fp8Weight(weight)

    def close_to_weight(values, scale, w):  # within e4m3's 1/16, plus its subnormal step
        return bool(((values.float() * scale - w.float()).abs() <= w.float().abs() / 16 + scale * 2.0**-9).all())

    # forward: W^T ([in, out], a scale per output channel); backward: W (a scale per input channel)
    assert fp8.forward[0].shape == (16, 32) and fp8.backward[0].shape == (32, 16)
    assert fp8.forward[0].stride() == (1, 16) and fp8.backward[0].stride() == (1, 32)  # column-major
    assert close_to_weight(fp8.forward[0], fp8.forward[1], weight.t())
    assert close_to_weight(fp8.backward[0], fp8.backward[1], weight)
    assert not fp8.refresh()
    with torch.no_grad():
        weight.mul_(3.0)  # in place: its version counter moves
    assert not close_to_weight(fp8.forward[0], fp8.forward[1], weight.t())
    assert fp8.refresh()
    assert close_to_weight(fp8.forward[0], fp8.forward[1], weight.t())
    assert close_to_weight(fp8.backward[0], fp8.backward[1], weight)
    assert fp8.nbytes == 2 * 32 * 16 + 4 * (32 + 16)


def test_fp8_weight_follows_a_replaced_weight_of_its_linear():
    linear = torch.nn.Linear(16, 32, bias=False).bfloat16().requires_grad_(False)
    fp8 = Fp8Weight(linear)
    assert fp8.weight is linear.weight and not fp8.refresh()
    linear.weight = torch.nn.Parameter(linear.weight.detach() * -2.0, requires_grad=False)  # e.g. load(assign=True)
    assert fp8.weight is linear.weight
    assert fp8.refresh()
    back = fp8.backward[0].float() * fp8.backward[1]
    bound = linear.weight.float().abs() / 16 + fp8.backward[1] * 2.0**-9
    assert ((back - linear.weight.float()).abs() <= bound).all()


def _peft_net(width: int = 64):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.GELU(), torch.nn.Linear(width, 16))
    net = net.bfloat16().requires_grad_(False)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False)
    model = peft.get_peft_model(net, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.bfloat16()
    FusedLoraLinear().apply(model)
    return model


@pytest.fixture(autouse=True)
def _small_layers_qualify(monkeypatch):
    """The test models are tiny; by default only layers of 1024+ features take FP8."""
    monkeypatch.setattr(Fp8FrozenGemms, "min_features", 16)


def test_layers_with_a_dimension_not_a_multiple_of_16_keep_bf16():
    model = _peft_net(width=40)  # [40, 32] and [16, 40]: neither layer qualifies
    patch = Fp8FrozenGemms()
    assert patch.layers(model) == []
    assert not patch.applies_to(model)


def test_layers_smaller_than_min_features_keep_the_merged_path(monkeypatch):
    model = _peft_net(width=48)  # [48, 32] and [16, 48]
    assert len(Fp8FrozenGemms().layers(model)) == 2
    monkeypatch.setattr(Fp8FrozenGemms, "min_features", 32)
    assert [layer.get_base_layer().weight.shape[0] for layer in Fp8FrozenGemms().layers(model)] == [48]
    monkeypatch.undo()
    # the default, read per call from the kernel config: a 0.5B model (hidden 896) keeps bf16
    assert Fp8FrozenGemms.min_features is None and KernelConfig.from_env({}).fp8_min_features == 1024
    monkeypatch.setattr(Fp8FrozenGemms, "min_features", None)
    with kernel_settings(fp8_min_features=32):  # set after import: the next call sees it
        assert Fp8FrozenGemms().features_needed() == 32
        assert [layer.get_base_layer().weight.shape[0] for layer in Fp8FrozenGemms().layers(model)] == [48]
    assert Fp8FrozenGemms(min_features=48).features_needed() == 48  # the patch's own argument wins


def test_asked_for_but_taking_no_layer_says_why_once(caplog, monkeypatch):
    model = _peft_net(width=48)
    monkeypatch.setattr(Fp8FrozenGemms, "min_features", 64)
    with caplog.at_level("WARNING", logger="twinkle.patch"):
        assert not Fp8FrozenGemms().applies_to(model)
        assert not Fp8FrozenGemms().applies_to(model)
    [record] = [r for r in caplog.records if "Fp8FrozenGemms" in r.getMessage()]
    assert "none of the 2 LoRA layers" in record.getMessage() and "at least 64 features" in record.getMessage()
    assert "(48, 32) bfloat16 on cpu" in record.getMessage()


@cpu_scaled_mm
def test_fp8_takes_layers_over_from_the_merged_path_and_reverts():
    from twinkle.patch.fastpath import get_flag

    model = _peft_net()
    MergedLoraForward().apply(model)
    base_bytes = sum(layer.get_base_layer().weight.nbytes for layer in lora_linear_layers(model))
    assert get_flag(model, "kept_merged_bytes") == base_bytes  # what ActivationCheckpointing budgets for
    patch = Fp8FrozenGemms()
    assert len(patch.layers(model)) == 2
    patch.apply(model)
    assert get_flag(model, "kept_merged_bytes") == 0  # no merged weight is kept any more
    for layer in lora_linear_layers(model):
        assert isinstance(layer._twinkle_fp8, Fp8Weight)
        assert not hasattr(layer, "_twinkle_merged")
    x = torch.randn(2, 200, 32).bfloat16()
    with torch.no_grad():
        fp8_out = model(x)
    patch.revert(model)
    assert all(not hasattr(layer, "_twinkle_fp8") for layer in lora_linear_layers(model))
    with torch.no_grad():
        bf16_out = model(x)
    assert 1e-3 < _rel(fp8_out, bf16_out) < 0.1


@cpu_scaled_mm
def test_fp8_path_traces_whole_under_compile():
    model = _peft_net()
    Fp8FrozenGemms().apply(model)
    x = torch.randn(2, 64, 32).bfloat16().requires_grad_(True)

    def run():
        for p in model.parameters():
            p.grad = None
        x.grad = None
        out = model(x)
        out.float().sin().sum().backward()
        return out.detach(), x.grad.clone(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    want = run()
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    model.compile(backend=counter, fullgraph=True)  # a graph break would raise
    got = run()
    torch._dynamo.reset()
    assert counter.frame_count == 1
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w)


@cpu_scaled_mm
def test_compiled_graphs_give_scaled_mm_its_weights_as_column_major_inputs():
    """CUDA's _scaled_mm needs a row-major first operand and a column-major second one (the CPU's
    takes any layout, so this checks the strides themselves, on the graphs AOTAutograd hands the
    compiler). The first H200 run failed on a row-major second operand in backward."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    seen = []

    def inspect(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.target is torch.ops.aten._scaled_mm.default:
                mat1, mat2 = node.args[:2]
                assert mat1.meta["val"].is_contiguous()
                seen.append((mat2.op, tuple(mat2.meta["val"].stride())))
        return make_boxed_func(gm.forward)

    model = _peft_net()
    Fp8FrozenGemms().apply(model)
    x = torch.randn(2, 64, 32).bfloat16().requires_grad_(True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=inspect, bw_compiler=inspect), fullgraph=True)
    compiled(x).float().sum().backward()
    torch._dynamo.reset()
    assert len(seen) == 4  # two layers, forward and input gradient
    for op, stride in seen:
        assert op == "placeholder" and stride[0] == 1 and stride[1] > 1, (op, stride)


def _model(patches, device="cpu", config=None, enabled=()):
    from twinkle.model.transformers_model import TransformersModel

    model = TransformersModel(
        config=config or tiny_qwen2_config(),
        torch_dtype="bfloat16",
        device=device,
        seed=5,
        patches=patches,
        enabled_patches=enabled,
    )
    model.add_adapter_to_model("default", dict(LORA))
    model.set_optimizer("AdamW", lr=1e-3)
    return model


def _fp8_grad_rtol(num_layers: int) -> float:
    """How far (norm-wise, relative) a gradient through FP8 frozen GEMMs may stray from bf16's.

    e4m3 keeps 3 mantissa bits: u = 2^-4. Row-scaled quantization rounds each operand element
    with a relative error spread over +-u (std u/sqrt(3)); a product of two such operands errs
    by about sqrt(2) u / sqrt(3) = 0.051 of its norm, independently per GEMM. A LoRA gradient
    goes through the 7 frozen projections of each layer forward and again backward, 14 L
    GEMMs whose errors add in quadrature. bf16's own rounding (2^-8) is an order below.
    """
    per_gemm = 2**0.5 * 2.0**-4 / 3**0.5
    return (14 * num_layers) ** 0.5 * per_gemm


def _train(fast, plain, batches):
    grad_rtol = _fp8_grad_rtol(plain.model.config.num_hidden_layers)
    losses = []
    for step, batch in enumerate(batches):
        out_fast, out_plain = fast.forward_backward(inputs=batch), plain.forward_backward(inputs=batch)
        losses.append((out_fast["loss"], out_plain["loss"]))
        if step == 0:
            pairs = list(zip(fast.state_of().params, plain.state_of().params))
            assert pairs
            for a, b in pairs:
                assert _rel(a.grad, b.grad) < grad_rtol
        fast.clip_grad_and_step(max_grad_norm=1.0)
        plain.clip_grad_and_step(max_grad_norm=1.0)
    return losses


@cpu_scaled_mm
def test_transformers_model_trains_lora_with_fp8_frozen_gemms():
    from twinkle.patch.fastpath import resolve_patches

    default = [p.name for p in resolve_patches(None)]
    fast = _model(None, enabled=["Fp8FrozenGemms"])
    plain = _model(default)
    assert "Fp8FrozenGemms" in fast.fast_path_patches and "Fp8FrozenGemms" not in plain.fast_path_patches
    layers = lora_linear_layers(fast.model)
    assert layers and all(isinstance(getattr(layer, "_twinkle_fp8", None), Fp8Weight) for layer in layers)

    rows = make_rows(4, seed=3)
    losses = _train(fast, plain, [rows] * 4)  # one batch again and again: the loss must fall
    for got, want in losses:
        assert got == pytest.approx(want, rel=0.03)
        assert abs(got - want) > 1e-5 * want  # FP8 did run: bf16 alone would match far closer
    assert losses[-1][0] < losses[0][0]

    # a base weight changed in place (say, by user code): the next forward quantizes it again
    layer = layers[0]
    stamp = layer._twinkle_fp8._stamp
    with torch.no_grad():
        layer.get_base_layer().weight.mul_(0.5)
    fast.forward_backward(inputs=rows)
    assert layer._twinkle_fp8._stamp != stamp


@pytest.mark.gpu
def test_fp8_frozen_gemms_train_like_bf16_on_cuda():
    from twinkle.patch.fastpath import resolve_patches

    config = tiny_qwen2_config(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4, tie_word_embeddings=False
    )
    default = [p.name for p in resolve_patches(None)]
    fast = _model(None, device="cuda", config=config, enabled=["Fp8FrozenGemms"])
    plain = _model(default, device="cuda", config=config)
    assert {"Fp8FrozenGemms", "CompileDecoderLayers"} <= set(fast.fast_path_patches)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (4, 256), generator=gen)
    losses = _train(fast, plain, [{"input_ids": ids, "labels": ids}] * 3)
    for got, want in losses:
        assert got == pytest.approx(want, rel=0.03)
    print("losses fp8/bf16:", losses)
