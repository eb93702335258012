"""GRPO in ray mode: TransformersModel (dp=2) on group ``model``, VLLMSampler on group ``sampler``.

The LoRA adapter moves model actor -> Ray object store -> sampler actor
(ObjectStoreCheckpointEngine), never through the driver. After every sync the sampler's
log-probs of its own samples must equal the trainer's recomputed ones (with the trained
adapter), while the adapter has moved the policy away from the base model: a sync that did
not arrive (the sampler still on the old adapter) fails the first check.
"""

from __future__ import annotations

import os
import random

import pytest

pytest.importorskip("ray", reason="the ray-mode GRPO test needs Ray (the nox `vllm` session installs ray>=2.40)")
pytest.importorskip(
    "twinkle_ray", reason="the ray-mode GRPO test needs twinkle-ray (pip install -e plugins/twinkle-ray)"
)

SEED = 3
STEPS = 3
GROUP = 4
PROMPTS = 4
#: the engine settings of conftest.ENGINE_OPTIONS (one small engine: 30% memory cap, 128 MiB KV cache)
ENGINE_OPTIONS = {"gpu_memory_utilization": 0.3, "kv_cache_memory_bytes": 128 << 20, "max_model_len": 512}


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for this module (model: 2 CPU ranks, sampler: 1)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def reward(text: str) -> float:
    """A reward that varies between samples of a random tiny model, so advantages are not all zero."""
    return (sum(ord(c) for c in text) % 10) / 10.0


def test_grpo_ray_model_and_vllm_sampler_groups(ray_cluster, tiny_model_dir, figures):
    import twinkle
    from peft import LoraConfig
    from twinkle import DeviceGroup, DeviceMesh
    from twinkle.advantage import GRPOAdvantage
    from twinkle.data_format import SamplingParams
    from twinkle.model import TransformersModel
    from twinkle_vllm.consistency import logprob_diff
    from twinkle_vllm.object_store import ObjectStoreCheckpointEngine
    from twinkle_vllm.sampler import VLLMSampler

    groups = [
        DeviceGroup(name="model", ranks=2, device_type="cpu"),
        DeviceGroup(name="sampler", ranks=1, device_type="cpu"),
    ]
    rng = random.Random(SEED)
    problems = [{"messages": [{"role": "user", "content": f"{a}+{b}="}]} for a in range(4) for b in range(4)]
    with twinkle.initialize(mode="ray", groups=groups, seed=SEED) as runtime:
        model = TransformersModel(
            model_id=tiny_model_dir,
            seed=SEED,
            device="cpu",
            remote_group="model",
            device_mesh=DeviceMesh.from_sizes(dp_size=2),
        )
        model.set_template("Template", model_id=tiny_model_dir)
        lora = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
        model.add_adapter_to_model("default", lora)
        model.set_optimizer("AdamW", lr=2e-2)
        model.set_loss("GRPOLoss", epsilon=0.2, beta=0.0)
        sampler = VLLMSampler(
            tiny_model_dir,
            seed=SEED,
            torch_dtype="float32",
            enable_lora=True,
            max_lora_rank=16,
            max_loras=1,
            remote_group="sampler",
            **ENGINE_OPTIONS,
        )
        engine = ObjectStoreCheckpointEngine()
        engine.sync(model, sampler, adapter_name="default", peft_config=lora)  # creates the adapter
        advantage_fn = GRPOAdvantage(scale="group")
        diffs, adapter_effect = [], []
        for step in range(STEPS):
            params = SamplingParams(max_tokens=4, temperature=1.0, num_samples=GROUP, seed=SEED * 1000 + step)
            responses = sampler.sample(rng.sample(problems, k=PROMPTS), params, adapter_name="default")
            sequences = [seq for response in responses for seq in response.sequences]
            assert len(sequences) == PROMPTS * GROUP
            # the sampler's log-probs vs the trainer's, both with the adapter as last synced
            trained = model.forward_only(inputs=[seq.input_feature for seq in sequences])["logps"]
            diffs.append(logprob_diff(sequences, trained)["logprob_abs_diff_max"])
            base = model.forward_only(inputs=[seq.input_feature for seq in sequences], disable_adapters=True)["logps"]
            adapter_effect.append(logprob_diff(sequences, base)["logprob_abs_diff_max"])
            advantages = advantage_fn([reward(seq.text) for seq in sequences], num_generations=GROUP)
            rows = [
                dict(seq.input_feature, advantages=adv, ref_logps=ref)
                for seq, adv, ref in zip(sequences, advantages, base)
            ]
            model.forward_backward(inputs=rows)
            model.clip_grad_and_step(max_grad_norm=1.0)
            engine.sync(model, sampler, adapter_name="default")
        pids = [set(component.pids) for component in runtime.launcher.components]
    assert len(engine.history) == STEPS + 1
    per_step_ms = [m["sync_seconds"] * 1000 for m in engine.history[1:]]  # the first one also creates the adapter
    figures["ray_lora_sync_ms_mean"] = sum(per_step_ms) / len(per_step_ms)
    figures["ray_logprob_abs_diff_max"] = max(diffs)
    assert len(pids) == 2 and not pids[0] & pids[1]  # model and sampler actors are separate processes
    assert all(m["sync_tensors"] > 0 for m in engine.history)
    # the trained adapter changes the policy clearly (so a missed sync would show) ...
    assert adapter_effect[-1] > 0.05, adapter_effect
    # ... and the sampler generates with exactly the adapter the trainer holds
    assert max(diffs) < 1e-3, diffs
