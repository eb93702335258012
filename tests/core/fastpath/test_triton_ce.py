"""The Triton cross-entropy chunk kernel equals the eager chunk function and F.cross_entropy.

On CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set by the root
conftest before anything imports triton): the same kernel source the GPU compiles, executed
program by program. Skipped where triton is not installed.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from twinkle.patch import triton_ce  # noqa: E402
from twinkle.patch.fused_linear_ce import _ce_chunk, chunk_kernel, linear_cross_entropy  # noqa: E402
from twinkle.patch.kernel_config import KernelConfig, kernel_config, kernel_settings  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks much smaller than the vocabulary, so every row takes several (and a partial) block."""
    monkeypatch.setattr(kernel_config(), "ce_block", 64)


def _logits(n, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, vocab, generator=gen)).to(dtype)
    logits[2, 10] = logits[2, 150] = logits[2].max() + 1  # a tie across blocks: the first index wins
    logits[3, 70] = logits[3, 71] = logits[3].max() + 1  # and inside one block
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[1] = -100
    labels[4] = vocab - 1
    return logits.to(DEVICE), labels.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_kernel_matches_the_eager_chunk(dtype, label_smoothing):
    logits, labels = _logits(9, 301, dtype)
    want_grad = logits.clone()
    want_loss, want_pred = _ce_chunk(want_grad, labels, label_smoothing)
    grad = logits.clone()
    loss = torch.full((9,), 7.0, device=DEVICE)
    pred = torch.full((9,), -5, dtype=torch.long, device=DEVICE)
    triton_ce.ce_chunk_(grad, labels, label_smoothing, loss, pred)
    torch.testing.assert_close(loss.sum(), want_loss, rtol=1e-5, atol=1e-5)
    assert loss[1].item() == 0.0  # the ignored row
    assert torch.equal(pred, want_pred)
    assert pred[2].item() == 10 and pred[3].item() == 70
    # float32: equal up to the order of sums; half precision: at most one rounding step apart
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=2**-7)
    torch.testing.assert_close(grad.float(), want_grad.float(), **tol)
    assert torch.count_nonzero(grad[1]) == 0


def test_an_id_outside_the_vocabulary_gives_nan_not_a_number_that_looks_right():
    logits, labels = _logits(5, 301, torch.float32)
    labels[0] = 301
    loss = torch.empty(5, device=DEVICE)
    pred = torch.empty(5, dtype=torch.long, device=DEVICE)
    triton_ce.ce_chunk_(logits, labels, 0.0, loss, pred)
    assert torch.isnan(loss[0]) and torch.isfinite(loss[2:]).all()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_linear_cross_entropy_on_the_kernel_matches_cross_entropy(monkeypatch, label_smoothing):
    monkeypatch.setattr(kernel_config(), "lce_kernel", "triton")
    assert chunk_kernel(DEVICE) == "triton"
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=gen).to(DEVICE).requires_grad_(True)
    weight = (0.3 * torch.randn(211, 16, generator=gen)).to(DEVICE).requires_grad_(True)
    labels = torch.randint(0, 211, (37,), generator=gen).to(DEVICE)
    labels[::5] = -100
    out, preds = linear_cross_entropy(
        hidden, weight, labels, label_smoothing=label_smoothing, chunk_rows=8, return_predictions=True
    )
    logits = F.linear(hidden, weight)
    ref = F.cross_entropy(logits, labels, reduction="sum", label_smoothing=label_smoothing)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    want_preds = logits.argmax(-1).masked_fill(labels == -100, -1)
    assert torch.equal(preds, want_preds)
    got = torch.autograd.grad(out * 0.5, [hidden, weight])
    want = torch.autograd.grad(ref * 0.5, [hidden, weight])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_kernel_choice_follows_the_config(monkeypatch):
    with kernel_settings(lce_kernel="auto"):
        assert chunk_kernel("cpu") == "eager"
        assert chunk_kernel("cuda") in ("triton", "inductor")
    with kernel_settings(lce_kernel="auto", lce_compile=False):
        assert chunk_kernel("cuda") == "eager"
    with kernel_settings(lce_kernel="inductor"):
        assert chunk_kernel("cpu") == "eager"
    with kernel_settings(lce_kernel="cuda-magic"):
        with pytest.raises(ValueError, match="TWINKLE_LCE_KERNEL='cuda-magic': choose one of auto, triton"):
            chunk_kernel("cuda")
    monkeypatch.setenv("TWINKLE_LCE_KERNEL", "inductor")  # the environment sets the default
    with kernel_settings(KernelConfig.from_env()):
        assert kernel_config().lce_kernel == "inductor"
