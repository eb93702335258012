"""A GRPO loop with the model and the sampler on separate groups gives the numbers of local mode.

examples/grpo.py builds its runtime in local mode; this is the same loop (its stage 2,
full-parameter, a reward computed in the driver) written once and run in both modes:
TransformersModel on group ``model`` (dp=2, two actors, gloo), TorchSampler on group
``sampler`` (one actor), weights synced model -> sampler through LocalCheckpointEngine.
"""

from __future__ import annotations

import random

import pytest
import twinkle
from twinkle import DeviceGroup, DeviceMesh

pytest.importorskip("transformers")

SEED = 3
STEPS = 2
GROUP = 4
PROMPTS = 4


def problems() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"{a}+{b}="}], "user_data": {"answer": str(a + b)}}
        for a in range(4)
        for b in range(4)
    ]


def reward(text: str) -> float:
    """A reward that varies between samples of a random tiny model, so advantages are not all zero."""
    return (sum(ord(c) for c in text) % 10) / 10.0


def grpo(model_group=None, sampler_group=None, model_mesh=None):
    """The loop; returns per-step (rewards, reference logps, loss)."""
    from twinkle import assets
    from twinkle.advantage import GRPOAdvantage
    from twinkle.checkpoint_engine import LocalCheckpointEngine
    from twinkle.data_format import SamplingParams
    from twinkle.model import TransformersModel
    from twinkle.sampler import TorchSampler

    rng = random.Random(SEED)
    model_dir = str(assets.path("tiny-qwen2"))
    model = TransformersModel(
        model_id=model_dir, seed=SEED, device="cpu", remote_group=model_group, device_mesh=model_mesh
    )
    model.set_template("Template", model_id=model_dir)
    model.set_optimizer("AdamW", lr=5e-3)
    model.set_loss("GRPOLoss", epsilon=0.2, beta=0.02)
    sampler = TorchSampler(model_id=model_dir, seed=SEED, device="cpu", remote_group=sampler_group)
    engine = LocalCheckpointEngine()
    engine.sync(model, sampler)
    advantage_fn = GRPOAdvantage(scale="group")
    history = []
    for step in range(STEPS):
        batch = rng.sample(problems(), k=PROMPTS)
        params = SamplingParams(max_tokens=3, temperature=1.0, num_samples=GROUP, seed=SEED * 1000 + step)
        responses = sampler.sample(batch, params)
        sequences = [seq for response in responses for seq in response.sequences]
        rewards = [reward(seq.text) for seq in sequences]
        advantages = advantage_fn(rewards, num_generations=GROUP)
        rows = [dict(seq.input_feature, advantages=adv) for seq, adv in zip(sequences, advantages)]
        ref = model.forward_only(inputs=rows)["logps"]
        rows = [dict(row, ref_logps=ref_logps) for row, ref_logps in zip(rows, ref)]
        out = model.forward_backward(inputs=rows)
        model.clip_grad_and_step(max_grad_norm=1.0)
        engine.sync(model, sampler)
        history.append({"rewards": rewards, "ref": ref, "loss": out["loss"]})
    return history


def test_grpo_model_and_sampler_groups_match_local(ray_cluster):
    with twinkle.initialize(mode="local", seed=SEED):
        expected = grpo()
    with twinkle.initialize(
        mode="ray",
        groups=[
            DeviceGroup(name="model", ranks=2, device_type="cpu"),
            DeviceGroup(name="sampler", ranks=1, device_type="cpu"),
        ],
        seed=SEED,
    ) as runtime:
        got = grpo(model_group="model", sampler_group="sampler", model_mesh=DeviceMesh.from_sizes(dp_size=2))
        pids = [set(component.pids) for component in runtime.launcher.components]
    assert len(pids) == 2 and not pids[0] & pids[1]  # model and sampler actors are separate processes
    assert len(got) == len(expected) == STEPS
    for step, (mine, theirs) in enumerate(zip(got, expected)):
        assert mine["rewards"] == theirs["rewards"], f"step {step}: the sampler drew other tokens"
        assert len(mine["ref"]) == PROMPTS * GROUP  # per-row logps of both data ranks, in order
        for row_mine, row_theirs in zip(mine["ref"], theirs["ref"]):
            assert row_mine == pytest.approx(row_theirs, rel=1e-4, abs=1e-5)
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-6)
    assert any(step["loss"] != 0 for step in got)
