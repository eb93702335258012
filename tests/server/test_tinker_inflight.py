"""``kind="inflight"`` sampling clients (SDK 0.38): they sample the run's live adapter, so a later
optimizer step shows in an existing client's samples, while a snapshot client keeps its weights."""

from __future__ import annotations

import pickle
import uuid

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

BASE = "twinkle/tiny-qwen2"


@pytest.fixture(scope="module")
def service(server):
    client = tinker.ServiceClient(base_url=server.url, api_key=server.add_tenant(f"inflight-{uuid.uuid4().hex[:6]}"))
    yield client
    client.close(status="success")


def _prompt_logprobs(sampler, tokens) -> np.ndarray:
    return np.array(sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:], dtype=np.float64)


def test_inflight_sampler_follows_the_runs_training_and_a_snapshot_does_not(server, service, tiny_tokenizer) -> None:
    tc = service.create_lora_training_client(base_model=BASE, rank=4).result()
    tokens = tiny_tokenizer.encode("Inflight samplers read the live adapter of their run.")
    inflight = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    snapshot = tc.save_weights_and_get_sampling_client().result()
    before = _prompt_logprobs(inflight, tokens)
    np.testing.assert_allclose(before, _prompt_logprobs(snapshot, tokens), rtol=0, atol=1e-5)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64)},
    )
    for _ in range(2):
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = _prompt_logprobs(inflight, tokens)
    trained = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(after, trained, rtol=0, atol=1e-4)  # the run's current weights
    assert np.abs(after - before).max() > 0.1  # the steps moved the weights the inflight client reads
    np.testing.assert_allclose(_prompt_logprobs(snapshot, tokens), before, rtol=0, atol=1e-5)
    # a pickled copy (a worker process) joins the same session and samples the same live weights
    clone = pickle.loads(pickle.dumps(inflight))
    np.testing.assert_allclose(_prompt_logprobs(clone, tokens), after, rtol=0, atol=1e-5)
    sid = inflight._sampling_session_id
    [(tenant_id,)] = server.state.store._rows("SELECT tenant_id FROM sampling_sessions WHERE id = ?", (sid,))
    assert server.state.store.sampling_session(tenant_id, sid)["clients"] >= 2  # the clone joined (its own id)
    out = inflight.sample(
        types.ModelInput.from_ints(tokens[:4]), 2, types.SamplingParams(max_tokens=4, seed=1)
    ).result()
    assert len(out.sequences) == 2 and all(len(s.tokens) == 4 for s in out.sequences)
