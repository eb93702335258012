"""Which step is which in the metrics, the schedule-length warning, and a training run's JSONL."""

from __future__ import annotations

import math
import warnings

import pytest
import twinkle
from model_test_utils import make_rows
from twinkle.dataloader import DataLoader
from twinkle.model import TransformersModel
from twinkle.tracker import read_metrics


def _train(tiny_model_dir, num_training_steps, rows=12, batch_size=2, accumulation=2, run_dir=None):
    """The seed's loop shape: forward_backward + clip_grad_and_step per batch, metrics every batch."""
    dataloader = DataLoader(dataset=make_rows(rows), batch_size=batch_size)
    model = TransformersModel(model_id=tiny_model_dir)
    model.set_optimizer("AdamW", lr=1e-3)
    model.state_of().gradient_accumulation_steps = accumulation
    steps = num_training_steps(len(dataloader))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.set_lr_scheduler("CosineWarmupScheduler", num_warmup_steps=0, num_training_steps=steps)
    metrics = []
    for batch in dataloader:
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
        metrics.append(model.calculate_metric(is_training=True))
    return [str(w.message) for w in caught if "LR schedule" in str(w.message)], metrics, model


def test_metrics_name_optimizer_steps_and_micro_batches(tiny_model_dir, tmp_path):
    with twinkle.initialize(run_dir=tmp_path):
        warned, metrics, _ = _train(tiny_model_dir, lambda n: n // 2)
    assert warned == []  # len(dataloader) // accumulation: the schedule is sized right
    # 6 batches, 2 per optimizer step
    assert [m["micro_batches"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["optimizer_step"] for m in metrics] == [0, 1, 1, 2, 2, 3]
    assert all(m["step"] == m["optimizer_step"] for m in metrics)
    assert metrics[-1]["lr_schedule_progress"] == 1.0
    # the cosine is done: lr at its floor (0) after the last optimizer step
    assert metrics[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    # the default JSONL tracker got the same dicts, at the optimizer step
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 1, 2, 2, 3]
    assert records[-1]["metrics"]["micro_batches"] == 6 and records[-1]["source"] == "train"
    assert set(records[0]["metrics"]) >= {"loss", "lr", "tokens_per_s", "optimizer_step", "micro_batches"}


def test_a_schedule_sized_in_batches_warns_and_shows_half_way(tiny_model_dir, tmp_path):
    with twinkle.initialize(run_dir=tmp_path):
        warned, metrics, model = _train(tiny_model_dir, lambda n: n)  # the seed's len(dataloader)
    assert len(warned) == 1
    assert "num_training_steps=6 is len(dataloader)" in warned[0]
    assert "3 optimizer steps" in warned[0] and "len(dataloader) // 2" in warned[0]
    assert metrics[-1]["lr_schedule_progress"] == 0.5
    # the lr is still half the peak: cos(pi * 3/6) -> 0.5 * (1 + 0) = 0.5
    assert metrics[-1]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-9)


def test_no_warning_without_accumulation_or_an_unrelated_length(tiny_model_dir, tmp_path):
    with twinkle.initialize(run_dir=tmp_path):
        warned, _, _ = _train(tiny_model_dir, lambda n: n, accumulation=1)
        assert warned == []
        warned, _, _ = _train(tiny_model_dir, lambda n: 2 * n)  # two epochs' worth of optimizer steps
        assert warned == []


def test_mfu_where_the_peak_is_known(tiny_model_dir, tmp_path, monkeypatch):
    from twinkle.model.mfu import flops_per_token

    with twinkle.initialize(run_dir=tmp_path):
        _, metrics, model = _train(tiny_model_dir, lambda n: n // 2)
        assert "mfu" not in metrics[-1]  # CPU: no known peak
        monkeypatch.setenv("TWINKLE_PEAK_TFLOPS", "0.001")  # 1 GFLOP/s
        model.forward_backward(inputs=make_rows(2))
        metric = model.calculate_metric(is_training=True)
    hf = model._hf_model()
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight  # tied: the head's matmul counts
    n = sum(p.numel() for name, p in hf.named_parameters() if ".lora_" not in name)
    assert flops_per_token(hf, lora=False) == 6 * n
    # the tiny model trains all parameters here (no adapter): 6 N FLOPs per token
    assert metric["mfu"] == pytest.approx(metric["tokens_per_s"] * 6 * n / 1e9, rel=1e-12)
