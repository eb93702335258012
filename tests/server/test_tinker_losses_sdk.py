"""Tinker 0.38's gspo and stable_reinforce through the official SDK against `twinkle serve`."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.types.provenance_spans import PromptProvenanceSpan, SampledProvenanceSpan  # noqa: E402

BASE = "twinkle/tiny-qwen2"


@pytest.fixture(scope="module")
def service(server):
    key = server.add_tenant(f"loss-{uuid.uuid4().hex[:6]}", max_adapters=40)
    client = tinker.ServiceClient(base_url=server.url, api_key=key)
    yield client
    client.close(status="success")


@pytest.fixture(scope="module")
def sentence(tiny_tokenizer) -> list[int]:
    return tiny_tokenizer.encode("Twinkle trains many small adapters on one shared base model. " * 2)


def _policy_logprobs(tc, tokens: list[int]) -> np.ndarray:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64)},
    )
    return tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_gspo_takes_the_sequence_ratio_over_the_masked_tokens(service, sentence, shift) -> None:
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    tokens = sentence[:20]
    lp = _policy_logprobs(tc, tokens)
    n = len(tokens) - 1
    mask = np.ones(n, dtype=np.float32)
    mask[:4] = 0.0  # "prompt" tokens: outside the ratio; their q is garbage that must not matter
    q = (lp + shift).astype(np.float32)
    q[:4] = 0.0
    adv = np.linspace(-1, 1, n).astype(np.float32)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": np.array(tokens[1:]),
            "logprobs": q,
            "advantages": adv,
            "sequence_ratio_mask": mask,
        },
    )
    out = tc.forward_backward([datum], "gspo", loss_fn_config={"clip_low_threshold": 0.8}).result()
    s = math.exp(-shift)  # the sequence ratio: exp(mean(lp - q)) over the masked tokens
    clipped = min(max(s, 0.8), 1.2)
    expected = -sum(min(s * a, clipped * a) for a in adv.astype(np.float64))
    # float32 logprobs of ~20 tokens: the mean log-ratio is exact to ~1e-6
    assert math.isclose(out.metrics["loss:sum"], expected, rel_tol=1e-4, abs_tol=1e-4)
    assert tc.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm"] > 0


def _stable_datum(prompt: list[int], seq, advantage: float) -> types.Datum:
    sampled = list(seq.tokens)
    full = prompt + sampled
    n_prompt = len(prompt) - 1  # targets that are prompt tokens (positions 1.. of the prompt)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={
            "target_tokens": np.array(full[1:], dtype=np.int64),
            "advantages": np.array([0.0] * n_prompt + [advantage] * len(sampled), dtype=np.float32),
        },
    )
    return datum.with_provenance(
        model_input=[
            PromptProvenanceSpan(sequence_id=seq.sequence_id, offset=0, length=len(prompt)),
            SampledProvenanceSpan(sequence_id=seq.sequence_id, offset=0, length=len(sampled) - 1),
        ],
        loss_fn_inputs=[
            PromptProvenanceSpan(sequence_id=seq.sequence_id, offset=1, length=n_prompt),
            SampledProvenanceSpan(sequence_id=seq.sequence_id, offset=0, length=len(sampled)),
        ],
    )


def test_stable_reinforce_trains_on_recorded_samples(service, tiny_tokenizer) -> None:
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    prompt = tiny_tokenizer.encode("Count to ten:")
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    res = sampler.sample(
        types.ModelInput.from_ints(prompt), 2, types.SamplingParams(max_tokens=5, seed=1, temperature=1.0)
    ).result()
    ids = [s.sequence_id for s in res.sequences]
    assert all(ids) and len(set(ids)) == 2
    advantages = [1.0, -0.5]
    data = [_stable_datum(prompt, s, a) for s, a in zip(res.sequences, advantages)]
    out = tc.forward_backward(data, "stable_reinforce", loss_fn_config={"kl_coeff": 0.01}).result()
    # on-policy: the recorded q equals the trained logp (to ~1e-4), the ratio is 1 and the k3 term 0,
    # so the loss is -sum(A * logp) over the sampled tokens; prompt tokens are masked out
    expected = -sum(a * sum(s.logprobs) for s, a in zip(res.sequences, advantages))
    assert math.isclose(out.metrics["loss:sum"], expected, rel_tol=1e-3, abs_tol=1e-3)
    assert tc.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm"] > 0
    # a record outlives a training use; a second pass (now off-policy) still finds it
    again = tc.forward_backward(data, "stable_reinforce").result()
    assert math.isfinite(again.metrics["loss:sum"])


def test_stable_reinforce_refuses_unrecorded_sequences(service, tiny_tokenizer) -> None:
    prompt = tiny_tokenizer.encode("Count to ten:")
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    plain = tc.save_weights_and_get_sampling_client().result()
    res = plain.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=3, seed=2)).result()
    with pytest.raises(Exception, match="record_stability_info"):
        tc.forward_backward([_stable_datum(prompt, res.sequences[0], 1.0)], "stable_reinforce").result()
    tc2 = service.create_lora_training_client(base_model=BASE, rank=4).result()
    no_provenance = types.Datum(
        model_input=types.ModelInput.from_ints(prompt[:-1]),
        loss_fn_inputs={"target_tokens": np.array(prompt[1:]), "advantages": np.ones(len(prompt) - 1)},
    )
    with pytest.raises(Exception, match="provenance"):
        tc2.forward_backward([no_provenance], "stable_reinforce").result()
