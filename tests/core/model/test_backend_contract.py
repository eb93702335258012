"""The backend-hook contract: what a third-party model backend implements, and what it then gets.

A backend subclasses :class:`twinkle.model.backend.BackendModel` and implements the hooks
``build_model`` and ``run_forward`` (plus ``export_weights`` / ``load_full_weights`` to
checkpoint); the shared base gives it the whole TwinkleModel protocol: token-normalized
gradient accumulation, clip/step, metrics, save/load. docs/model.md ("Writing a backend")
shows the same backend.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from twinkle.data_format.output import ModelOutput  # noqa: E402
from twinkle.model.backend import BACKEND_HOOKS, BackendModel  # noqa: E402
from twinkle.model.state import FULL_MODEL  # noqa: E402

VOCAB = 32


class TinyLM(torch.nn.Module):
    """Embedding -> linear head: the smallest network with logits."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.embed(input_ids)))


class TinyBackend(BackendModel):
    """A minimal backend: two required hooks, two for checkpoints."""

    def build_model(self, config, dtype):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return TinyLM(config["vocab_size"], config["hidden_size"]).to(self.device)

    def run_forward(self, batch):
        return ModelOutput(logits=self.model(batch["input_ids"]))

    def export_weights(self, state, **options):
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def load_full_weights(self, state_dict, path):
        self.model.load_state_dict(state_dict)


def _rows(seed: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (5 + 3 * i,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100, *ids[1:]]})
    return rows


def _model(**kwargs) -> TinyBackend:
    model = TinyBackend(config={"vocab_size": VOCAB, "hidden_size": 8}, device="cpu", seed=3, **kwargs)
    model.set_optimizer("SGD", lr=0.5)
    return model


def test_every_hook_is_declared_on_the_base():
    for hook in BACKEND_HOOKS:
        assert callable(getattr(BackendModel, hook, None)), hook
    assert len(set(BACKEND_HOOKS)) == len(BACKEND_HOOKS)


def test_missing_required_hook_names_itself():
    class NoForward(BackendModel):
        def build_model(self, config, dtype):
            return TinyLM(VOCAB, 4)

    model = NoForward(config={"vocab_size": VOCAB}, device="cpu")
    with pytest.raises(NotImplementedError, match="NoForward does not implement the backend hook 'run_forward'"):
        model.forward_backward(inputs=_rows(0, 1))
    with pytest.raises(NotImplementedError, match="'attach_adapter'"):
        model.add_adapter_to_model("a", {"r": 2, "target_modules": ["head"]})


def test_accumulated_window_equals_one_large_batch():
    """Two micro-batches then a step equal one batch holding both: the sum of the losses over the window's tokens."""
    rows = _rows(1, 4)
    split = _model()
    split.state_of().gradient_accumulation_steps = 2
    first = split.forward_backward(inputs=rows[:1])  # 4 label tokens
    assert split.clip_grad_and_step(max_grad_norm=1e9) == {"stepped": False, "step": 0}
    split.forward_backward(inputs=rows[1:])  # 7 + 10 + 13 label tokens
    result = split.clip_grad_and_step(max_grad_norm=1e9)
    assert result["stepped"] and result["step"] == 1 and result["lr"] == 0.5

    whole = _model()
    out = whole.forward_backward(inputs=rows)
    whole.clip_grad_and_step(max_grad_norm=1e9)
    assert out["num_tokens"] == 4 + 7 + 10 + 13 and first["num_tokens"] == 4
    assert result["grad_norm"] == pytest.approx(whole.state_of().last_grad_norm, rel=1e-5)
    for a, b in zip(split.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    start = _model()
    assert any(not torch.equal(a, b) for a, b in zip(start.model.parameters(), whole.model.parameters()))


def test_clip_and_metrics_come_from_the_base():
    model = _model()
    model.forward_backward(inputs=_rows(2, 2))
    result = model.clip_grad_and_step(max_grad_norm=1e-3)
    assert result["grad_norm"] > 1e-3  # it was clipped: the update is max_grad_norm * lr at most
    metrics = model.calculate_metric(is_training=True)
    assert metrics["step"] == 1 and metrics["lr"] == 0.5 and metrics["grad_norm"] == result["grad_norm"]
    assert 0.0 <= metrics["token_acc"] <= 1.0 and metrics["loss"] > 0


def test_save_and_load_through_the_weight_hooks(tmp_path):
    model = _model()
    model.forward_backward(inputs=_rows(3, 2))
    model.clip_grad_and_step()
    path = model.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert (tmp_path / "ckpt" / "optimizer.pt").is_file()

    fresh = _model()
    state = fresh.resume_from_checkpoint(path)
    assert state["global_step"] == 1 and fresh.state_of(FULL_MODEL).global_step == 1
    for a, b in zip(model.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)
