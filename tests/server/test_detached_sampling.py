"""A sliced job whose work runs off the worker (``twinkle serve --sampler vllm``): the worker starts it,
goes on with the next jobs at once, and answers it when its future resolves (from another thread).

The vLLM side itself is tested in tests/vllm/test_server_vllm_sampling.py (nox session ``vllm``).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any

import pytest

pytest.importorskip("torch")

from twinkle_server.scheduler import Job, Scheduler  # noqa: E402


class Detached:
    """A stand-in for a vLLM request: a future that another thread resolves."""

    def __init__(self) -> None:
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def step(self, budget_s: float | None = None) -> bool:  # pragma: no cover - never called for a detached job
        raise AssertionError("a detached job must not be stepped on the worker")


def test_a_detached_sample_leaves_the_worker_free_and_is_answered_from_its_future() -> None:
    answered: dict[str, tuple[Any, str | None, float]] = {}
    done = threading.Event()

    def on_done(future_id: str, payload: Any, error: str | None, category: str | None) -> None:
        answered[future_id] = (payload, error, time.monotonic())
        if len(answered) == 4:
            done.set()

    sched = Scheduler(object(), on_done, batch_window_s=0.0)  # type: ignore[arg-type]
    sched.start()
    try:
        first, failing = Detached(), Detached()
        for name, work in (("t-sample", first), ("t-failing", failing)):
            sched.submit(
                Job(
                    name,
                    None,
                    None,
                    "sample",
                    start=lambda work=work: work,
                    finish=lambda gen: ("text/plain", str(gen.future.result()).encode()),
                    tenant="t",
                )
            )
        # the same tenant's next arrival-order job runs while both samples are still generating
        sched.submit(Job("t-next", None, None, "internal", run=lambda: ("text/plain", b"next"), tenant="t"))
        deadline = time.monotonic() + 10
        while "t-next" not in answered:
            assert time.monotonic() < deadline, "the worker waited for the detached samples"
            time.sleep(0.01)
        assert "t-sample" not in answered and "t-failing" not in answered and sched.queued() == 0
        threading.Thread(target=first.future.set_result, args=("tokens",)).start()
        threading.Thread(target=failing.future.set_exception, args=(ValueError("bad request"),)).start()
        sched.submit(Job("t-after", None, None, "internal", run=lambda: ("text/plain", b"after"), tenant="t"))
        assert done.wait(10)
        assert answered["t-sample"][:2] == (("text/plain", b"tokens"), None)
        assert answered["t-failing"][0] is None and "bad request" in (answered["t-failing"][1] or "")
        assert sched.slices == 0  # no slice ran on the worker
    finally:
        sched.stop()
