"""TorchSampler: batching, seeds, log-probs, stops, num_samples layout, adapters, weight sync."""

from __future__ import annotations

import pytest
import torch
from twinkle.data_format import SampleResponse, SamplingParams
from twinkle.sampler.base import Sampler

from conftest import chat

PROMPTS = [chat("1+1=", answer="2"), chat("a much longer prompt about the capital of France, please", answer="Paris")]


def test_is_a_sampler(rl_sampler):
    assert isinstance(rl_sampler, Sampler)


def test_layout_user_data_and_ready_to_train_rows(rl_sampler):
    responses = rl_sampler.sample(PROMPTS, SamplingParams(max_tokens=5, num_samples=3, seed=0, ignore_eos=True))
    assert [len(r.sequences) for r in responses] == [3, 3]
    for response, prompt in zip(responses, PROMPTS):
        assert isinstance(response, SampleResponse)
        for seq in response.sequences:
            assert len(seq.tokens) == len(seq.logprobs) == 5 and seq.stop_reason == "length"
            row = seq.input_feature
            n = len(response.prompt_tokens)
            assert row["input_ids"] == response.prompt_tokens + seq.tokens
            assert row["labels"] == [-100] * n + seq.tokens
            assert row["old_logps"][n:] == pytest.approx(seq.logprobs) and row["old_logps"][:n] == [0.0] * n
            assert seq.user_data == prompt["user_data"] == row["user_data"]
            assert seq.trajectory["messages"][-1] == {"role": "assistant", "content": seq.text}
            assert seq.trajectory["messages"][:-1] == prompt["messages"]
    assert SampleResponse.from_dict(responses[0].to_dict()) == responses[0]


def test_seed_reproducible_and_batching_does_not_change_greedy(rl_sampler):
    params = SamplingParams(max_tokens=6, num_samples=2, seed=3, ignore_eos=True)
    a = rl_sampler.sample(PROMPTS, params)
    b = rl_sampler.sample(PROMPTS, params)
    assert [s.tokens for r in a for s in r.sequences] == [s.tokens for r in b for s in r.sequences]
    c = rl_sampler.sample(PROMPTS, params.model_copy(update={"seed": 4}))
    assert [s.tokens for r in a for s in r.sequences] != [s.tokens for r in c for s in r.sequences]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    batched = rl_sampler.sample(PROMPTS, greedy)  # left-padded together
    alone = [rl_sampler.sample([p], greedy)[0] for p in PROMPTS]
    assert [r.sequences[0].tokens for r in batched] == [r.sequences[0].tokens for r in alone]
    for r, s in zip(batched, alone):
        assert r.sequences[0].logprobs == pytest.approx(s.sequences[0].logprobs, abs=1e-4)


def test_logprobs_match_a_forward_pass(rl_sampler):
    responses = rl_sampler.sample(PROMPTS[:1], SamplingParams(max_tokens=6, seed=1, prompt_logprobs=True))
    seq = responses[0].sequences[0]
    ids = torch.tensor([seq.input_feature["input_ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(rl_sampler.model(input_ids=ids).logits[0, :-1].float(), -1)
    per_token = lp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1).tolist()
    n = len(responses[0].prompt_tokens)
    assert seq.logprobs == pytest.approx(per_token[n - 1 :], abs=1e-4)
    assert responses[0].prompt_logprobs[0] is None
    assert responses[0].prompt_logprobs[1:] == pytest.approx(per_token[: n - 1], abs=1e-4)


def test_stop_token_ids_and_strings(rl_sampler):
    free = rl_sampler.sample(PROMPTS[:1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].sequences[0]
    stop_id = free.tokens[2]
    seq = rl_sampler.sample(
        PROMPTS[:1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=[stop_id])
    )[0].sequences[0]
    first = free.tokens.index(stop_id)
    assert seq.tokens == free.tokens[: first + 1] and seq.stop_reason == "stop"
    text = rl_sampler.tokenizer.decode(free.tokens[3:5], skip_special_tokens=True)
    stop = text.strip()[:2] or text[:1]
    seq = rl_sampler.sample(PROMPTS[:1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=[stop]))[
        0
    ].sequences[0]
    assert seq.stop_reason == "stop" and stop not in seq.text
    assert seq.tokens == free.tokens[: len(seq.tokens)] and len(seq.tokens) <= 5
    assert stop in rl_sampler.tokenizer.decode(seq.tokens, skip_special_tokens=True)


def test_token_prompts_and_clear_errors(rl_sampler):
    ids = rl_sampler.template.encode(PROMPTS[0], add_generation_prompt=True)["input_ids"]
    a = rl_sampler.sample([{"input_ids": ids}], SamplingParams(max_tokens=4, temperature=0))[0]
    b = rl_sampler.sample(PROMPTS[:1], SamplingParams(max_tokens=4, temperature=0))[0]
    assert a.sequences[0].tokens == b.sequences[0].tokens
    assert a.sequences[0].trajectory == {
        "messages": [{"role": "assistant", "content": a.sequences[0].text}],
        "user_data": {},
    }
    with pytest.raises(ValueError, match="neither 'messages'"):
        rl_sampler.sample([{"text": "hi"}])
    with pytest.raises(KeyError, match="no adapter 'nope'"):
        rl_sampler.sample(PROMPTS[:1], adapter_name="nope")
    with pytest.raises(ValueError, match="num_samples"):
        SamplingParams(num_samples=0)
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        SamplingParams(stop=[""])
