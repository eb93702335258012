"""Async RL in ray mode: the sampler and the trainer on separate Ray groups, fed by twinkle.rollout.

A RolloutWorker thread in the driver drives the sampler's actor into a RolloutBuffer while the
trainer's actor trains; weights go trainer -> sampler through ``worker.sync_weights`` (Ray's object
store, no round trip through the driver). Checked: policy versions on every sample and bounded
staleness (admission control), partial rollouts with per-token versions across a weight update,
the sampler really receives the new weights, and sampling overlaps training in time.
"""

from __future__ import annotations

import threading
import time

import pytest
from twinkle import DeviceGroup

pytest.importorskip("transformers")

SEED = 5
GROUP = 4


def prompts() -> list[dict]:
    return [{"input_ids": [1, 2, 3, 4 + i], "user_data": {"i": i}} for i in range(2)]


def groups() -> list[DeviceGroup]:
    return [
        DeviceGroup(name="trainer", ranks=1, device_type="cpu"),
        DeviceGroup(name="sampler", ranks=1, device_type="cpu"),
    ]


def build(model_dir: str):
    from peft import LoraConfig
    from twinkle.checkpoint_engine import LocalCheckpointEngine
    from twinkle.model import TransformersModel
    from twinkle.sampler import TorchSampler

    model = TransformersModel(model_id=model_dir, seed=SEED, device="cpu", remote_group="trainer")
    sampler = TorchSampler(model_id=model_dir, seed=SEED, device="cpu", remote_group="sampler")
    LocalCheckpointEngine().sync(model, sampler)
    model.add_adapter_to_model(
        "default", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    model.set_optimizer("AdamW", lr=1e-2)
    model.set_loss("GRPOLoss", epsilon=0.2, rollout_correction="token_truncate", rollout_clip_max=2.0)
    LocalCheckpointEngine().sync(model, sampler, adapter_name="default")
    return model, sampler


def test_async_grpo_with_sampler_and_trainer_on_separate_groups(ray_runtime, tmp_path):
    from twinkle.data_format import SamplingParams
    from twinkle.rollout import RolloutBuffer, RolloutWorker
    from twinkle.testing import write_tiny_model_dir

    model_dir = write_tiny_model_dir(tmp_path)
    runtime = ray_runtime(groups=groups(), seed=SEED)
    model, sampler = build(model_dir)
    trainer_pids, sampler_pids = (set(c.pids) for c in runtime.launcher.components)
    assert not trainer_pids & sampler_pids  # two processes

    per_step = len(prompts()) * GROUP
    buffer = RolloutBuffer(batch_size=per_step, max_staleness=1)
    spans: list[tuple[str, float, float]] = []
    lock = threading.Lock()

    class Timed:  # records when the sampler's actor was busy
        def sample(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return sampler.sample(*args, **kwargs)
            finally:
                with lock:
                    spans.append(("sample", start, time.perf_counter()))

        def update_weights(self, *args, **kwargs):
            return sampler.update_weights(*args, **kwargs)

    worker = RolloutWorker(
        Timed(),
        buffer,
        prompts,
        SamplingParams(max_tokens=6, temperature=1.0, num_samples=GROUP, seed=SEED),
        adapter_name="default",
    ).start()
    staleness, versions = [], []
    try:
        for _step in range(4):
            rollouts = buffer.get(per_step, timeout=300)
            staleness += [r.staleness(buffer.version) for r in rollouts]
            versions += [r.version for r in rollouts]
            assert all(r.token_versions == [r.version] * len(r.sequence.tokens) for r in rollouts)
            rows = [r.row(advantages=float(i % 2) - 0.5) for i, r in enumerate(rollouts)]
            start = time.perf_counter()
            model.forward_backward(inputs=rows)
            model.clip_grad_and_step()
            with lock:
                spans.append(("train", start, time.perf_counter()))
            metrics = worker.sync_weights(model, adapter_name="default")
            assert 0 <= metrics["sync_pause_seconds"] <= metrics["sync_seconds"]
    finally:
        worker.stop()
    assert buffer.version == 4
    assert max(staleness) <= 1  # admission control: never more than max_staleness behind
    assert max(versions) >= 1  # samples of later versions arrived
    # sampling ran while the trainer trained (the whole point of async)
    trains = [(a, b) for kind, a, b in spans if kind == "train"]
    samples = [(a, b) for kind, a, b in spans if kind == "sample"]
    overlap = sum(max(0.0, min(b1, b2) - max(a1, a2)) for a1, b1 in trains for a2, b2 in samples)
    assert overlap > 0, spans

    # the sampler got the trained adapter: its logprobs of a fixed completion now match the trainer's
    from twinkle.data_format.sampling import build_input_feature

    row = build_input_feature([1, 2, 3, 4], [7, 8, 9])
    trainer_logps = model.forward_only(inputs=[row])["logps"][0]
    sampler_logps = sampler.compute_logps([row], adapter_name="default")[0]
    trained = [t for t, label in zip(trainer_logps, row["labels"]) if label != -100]
    sampled = [s for s, label in zip(sampler_logps, row["labels"]) if label != -100]
    assert sampled == pytest.approx(trained, abs=1e-4)


def test_partial_rollouts_in_ray_mode_record_the_version_of_each_token(ray_runtime, tmp_path):
    """A weight update between chunks: the sequence continues under the new weights, versions per token."""
    from twinkle.data_format import SamplingParams
    from twinkle.data_format.sampling import build_input_feature
    from twinkle.rollout import RolloutBuffer, RolloutWorker
    from twinkle.testing import write_tiny_model_dir

    model_dir = write_tiny_model_dir(tmp_path)
    ray_runtime(groups=groups(), seed=SEED)
    model, sampler = build(model_dir)
    buffer = RolloutBuffer(batch_size=len(prompts()) * 2, max_staleness=2)
    chunk_done = threading.Event()
    proceed = threading.Event()

    class Gate:  # after the first chunk, wait until the trainer has pushed new weights
        calls = 0

        def sample(self, *args, **kwargs):
            out = sampler.sample(*args, **kwargs)
            Gate.calls += 1
            if Gate.calls == 1:
                chunk_done.set()
                proceed.wait(120)
            return out

        def update_weights(self, *args, **kwargs):
            return sampler.update_weights(*args, **kwargs)

    params = SamplingParams(max_tokens=6, temperature=1.0, num_samples=2, seed=SEED, ignore_eos=True)
    worker = RolloutWorker(Gate(), buffer, prompts, params, adapter_name="default", chunk_tokens=3).start()
    try:
        assert chunk_done.wait(120)
        rows = [dict(build_input_feature([1, 2, 3], [4, 5], logprobs=[-1.0, -1.0]), advantages=1.0)]
        model.forward_backward(inputs=rows)
        model.clip_grad_and_step()
        sync = threading.Thread(target=worker.sync_weights, args=(model,), kwargs={"adapter_name": "default"})
        sync.start()
        deadline = time.monotonic() + 120
        while not worker._syncs_waiting and time.monotonic() < deadline:  # the sync waits for the chunk
            time.sleep(0.01)
        proceed.set()  # the first chunk returns; the waiting sync goes before the second chunk
        sync.join(120)
        rollouts = buffer.get(len(prompts()) * 2, timeout=300)
    finally:
        proceed.set()
        worker.stop()
    for r in rollouts:
        assert len(r.token_versions) == len(r.sequence.tokens) == 6
        assert r.token_versions[:3] == [0, 0, 0] and r.token_versions[3:] == [1, 1, 1]
        assert r.version == 0 and r.latest_version == 1
