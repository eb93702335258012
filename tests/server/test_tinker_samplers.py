"""Sampling clients through the official SDK: base-model samplers, and snapshots kept by use."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

BASE = "twinkle/tiny-qwen2"


def _fresh_policy_logprobs(tc, tokens: list[int]) -> np.ndarray:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64)},
    )
    return tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()


def test_base_model_sampler_samples_and_scores(server, tiny_tokenizer) -> None:
    key = server.add_tenant(f"base-{uuid.uuid4().hex[:6]}", max_adapters=4)
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    try:
        sampler = service.create_sampling_client(base_model=BASE).result()
        prompt = tiny_tokenizer.encode("The base model says:")
        res = sampler.sample(types.ModelInput.from_ints(prompt), 2, types.SamplingParams(max_tokens=4, seed=5)).result()
        assert len(res.sequences) == 2 and all(len(s.tokens) == 4 for s in res.sequences)
        tokens = prompt + list(res.sequences[0].tokens)
        scored = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
        assert scored[0] is None and len(scored) == len(tokens)
        # a fresh LoRA (B = 0) is the base model: its forward gives the same logprobs
        tc = service.create_lora_training_client(base_model=BASE, rank=2).result()
        np.testing.assert_allclose(np.array(scored[1:]), _fresh_policy_logprobs(tc, tokens), atol=1e-4)
        np.testing.assert_allclose(np.array(scored[len(prompt) :]), np.array(res.sequences[0].logprobs), atol=1e-4)
    finally:
        service.close(status="success")


def test_a_sampler_in_use_survives_later_snapshots(small_pool_server, tiny_tokenizer) -> None:
    """DPO's shape: a reference sampler used every step, evaluator snapshots taken and dropped.

    The pool has 4 slots: one training run plus 3 snapshots. Six more snapshots come after the
    reference; the reference, sampled between them, is never the least recently used, so it stays.
    """
    key = small_pool_server.add_tenant(f"dpo-{uuid.uuid4().hex[:6]}", max_adapters=2)
    service = tinker.ServiceClient(base_url=small_pool_server.url, api_key=key)
    try:
        tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
        prompt = tiny_tokenizer.encode("Reference:")
        reference = tc.save_weights_and_get_sampling_client().result()
        first_score = reference.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
        evaluators = []
        for step in range(6):
            datum = types.Datum(
                model_input=types.ModelInput.from_ints(prompt[:-1]),
                loss_fn_inputs={"target_tokens": np.array(prompt[1:]), "weights": np.ones(len(prompt) - 1)},
            )
            tc.forward_backward([datum], "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            evaluator = tc.save_weights_and_get_sampling_client().result()
            evaluator.sample(
                types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=2, seed=step)
            ).result()
            evaluators.append(evaluator)
            # the reference is used every step and still scores with the weights it was taken with
            again = reference.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
            np.testing.assert_allclose(np.array(again[1:]), np.array(first_score[1:]), atol=1e-6)
        # the oldest evaluator snapshots made room for the newer ones
        with pytest.raises(Exception, match="no longer in memory"):
            evaluators[0].sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=1)).result()
        evaluators[-1].sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=1)).result()
    finally:
        service.close(status="success")


def test_topk_prompt_logprobs(server, tiny_tokenizer) -> None:
    key = server.add_tenant(f"topk-{uuid.uuid4().hex[:6]}", max_adapters=4)
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    try:
        sampler = service.create_sampling_client(base_model=BASE).result()
        prompt = tiny_tokenizer.encode("Top tokens of every prompt position")
        res = sampler.sample(
            types.ModelInput.from_ints(prompt),
            1,
            types.SamplingParams(max_tokens=1, seed=0),
            include_prompt_logprobs=True,
            topk_prompt_logprobs=3,
        ).result()
        topk, lps = res.topk_prompt_logprobs, res.prompt_logprobs
        assert len(topk) == len(prompt) and topk[0] is None and lps[0] is None
        for i in range(1, len(prompt)):
            row = topk[i]
            assert len(row) == 3 and len({t for t, _ in row}) == 3
            values = [lp for _, lp in row]
            assert values == sorted(values, reverse=True) and sum(np.exp(values)) <= 1 + 1e-5
            # the prompt token's own logprob: equal to its entry when in the top 3, else below the third
            given = dict(row).get(prompt[i])
            if given is not None:
                assert abs(given - lps[i]) < 1e-5
            else:
                assert lps[i] <= values[-1] + 1e-6
        with pytest.raises(Exception, match="topk_prompt_logprobs must be between"):
            sampler.sample(
                types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=1), topk_prompt_logprobs=1000
            ).result()
    finally:
        service.close(status="success")


def test_batched_retrieve_futures(server, tiny_tokenizer) -> None:
    """The SDK's session poller is used (the client config turns it on); the endpoint over raw HTTP."""
    import httpx

    key = server.add_tenant(f"poll-{uuid.uuid4().hex[:6]}", max_adapters=4)
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    prompt = tiny_tokenizer.encode("Polled:")
    try:
        sampler = service.create_sampling_client(base_model=BASE).result()
        sampler.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=2)).result()
        tenant_id = server.state.store.tenant_for_key(key).id
        cursors = server.state.session_futures._cursor
        assert any(t[0] == tenant_id and c >= 1 for t, c in cursors.items())  # reported through the poller
    finally:
        service.close(status="success")
    with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=60) as http:
        sid = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "test"}).json()["session_id"]
        sampler_id = http.post(
            "/api/v1/create_sampling_session",
            json={"session_id": sid, "sampling_session_seq_id": 0, "base_model": BASE},
        ).json()["sampling_session_id"]

        def sample(max_tokens: int) -> str:
            body = {
                "num_samples": 1,
                "prompt": {"chunks": [{"tokens": prompt, "type": "encoded_text"}]},
                "sampling_params": {"max_tokens": max_tokens},
                "sampling_session_id": sampler_id,
                "seq_id": 1,
            }
            return http.post("/api/v1/asample", json=body).json()["request_id"]

        ok, bad = sample(2), sample(100_000)  # the second is past the model's positions: it fails in the engine
        target = {"type": "sampling_session", "sampling_session_id": sampler_id, "cloned_sampler_id": 0}
        seen: dict[str, dict] = {}
        cursor = 0
        for _ in range(20):
            reply = http.post("/api/v1/retrieve_futures", json={"target": target, "prev_cursor": cursor}).json()
            seen.update({c["request_id"]: c for c in reply["completions"]})
            cursor = reply["cursor"]
            if len(seen) == 2:
                break
        assert seen[ok]["state"] == "finished" and seen[ok]["response_payload_uncompressed_size"] > 0
        assert seen[bad]["state"] == "failed"
        # seen completions are trimmed: the next poll (no wait) reports nothing new
        again = http.post("/api/v1/retrieve_futures", json={"target": target, "prev_cursor": cursor, "timeout": 0})
        assert again.json() == {"completions": [], "cursor": cursor}
        gone = http.post("/api/v1/retrieve_futures", json={"target": {**target, "sampling_session_id": "sampler-nope"}})
        assert gone.status_code == 404
