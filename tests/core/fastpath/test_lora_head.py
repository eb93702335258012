"""LoRA on the LM head keeps the chunked head (twinkle.patch.fused_linear_ce with ``lora=``).

Tinker clients train ``lm_head`` by default (``train_unembed=True``): peft then wraps the head
in a LoRA layer. The chunked log-probabilities / cross-entropy add each chunk's low-rank term
``scaling (h A^T) B^T`` themselves, so no ``[tokens, vocab]`` logits exist, in the
single-adapter fast path and in multi-adapter passes (each segment its own adapter's head).
Checked against full logits (float64 reference / peft's own forward), for isolation (a NaN in one
tenant's head never reaches another) and for the peak logits size.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from fastpath_test_utils import gamma, make_rows  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from twinkle.model.multi_adapter import forward_backward_multi, forward_only_multi  # noqa: E402
from twinkle.model.transformers_model import TransformersModel  # noqa: E402
from twinkle.patch.fused_linear_ce import linear_cross_entropy, linear_token_logps  # noqa: E402
from twinkle.patch.kernel_config import kernel_settings  # noqa: E402

VOCAB = 512
HEAD = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]}
NO_HEAD = {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}


class LargestLogits(TorchDispatchMode):
    """Records the most rows of any tensor an op computes with the vocabulary as its last dimension
    (views such as the head weight's transpose ``[hidden, vocab]`` compute nothing and are skipped)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


# ---------------------------------------------------------------------- the chunked functions
def _problem(n=40, h=64, r=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).requires_grad_(True)
    weight = torch.randn(VOCAB, h, generator=gen) * 0.1  # frozen base head
    a = (torch.randn(r, h, generator=gen) * 0.1).requires_grad_(True)
    b = (torch.randn(VOCAB, r, generator=gen) * 0.1).requires_grad_(True)
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    labels[::7] = -100
    return hidden, weight, a, b, labels


def _reference(hidden, weight, a, b, scaling, labels):
    """float64 full logits, their log-softmax at the labels (0 where ignored), magnitudes |h||W| + s|h||A||B|."""
    h64, w64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (hidden, weight, a, b))
    logits = h64 @ w64.t() + scaling * (h64 @ a64.t()) @ b64.t()
    mag = h64.abs() @ w64.abs().t() + scaling * (h64.abs() @ a64.abs().t()) @ b64.abs().t()
    logp = torch.log_softmax(logits, -1).gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1) * (labels != -100)
    return logp, (h64, a64, b64), mag.detach()


def _logp_tolerance(mag, h, r):
    """A logit is a length-h dot plus a rank-r term of length-h dots: error <= gamma(h + r + 2) * its magnitude;
    log_softmax is 1-Lipschitz in each logit's error (twice: target and log-sum-exp), and the float32
    log-sum-exp of VOCAB terms adds gamma(VOCAB + 2) (relative error of the sum -> absolute in the log)."""
    return 2 * gamma(h + r + 2) * float(mag.max()) + gamma(VOCAB + 2)


def _grad_close(got, want, n, h, r):
    """Each gradient is a chain of float32 reductions (logits: h + r, softmax: VOCAB, over tokens: n, back
    through B then A: r + h), so |got - want| <= 4 gamma(h + r + VOCAB + n + r + h) max|want| (4: the product
    of a few such sums, each within its own gamma; elements compared against the largest, no cancellation
    amplification for these well-scaled random inputs)."""
    tol = 4 * gamma(2 * h + 2 * r + VOCAB + n) * float(want.abs().max())
    return float((got.double() - want).abs().max()) <= tol


@pytest.mark.parametrize("chunk_rows", [8, None])
def test_chunked_logps_with_lora_head_equal_full_logits(chunk_rows):
    hidden, weight, a, b, labels = _problem()
    scaling = 2.0
    got = linear_token_logps(hidden, weight, labels, lora=(a, b, scaling), chunk_rows=chunk_rows)
    want, (h64, a64, b64), mag = _reference(hidden, weight, a, b, scaling, labels)
    assert float((got.detach().double() - want.detach()).abs().max()) <= _logp_tolerance(mag, 64, 4)
    coef = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    (got * coef).sum().backward()
    (want * coef.double()).sum().backward()
    assert weight.grad is None  # the base head is frozen
    for g, w in ((hidden.grad, h64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert g is not None and _grad_close(g, w, 40, 64, 4)
    # the LoRA term matters: without it the result is far off
    plain = linear_token_logps(hidden.detach(), weight, labels)
    assert float((plain.double() - want.detach()).abs().max()) > 100 * _logp_tolerance(mag, 64, 4)


@pytest.mark.parametrize("chunk_rows", [8, None])
def test_chunked_cross_entropy_with_lora_head_equals_full_logits(chunk_rows):
    hidden, weight, a, b, labels = _problem(seed=2)
    scaling = 0.5
    loss, preds = linear_cross_entropy(
        hidden, weight, labels, lora=(a, b, scaling), chunk_rows=chunk_rows, return_predictions=True
    )
    want, (h64, a64, b64), mag = _reference(hidden, weight, a, b, scaling, labels)
    kept = int((labels != -100).sum())
    # the sum of `kept` per-token errors, plus its own float32 summation
    assert abs(float(loss.detach()) + float(want.detach().sum())) <= kept * _logp_tolerance(mag, 64, 4) + gamma(
        kept
    ) * float(want.abs().sum())
    loss.backward()
    (-want.sum()).backward()
    for g, w in ((hidden.grad, h64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert _grad_close(g, w, 40, 64, 4)
    logits = h64 @ weight.double().t() + scaling * (h64 @ a64.t()) @ b64.t()
    assert torch.equal(preds[labels != -100], logits.argmax(-1)[labels != -100])


def test_lora_segments_give_each_range_its_own_head_and_isolate_nan():
    hidden, weight, a, b, labels = _problem(n=30)
    gen = torch.Generator().manual_seed(3)
    a2, b2 = torch.randn(2, 64, generator=gen) * 0.1, torch.randn(VOCAB, 2, generator=gen) * 0.1
    # tokens 0..12: adapter 1; 12..20: no head LoRA; 20..30: adapter 2
    segments = [(0, 12, a, b, 2.0), (20, 30, a2, b2, 1.0)]
    got = linear_token_logps(hidden, weight, labels, lora_segments=segments, chunk_rows=8)
    parts = [
        linear_token_logps(hidden[:12], weight, labels[:12], lora=(a, b, 2.0)),
        linear_token_logps(hidden[12:20], weight, labels[12:20]),
        linear_token_logps(hidden[20:], weight, labels[20:], lora=(a2, b2, 1.0)),
    ]
    assert torch.allclose(got, torch.cat(parts), rtol=0, atol=_logp_tolerance(torch.tensor(50.0), 64, 4))
    loss = linear_cross_entropy(hidden, weight, labels, lora_segments=segments)
    want = sum(
        linear_cross_entropy(hidden[s:e], weight, labels[s:e], lora=t)
        for s, e, t in [(0, 12, (a, b, 2.0)), (12, 20, None), (20, 30, (a2, b2, 1.0))]
    )
    assert float(loss) == pytest.approx(float(want), rel=1e-6)

    # a NaN in adapter 2's head: adapter 1's tokens and the plain ones are bit-identical
    hidden.grad = a.grad = b.grad = None
    clean = linear_token_logps(hidden, weight, labels, lora_segments=segments)
    clean.sum().backward()
    clean_grads = (hidden.grad[:20].clone(), a.grad.clone(), b.grad.clone())
    hidden.grad = a.grad = b.grad = None
    poisoned = [(0, 12, a, b, 2.0), (20, 30, torch.full_like(a2, float("nan")), b2, 1.0)]
    dirty = linear_token_logps(hidden, weight, labels, lora_segments=poisoned)
    dirty.sum().backward()
    assert torch.equal(dirty[:20], clean[:20]) and dirty[20:][labels[20:] != -100].isnan().all()
    for g, c in zip((hidden.grad[:20], a.grad, b.grad), clean_grads):
        assert torch.equal(g, c)


# ---------------------------------------------------------------------- TransformersModel, one adapter
def _model(config, tenants, fused=True):
    model = TransformersModel(
        config=config, device="cpu", seed=3, disabled_patches=() if fused else ["FusedLinearCrossEntropy"]
    )
    for name, lora in tenants:
        model.add_adapter_to_model(name, {**lora, "init_lora_weights": False})
        model.set_optimizer("AdamW", lr=1e-3, adapter_name=name)
    return model


def _grads(model, name):
    return {n: p.grad.clone() for n, p in model.model.named_parameters() if f".{name}." in n and p.grad is not None}


def _close(got, want, rtol=1e-5):
    """``|got - want| <= rtol * max|want|`` (float32 through a 2-layer model: ~100 roundings of 2^-24 each)."""
    return bool(((got - want).abs() <= rtol * want.abs().max().clamp(min=1e-30)).all())


def test_single_adapter_lora_head_trains_on_the_chunked_head_like_full_logits(tiny_config):
    rows = make_rows(3, seed=4)
    fused, plain = _model(tiny_config, [("alice", HEAD)]), _model(tiny_config, [("alice", HEAD)], fused=False)
    watch = LargestLogits(VOCAB)
    tokens = sum(len(r["input_ids"]) for r in rows)
    with kernel_settings(lce_chunk_bytes=4 * VOCAB * 8), watch:  # 8 rows a chunk
        got = fused.forward_backward(rows, adapter_name="alice")
    assert 0 < watch.rows <= 8 < tokens
    with LargestLogits(VOCAB) as full:
        want = plain.forward_backward(rows, adapter_name="alice")
    assert full.rows >= tokens - len(rows)  # the reference does hold full logits: the check can tell
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    g, w = _grads(fused, "alice"), _grads(plain, "alice")
    assert g.keys() == w.keys() and any("lm_head" in k and "lora_B" in k for k in g)
    for key in w:
        assert _close(g[key], w[key]), key
    # forward_only's per-token log-probs (the label_logps path)
    a = fused.forward_only(rows, adapter_name="alice")["logps"]
    b = plain.forward_only(rows, adapter_name="alice")["logps"]
    for x, y in zip(a, b):
        assert _close(torch.tensor(x), torch.tensor(y))


# ---------------------------------------------------------------------- multi-adapter passes
def test_multi_adapter_pass_with_and_without_lora_head_equals_each_alone(tiny_config):
    tenants = [("alice", HEAD), ("bob", NO_HEAD)]
    rows = {"alice": make_rows(2, seed=1), "bob": make_rows(3, seed=2)}
    shared = _model(tiny_config, tenants)
    watch = LargestLogits(VOCAB)
    with kernel_settings(lce_chunk_bytes=4 * VOCAB * 8), watch:
        outs = forward_backward_multi(shared, rows, kernel="torch")
    assert 0 < watch.rows <= 8
    for name, lora in tenants:
        alone = _model(tiny_config, [(name, lora)], fused=False)  # full logits through peft's own head
        want = alone.forward_backward(rows[name], adapter_name=name)
        assert outs[name]["loss"] == pytest.approx(want["loss"], rel=1e-5)
        g, w = _grads(shared, name), _grads(alone, name)
        assert g.keys() == w.keys() and g
        for key in w:
            assert _close(g[key], w[key]), (name, key)
    with kernel_settings(lce_chunk_bytes=4 * VOCAB * 8), LargestLogits(VOCAB) as watch:
        got = forward_only_multi(shared, rows, kernel="torch")
    assert 0 < watch.rows <= 8
    for name, lora in tenants:
        want = _model(tiny_config, [(name, lora)], fused=False).forward_only(rows[name], adapter_name=name)
        assert got[name]["loss"] == pytest.approx(want["loss"], rel=1e-5)
        for x, y in zip(got[name]["logps"], want["logps"]):
            assert _close(torch.tensor(x), torch.tensor(y))


def test_nan_in_one_tenants_lora_head_never_changes_anothers(tiny_config):
    tenants = [("alice", HEAD), ("bob", {**HEAD, "r": 2})]
    rows = {"alice": make_rows(2, seed=1), "bob": make_rows(2, seed=2)}

    def run(poison):
        model = _model(tiny_config, tenants)
        if poison:
            with torch.no_grad():
                for n, p in model.model.named_parameters():
                    if ".bob." in n and "lm_head" in n:
                        p.fill_(float("nan"))
        outs = forward_backward_multi(model, rows, kernel="torch")
        return outs, _grads(model, "alice")

    clean_out, clean_grads = run(False)
    out, grads = run(True)
    assert out["bob"]["loss"] != out["bob"]["loss"]  # bob's own loss is NaN
    assert out["alice"]["loss"] == clean_out["alice"]["loss"]
    assert clean_grads.keys() == grads.keys()
    for key in clean_grads:
        assert torch.isfinite(grads[key]).all() and torch.equal(grads[key], clean_grads[key]), key
