"""The chunked linear cross-entropy equals ``F.cross_entropy(hidden @ W.T + b)`` (values and gradients)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from twinkle.patch.fused_linear_ce import linear_cross_entropy, linear_token_logps  # noqa: E402


def _data(n=53, h=24, v=97, dtype=torch.float32, seed=0, ignore_every=4):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=dtype).requires_grad_(True)
    weight = (0.3 * torch.randn(v, h, generator=gen, dtype=dtype)).requires_grad_(True)
    bias = (0.1 * torch.randn(v, generator=gen, dtype=dtype)).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::ignore_every] = -100
    return hidden, weight, bias, labels


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, None])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_cross_entropy_fp32(chunk_rows, label_smoothing, with_bias):
    hidden, weight, bias, labels = _data()
    bias = bias if with_bias else None
    params = [hidden, weight] + ([bias] if with_bias else [])
    ref = F.cross_entropy(
        F.linear(hidden, weight, bias), labels, ignore_index=-100, reduction="sum", label_smoothing=label_smoothing
    )
    out = linear_cross_entropy(
        hidden, weight, labels, bias=bias, label_smoothing=label_smoothing, chunk_rows=chunk_rows
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    # a non-unit upstream gradient (the model divides by the window's token count)
    for got, want in zip(_grads(out * 0.37, params), _grads(ref * 0.37, params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_leading_dims_and_mostly_ignored_rows():
    """[B, T, H] input and a batch where most labels are -100 (the rows are skipped, not computed)."""
    hidden, weight, _, labels = _data(n=60, ignore_every=1)
    labels = labels.clone()
    labels[:] = -100
    labels[5] = 3
    labels[41] = 96
    h3, y3 = hidden.view(3, 20, -1), labels.view(3, 20)
    out, preds = linear_cross_entropy(h3, weight, y3, chunk_rows=8, return_predictions=True)
    ref = F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(out, [hidden, weight]), _grads(ref, [hidden, weight])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert preds.shape == (3, 20)
    argmax = F.linear(hidden, weight).argmax(-1)
    flat = preds.view(-1)
    assert flat[5] == argmax[5] and flat[41] == argmax[41]
    assert bool((flat[labels == -100] == -1).all())


def test_frozen_weight_gets_no_grad_and_all_ignored_is_zero():
    hidden, weight, _, labels = _data()
    weight = weight.detach()
    out = linear_cross_entropy(hidden, weight, labels, chunk_rows=5)
    (g,) = _grads(out, [hidden])
    ref = F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(g, _grads(ref, [hidden])[0], rtol=1e-4, atol=1e-6)
    none = torch.full_like(labels, -100)
    zero = linear_cross_entropy(hidden, weight, none)
    assert float(zero.detach()) == 0.0


def test_bf16_inputs_match_the_plain_bf16_path():
    """Same recipe as the plain path: bf16 matmul, float32 softmax; gradients within bf16 rounding."""
    hidden, weight, _, labels = _data(n=40, h=32, v=200)
    hb = hidden.detach().bfloat16().requires_grad_(True)
    wb = weight.detach().bfloat16().requires_grad_(True)
    ref = F.cross_entropy(F.linear(hb, wb).float(), labels, ignore_index=-100, reduction="sum")
    out = linear_cross_entropy(hb, wb, labels, chunk_rows=16)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    for got, want in zip(_grads(out, [hb, wb]), _grads(ref, [hb, wb])):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_token_logps_match_log_softmax():
    hidden, weight, bias, labels = _data()
    ref = torch.log_softmax(F.linear(hidden, weight, bias), -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    ref = ref * (labels != -100)
    out = linear_token_logps(hidden, weight, labels, bias=bias, chunk_rows=9)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3))
    params = [hidden, weight, bias]
    for got, want in zip(_grads((out * upstream).sum(), params), _grads((ref * upstream).sum(), params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bad_shapes_and_arguments_are_named():
    hidden, weight, _, labels = _data()
    with pytest.raises(ValueError, match="disagree on the token dimensions"):
        linear_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="hidden size"):
        linear_cross_entropy(hidden[:, :-1], weight, labels)
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(hidden, weight, labels, chunk_rows=0)


def test_chunks_are_larger_when_the_head_trains():
    """Each chunk re-reads the float32 weight-gradient buffer, so full fine-tuning takes 4x fewer, larger chunks."""
    from twinkle.patch import fused_linear_ce as lce

    vocab = 151936
    frozen = lce._chunk_rows(100_000, vocab, None)
    training = lce._chunk_rows(100_000, vocab, None, weight_grad=True)
    assert frozen == 512 and training == 2048
    assert lce._chunk_rows(100, vocab, None, weight_grad=True) == 100  # never more rows than there are
    assert lce._chunk_rows(100_000, vocab, 7, weight_grad=True) == 7  # an explicit size wins


def test_a_second_backward_through_the_same_loss_is_refused_not_wrong():
    """The saved gradients are scaled in place; a retained graph's second backward must fail loudly."""
    hidden, weight, bias, labels = _data()
    loss = linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_rows=7)
    (2.0 * loss).backward(retain_graph=True)
    first = hidden.grad.clone()
    want = torch.autograd.grad(
        2.0 * F.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=-100, reduction="sum"), hidden
    )[0]
    torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
