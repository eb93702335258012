"""http mode: the GRPO example runs against `twinkle serve` with only initialize() changed.

The model (full-parameter warm-up on a private copy, then a LoRA adapter), the sampler and
the checkpoint engine are server-side objects of the tenant; ``engine.sync(model, sampler)``
resolves its proxy arguments on the server. Same seed, same numbers as local mode.
"""

from __future__ import annotations

import importlib.util
import math
import uuid
from pathlib import Path

import pytest

pytest.importorskip("peft")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo.py"
STEPS = 3


def grpo_example():
    spec = importlib.util.spec_from_file_location("twinkle_example_grpo_http", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grpo_example_over_http_matches_local(server) -> None:
    example = grpo_example()
    key = server.add_tenant(f"grpo-{uuid.uuid4().hex[:6]}")
    remote = example.main(steps=STEPS, seed=0, verbose=False, mode="http", base_url=server.url, api_key=key)
    local = example.main(steps=STEPS, seed=0, verbose=False)
    assert len(remote["rewards"]) == STEPS
    assert all(math.isfinite(r) for r in remote["rewards"])
    # same seeds, same weights, same sampled completions: the same rewards step by step
    assert remote["rewards"] == pytest.approx(local["rewards"], abs=1e-6), (remote["rewards"], local["rewards"])
    # the sync ran on the server; the client only timed the call
    assert remote["sync_seconds_mean"] > 0


def test_samplers_and_sync_are_private_to_their_tenant(server) -> None:
    import twinkle
    from peft import LoraConfig
    from twinkle.checkpoint_engine import LocalCheckpointEngine
    from twinkle.client.proxy import RemoteComponent
    from twinkle.client.session import ClientSession, ServerError
    from twinkle.data_format import SamplingParams
    from twinkle.model import TransformersModel
    from twinkle.sampler import TorchSampler

    name = server.state.config.model_name
    prompt = [{"input_ids": [1, 2, 3]}]
    params = SamplingParams(max_tokens=2, num_samples=2, seed=1)
    key_a = server.add_tenant(f"smp-a-{uuid.uuid4().hex[:6]}")
    key_b = server.add_tenant(f"smp-b-{uuid.uuid4().hex[:6]}")
    with twinkle.initialize(mode="http", base_url=server.url, api_key=key_a):
        model_a = TransformersModel(model_id=name)
        sampler_a = TorchSampler(model_id=name)
        engine_a = LocalCheckpointEngine()
        assert type(sampler_a).__name__ == type(engine_a).__name__ == "RemoteComponent"
        model_a.add_adapter_to_model("default", LoraConfig(r=4, target_modules="all-linear"))
        metrics = engine_a.sync(model_a, sampler_a, adapter_name="default")  # LoRA on the shared base
        assert metrics["sync_tensors"] > 0 and metrics["sync_bytes"] > 0
        assert sampler_a.adapter_names() == ["default"]
        sequences = sampler_a.sample(prompt, params, adapter_name="default")[0].sequences
        assert len(sequences) == 2
        session_b = ClientSession(server.url, key_b)
        try:
            stolen = RemoteComponent(session_b, TorchSampler, sampler_a.remote_id)
            with pytest.raises(ServerError, match="not found"):
                stolen.sample(prompt, params, adapter_name="default")
        finally:
            session_b.close()
        a_ids = (model_a.remote_id, sampler_a.remote_id)
    with twinkle.initialize(mode="http", base_url=server.url, api_key=key_b):
        sampler_b = TorchSampler(model_id=name)
        engine_b = LocalCheckpointEngine()
        with pytest.raises(ServerError, match="not found"):
            engine_b.sync(RemoteComponent(sampler_b._session, TransformersModel, a_ids[0]), sampler_b, "default")
        with pytest.raises(ServerError, match="no adapter 'default'"):
            sampler_b.sample(prompt, params, adapter_name="default")  # B's sampler has no adapter of A's
        with pytest.raises(ServerError, match="not allowed"):
            sampler_b.add_adapter("stolen", "../../twinkle-checkpoints")  # adapter dirs stay in B's folder
