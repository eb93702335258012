"""Checkpoints: PEFT/HF formats other tools load, atomic writes, exact resume."""

from __future__ import annotations

import os

import pytest
import torch
from model_test_utils import make_rows
from peft import LoraConfig
from twinkle.model.transformers_model import CheckpointError, TransformersModel

LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")


def _trained(tiny_model_dir: str, steps: int = 3) -> TransformersModel:
    model = TransformersModel(model_id=tiny_model_dir)
    model.add_adapter_to_model("default", LORA)
    model.set_optimizer("AdamW", lr=1e-2)
    for _ in range(steps):
        model.forward_backward(inputs=make_rows(2))
        model.clip_grad_and_step()
    return model


def test_adapter_checkpoint_is_peft_format(tiny_model_dir, tmp_path):
    from peft import PeftModel

    model = _trained(tiny_model_dir)
    path = model.save(tmp_path / "ckpt")
    files = set(os.listdir(path))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "trainer_state.json"} <= files
    rows = make_rows(2, seed=9)
    ours = model.forward_only(rows)
    # plain peft on a freshly built base (same seed => same random base weights)
    base = TransformersModel(model_id=tiny_model_dir).model
    peft_model = PeftModel.from_pretrained(base, path).eval()
    batch = model.state_of().processor(rows)
    with torch.no_grad():
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.log_softmax(logits.float(), -1)
    lp = torch.gather(ref[0, :-1], -1, batch["input_ids"][0, 1:, None]).squeeze(-1)
    n = len(rows[0]["input_ids"])
    expected = [v if lab != -100 else 0.0 for v, lab in zip([0.0, *lp[: n - 1].tolist()], rows[0]["labels"])]
    assert ours.logps[0] == pytest.approx(expected, abs=1e-4)
    # and load() into a fresh TransformersModel restores the adapter
    fresh = TransformersModel(model_id=tiny_model_dir)
    fresh.load(path)
    assert fresh.forward_only(rows).loss == pytest.approx(ours.loss, rel=1e-6)


def test_full_checkpoint_is_transformers_format(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = TransformersModel(model_id=tiny_model_dir)
    model.set_optimizer("SGD", lr=0.5)
    model.forward_backward(inputs=make_rows(2))
    model.clip_grad_and_step()
    path = model.save(tmp_path / "full", save_optimizer=False)
    assert "model.safetensors" in os.listdir(path) and "optimizer.pt" not in os.listdir(path)
    hf = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([make_rows(1, seed=4)[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model.model(input_ids=ids).logits)
    other = TransformersModel(model_id=path)  # has weights now: loaded, not random
    assert other.forward_only(make_rows(2)).loss == pytest.approx(model.forward_only(make_rows(2)).loss, rel=1e-6)


def test_failed_save_leaves_nothing_and_keeps_the_old_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    model = _trained(tiny_model_dir, steps=1)
    target = tmp_path / "ckpt"
    model.save(target)
    before = sorted(os.listdir(target))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(TransformersModel, "_write_tokenizer", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save(target)
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path / "new")
    assert sorted(os.listdir(target)) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_bad_paths_get_clear_errors(tiny_model_dir, tmp_path):
    model = _trained(tiny_model_dir, steps=1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        model.save(tmp_path / "file")
    model.save(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="already exists"):
        model.save(tmp_path / "ckpt", overwrite=False)
    with pytest.raises(CheckpointError, match="not a directory"):
        model.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither adapter_config.json"):
        model.load(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        model.resume_from_checkpoint(tmp_path / "empty")


def _new_run(tiny_model_dir: str, total_steps: int) -> TransformersModel:
    model = TransformersModel(model_id=tiny_model_dir)
    model.add_adapter_to_model("default", LORA, gradient_accumulation_steps=2)
    model.set_optimizer("AdamW", lr=5e-3)
    model.set_lr_scheduler("CosineWarmupScheduler", num_warmup_steps=1, num_training_steps=total_steps)
    return model


class _Loader:
    """A resumable stand-in for the DataLoader's state (consumed batches)."""

    def __init__(self) -> None:
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = state["consumed"]


def test_resume_continues_the_exact_loss_trajectory(tiny_model_dir, tmp_path):
    batches = [make_rows(2, seed=100 + i) for i in range(8)]
    model = _new_run(tiny_model_dir, total_steps=4)
    loader = _Loader()
    losses = []
    for i, batch in enumerate(batches):
        losses.append(model.forward_backward(inputs=batch).loss)
        model.clip_grad_and_step()
        loader.consumed = i + 1
        if i == 3:
            model.save(tmp_path / "mid", dataloader=loader)

    resumed = _new_run(tiny_model_dir, total_steps=4)
    loader2 = _Loader()
    state = resumed.resume_from_checkpoint(tmp_path / "mid", dataloader=loader2)
    assert state["global_step"] == 2 and loader2.consumed == 4
    assert resumed.state_of().lr_scheduler.last_epoch == model.state_of().lr_scheduler.last_epoch - 2
    after = []
    for batch in batches[loader2.consumed :]:
        after.append(resumed.forward_backward(inputs=batch).loss)
        resumed.clip_grad_and_step()
    assert after == pytest.approx(losses[4:], rel=1e-6, abs=1e-7)
    assert resumed.state_of().global_step == 4
