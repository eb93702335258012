"""Async RL building blocks: admission control, bounded staleness, partial rollouts, the local worker."""

from __future__ import annotations

import threading

import pytest
from twinkle.data_format import SamplingParams
from twinkle.data_format.sampling import SampleResponse, as_sampling_params, sampled_sequence
from twinkle.rollout import Rollout, RolloutBuffer, RolloutWorker, sample_partial


class CountingSampler:
    """Token t of a continuation is 10 * (calls so far) + t; stops ('stop') once 7 tokens follow the prompt."""

    def __init__(self, prompt_len: int = 3, stop_after: int = 7):
        self.calls = 0
        self.prompt_len = prompt_len
        self.stop_after = stop_after

    def sample(self, prompts, sampling_params=None, adapter_name=None):
        params = as_sampling_params(sampling_params)
        self.calls += 1
        out = []
        for prompt in prompts:
            ids = list(prompt["input_ids"])
            seqs = []
            for _ in range(params.num_samples):
                done = len(ids) - self.prompt_len
                n = min(params.max_tokens, self.stop_after - done)
                tokens = [10 * self.calls + t for t in range(n)]
                reason = "stop" if done + n >= self.stop_after else "length"
                logprobs = [-0.5] * n
                text = "".join(f"<{t}>" for t in tokens)
                seqs.append(sampled_sequence(ids, tokens, logprobs, reason, text, prompt.get("user_data", {}), None))
            out.append(SampleResponse(sequences=seqs, prompt_tokens=ids))
        return out


def rollouts(version: int, n: int) -> list[Rollout]:
    seq = CountingSampler().sample([{"input_ids": [1, 2, 3]}], SamplingParams(max_tokens=2))[0].sequences[0]
    return [Rollout(seq, version=version) for _ in range(n)]


def test_admission_control_bounds_how_far_ahead_sampling_runs():
    buffer = RolloutBuffer(batch_size=4, max_staleness=1)
    assert buffer.admit(4, timeout=0) and buffer.admit(4, timeout=0)  # versions 0 and 1 worth of samples
    assert not buffer.admit(1, timeout=0.01)  # a third batch would be 2 versions behind when consumed
    buffer.set_version(1)
    assert buffer.admit(4, timeout=0)
    assert not buffer.admit(1, timeout=0)
    sync = RolloutBuffer(batch_size=4, max_staleness=0)  # synchronous: one batch at a time
    assert sync.admit(4, timeout=0) and not sync.admit(1, timeout=0)


def test_get_drops_too_stale_rollouts_and_frees_their_slots():
    buffer = RolloutBuffer(batch_size=2, max_staleness=1)
    assert buffer.admit(2, timeout=0) and buffer.admit(2, timeout=0)
    buffer.put(rollouts(0, 2))
    buffer.put(rollouts(1, 2))
    buffer.set_version(2)  # version-0 samples are now 2 behind
    got = buffer.get(2, timeout=0)
    assert [r.version for r in got] == [1, 1] and buffer.dropped == 2
    assert buffer.can_admit(2 + 2)  # 2 dropped slots + the new version's 2
    with pytest.raises(TimeoutError):
        buffer.get(1, timeout=0.01)
    assert buffer.stats() == {"buffer_size": 0, "buffer_dropped": 2, "buffer_consumed": 2, "policy_version": 2}


def test_bad_buffer_options():
    with pytest.raises(ValueError, match="batch_size"):
        RolloutBuffer(batch_size=0)
    with pytest.raises(ValueError, match="max_staleness"):
        RolloutBuffer(batch_size=2, max_staleness=-1)
    buffer = RolloutBuffer(batch_size=2)
    buffer.set_version(3)
    with pytest.raises(ValueError, match="back"):
        buffer.set_version(2)


def test_partial_rollout_records_the_version_of_every_token():
    sampler = CountingSampler()
    version = {"v": 0}

    def weight_update():  # between chunks the sampler got new weights
        version["v"] += 1

    groups = sample_partial(
        sampler,
        [{"input_ids": [1, 2, 3], "user_data": {"answer": "x"}}],
        SamplingParams(max_tokens=7, num_samples=2, seed=1),
        chunk_tokens=3,
        version=lambda: version["v"],
        between_chunks=weight_update,
    )
    assert len(groups) == 1 and len(groups[0]) == 2
    for r in groups[0]:
        assert r.token_versions == [0, 0, 0, 1, 1, 1, 2]
        assert r.version == 0 and r.latest_version == 2 and r.staleness(3) == 3
        seq = r.sequence
        assert seq.stop_reason == "stop" and len(seq.tokens) == 7
        assert seq.input_feature["input_ids"] == [1, 2, 3, *seq.tokens]
        assert seq.input_feature["labels"] == [-100] * 3 + seq.tokens
        assert seq.input_feature["old_logps"] == [0.0] * 3 + [-0.5] * 7
        assert seq.user_data == {"answer": "x"}
        assert seq.text == "".join(f"<{t}>" for t in seq.tokens)
        row = r.row(advantages=1.0)
        assert row["policy_version"] == 0 and row["advantages"] == 1.0
    assert sampler.calls == 1 + 2 * 2  # one first call, then one continuation per sequence per chunk


def test_partial_rollout_continues_exactly_under_the_same_weights(rl_sampler):
    """Greedy, same weights: chunked sampling gives the tokens and log-probs of one call."""
    prompts = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10]}]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    whole = rl_sampler.sample(prompts, params)
    groups = sample_partial(rl_sampler, prompts, params, chunk_tokens=2, version=lambda: 4)
    for response, group in zip(whole, groups):
        assert group[0].sequence.tokens == response.sequences[0].tokens
        assert group[0].sequence.logprobs == pytest.approx(response.sequences[0].logprobs, abs=1e-4)
        assert group[0].token_versions == [4] * 6


@pytest.mark.parametrize("chunk_tokens", [None, 2])
def test_worker_keeps_every_consumed_sample_within_the_staleness_bound(chunk_tokens):
    sampler = CountingSampler(stop_after=5)
    buffer = RolloutBuffer(batch_size=4, max_staleness=1)
    prompts = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6]}]
    seen_groups: list[int] = []
    worker = RolloutWorker(
        sampler,
        buffer,
        lambda: prompts,
        SamplingParams(max_tokens=5, num_samples=2),
        chunk_tokens=chunk_tokens,
        postprocess=lambda rs: seen_groups.extend(r.group for r in rs),
    ).start()
    synced = threading.Event()
    consumed = []
    for _ in range(5):
        batch = buffer.get(4, timeout=30)
        assert all(r.staleness(buffer.version) <= 1 for r in batch)
        assert all(len(r.token_versions) == 5 for r in batch)
        consumed.extend(batch)
        worker.sync(synced.set)
    worker.stop()
    assert synced.is_set() and buffer.version == 5
    versions = [r.version for r in consumed]
    assert versions == sorted(versions) and versions[-1] >= 2  # oldest first; sampling follows the trainer
    assert seen_groups[:4] == [0, 0, 1, 1]  # the samples of one prompt share a group id


def test_worker_with_a_real_sampler_and_weight_syncs(rl_model_dir):
    """TorchSampler in the worker thread, a LoRA trained and synced between chunks: versions advance,
    partial rollouts span versions, and the trainer's steps see the rollout-correction metrics."""
    from peft import LoraConfig
    from twinkle.checkpoint_engine import LocalCheckpointEngine
    from twinkle.model import TransformersModel
    from twinkle.sampler import TorchSampler

    model = TransformersModel(model_id=rl_model_dir, seed=1, device="cpu")
    model.add_adapter_to_model("default", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=1e-2)
    model.set_loss("GRPOLoss", rollout_correction="token_mask", rollout_clip_min=0.5, rollout_clip_max=5.0)
    sampler = TorchSampler(model_id=rl_model_dir, device="cpu", seed=3)
    engine = LocalCheckpointEngine()
    engine.sync(model, sampler, adapter_name="default")
    buffer = RolloutBuffer(batch_size=4, max_staleness=1)
    params = SamplingParams(max_tokens=4, num_samples=2, ignore_eos=True, seed=5)
    prompts = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}]
    worker = RolloutWorker(sampler, buffer, lambda: prompts, params, adapter_name="default", chunk_tokens=2).start()
    token_versions = []
    for _ in range(3):
        batch = buffer.get(4, timeout=300)
        assert all(r.staleness(buffer.version) <= 1 for r in batch)
        token_versions += [r.token_versions for r in batch]
        out = model.forward_backward(inputs=[r.row(advantages=a) for r, a in zip(batch, [1.0, -1.0, 0.5, -0.5])])
        assert 0.0 <= out["rollout_masked_fraction"] <= 1.0
        model.clip_grad_and_step()
        worker.sync(lambda: engine.sync(model, sampler, adapter_name="default"))
    worker.stop()
    assert buffer.version == 3 and worker.batches >= 3
    assert all(len(v) == 4 and v == sorted(v) for v in token_versions)


class SeedRecordingSampler(CountingSampler):
    def __init__(self):
        super().__init__(stop_after=2)
        self.seeds: list[int | None] = []
        self.loaded: list[tuple[dict, str | None]] = []

    def sample(self, prompts, sampling_params=None, adapter_name=None):
        self.seeds.append(as_sampling_params(sampling_params).seed)
        return super().sample(prompts, sampling_params, adapter_name)

    def update_weights(self, weights, adapter_name=None, peft_config=None):
        self.loaded.append((dict(weights), adapter_name))
        return len(weights)


def test_worker_seeds_batch_k_with_seed_plus_k():
    sampler = SeedRecordingSampler()
    buffer = RolloutBuffer(batch_size=2, max_staleness=2)
    worker = RolloutWorker(sampler, buffer, lambda: [{"input_ids": [1, 2, 3]}], {"max_tokens": 2, "num_samples": 2,
                                                                                 "seed": 100}).start()
    buffer.get(2, timeout=30)
    buffer.get(2, timeout=30)
    worker.stop()
    assert sampler.seeds[:3] == [100, 101, 102]  # not the same stream every batch


class FakeModel:
    def __init__(self):
        self.calls = 0

    def get_state_dict(self, adapter_name=None):
        self.calls += 1
        return {"w": self.calls}


def test_sync_weights_gathers_then_loads_between_sample_calls_and_bumps_the_version():
    sampler = SeedRecordingSampler()
    buffer = RolloutBuffer(batch_size=2, max_staleness=1)
    worker = RolloutWorker(sampler, buffer, lambda: [{"input_ids": [1, 2, 3]}], {"max_tokens": 2, "num_samples": 2})
    model = FakeModel()
    metrics = worker.sync_weights(model, adapter_name="default")  # no worker thread: loads at once
    assert sampler.loaded == [({"w": 1}, "default")] and buffer.version == 1
    assert 0 <= metrics["sync_pause_seconds"] <= metrics["sync_seconds"]


def test_a_waiting_sync_goes_before_the_next_chunk():
    """The worker re-takes the sampler right after a chunk; a sync that waits must still get in first."""
    entered, release = threading.Event(), threading.Event()
    order: list[str] = []

    class Blocking(SeedRecordingSampler):
        def sample(self, prompts, sampling_params=None, adapter_name=None):
            order.append("sample")
            if len(order) == 1:
                entered.set()
                release.wait(30)
            return super().sample(prompts, sampling_params, adapter_name)

        def update_weights(self, weights, adapter_name=None, peft_config=None):
            order.append("sync")
            return super().update_weights(weights, adapter_name, peft_config)

    sampler = Blocking()
    sampler.stop_after = 6
    buffer = RolloutBuffer(batch_size=1, max_staleness=3)
    worker = RolloutWorker(sampler, buffer, lambda: [{"input_ids": [1, 2, 3]}], {"max_tokens": 6, "num_samples": 1},
                           chunk_tokens=2).start()
    assert entered.wait(30)
    sync = threading.Thread(target=worker.sync_weights, args=(FakeModel(),))
    sync.start()
    while not worker._syncs_waiting:
        threading.Event().wait(0.005)
    release.set()
    sync.join(30)
    (rollout,) = buffer.get(1, timeout=30)
    worker.stop()
    assert order[:3] == ["sample", "sync", "sample"]
    assert rollout.token_versions == [0, 0, 1, 1, 1, 1]
