"""LocalCheckpointEngine + TransformersModel + TorchSampler: full and LoRA syncs, timed; reference = adapter off."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from twinkle.checkpoint_engine import LocalCheckpointEngine
from twinkle.checkpoint_engine.base import CheckpointEngine
from twinkle.data_format import SamplingParams
from twinkle.model import TransformersModel
from twinkle.sampler import TorchSampler

from conftest import chat

PROMPTS = [chat("2+2=", answer="4"), chat("3+1=", answer="4")]


@pytest.fixture(scope="module")
def trained(rl_model_dir):
    """A model whose full weights differ from the sampler's init, and a LoRA adapter that learned something."""
    model = TransformersModel(model_id=rl_model_dir, seed=1, device="cpu")
    model.set_template("Template", model_id=rl_model_dir)
    sampler = TorchSampler(model_id=rl_model_dir, seed=2, device="cpu")  # different random init
    engine = LocalCheckpointEngine()
    full = engine.sync(model, sampler)
    model.add_adapter_to_model("default", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=1e-2)
    model.set_loss("GRPOLoss")
    return model, sampler, engine, full


def test_full_sync_copies_every_weight(trained):
    model, sampler, engine, full = trained
    assert isinstance(engine, CheckpointEngine)
    trainer_base = {k.replace(".base_layer.", "."): v for k, v in model.model.get_base_model().state_dict().items()}
    sampler_base = sampler._peft.get_base_model() if sampler._peft is not None else sampler.model
    for name, tensor in sampler_base.state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(tensor, trainer_base[name.replace(".base_layer.", ".")])
    assert full["sync_seconds"] > 0 and full["sync_tensors"] > 10 and full["sync_bytes"] > 100_000


def test_lora_sync_then_sampler_logprobs_equal_the_trainer(trained):
    model, sampler, engine, _ = trained
    responses = sampler.sample(PROMPTS, SamplingParams(max_tokens=4, num_samples=2, seed=0))
    sequences = [s for r in responses for s in r.sequences]
    rows = [dict(s.input_feature, advantages=a) for s, a in zip(sequences, [1.0, -1.0, 0.5, -0.5])]
    for _ in range(3):
        model.forward_backward(inputs=rows)
        model.clip_grad_and_step()
    lora = engine.sync(model, sampler, adapter_name="default")
    assert lora["sync_bytes"] < 0.5 * engine.history[0]["sync_bytes"]  # only LoRA tensors moved
    assert sampler.adapter_names() == ["default"]
    after = sampler.sample(PROMPTS, SamplingParams(max_tokens=4, num_samples=2, seed=5), adapter_name="default")
    seqs = [s for r in after for s in r.sequences]
    trainer = model.forward_only(inputs=[s.input_feature for s in seqs])["logps"]
    for seq, lp in zip(seqs, trainer):
        n = len(seq.input_feature["input_ids"]) - len(seq.tokens)
        assert lp[n:] == pytest.approx(seq.logprobs, abs=1e-4)
    # the base (adapter off) in the sampler equals the trainer's reference (adapter disabled)
    base = sampler.sample(PROMPTS[:1], SamplingParams(max_tokens=4, seed=5))[0].sequences[0]
    ref = model.forward_only(inputs=[base.input_feature], disable_adapters=True)["logps"][0]
    assert ref[-len(base.tokens) :] == pytest.approx(base.logprobs, abs=1e-4)
    adapted = model.forward_only(inputs=[base.input_feature])["logps"][0]
    assert adapted[-len(base.tokens) :] != pytest.approx(base.logprobs, abs=1e-4)


def test_bad_sync_inputs(trained, rl_model_dir):
    model, sampler, engine, _ = trained
    with pytest.raises(ValueError, match="adapter_name"):
        engine.sync(model, sampler)  # a LoRA model's full weights: ask for the adapter
    with pytest.raises(KeyError, match="no parameter"):
        sampler.update_weights({"model.not_a_layer.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        sampler.update_weights({"model.norm.weight": torch.zeros(3)})
    with pytest.raises(TypeError, match="not a Sampler"):
        engine.sync(model, object())
