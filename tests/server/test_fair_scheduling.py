"""Fair scheduling: per-tenant shares of the worker, sampling in slices, sliced == whole sampling.

The scheduler tests drive :class:`Scheduler` with a stand-in engine whose passes *sleep* for
a time proportional to their tokens (no CPU work, so the shares do not depend on this
machine's load); the sampling tests use the real tiny engine.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest

pytest.importorskip("torch")

from twinkle_server.engine import BatchJob, Datum, JobResult  # noqa: E402
from twinkle_server.scheduler import Job, Scheduler  # noqa: E402

#: seconds a stand-in pass takes per token.
PER_TOKEN_S = 0.0005


class SleepEngine:
    """forward_backward sleeps ``PER_TOKEN_S`` per token; optim_steps are instant."""

    def forward_backward(self, jobs: list[BatchJob]) -> list[JobResult]:
        time.sleep(PER_TOKEN_S * sum(len(d.tokens) for job in jobs for d in job.datums))
        return [JobResult() for _ in jobs]

    def optim_steps(self, requests: list[Any]) -> list[dict[str, float]]:
        return [{} for _ in requests]


class Recorder:
    def __init__(self) -> None:
        self.done: list[tuple[str, float]] = []
        self.lock = threading.Lock()

    def __call__(self, future_id: str, payload: Any, error: str | None, category: str | None) -> None:
        assert error is None, error
        with self.lock:
            self.done.append((future_id, time.monotonic()))


def _fb(tenant: str, run: str, seq: int, rows: int, tokens: int) -> Job:
    batch = BatchJob(0, [Datum(list(range(tokens)), {}) for _ in range(rows)])
    return Job(
        f"{run}/{seq}",
        run,
        seq,
        "forward_backward",
        prepare=lambda: batch,
        finish=lambda result: ("", b""),
        rows=rows,
        tenant=tenant,
    )


def _scheduler(recorder: Recorder, **kwargs: Any) -> Scheduler:
    sched = Scheduler(SleepEngine(), recorder, batch_window_s=0.0, **kwargs)  # type: ignore[arg-type]
    sched.start()
    return sched


def _tenant_of(future_id: str) -> str:
    return future_id.split("-", 1)[0]


def test_a_tenant_with_three_runs_gets_the_same_share_as_a_tenant_with_one() -> None:
    """Per-tenant, not per-run: a round robin over runs would give tenant a 3/4 of the passes."""
    rec = Recorder()
    sched = _scheduler(rec, max_batch_rows=1)  # one job per pass: the tenants contend for every pass
    try:
        sched.pause()
        runs = {"a-1": "a", "a-2": "a", "a-3": "a", "b-1": "b"}
        for run, tenant in runs.items():
            sched.register_model(run)
            for seq in range(1, 61):
                sched.submit(_fb(tenant, run, seq, rows=1, tokens=20))
        sched.resume()
        deadline = time.monotonic() + 60
        while len(rec.done) < 80 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sched.stop()
    first = [_tenant_of(fid) for fid, _ in rec.done[:80]]
    assert len(first) == 80
    a, b = first.count("a"), first.count("b")
    assert abs(a - b) <= 4, (a, b)  # equal tokens per job: equal shares are equal job counts
    shares = sched.shares()
    assert 0.8 < shares["a"] / shares["b"] < 1.25, shares


def test_big_and_small_jobs_share_worker_time_not_job_counts() -> None:
    """Tenant a sends 8-row jobs, tenant b 1-row jobs: b gets about 8 passes per pass of a's."""
    rec = Recorder()
    sched = _scheduler(rec, max_batch_rows=8)  # a's job fills a pass alone
    # 40 ms per row: the worker's own time per job (charged too, a few ms on a loaded machine)
    # stays small beside a 1-row job, so equal charges mean about equal rows
    tokens = 80
    try:
        sched.pause()
        sched.register_model("a-1")
        sched.register_model("b-1")
        for seq in range(1, 41):
            sched.submit(_fb("a", "a-1", seq, rows=8, tokens=tokens))
        for seq in range(1, 121):
            sched.submit(_fb("b", "b-1", seq, rows=1, tokens=tokens))
        sched.resume()
        deadline = time.monotonic() + 60
        while len(rec.done) < 72 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sched.stop()
    first = [_tenant_of(fid) for fid, _ in rec.done[:72]]
    a_rows, b_rows = 8 * first.count("a"), first.count("b")
    # equal tokens (= equal sleep time) within one of a's jobs
    assert abs(a_rows - b_rows) <= 16, (a_rows, b_rows)


class SlowGeneration:
    """A resumable stand-in: ``steps`` decode steps of ``step_s`` each, sleeping."""

    def __init__(self, steps: int, step_s: float) -> None:
        self.left, self.step_s, self.budgets = steps, step_s, []

    def step(self, budget_s: float | None) -> bool:
        self.budgets.append(budget_s)
        started = time.monotonic()
        while self.left > 0:
            time.sleep(self.step_s)
            self.left -= 1
            if budget_s is not None and time.monotonic() - started + self.step_s > budget_s:
                break
        return self.left == 0


def test_a_training_step_waits_at_most_one_slice_behind_a_flood_of_long_samples() -> None:
    slice_s, step_s = 0.1, 0.01
    rec = Recorder()
    sched = _scheduler(rec, slice_s=slice_s)
    gens: list[SlowGeneration] = []

    def sample_job(i: int) -> Job:
        def start() -> SlowGeneration:
            gens.append(SlowGeneration(steps=100, step_s=step_s))  # 1 s each, whole
            return gens[-1]

        return Job(f"a-sample-{i}", None, None, "sample", start=start, finish=lambda g: ("", b""), tenant="a")

    waits = []
    try:
        for i in range(4):
            sched.submit(sample_job(i))
        sched.register_model("b-1")
        time.sleep(0.05)
        for seq in range(1, 9):
            submitted = time.monotonic()
            sched.submit(_fb("b", "b-1", seq, rows=1, tokens=10))
            while not any(fid == f"b-1/{seq}" for fid, _ in rec.done):
                time.sleep(0.002)
            finished = next(t for fid, t in rec.done if fid == f"b-1/{seq}")
            waits.append(finished - submitted)
            time.sleep(0.03)  # the client turning the result into its next step
        assert not any(fid.startswith("a-sample") for fid, _ in rec.done)  # the flood is still running
    finally:
        sched.stop()
    # behind at most one slice (which overruns its budget by under one decode step), plus the pass itself
    bound = slice_s + step_s + PER_TOKEN_S * 10 + 0.1
    assert max(waits) < bound, (waits, bound)
    assert sched.slices >= 8 and all(b == slice_s for g in gens for b in g.budgets)


def test_slices_off_runs_each_sample_whole() -> None:
    rec = Recorder()
    sched = _scheduler(rec, slice_s=None)
    gen = SlowGeneration(steps=5, step_s=0.001)
    try:
        sched.submit(Job("a-s", None, None, "sample", start=lambda: gen, finish=lambda g: ("", b""), tenant="a"))
        deadline = time.monotonic() + 10
        while not rec.done and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sched.stop()
    assert gen.budgets == [None] and [fid for fid, _ in rec.done] == ["a-s"]


# -- sliced sampling draws what whole sampling draws -------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        {"num_samples": 3, "max_tokens": 12, "temperature": 1.0, "seed": 11, "prompt_logprobs": True},
        {"num_samples": 2, "max_tokens": 10, "temperature": 0.7, "top_k": 40, "top_p": 0.9, "seed": 5},
        {"num_samples": 2, "max_tokens": 9, "temperature": 0.0},
        {"num_samples": 4, "max_tokens": 20, "temperature": 1.0, "seed": 3, "stop_token_ids": [7, 19, 100]},
    ],
)
def test_sliced_sampling_equals_whole_sampling_with_other_work_between_slices(engine, params) -> None:
    slot = engine.create_slot(4, seed=1)
    other = engine.create_slot(4, seed=2)
    try:
        # a trained adapter (B != 0), so the slot's adapter matters to the tokens
        from twinkle_server.engine import BatchJob as EngineJob

        engine.forward_backward([EngineJob(slot, [Datum([3, 4, 5, 6, 7], {"target_tokens": [4, 5, 6, 7, 8]})])])
        engine.optim_step(slot, learning_rate=0.05)
        prompt = [5, 9, 13, 17]
        whole = engine.sample(slot, prompt, **params)
        gen = engine.start_sample(slot, prompt, **params)
        turns = 0
        while not gen.step(0.0):  # a budget of 0: one decode step per slice
            turns += 1
            # other tenants' work between the slices: a training pass and another generation
            engine.forward_backward([EngineJob(other, [Datum([1, 2, 3], {"target_tokens": [2, 3, 4]})])])
            engine.sample(other, [8, 8], num_samples=2, max_tokens=3, seed=turns)
        assert turns >= 2
        sequences, prompt_lps = gen.result()
        assert sequences == whole[0]  # the same tokens, bit-identical logprobs, the same stop reasons
        if params.get("prompt_logprobs"):
            assert math.isnan(prompt_lps[0]) and prompt_lps[1:] == whole[1][1:]
        else:
            assert prompt_lps is None and whole[1] is None
    finally:
        engine.free_slot(slot)
        engine.free_slot(other)


def test_a_generation_whose_adapter_was_unloaded_fails_its_next_slice(engine) -> None:
    from twinkle_server.engine import EngineError

    slot = engine.create_slot(4, seed=1)
    gen = engine.start_sample(slot, [5, 6, 7], max_tokens=8, seed=1, stop_token_ids=[])
    assert not gen.step(0.0)
    engine.free_slot(slot)
    replacement = engine.create_slot(4, seed=9)  # may take the same slot id
    try:
        with pytest.raises(EngineError, match="unloaded while this request was sampling"):
            gen.step(0.0)
    finally:
        engine.free_slot(replacement)
