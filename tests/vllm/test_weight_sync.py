"""Checkpoint engines into VLLMSampler, and the sampler-vs-trainer logprob consistency metric."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from twinkle.data_format import SamplingParams
from twinkle_vllm.checkpoint_engine import VLLMCheckpointEngine
from twinkle_vllm.consistency import logprob_diff
from twinkle_vllm.distributed import DistributedCheckpointEngine

PROMPTS = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [100, 200, 300]}, {"input_ids": [11, 12, 13, 14, 15]}]


def train_one_step(model, lr: float = 1e-2) -> None:
    rows = [{"input_ids": p["input_ids"] + [9, 10, 11], "labels": p["input_ids"] + [9, 10, 11]} for p in PROMPTS]
    model.forward_backward(inputs=rows)
    model.clip_grad_and_step()


def test_lora_sync_and_logprob_consistency(fresh_sampler, tiny_model_dir, figures):
    from peft import LoraConfig
    from twinkle.model import TransformersModel

    model = TransformersModel(model_id=tiny_model_dir, device="cpu")
    model.add_adapter_to_model("default", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=1e-2)
    model.add_metric("LogprobConsistency", is_training=False)
    train_one_step(model)
    engine = VLLMCheckpointEngine()
    fresh_sampler.sleep()  # colocated: the sampler sleeps while the model trains; sync wakes it
    with pytest.raises(ValueError, match="adapter_name"):
        engine.sync(model, fresh_sampler)  # a LoRA model's full weights: the base did not change
    metrics = engine.sync(model, fresh_sampler, adapter_name="default")
    assert not fresh_sampler.is_sleeping
    assert metrics["sync_seconds"] > 0 and metrics["sync_tensors"] > 0 and metrics["sync_bytes"] > 0
    figures["lora_sync_seconds"] = metrics["sync_seconds"]

    responses = fresh_sampler.sample(
        PROMPTS, SamplingParams(max_tokens=16, num_samples=4, temperature=1.0, seed=0), adapter_name="default"
    )
    sequences = [s for r in responses for s in r.sequences]
    rows = [s.input_feature for s in sequences]
    trainer = model.forward_only(inputs=rows)["logps"]
    diff = logprob_diff(sequences, trainer)
    assert diff["logprob_tokens"] == sum(len(s.tokens) for s in sequences)
    assert diff["logprob_abs_diff_max"] < 1e-3
    figures["logprob_abs_diff_max"] = diff["logprob_abs_diff_max"]
    figures["logprob_abs_diff_mean"] = diff["logprob_abs_diff_mean"]
    # the same figure through the registered metric
    metric = model.calculate_metric(is_training=False)
    assert metric["logprob_abs_diff_max"] == pytest.approx(diff["logprob_abs_diff_max"], abs=1e-5)
    # and the adapter really changed the policy: the base model's log-probs differ
    base = model.forward_only(inputs=rows, disable_adapters=True)["logps"]
    assert logprob_diff(sequences, base)["logprob_abs_diff_max"] > 1e-2


def test_full_weight_sync_after_training(fresh_sampler, tiny_model_dir, figures):
    from twinkle.model import TransformersModel

    model = TransformersModel(model_id=tiny_model_dir, device="cpu")
    model.set_optimizer("AdamW", lr=1e-2)
    train_one_step(model)
    metrics = VLLMCheckpointEngine().sync(model, fresh_sampler)
    figures["full_sync_seconds"] = metrics["sync_seconds"]
    responses = fresh_sampler.sample(PROMPTS, SamplingParams(max_tokens=12, num_samples=2, seed=1))
    sequences = [s for r in responses for s in r.sequences]
    diff = logprob_diff(sequences, model.forward_only(inputs=[s.input_feature for s in sequences])["logps"])
    assert diff["logprob_abs_diff_max"] < 1e-3


TRAINER = Path(__file__).with_name("trainer_process.py")


def test_distributed_sync_from_another_process(fresh_sampler, hf_model, free_port, tmp_path, figures):
    """A trainer process sends full weights, then a LoRA adapter, in small buckets over gloo."""
    engine = DistributedCheckpointEngine(f"tcp://127.0.0.1:{free_port}", rank=1, world_size=2, timeout_s=180)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    trainer = subprocess.Popen(
        [sys.executable, str(TRAINER), str(free_port), str(tmp_path), fresh_sampler.weights_dir],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        full = engine.sync(None, fresh_sampler)
        lora = engine.sync(None, fresh_sampler)
    finally:
        output, _ = trainer.communicate(timeout=180)
    assert trainer.returncode == 0, output
    sent = json.loads((tmp_path / "metrics.json").read_text())
    assert full["sync_buckets"] > 1 and full["sync_bytes"] == sent["full"]["sync_bytes"]
    assert lora["sync_tensors"] == sent["lora"]["sync_tensors"]
    figures["distributed_full_sync_seconds"] = sent["full"]["sync_seconds"]
    figures["distributed_lora_sync_seconds"] = sent["lora"]["sync_seconds"]

    from peft import PeftModel
    from safetensors.torch import load_file

    reference = type(hf_model)(hf_model.config).eval()
    reference.load_state_dict(load_file(tmp_path / "full.safetensors"), strict=False)
    reference.lm_head.weight = reference.model.embed_tokens.weight
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    prompts = [p["input_ids"] for p in PROMPTS]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with peft_model.disable_adapter():
        want_base = [_greedy(peft_model, p) for p in prompts]
    want_lora = [_greedy(peft_model, p) for p in prompts]
    got_base = [r.sequences[0].tokens for r in fresh_sampler.sample([{"input_ids": p} for p in prompts], greedy)]
    got_lora = [
        r.sequences[0].tokens
        for r in fresh_sampler.sample([{"input_ids": p} for p in prompts], greedy, adapter_name="remote")
    ]
    assert got_base == want_base
    assert got_lora == want_lora and got_lora != got_base


def _greedy(model, ids: list[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def test_distributed_engine_argument_errors():
    with pytest.raises(ValueError, match="tcp://host:port"):
        DistributedCheckpointEngine("127.0.0.1:1234", rank=0)
    with pytest.raises(ValueError, match="world_size"):
        DistributedCheckpointEngine("tcp://127.0.0.1:1234", rank=0, world_size=1)
    engine = DistributedCheckpointEngine("tcp://127.0.0.1:1234", rank=1)
    with pytest.raises(ValueError, match="trainer"):
        engine.sync(None, None)
    with pytest.raises(ValueError, match="sampler rank"):
        engine.sync(torch.nn.Linear(2, 2), None)
