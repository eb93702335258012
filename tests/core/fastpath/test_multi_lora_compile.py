"""The segmented LoRA ops under torch.compile, and their tenant isolation (twinkle.patch.multi_lora).

A multi-adapter pass describes its layout to the LoRA layers as tensors (stacked adapter
weights, int32 segment/tile/chunk tables) and runs the update through the custom op
``twinkle::segment_matmul``, so a compiled layer is traced once and replayed for other layouts.
Here on CPU with the ``aot_eager`` backend (dynamo and AOTAutograd as on a GPU, no inductor
build): no recompile over three layouts of one token count; one at most when the token count
changes (automatic dynamic shapes), none after; compiled results equal eager ones. The op's
forward and both gradients are checked per segment against float64, with NaN-filled tokens of
one adapter, on the torch path and on the Triton kernels (under Triton's interpreter on CPU).
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from fastpath_test_utils import gamma  # noqa: E402
from twinkle.model.multi_adapter import forward_backward_multi  # noqa: E402
from twinkle.model.transformers_model import TransformersModel  # noqa: E402
from twinkle.patch import multi_lora, triton_multi_lora  # noqa: E402
from twinkle.patch.model_walk import decoder_layers  # noqa: E402

KERNELS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not multi_lora.triton_available(), reason="triton")),
]

#: Different ranks (4, 8, 2: r_cap 8) and target sets; every MLP projection is some tenant's target.
TENANTS = [
    ("alice", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}),
    ("bob", {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("carol", {"r": 2, "lora_alpha": 4, "target_modules": ["o_proj", "up_proj"]}),
]


def _rows(lengths, seed):
    rng = random.Random(seed)
    return [
        {
            "input_ids": [rng.randrange(1, 512) for _ in range(n)],
            "labels": [-100] + [rng.randrange(1, 512) for _ in range(n - 1)],
        }
        for n in lengths
    ]


def _model(config):
    model = TransformersModel(config=config, device="cpu", seed=3)
    for name, lora in TENANTS:
        model.add_adapter_to_model(name, {**lora, "init_lora_weights": False})
    return model


# ---------------------------------------------------------------------- the op, per segment
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("transpose", [False, True])
def test_segment_op_forward_and_gradients_equal_a_per_segment_float64_reference(kernel, transpose):
    matmul_op, _ = multi_lora._ops()
    gen = torch.Generator().manual_seed(1)
    tokens, k, n, slots = 700, 40, 24, 8
    x = torch.randn(tokens, k, generator=gen).requires_grad_(True)
    shape = (slots, k, n) if transpose else (slots, n, k)
    w = torch.randn(*shape, generator=gen).requires_grad_(True)
    scale = torch.tensor([0.5, 2.0, 0.25, 1.5, 0.0, 0.0, 0.0, 0.0])
    # a gap (10..20), adapter 0 twice, a segment longer than a weight-gradient chunk (CHUNK_T = 512)
    segments = [(1, 0, 10), (0, 20, 95), (2, 95, 96), (3, 96, 640), (0, 640, 700)]
    segs, tiles, chunks, ranges = multi_lora._layout_tensors(segments, tokens, slots, x.device)
    y = matmul_op(x, w, scale, segs, tiles, chunks, ranges, transpose, kernel)
    g = torch.randn(tokens, n, generator=gen)
    dx, dw = torch.autograd.grad(y, [x, w], g)

    x64, g64 = x.detach().double(), g.double()
    w64 = w.detach().double()
    w64 = w64 if transpose else w64.transpose(1, 2)  # [slots, k, n]: y = s x W
    ref, mag = torch.zeros(tokens, n, dtype=torch.float64), torch.zeros(tokens, n, dtype=torch.float64)
    dx_ref, dx_mag = torch.zeros(tokens, k, dtype=torch.float64), torch.zeros(tokens, k, dtype=torch.float64)
    dw_ref, dw_mag = torch.zeros(slots, k, n, dtype=torch.float64), torch.zeros(slots, k, n, dtype=torch.float64)
    for a, s, e in segments:
        sc = float(scale[a])
        ref[s:e] = sc * x64[s:e] @ w64[a]
        mag[s:e] = sc * x64[s:e].abs() @ w64[a].abs()
        dx_ref[s:e] = sc * g64[s:e] @ w64[a].t()
        dx_mag[s:e] = sc * g64[s:e].abs() @ w64[a].abs().t()
        dw_ref[a] += sc * x64[s:e].t() @ g64[s:e]
        dw_mag[a] += sc * x64[s:e].abs().t() @ g64[s:e].abs()
    if not transpose:
        dw_ref, dw_mag = dw_ref.transpose(1, 2), dw_mag.transpose(1, 2)
    # |fl(sum) - sum| <= gamma_m sum|terms| for a length-m reduction in any order (plus the scale's rounding);
    # a weight gradient sums over all of an adapter's tokens, in chunks, then over the chunks
    assert ((y.detach().double() - ref).abs() <= gamma(k + 1) * mag).all()
    assert ((dx.double() - dx_ref).abs() <= gamma(n + 1) * dx_mag).all()
    assert ((dw.double() - dw_ref).abs() <= gamma(tokens + 2) * dw_mag).all()
    assert (y[10:20] == 0).all() and (dx[10:20] == 0).all()
    assert (dw[4:] == 0).all()  # unused slots


@pytest.mark.parametrize("kernel", KERNELS)
def test_nan_tokens_of_one_adapter_reach_no_other_adapters_outputs_or_gradients(kernel):
    matmul_op, _ = multi_lora._ops()
    gen = torch.Generator().manual_seed(2)
    tokens, k, n, slots = 300, 32, 16, 8
    segments = [(0, 0, 100), (1, 100, 180), (2, 180, 300)]
    layout = multi_lora._layout_tensors(segments, tokens, slots, torch.device("cpu"))
    scale = torch.ones(slots)
    x = torch.randn(tokens, k, generator=gen)
    w = torch.randn(slots, n, k, generator=gen)
    g = torch.randn(tokens, n, generator=gen)

    def run(x, w):
        x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = matmul_op(x, w, scale, *layout, False, kernel)
        dx, dw = torch.autograd.grad(y, [x, w], g)
        return y.detach(), dx, dw

    clean = run(x, w)
    poisoned_x = x.clone()
    poisoned_x[120:130] = float("nan")  # adapter 1's tokens
    poisoned_w = w.clone()
    poisoned_w[1, 3] = float("inf")  # and its weights
    got = run(poisoned_x, poisoned_w)
    other = torch.cat([torch.arange(0, 100), torch.arange(180, 300)])
    for a, b in zip(got[:2], clean[:2]):  # y and dx of adapters 0 and 2: bit for bit
        assert torch.equal(a[other], b[other])
    assert torch.equal(got[2][0], clean[2][0]) and torch.equal(got[2][2], clean[2][2])
    assert not torch.isfinite(got[2][1]).all()  # adapter 1's own gradient is poisoned


# ---------------------------------------------------------------------- compiled layers
def _compile_mlps(model, backend):
    """Compile each decoder layer's MLP (three LoRA layers with the segment hook inside).

    Whole decoder layers on CPU would also compile the float32 varlen attention, which reads
    the sequence boundaries on the host (one sdpa per sequence) and recompiles per layout by
    itself; on CUDA that is ``varlen_attn`` on tensors (see the gpu test below).
    """
    for layer in decoder_layers(model.model):
        layer.mlp.compile(backend=backend)


def test_compiled_mlps_replay_across_segment_layouts_without_recompiling(tiny_config):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _model(tiny_config)
    counter = CompileCounterWithBackend("aot_eager")
    _compile_mlps(model, counter)
    # three layouts of 64 tokens: other boundaries, rows, order of tenants (and so slots)
    layouts = [
        {"alice": _rows([10, 20], 1), "bob": _rows([30], 2), "carol": _rows([4], 3)},
        {"alice": _rows([5], 4), "bob": _rows([40, 7], 5), "carol": _rows([12], 6)},
        {"carol": _rows([30], 8), "alice": _rows([30], 9), "bob": _rows([4], 10)},
    ]
    forward_backward_multi(model, layouts[0], kernel="torch", solo_fast_path=False)
    compiled = counter.frame_count
    assert compiled >= 1
    for layout in layouts[1:]:
        forward_backward_multi(model, layout, kernel="torch", solo_fast_path=False)
    assert counter.frame_count == compiled, "a new segment layout of the same length recompiled"
    # another token count: one recompile at most (automatic dynamic shapes), then none
    forward_backward_multi(
        model, {"alice": _rows([9, 11], 11), "bob": _rows([20], 12)}, kernel="torch", solo_fast_path=False
    )
    assert counter.frame_count <= compiled + 1
    after = counter.frame_count
    forward_backward_multi(
        model, {"bob": _rows([33], 13), "alice": _rows([50], 14)}, kernel="torch", solo_fast_path=False
    )
    assert counter.frame_count == after


def test_compiled_multi_adapter_pass_equals_the_eager_one(tiny_config):
    torch._dynamo.reset()
    layout = {"alice": _rows([10, 20], 1), "bob": _rows([30], 2), "carol": _rows([4], 3)}
    results = []
    for compiled in (False, True):
        model = _model(tiny_config)
        if compiled:  # whole decoder layers (the attention's graph breaks on CPU change nothing numerically)
            for layer in decoder_layers(model.model):
                layer.compile(backend="aot_eager")
        outs = forward_backward_multi(model, layout, kernel="torch", solo_fast_path=False)
        grads = {n: p.grad.clone() for n, p in model.model.named_parameters() if p.grad is not None}
        results.append((outs, grads))
    (eager, eager_grads), (comp, comp_grads) = results
    assert eager_grads.keys() == comp_grads.keys() and eager_grads
    for name in eager:
        # aot_eager runs the same aten ops; its decompositions may round differently (float32 through 2 layers)
        assert comp[name]["loss"] == pytest.approx(eager[name]["loss"], rel=1e-5)
    for key, grad in eager_grads.items():
        assert float((comp_grads[key] - grad).norm()) <= 1e-5 * float(grad.norm()), key


# ---------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("transpose", [False, True])
def test_gpu_triton_segment_ops_equal_float64_per_segment(transpose):
    matmul_op, _ = multi_lora._ops()
    gen = torch.Generator().manual_seed(0)
    tokens, k, n, slots = 5000, 896, 16, 8
    x = torch.randn(tokens, k, generator=gen).to("cuda", torch.bfloat16).requires_grad_(True)
    shape = (slots, k, n) if transpose else (slots, n, k)
    w = (torch.randn(*shape, generator=gen) * 0.05).to("cuda", torch.bfloat16).requires_grad_(True)
    scale = torch.tensor([2.0, 0.5, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], device="cuda")
    segments = [(0, 0, 2000), (3, 2000, 2001), (1, 2100, 4900), (2, 4900, 5000)]
    layout = multi_lora._layout_tensors(segments, tokens, slots, x.device)
    y = matmul_op(x, w, scale, *layout, transpose, "triton")
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, [x, w], g)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = matmul_op(x64.cpu(), w64.cpu(), scale.double().cpu(), *[t.cpu() for t in layout], transpose, "torch")
    dx_ref, dw_ref = torch.autograd.grad(ref, [x64, w64], g.double().cpu())
    # bf16 inputs are exact in the fp32 dots; sums of up to 2800 terms (gamma_m, about sqrt(m) of the
    # largest term for random signs) and one bf16 rounding of each result (2^-8 of the largest)
    m = 2800
    rel = gamma(m) * m**0.5 + 2.0**-8
    for a, b in ((y, ref), (dx, dx_ref), (dw, dw_ref)):
        b = b.to(a.device)
        assert ((a.double() - b).abs() <= rel * b.abs().max() + 1e-30).all()


@pytest.mark.gpu
def test_gpu_compiled_decoder_layers_do_not_recompile_across_layouts(tiny_config):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = TransformersModel(config=tiny_config, torch_dtype="bfloat16", device="cuda", seed=3)
    for name, lora in TENANTS:
        model.add_adapter_to_model(name, {**lora, "init_lora_weights": False})
    # warm-up: two layouts of 128 tokens with other longest rows and sequence counts (the varlen max
    # length and the boundaries' count become dynamic: that is attention's, not the segments')
    forward_backward_multi(model, {"alice": _rows([60, 4], 1), "bob": _rows([30], 2), "carol": _rows([34], 3)})
    forward_backward_multi(model, {"alice": _rows([8], 4), "bob": _rows([70, 10, 20], 5), "carol": _rows([20], 6)})
    before = counters["stats"]["unique_graphs"]
    for seed in range(3):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(8, 120), 2))
        lengths = [cuts[0], cuts[1] - cuts[0], 128 - cuts[1]]
        order = list(TENANTS)
        rng.shuffle(order)
        forward_backward_multi(model, {name: _rows([n], seed) for (name, _), n in zip(order, lengths)})
    assert counters["stats"]["unique_graphs"] == before


# ---------------------------------------------------------------------- the kernel's launch configurations
def _configs_case(device, dtype):
    gen = torch.Generator().manual_seed(5)
    tokens, k, n, slots = 300, 96, 40, 8
    x = torch.randn(tokens, k, generator=gen).to(device, dtype)
    w = (torch.randn(slots, n, k, generator=gen) * 0.05).to(device, dtype)
    scale = torch.tensor([2.0, 0.5, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], device=device)
    # a gap of no adapter (slot -1: zeros), segments shorter than a sub-tile, one over several tiles
    segments = [(0, 0, 7), (-1, 7, 20), (3, 20, 21), (1, 21, 250), (2, 250, 300)]
    _, tiles, _, _ = multi_lora._layout_tensors(segments, tokens, slots, x.device)
    outs = []
    for config in range(len(triton_multi_lora.MATMUL_CONFIGS)):
        out = torch.full((tokens, n), float("nan"), dtype=dtype, device=device)
        triton_multi_lora.matmul_with(config, x, w, scale, tiles, out)
        outs.append(out)
    return x, w, scale, segments, outs


@pytest.mark.skipif(not multi_lora.triton_available(), reason="triton")
def test_segment_kernel_sub_tiles_cover_every_token_once():
    # under the interpreter: each configuration's sub-tiles write every token (none left NaN) and
    # give the per-segment product
    x, w, scale, segments, outs = _configs_case("cpu", torch.float32)
    ref = torch.zeros(outs[0].shape, dtype=torch.float64)
    for slot, start, end in segments:
        if slot >= 0:
            ref[start:end] = float(scale[slot]) * (x[start:end].double() @ w[slot].double().t())
    for out in outs[:3]:  # sub-tiles of 64, 32 and 16 tokens (the others differ in warps and stages only)
        assert not out.isnan().any()
        assert (out[7:20] == 0).all()
        assert torch.allclose(out.double(), ref, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_every_launch_configuration_gives_the_same_bits(dtype):
    _, _, _, _, outs = _configs_case("cuda", dtype)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
