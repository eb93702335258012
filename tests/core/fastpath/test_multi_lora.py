"""Batched multi-adapter LoRA (twinkle.patch.multi_lora, twinkle.model.multi_adapter).

One pass holds token segments of several adapters: the base GEMMs run once, each segment gets
its own adapter's low-rank update. Checked against each adapter run alone (plain peft, and a
TransformersModel trained alone), on the torch path and on the Triton segment kernel (under
Triton's interpreter on CPU), and for isolation: a NaN in one tenant never reaches another.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from fastpath_test_utils import TF32_UNIT_ROUNDOFF, gamma, make_rows  # noqa: E402
from twinkle.model.multi_adapter import forward_backward_multi, forward_only_multi  # noqa: E402
from twinkle.model.transformers_model import TransformersModel  # noqa: E402
from twinkle.patch import multi_lora  # noqa: E402

KERNELS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not multi_lora.triton_available(), reason="triton")),
]

#: Three tenants: different ranks and different target sets (carol's modules are disjoint from bob's).
TENANTS = [
    ("alice", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}),
    ("bob", {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("carol", {"r": 2, "lora_alpha": 4, "target_modules": ["o_proj", "up_proj"]}),
]


# ---------------------------------------------------------------------- the segment product
@pytest.mark.parametrize("kernel", KERNELS)
def test_segment_matmul_within_the_rounding_bound_of_a_float64_reference(kernel):
    gen = torch.Generator().manual_seed(0)
    tokens, k, n = 150, 40, 24
    x = torch.randn(tokens, k, generator=gen).requires_grad_(True)
    w = torch.randn(3, n, k, generator=gen).requires_grad_(True)
    # a gap (tokens 10..19 get no update), a long segment over several tiles, adapter 0 twice
    segments = [(1, 0, 10), (0, 20, 95), (2, 95, 96), (0, 96, 150)]
    y = multi_lora.segment_matmul(x, w, segments, kernel=kernel)
    assert y.shape == (tokens, n)

    x64, w64 = x.detach().double(), w.detach().double()
    ref = torch.zeros(tokens, n, dtype=torch.float64)
    mag = torch.zeros(tokens, n, dtype=torch.float64)
    for a, s, e in segments:
        ref[s:e] = x64[s:e] @ w64[a].t()
        mag[s:e] = x64[s:e].abs() @ w64[a].abs().t()
    # |fl(sum x_i w_i) - sum x_i w_i| <= gamma_k sum |x_i w_i|, any summation order
    assert ((y.detach().double() - ref).abs() <= gamma(k) * mag).all()
    assert (y[10:20] == 0).all()

    g = torch.randn(tokens, n, generator=gen)
    (y * g).sum().backward()
    g64 = g.double()
    dx_ref = torch.zeros(tokens, k, dtype=torch.float64)
    dx_mag = torch.zeros(tokens, k, dtype=torch.float64)
    dw_ref = torch.zeros(3, n, k, dtype=torch.float64)
    dw_mag = torch.zeros(3, n, k, dtype=torch.float64)
    for a, s, e in segments:
        dx_ref[s:e] = g64[s:e] @ w64[a]
        dx_mag[s:e] = g64[s:e].abs() @ w64[a].abs()
        dw_ref[a] += g64[s:e].t() @ x64[s:e]
        dw_mag[a] += g64[s:e].abs().t() @ x64[s:e].abs()
    assert ((x.grad.double() - dx_ref).abs() <= gamma(n) * dx_mag).all()
    # a weight gradient sums over every token of the adapter (75 + 54 for adapter 0), plus the float32 adds
    assert ((w.grad.double() - dw_ref).abs() <= gamma(tokens + 2) * dw_mag).all()
    assert (x.grad[10:20] == 0).all()


def test_eager_torch_path_gives_the_custom_ops_bits():
    """The eager ``torch``-kernel delta (a plain autograd.Function) computes what the op computes, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    tokens, k, r, n = 96, 24, 8, 40
    segments = [(1, 0, 30), (0, 30, 31), (2, 40, 96)]  # tokens 31..39 belong to no adapter
    segs, tiles, chunks, ranges = multi_lora._layout_tensors(segments, tokens, 4, torch.device("cpu"))
    scale = torch.tensor([0.5, 2.0, 1.5, 0.0])
    leaves = [
        torch.randn(tokens, k, generator=gen),
        torch.randn(4, r, k, generator=gen),
        torch.randn(4, n, r, generator=gen),
    ]
    upstream = torch.randn(tokens, n, generator=gen)
    results = []
    for compiled_path in (False, True):
        x, a, b = (t.clone().requires_grad_(True) for t in leaves)
        state = (a, b, scale, segs, tiles, chunks, ranges, "torch")
        if compiled_path:  # what a compiled layer runs: the two custom-op calls
            op = torch.ops.twinkle.segment_matmul
            low = op(x, a, scale, segs, tiles, chunks, ranges, False, "torch")
            y = op(low, b, None, segs, tiles, chunks, ranges, False, "torch")
        else:
            y = multi_lora._segmented_delta(x, state)
        (y * upstream).sum().backward()
        results.append((y.detach(), x.grad, a.grad, b.grad))
    for eager, op_result in zip(*results):
        assert torch.equal(eager, op_result)
    assert (results[0][0][31:40] == 0).all() and (results[0][1][31:40] == 0).all()


def test_segment_plan_rejects_overlapping_or_unknown_segments(tiny_config):
    with pytest.raises(ValueError, match="in order"):
        multi_lora.SegmentPlan([("a", 0, 5), ("b", 4, 8)], 8)
    with pytest.raises(ValueError, match="choose one of"):
        multi_lora.SegmentPlan([("a", 0, 5)], 8, kernel="cuda")
    model = _peft_model(tiny_config)
    with pytest.raises(ValueError, match="no adapter named 'mallory'"):
        with multi_lora.adapter_segments(model, [("mallory", 0, 4)]):
            pass


# ---------------------------------------------------------------------- against plain peft
def _peft_model(config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    model = None
    for name, lora in TENANTS:
        cfg = LoraConfig(**lora, init_lora_weights=False)  # random B: every update is non-zero
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return model


def _label_logps(logits, labels):
    logp = torch.log_softmax(logits.float(), -1)
    return torch.gather(logp, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)


def _adapter_grads(model, name):
    return {n: p.grad.clone() for n, p in model.named_parameters() if f".{name}." in n and p.grad is not None}


def _close(got, want, rtol=1e-5):
    """``|got - want| <= rtol * max|want|`` (float32 through a 2-layer model: ~100 roundings of 2^-24 each)."""
    scale = want.abs().max().clamp(min=1e-30)
    return bool(((got - want).abs() <= rtol * scale).all())


@pytest.mark.parametrize("kernel", KERNELS)
def test_multi_adapter_pass_equals_each_adapter_alone_through_peft(tiny_config, kernel):
    from twinkle.patch.varlen import VarlenAttention, packed_inputs
    from twinkle.processor.base import PaddingFreeProcessor

    model = _peft_model(tiny_config)
    rows = {name: make_rows(2, seed=i) for i, (name, _) in enumerate(TENANTS)}
    weights = torch.Generator().manual_seed(5)

    # each adapter alone: peft's own forward, its rows padded
    want = {}
    for name, _ in TENANTS:
        model.set_adapter(name)
        model.zero_grad(set_to_none=True)
        ids = [r["input_ids"] for r in rows[name]]
        length = max(map(len, ids))
        input_ids = torch.tensor([i + [0] * (length - len(i)) for i in ids])
        mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids])
        labels = torch.full_like(input_ids, -100)
        for b, r in enumerate(rows[name]):
            n = len(r["labels"])
            labels[b, : n - 1] = torch.tensor(r["labels"][1:])
        logps = _label_logps(model(input_ids=input_ids, attention_mask=mask).logits, labels)
        coef = torch.rand(logps.shape, generator=weights)
        (logps * coef).sum().backward()
        valid = labels != -100
        want[name] = (logps[valid].detach(), coef[valid], _adapter_grads(model, name))

    # all three in one packed pass
    VarlenAttention().apply(model)
    for n, p in model.named_parameters():  # set_adapter left only the last one trainable
        p.requires_grad_(any(f".{name}." in n for name, _ in TENANTS))
    model.zero_grad(set_to_none=True)
    all_rows = [r for name, _ in TENANTS for r in rows[name]]
    batch = PaddingFreeProcessor()(all_rows)
    bounds, pos = [], 0
    for name, _ in TENANTS:
        n = sum(len(r["input_ids"]) for r in rows[name])
        bounds.append((name, pos, pos + n))
        pos += n
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    with multi_lora.adapter_segments(model, bounds, kernel=kernel), packed_inputs(model, batch, inputs):
        logps = _label_logps(model(**inputs).logits, batch["shift_labels"])[0]
        loss = 0.0
        for name, s, e in bounds:
            valid = batch["shift_labels"][0, s:e] != -100
            got_logps = logps[s:e][valid]
            loss = loss + (got_logps * want[name][1]).sum()
            assert _close(got_logps.detach(), want[name][0]), name
        loss.backward()
    for name, _ in TENANTS:
        got = _adapter_grads(model, name)
        assert got.keys() == want[name][2].keys() and got
        for key, grad in want[name][2].items():
            assert _close(got[key], grad), key
    # outside the context the model is a plain peft model again
    assert all(not layer._disable_adapters for layer in multi_lora.lora_linear_layers(model))
    assert multi_lora.active_plan() is None


# ---------------------------------------------------------------------- against TransformersModel alone
def _model(config, tenants, lr=1e-3):
    model = TransformersModel(config=config, device="cpu", seed=3)
    for name, lora in tenants:
        model.add_adapter_to_model(name, {**lora, "init_lora_weights": False})
        model.set_optimizer("AdamW", lr=lr, adapter_name=name)
    return model


def _close_norm(got, want, rtol=1e-5):
    """``||got - want|| <= rtol ||want||``. In norm, not per element: AdamW divides by sqrt(v), so an
    element whose gradient is ~0 moves by up to lr on rounding alone, and later gradients inherit that."""
    return float((got - want).norm()) <= rtol * float(want.norm())


def _adapter_weights(model, name):
    return {
        n.replace(f".{name}.", "."): p.detach().clone() for n, p in model.model.named_parameters() if f".{name}." in n
    }


def test_tenants_trained_in_shared_passes_equal_transformers_model_trained_alone(tiny_config):
    steps = 3
    data = {
        name: [make_rows(2 + (i + s) % 2, seed=10 * s + i) for s in range(steps)] for i, (name, _) in enumerate(TENANTS)
    }
    shared = _model(tiny_config, TENANTS)
    shared_log = {name: [] for name, _ in TENANTS}
    for s in range(steps):
        outs = forward_backward_multi(shared, {name: data[name][s] for name, _ in TENANTS}, kernel="torch")
        for name, _ in TENANTS:
            grads = {n: p.grad.clone() for n, p in shared.model.named_parameters() if f".{name}." in n}
            step = shared.clip_grad_and_step(adapter_name=name)
            shared_log[name].append((outs[name]["loss"], outs[name]["num_tokens"], step["grad_norm"], grads))

    for name, lora in TENANTS:
        alone = _model(tiny_config, [(name, lora)])
        for s in range(steps):
            out = alone.forward_backward(data[name][s], adapter_name=name)
            grads = {n: p.grad.clone() for n, p in alone.model.named_parameters() if f".{name}." in n}
            step = alone.clip_grad_and_step(adapter_name=name)
            loss, tokens, norm, shared_grads = shared_log[name][s]
            assert tokens == out["num_tokens"]
            assert loss == pytest.approx(out["loss"], rel=1e-5)
            assert norm == pytest.approx(step["grad_norm"], rel=1e-5)
            assert grads.keys() == shared_grads.keys()
            for key in grads:  # in norm, as the weights below
                assert _close_norm(shared_grads[key], grads[key]), (name, s, key)
        got, want = _adapter_weights(shared, name), _adapter_weights(alone, name)
        assert got.keys() == want.keys()
        for key in want:
            assert _close_norm(got[key], want[key]), (name, key)
        assert shared.state_of(name).global_step == alone.state_of(name).global_step == steps


def test_forward_only_multi_equals_forward_only_per_adapter(tiny_config):
    model = _model(tiny_config, TENANTS[:2])
    rows = {"alice": make_rows(3, seed=1), "bob": make_rows(2, seed=2)}
    got = forward_only_multi(model, rows, kernel="torch")
    for name in rows:
        want = model.forward_only(rows[name], adapter_name=name)
        assert got[name]["num_tokens"] == want["num_tokens"]
        assert got[name]["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert len(got[name]["logps"]) == len(want["logps"])
        for a, b in zip(got[name]["logps"], want["logps"]):
            assert len(a) == len(b)
            assert _close(torch.tensor(a), torch.tensor(b))


@pytest.mark.parametrize("kernel", KERNELS)
def test_nan_in_one_tenant_never_changes_another_tenants_results(tiny_config, kernel):
    rows = {"alice": make_rows(2, seed=1), "bob": make_rows(2, seed=2)}

    def run(poison):
        model = _model(tiny_config, TENANTS[:2])
        if poison:
            with torch.no_grad():
                for n, p in model.model.named_parameters():
                    if ".bob." in n:
                        p.fill_(float("nan") if "lora_B" in n else 1e30)
        outs = forward_backward_multi(model, rows, kernel=kernel)
        grads = {n: p.grad.clone() for n, p in model.model.named_parameters() if ".alice." in n}
        model.clip_grad_and_step(adapter_name="alice")
        return outs, grads, _adapter_weights(model, "alice")

    clean_out, clean_grads, clean_weights = run(False)
    out, grads, weights = run(True)
    assert out["bob"]["loss"] != out["bob"]["loss"]  # bob's own loss is NaN
    assert out["alice"]["loss"] == clean_out["alice"]["loss"]
    for key in clean_grads:
        assert torch.isfinite(grads[key]).all()
        assert torch.equal(grads[key], clean_grads[key]), key
    for key in clean_weights:
        assert torch.equal(weights[key], clean_weights[key]), key


def test_adapter_with_dropout_is_refused(tiny_config):
    model = _model(tiny_config, [("alice", {"r": 4, "target_modules": ["q_proj"], "lora_dropout": 0.1})])
    with pytest.raises(ValueError, match="lora_dropout"):
        forward_backward_multi(model, {"alice": make_rows(1)}, kernel="torch", solo_fast_path=False)


# ---------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_triton_segment_kernel_equals_the_torch_path(dtype):
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 896, generator=gen).to("cuda", dt).requires_grad_(True)
    w = (torch.randn(4, 16, 896, generator=gen) * 0.05).to("cuda", dt).requires_grad_(True)
    segments = [(0, 0, 1000), (3, 1000, 1001), (1, 1100, 2900)]
    got = multi_lora.segment_matmul(x, w, segments, kernel="triton")
    g = torch.randn_like(got)
    dx, dw = torch.autograd.grad(got, [x, w], g)
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    ref = multi_lora.segment_matmul(x64, w64, segments, kernel="torch")
    dx_ref, dw_ref = torch.autograd.grad(ref, [x64, w64], g.double())
    # each product errs by at most (2 u_in + gamma_k) |x||w|: float32 inputs are rounded to TF32
    # (u = 2^-11) by tl.dot, bf16 ones are exact in it; fp32 sums over k terms (gamma_k).
    # sum(|x||w|) against the largest |sum(x w)|: about sqrt(k) for random signs. A bf16
    # output adds its one rounding (2^-8 of the value, at most of the largest).
    k = 1800  # the longest reduction: dw sums over a 1800-token segment
    unit_in = TF32_UNIT_ROUNDOFF if dt == torch.float32 else 0.0
    unit_out = 0.0 if dt == torch.float32 else 2.0**-8
    rel = (2 * unit_in + gamma(k)) * k**0.5 + unit_out
    for a, b in ((got, ref), (dx, dx_ref), (dw, dw_ref)):
        assert ((a.double() - b).abs() <= rel * b.abs().max() + 1e-30).all()


@pytest.mark.gpu
def test_gpu_bf16_tenant_in_a_shared_pass_matches_it_alone(tiny_config):
    def build(tenants):
        model = TransformersModel(config=tiny_config, torch_dtype="bfloat16", device="cuda", seed=3)
        for name, lora in tenants:
            model.add_adapter_to_model(name, {**lora, "init_lora_weights": False})
            model.set_optimizer("AdamW", lr=1e-3, adapter_name=name)
        return model

    rows = {name: make_rows(3, seed=i) for i, (name, _) in enumerate(TENANTS)}
    shared = build(TENANTS)
    outs = forward_backward_multi(shared, rows)
    for name, lora in TENANTS:
        alone = build([(name, lora)])
        want = alone.forward_backward(rows[name], adapter_name=name)
        assert outs[name]["num_tokens"] == want["num_tokens"]
        assert outs[name]["loss"] == pytest.approx(want["loss"], rel=2.0**-6)


def test_a_pass_of_one_adapter_takes_the_single_adapter_fast_path_or_the_segmented_one(tiny_config):
    rows = make_rows(3, seed=4)
    fast, segmented = _model(tiny_config, TENANTS[:1]), _model(tiny_config, TENANTS[:1])
    a = forward_backward_multi(fast, {"alice": rows})["alice"]
    b = forward_backward_multi(segmented, {"alice": rows}, kernel="torch", solo_fast_path=False)["alice"]
    assert a["num_tokens"] == b["num_tokens"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for (name, p), (_, q) in zip(fast.model.named_parameters(), segmented.model.named_parameters()):
        if ".alice." in name:
            assert _close_norm(q.grad, p.grad), name


def test_lora_linear_layers_are_model_modules_lora_layers_in_order(tiny_config):
    """The walk that skips LoRA layers' children finds exactly ``model.modules()``'s LoRA layers, in order,
    with adapters of different target sets (one on the LM head: a LoRA layer the others lack)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = _model(
        tiny_config,
        [
            ("a", {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"]}),
            ("b", {"r": 8, "target_modules": "all-linear"}),
            ("c", {"r": 2, "target_modules": ["o_proj"]}),
        ],
    )
    want = [m for m in model.model.modules() if isinstance(m, LoraLinear)]
    got = multi_lora.lora_linear_layers(model.model)
    assert len(want) >= 8 and any(m is model.model.get_output_embeddings() for m in want)
    assert [id(m) for m in got] == [id(m) for m in want]
