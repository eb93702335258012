"""MegatronModel checkpoints are Hugging Face / PEFT checkpoints: other tools load them, resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from twinkle.model.transformers_model import CheckpointError
from twinkle_megatron.model import MegatronModel

from conftest import tiny_config


def _logits(model: MegatronModel, rows: list[dict]) -> torch.Tensor:
    return model.forward_only(inputs=rows[1:2], return_logits=True).logits


def _train(model: MegatronModel, rows: list[dict], steps: int) -> list[float]:
    losses = []
    for step in range(steps):
        losses.append(model.forward_backward(inputs=rows[:2] if step % 2 == 0 else rows[2:]).loss)
        model.clip_grad_and_step(max_grad_norm=1.0)
    return losses


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3_moe", "llama"])
def test_full_save_loads_in_transformers(model_type: str, rows, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    mg = MegatronModel(config=tiny_config(model_type), device="cpu", seed=3)
    try:
        mg.set_optimizer("AdamW", lr=1e-2)
        _train(mg, rows, 2)
        path = mg.save(tmp_path / "full", save_optimizer=False)
        files = {p.name for p in (tmp_path / "full").iterdir()}
        assert {"config.json", "model.safetensors"} <= files
        assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dir left behind
        hf = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([rows[1]["input_ids"]])).logits
        diff = (ref - _logits(mg, rows)).abs().max().item()
        print(f"{model_type}: transformers-loaded logits max |diff| = {diff:.3e}")
        assert diff < 1e-4
    finally:
        mg.close()


def test_lora_save_is_a_peft_adapter_and_merged_weights_agree(rows, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    mg = MegatronModel(config=tiny_config("qwen2"), device="cpu", seed=3)
    try:
        base_dir = mg.save(tmp_path / "base", save_optimizer=False)  # the untrained base, in HF format
        mg.add_adapter_to_model("default", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        mg.set_optimizer("AdamW", lr=5e-2)
        _train(mg, rows, 3)
        adapter_dir = mg.save(tmp_path / "adapter", save_optimizer=False)
        config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4
        assert sorted(config["target_modules"]) == sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        )
        ours = _logits(mg, rows)
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
        with torch.no_grad():
            ref = peft_model(input_ids=torch.tensor([rows[1]["input_ids"]])).logits
        diff = (ref - ours).abs().max().item()
        print(f"peft-loaded adapter logits max |diff| = {diff:.3e}")
        assert diff < 1e-4
        merged = mg.get_state_dict(merged=True)
        hf = AutoModelForCausalLM.from_pretrained(base_dir)
        hf.load_state_dict(merged)
        with torch.no_grad():
            merged_logits = hf.eval()(input_ids=torch.tensor([rows[1]["input_ids"]])).logits
        assert (merged_logits - ours).abs().max().item() < 1e-4
        # load() restores the adapter into a fresh model with the same base
        other = MegatronModel(model_id=base_dir, device="cpu")
        try:
            other.load(adapter_dir)
            assert (_logits(other, rows) - ours).abs().max().item() < 1e-5
        finally:
            other.close()
    finally:
        mg.close()


def test_resume_continues_exactly(rows, tmp_path) -> None:
    def fresh() -> MegatronModel:
        model = MegatronModel(config=tiny_config("qwen2"), device="cpu", seed=11)
        model.add_adapter_to_model("default", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        model.set_optimizer("AdamW", lr=2e-2)
        model.set_lr_scheduler("CosineWarmupScheduler", num_warmup_steps=1, num_training_steps=6)
        return model

    straight = fresh()
    try:
        expected = _train(straight, rows, 4)
    finally:
        straight.close()
    first = fresh()
    try:
        head = _train(first, rows, 2)
        first.save(tmp_path / "ckpt")
    finally:
        first.close()
    second = fresh()
    try:
        state = second.resume_from_checkpoint(tmp_path / "ckpt")
        assert state["global_step"] == 2
        resumed = []
        for step in range(2, 4):
            resumed.append(second.forward_backward(inputs=rows[:2] if step % 2 == 0 else rows[2:]).loss)
            second.clip_grad_and_step(max_grad_norm=1.0)
        assert head + resumed == pytest.approx(expected, abs=1e-6)
        assert second.calculate_metric()["step"] == 4
    finally:
        second.close()


def test_checkpoint_errors_name_the_problem(tmp_path) -> None:
    mg = MegatronModel(config=tiny_config("qwen2"), device="cpu")
    try:
        with pytest.raises(CheckpointError, match="not a directory"):
            mg.load(tmp_path / "missing")
        (tmp_path / "empty").mkdir()
        with pytest.raises(CheckpointError, match="neither"):
            mg.load(tmp_path / "empty")
        wrong = MegatronModel(config=tiny_config("qwen3"), device="cpu")
        try:
            wrong.save(tmp_path / "qwen3", save_optimizer=False)
        finally:
            wrong.close()
        with pytest.raises(CheckpointError, match="do not fit"):
            mg.load(tmp_path / "qwen3")
        (tmp_path / "file").write_text("x")
        with pytest.raises(CheckpointError, match="is a file"):
            mg.save(tmp_path / "file")
    finally:
        mg.close()
