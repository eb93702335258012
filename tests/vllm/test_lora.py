"""Named LoRA adapters in VLLMSampler: from a saved PEFT directory and from in-memory tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from twinkle.data_format import SamplingParams

PROMPTS = [[5, 6, 7, 8], [100, 200, 300], [11, 12]]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def random_lora(hf_model, seed: int, r: int = 8):
    """A peft model around a copy of ``hf_model`` whose LoRA B is random (so the adapter changes outputs)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(copy.deepcopy(hf_model), config).eval()


def peft_greedy(peft_model, ids: list[int], n: int) -> list[int]:
    out = peft_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def tokens(responses) -> list[list[int]]:
    return [r.sequences[0].tokens for r in responses]


def test_adapter_from_saved_directory_matches_peft(fresh_sampler, hf_model, tmp_path):
    peft_model = random_lora(hf_model, seed=1)
    peft_model.save_pretrained(tmp_path / "adapter")
    sampler = fresh_sampler
    base = tokens(sampler.sample([{"input_ids": p} for p in PROMPTS], GREEDY))
    sampler.add_adapter("saved", str(tmp_path / "adapter"))
    assert "saved" in sampler.adapter_names()
    with_lora = tokens(sampler.sample([{"input_ids": p} for p in PROMPTS], GREEDY, adapter_name="saved"))
    assert with_lora == [peft_greedy(peft_model, p, 8) for p in PROMPTS]
    assert with_lora != base
    # the base model is unaffected by the adapter
    assert tokens(sampler.sample([{"input_ids": p} for p in PROMPTS], GREEDY)) == base
    with pytest.raises(ValueError, match="exists"):
        sampler.add_adapter("saved", str(tmp_path / "adapter"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        sampler.add_adapter("other", str(tmp_path))


def test_adapter_from_in_memory_tensors_and_updates(fresh_sampler, hf_model):
    from peft import get_peft_model_state_dict

    sampler = fresh_sampler
    first, second = random_lora(hf_model, seed=2), random_lora(hf_model, seed=3)
    config = first.peft_config["default"]
    loaded = sampler.update_weights(get_peft_model_state_dict(first), adapter_name="mem", peft_config=config)
    assert loaded == len(get_peft_model_state_dict(first))
    got = tokens(sampler.sample([{"input_ids": p} for p in PROMPTS], GREEDY, adapter_name="mem"))
    assert got == [peft_greedy(first, p, 8) for p in PROMPTS]
    # new tensors for the same adapter replace the old ones (and the prefix cache is reset)
    sampler.update_weights(get_peft_model_state_dict(second), adapter_name="mem")
    got = tokens(sampler.sample([{"input_ids": p} for p in PROMPTS], GREEDY, adapter_name="mem"))
    assert got == [peft_greedy(second, p, 8) for p in PROMPTS]
    sampler.remove_adapter("mem")
    with pytest.raises(KeyError, match="no adapter 'mem'"):
        sampler.sample([{"input_ids": PROMPTS[0]}], GREEDY, adapter_name="mem")


def test_new_adapter_from_config_samples_like_the_base(fresh_sampler):
    from peft import LoraConfig

    sampler = fresh_sampler
    sampler.add_adapter("fresh", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    prompts = [{"input_ids": p} for p in PROMPTS]
    assert tokens(sampler.sample(prompts, GREEDY, adapter_name="fresh")) == tokens(sampler.sample(prompts, GREEDY))


def test_adapter_rank_above_engine_limit_is_refused(fresh_sampler, hf_model):
    from peft import get_peft_model_state_dict

    big = random_lora(hf_model, seed=4, r=32)
    with pytest.raises(ValueError, match="max_lora_rank"):
        fresh_sampler.update_weights(
            get_peft_model_state_dict(big), adapter_name="big", peft_config=big.peft_config["default"]
        )
