"""Saving a checkpoint and syncing weights show a bar (bytes, rate, ETA) on a terminal, nothing elsewhere."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from twinkle.checkpoint_engine import LocalCheckpointEngine  # noqa: E402
from twinkle.model import TransformersModel  # noqa: E402
from twinkle.sampler import TorchSampler  # noqa: E402


def _model(model_dir):
    model = TransformersModel(model_id=model_dir, seed=0, device="cpu")
    model.add_adapter_to_model("default", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    model.set_optimizer("AdamW", lr=1e-3)
    return model


def test_save_draws_a_bytes_bar_when_forced_and_nothing_otherwise(tiny_model_dir, rows, tmp_path, monkeypatch, capsys):
    model = _model(tiny_model_dir)
    model.forward_backward(inputs=rows[:2])
    model.clip_grad_and_step()
    monkeypatch.setenv("TWINKLE_PROGRESS", "0")
    model.save(str(tmp_path / "quiet"), save_optimizer=True)
    assert "save" not in capsys.readouterr().err
    monkeypatch.setenv("TWINKLE_PROGRESS", "1")  # as on a terminal
    model.save(str(tmp_path / "ckpt"), save_optimizer=True)
    err = capsys.readouterr().err
    assert "save ckpt" in err and "100%" in err
    assert "B/s" in err  # the rate, in bytes


def test_weight_sync_draws_a_bar_when_forced(tiny_model_dir, monkeypatch, capsys):
    model = _model(tiny_model_dir)
    sampler = TorchSampler(model_id=tiny_model_dir, seed=0, device="cpu")
    monkeypatch.setenv("TWINKLE_PROGRESS", "1")
    metrics = LocalCheckpointEngine().sync(model, sampler, adapter_name="default")
    err = capsys.readouterr().err
    assert "weight sync" in err and "100%" in err and "B/s" in err
    assert metrics["sync_bytes"] > 0
