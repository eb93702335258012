"""The worker: runs requests in per-model ``seq_id`` order, shares the device fairly between
tenants, and batches tenants together.

Requests become :class:`Job` objects. A job of a training run carries the run's
``seq_id``; it runs only after the run's previous ``seq_id`` finished (the order the
tinker SDK numbers them in), whatever order they arrived in. Jobs without a ``seq_id``
(model creation, sampling, twinkle-client calls) run in arrival order within their tenant.

Fair share. Every job belongs to a tenant. The worker charges each tenant the worker time
its work took (a batched pass is split among its jobs by tokens) and always serves the
tenant that has been charged least: its ready job runs next (for a ``forward_backward``,
with every other ready one in one batched pass; for an ``optim_step``, with every other
ready one in one fused step). A tenant that becomes busy after a pause starts at the least
charge among the busy tenants (no credit is saved up while idle), so under contention every
busy tenant gets about the same share of the device, however many runs or requests it
queues. At most one of a tenant's arrival-order jobs is a candidate at a time.

Slices. A sampling job (``start``) is a resumable generation: each turn runs one slice of
about ``slice_s`` seconds of decoding (see :mod:`twinkle_server.sampling`), then the worker
picks again, so another tenant's small training step waits behind at most one slice (plus
whatever it waits for in its own turn), never behind a whole long request. A sliced job whose
work runs elsewhere (``twinkle serve --sampler vllm``: its ``start`` returns an object with a
``future``) takes one turn to start and leaves the queue; it is answered when the future is done.

Gathering: tenants step in lockstep only if each pass waits for the tenants that are
between two steps. Before a ``forward_backward`` pass starts, the worker waits for the
runs that trained in one of the last two passes and have nothing queued (their client is
turning its last result into the next request), but never longer than a window: the
smaller of ``batch_window_s`` and half the recent pass time, so a tenant that stops
training costs the others at most two such waits, and no run ever waits on another for
longer than the window.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

from twinkle_server.engine import BatchJob, EngineError, JobResult, LoRAEngine

logger = logging.getLogger("twinkle_server")

#: Job kinds that run as one batched multi-LoRA pass.
BATCHED_KINDS = ("forward_backward", "forward")
#: Job kind whose ready jobs (with ``prepare``) step together in one multi-tensor update.
OPTIM_KIND = "optim_step"
#: (content type, payload bytes) of a finished job.
Payload = tuple[str, bytes]
#: a run that trained in one of this many latest passes is expected in the next one.
EXPECTED_PASSES = 2
#: the gather window is at most this fraction of the recent pass time.
WINDOW_FRACTION = 0.5
#: default seconds of decoding per sampling slice.
DEFAULT_SLICE_S = 0.5


class UserError(ValueError):
    """An error caused by the request (reported to the user as category ``user``)."""


@dataclass
class Job:
    """One unit of work.

    Attributes:
        future_id: the request id the client polls.
        model_id: the training run it belongs to (orders it), or None.
        seq_id: its position in the run's request order, or None for arrival order.
        kind: ``forward_backward``, ``forward`` (batched), ``optim_step`` (stepped together)
            or anything else (run alone).
        run: for jobs run alone: does the work and returns the payload.
        prepare: for batched jobs: builds the :class:`BatchJob`; for ``optim_step`` jobs:
            returns ``(slot, AdamParams fields)`` (at execution time).
        finish: turns the :class:`JobResult` (batched), the step's metrics (``optim_step``) or
            the finished resumable (``start``) into the payload.
        tenant: who the job's time is charged to (None: the server's own work, charged to nobody).
        start: for sliced jobs: builds the resumable work (an object with ``step(budget_s) -> done``,
            such as :class:`twinkle_server.sampling.Generation`) on the job's first turn.
    """

    future_id: str
    model_id: str | None
    seq_id: int | None
    kind: str
    run: Callable[[], Payload] | None = None
    prepare: Callable[[], BatchJob] | None = None
    finish: Callable[[JobResult], Payload] | None = None
    rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    queued_at: float = field(default_factory=time.monotonic)
    tenant: str | None = None
    start: Callable[[], Any] | None = None
    #: the resumable work of a sliced job between its turns.
    resumable: Any = None


@dataclass
class PassRecord:
    """One batched pass: when it started (``time.time()``), how many runs and datums it held,
    how long it ran, how long it waited for tenants to join, and how long answering its jobs
    and running the optim_steps queued behind them took afterwards."""

    started: float
    kind: str
    tenants: int
    rows: int
    seconds: float
    waited_s: float
    after_s: float = 0.0
    #: the tenants of the pass's jobs.
    tenant_ids: list[str] = field(default_factory=list)


class Scheduler:
    """Owns the worker thread that drives the engine.

    Args:
        engine: the :class:`LoRAEngine`.
        on_done: ``on_done(future_id, payload, error, category)`` after every job.
        max_batch_rows: datums per batched pass.
        batch_window_s: the longest a ``forward_backward`` pass waits for the runs that are
            between two training steps (see the module docstring); 0 never waits.
        seq_window: a run's request may be at most this many ``seq_id``s ahead of the run's
            next one (an out-of-order request holds its decoded body until its turn).
        seq_wait_s: a request waiting for an earlier ``seq_id`` that never comes fails after
            this long (its future answers the error; the body is released).
        slice_s: seconds of decoding per turn of a sampling job (a longer request is resumed
            in later turns, other tenants' work between them); None runs each request whole.
    """

    def __init__(
        self,
        engine: LoRAEngine,
        on_done: Callable[[str, Payload | None, str | None, str | None], None],
        *,
        max_batch_rows: int = 256,
        batch_window_s: float = 0.0,
        seq_window: int = 128,
        seq_wait_s: float = 600.0,
        slice_s: float | None = DEFAULT_SLICE_S,
    ) -> None:
        self.engine = engine
        self.slice_s = slice_s
        self.seq_window = seq_window
        self.seq_wait_s = seq_wait_s
        self.on_done = on_done
        self.max_batch_rows = max_batch_rows
        self.batch_window_s = batch_window_s
        self._cond = threading.Condition()
        self._ordered: dict[str, dict[int, Job]] = {}
        self._next_seq: dict[str, int] = {}
        self._free: deque[Job] = deque()
        self._rotation = 0
        #: run -> (number of the last pass it was in, when that pass finished).
        self._last_pass: dict[str, tuple[int, float]] = {}
        self._pass_no = 0
        self._pass_s = 0.0
        self._waited_s = 0.0
        self._pass_end = 0.0
        self._running = False
        self._paused = False
        self._thread: threading.Thread | None = None
        #: statistics (for tests and benchmarks): jobs per batched pass, the passes, and
        #: finished future ids in completion order (the last 10,000 of each).
        self.batches: deque[int] = deque(maxlen=10_000)
        self.passes: deque[PassRecord] = deque(maxlen=10_000)
        self.completed: deque[str] = deque(maxlen=10_000)
        #: tenant -> worker seconds charged (the fair-share ledger); see the module docstring.
        self.usage: dict[str, float] = {}
        #: sampling slices run (for tests and benchmarks).
        self.slices = 0

    def start(self) -> None:
        """Start the worker thread."""
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="twinkle-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker after the job in progress."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def pause(self) -> None:
        """Hold new rounds (queued jobs wait) until :meth:`resume`; the job in progress finishes."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        """Let the worker pick up queued jobs again."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def register_model(self, model_id: str, next_seq: int = 1) -> None:
        """Start ordering a run's requests at ``next_seq``."""
        with self._cond:
            self._next_seq.setdefault(model_id, next_seq)
            self._ordered.setdefault(model_id, {})

    def forget_model(self, model_id: str) -> list[Job]:
        """Stop ordering a run; returns its queued jobs (the caller fails them)."""
        with self._cond:
            self._next_seq.pop(model_id, None)
            self._last_pass.pop(model_id, None)
            return list(self._ordered.pop(model_id, {}).values())

    def submit(self, job: Job) -> None:
        """Queue a job.

        Raises:
            UserError: the ``seq_id`` was already used or queued for this run.
        """
        with self._cond:
            if job.tenant is not None and not self._busy(job.tenant):
                self._catch_up(job.tenant)
            if job.model_id is not None and job.seq_id is not None and job.model_id in self._next_seq:
                queue = self._ordered[job.model_id]
                if job.seq_id < self._next_seq[job.model_id] or job.seq_id in queue:
                    raise UserError(
                        f"seq_id {job.seq_id} of {job.model_id} was already used; each request of a training "
                        "client needs the next seq_id"
                    )
                if job.seq_id >= self._next_seq[job.model_id] + self.seq_window:
                    raise UserError(
                        f"seq_id {job.seq_id} of {job.model_id} is more than {self.seq_window} ahead of the run's "
                        f"next seq_id {self._next_seq[job.model_id]}; send requests in order"
                    )
                queue[job.seq_id] = job
            else:
                self._free.append(job)
            self._cond.notify_all()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the worker thread (for changes to the engine from request handlers)."""

        def run() -> Payload:
            fn()
            return ("", b"")

        self.submit(Job("", None, None, "internal", run=run))

    def queued(self) -> int:
        """How many jobs wait (all runs)."""
        with self._cond:
            return len(self._free) + sum(len(q) for q in self._ordered.values())

    def pass_stats(self, since: float = 0.0) -> dict[str, Any]:
        """Summary of the ``forward_backward`` passes that started at or after ``since`` (``time.time()``).

        Returns:
            ``{"passes", "mean_tenants", "histogram": {tenants: passes}, "mean_wait_ms", "mean_after_ms",
            "records"}``.
        """
        with self._cond:
            records = [r for r in self.passes if r.started >= since and r.kind == "forward_backward"]
        histogram = Counter(r.tenants for r in records)
        return {
            "passes": len(records),
            "mean_tenants": sum(r.tenants for r in records) / len(records) if records else 0.0,
            "histogram": {str(k): histogram[k] for k in sorted(histogram)},
            "mean_wait_ms": 1e3 * sum(r.waited_s for r in records) / len(records) if records else 0.0,
            "mean_after_ms": 1e3 * sum(r.after_s for r in records) / len(records) if records else 0.0,
            "records": [asdict(r) for r in records],
        }

    def shares(self) -> dict[str, float]:
        """Worker seconds charged to each tenant so far (the fair-share ledger, for tests and benchmarks)."""
        with self._cond:
            return dict(self.usage)

    # -- fair share -------------------------------------------------------------------
    def _busy(self, tenant: str) -> bool:
        """(With the lock) whether the tenant has a job queued."""
        return any(job.tenant == tenant for job in self._free) or any(
            job.tenant == tenant for queue in self._ordered.values() for job in queue.values()
        )

    def _catch_up(self, tenant: str) -> None:
        """(With the lock) a tenant becoming busy starts at the least charge of the busy tenants (no saved credit)."""
        busy = {job.tenant for job in self._free} | {
            job.tenant for queue in self._ordered.values() for job in queue.values()
        }
        floor = min((self.usage.get(t, 0.0) for t in busy if t is not None), default=None)
        if floor is not None:
            self.usage[tenant] = max(self.usage.get(tenant, 0.0), floor)

    def _charge(self, jobs: list[Job], seconds: float, weights: list[float] | None = None) -> None:
        """Charge ``seconds`` of worker time to the jobs' tenants (split by ``weights``, default evenly)."""
        if not jobs or seconds <= 0:
            return
        weights = weights if weights is not None and sum(weights) > 0 else [1.0] * len(jobs)
        total = sum(weights)
        with self._cond:
            for job, weight in zip(jobs, weights):
                if job.tenant is not None:
                    self.usage[job.tenant] = self.usage.get(job.tenant, 0.0) + seconds * weight / total

    # -- the loop -------------------------------------------------------------------
    def _ready(self) -> list[Job]:
        """(With the lock) the jobs that may run now, least-charged tenant first.

        One job per run (its next ``seq_id``), and per tenant its oldest arrival-order job;
        the server's own jobs (no tenant) come first.
        """
        ready: list[Job] = []
        models = list(self._ordered)
        if models:
            start = self._rotation % len(models)
            self._rotation += 1
            for model_id in models[start:] + models[:start]:
                job = self._ordered[model_id].get(self._next_seq[model_id])
                if job is not None:
                    ready.append(job)
        seen: set[str] = set()
        internal = 0
        for job in self._free:
            if job.tenant is None:
                if internal < 8:
                    ready.append(job)
                    internal += 1
            elif job.tenant not in seen:
                seen.add(job.tenant)
                ready.append(job)
        # a stable sort: within one charge, runs keep their rotation and jobs their arrival order
        ready.sort(key=lambda job: -1.0 if job.tenant is None else self.usage.get(job.tenant, 0.0))
        return ready

    def _expire(self) -> list[tuple[Job, float]]:
        """(With the lock) take out the requests that waited longer than ``seq_wait_s`` for an earlier seq_id."""
        now = time.monotonic()
        expired = []
        for model_id, queue in self._ordered.items():
            nxt = self._next_seq.get(model_id)
            for seq, job in list(queue.items()):
                if seq != nxt and now - job.queued_at > self.seq_wait_s:
                    expired.append((queue.pop(seq), now - job.queued_at))
        return expired

    def _answer_expired(self, job: Job, waited: float) -> None:
        message = (
            f"seq_id {job.seq_id} of {job.model_id} waited {waited:.0f} s for seq_id "
            f"{self._next_seq.get(job.model_id or '', '?')}, which never arrived; the request was dropped"
        )
        try:
            self.on_done(job.future_id, None, message, "user")
        except Exception:  # noqa: BLE001 - the worker must survive
            logger.exception("answering an expired request failed")

    def _loop(self) -> None:
        gather_start: float | None = None
        while True:
            with self._cond:
                expired = self._expire()
                ready = [] if self._paused or expired else self._ready()
                while not ready and not expired and self._running:
                    self._cond.wait(timeout=0.5)
                    expired = self._expire()
                    ready = [] if self._paused or expired else self._ready()
                if not self._running:
                    return
            if expired:
                for job, waited in expired:
                    self._answer_expired(job, waited)
                continue
            first = ready[0]
            if first.kind not in BATCHED_KINDS:
                # the least-charged tenant's turn: one job (one slice of a sampling job), or every
                # ready optim_step fused into one step
                if first.kind == OPTIM_KIND and first.prepare is not None:
                    turn = [job for job in ready if job.kind == OPTIM_KIND and job.prepare is not None]
                else:
                    turn = [first]
                self._run_singles(turn)
                continue
            with self._cond:
                batched = [job for job in ready if job.kind == first.kind]
                if gather_start is None:
                    gather_start = time.monotonic()
                gathered = self._gather(batched, gather_start)
            if gathered is None:  # a run's optim_step (or other single) arrived: run it, then gather on
                continue
            gather_start = None
            self._run_round(gathered)

    def _expected(self, ready: list[Job], now: float) -> int:
        """Runs that trained in one of the last passes, recently, and have no next job queued."""
        horizon = max(1.0, 4 * self._pass_s)
        ready_models = {job.model_id for job in ready}
        count = 0
        for model_id, (number, finished) in self._last_pass.items():
            if (
                self._pass_no - number < EXPECTED_PASSES
                and now - finished < horizon
                and model_id not in ready_models
                and model_id in self._next_seq
                and self._next_seq[model_id] not in self._ordered[model_id]
            ):
                count += 1
        return count

    def _gather(self, ready: list[Job], start: float) -> list[Job] | None:
        """Wait (bounded) for the runs between two training steps to send their ``forward_backward``.

        Returns the jobs of the pass, or None when an unbatched job of a tenant charged less
        than the pass's first became ready meanwhile (the loop runs it and gathers on, with the
        same ``start``).
        """
        window = self.batch_window_s
        if self._pass_s > 0:
            window = min(window, WINDOW_FRACTION * self._pass_s)
        while True:
            now = time.monotonic()
            self._waited_s = now - start
            rows = sum(job.rows for job in ready if job.kind == "forward_backward")
            if (
                self._waited_s >= window
                or rows >= self.max_batch_rows
                or not self._running
                or self._paused
                or not any(job.kind == "forward_backward" for job in ready)
                or not self._expected(ready, now)
            ):
                return ready
            self._cond.wait(timeout=window - self._waited_s)
            fresh = self._ready()
            if fresh and fresh[0].kind not in BATCHED_KINDS:  # a less-charged tenant's other job goes first
                return None
            ready = fresh

    def _run_round(self, ready: list[Job]) -> None:
        batched_models: set[str | None] = set()
        record: PassRecord | None = None
        for kind in BATCHED_KINDS:
            batch, rows = [], 0
            for job in ready:
                if job.kind != kind:
                    continue
                if batch and rows + job.rows > self.max_batch_rows:
                    break
                batch.append(job)
                rows += job.rows
            if batch:
                record = self._run_batch(batch) or record
                batched_models.update(job.model_id for job in batch)
        singles = []
        with self._cond:
            # a run whose pass just finished often has its optim_step queued next: run it now,
            # so every tenant's step ends together and their next passes line up
            for model_id in batched_models - {None}:
                job = self._ordered.get(model_id, {}).get(self._next_seq.get(model_id, -1))
                if job is not None and job.kind not in BATCHED_KINDS:
                    singles.append(job)
        self._run_singles(singles)
        if record is not None:
            record.after_s = time.monotonic() - self._pass_end

    def _complete(self, job: Job, payload: Payload | None, error: str | None, category: str | None) -> None:
        with self._cond:
            if job.model_id is not None and job.seq_id is not None and job.model_id in self._ordered:
                self._ordered[job.model_id].pop(job.seq_id, None)
                self._next_seq[job.model_id] = job.seq_id + 1
            else:
                try:
                    self._free.remove(job)
                except ValueError:
                    pass
        if job.future_id:
            self.completed.append(job.future_id)
        if not job.future_id:
            if error is not None:
                logger.error("internal job failed: %s", error)
            return
        try:
            self.on_done(job.future_id, payload, error, category)
        except Exception:  # noqa: BLE001 - the worker must survive a storage failure
            logger.exception("could not record the result of %s", job.future_id)

    def _fail(self, job: Job, exc: BaseException) -> None:
        if isinstance(exc, (UserError, EngineError, ValueError)):
            self._complete(job, None, str(exc), "user")
        else:
            logger.error("job %s (%s) failed:\n%s", job.future_id, job.kind, traceback.format_exc())
            self._complete(job, None, f"internal server error while running {job.kind}; see the server log", "server")

    def _run_singles(self, jobs: list[Job]) -> None:
        """Run unbatched jobs: ``optim_step`` jobs together in one engine call, the rest one by one."""
        steps = [job for job in jobs if job.kind == OPTIM_KIND and job.prepare is not None]
        if steps:
            clock = time.monotonic()
            self._run_optim_steps(steps)
            self._charge(steps, time.monotonic() - clock)
        for job in jobs:
            if job not in steps:
                clock = time.monotonic()
                if job.start is not None:
                    self._run_slice(job)
                else:
                    self._run_single(job)
                self._charge([job], time.monotonic() - clock)

    def _prepare_jobs(self, jobs: list[Job]) -> list[tuple[Job, Any]]:
        """``(job, job.prepare())`` of each job; a job whose ``prepare`` raises is failed and left out."""
        prepared: list[tuple[Job, Any]] = []
        for job in jobs:
            try:
                assert job.prepare is not None
                prepared.append((job, job.prepare()))
            except Exception as exc:  # noqa: BLE001 - reported to the client
                self._fail(job, exc)
        return prepared

    def _finish_jobs(self, outcomes: Iterable[tuple[Job, BaseException | None, Any]]) -> None:
        """Complete each ``(job, error, result)``: fail it with ``error``, else with ``job.finish(result)``."""
        for job, error, result in outcomes:
            if error is not None:
                self._fail(job, error)
                continue
            try:
                assert job.finish is not None
                payload = job.finish(result)
            except Exception as exc:  # noqa: BLE001 - reported to the client
                self._fail(job, exc)
                continue
            self._complete(job, payload, None, None)

    def _run_optim_steps(self, jobs: list[Job]) -> None:
        prepared = self._prepare_jobs(jobs)
        if not prepared:
            return
        try:
            results = self.engine.optim_steps([request for _, request in prepared])
        except Exception as exc:  # noqa: BLE001
            for job, _ in prepared:
                self._fail(job, exc)
            return
        self._finish_jobs(
            (job, result if isinstance(result, Exception) else None, result)
            for (job, _), result in zip(prepared, results)
        )

    def _run_single(self, job: Job) -> None:
        try:
            assert job.run is not None
            payload = job.run()
        except Exception as exc:  # noqa: BLE001 - reported to the client
            self._fail(job, exc)
            return
        self._complete(job, payload, None, None)

    def _run_slice(self, job: Job) -> None:
        """One turn of a sliced job: start it on its first turn, run a slice, finish it when done."""
        try:
            if job.resumable is None:
                assert job.start is not None
                job.resumable = job.start()
                if getattr(job.resumable, "future", None) is not None:  # it runs elsewhere: see _detach
                    self._detach(job)
                    return
            done = job.resumable.step(self.slice_s)
            with self._cond:
                self.slices += 1
        except Exception as exc:  # noqa: BLE001 - reported to the client
            job.resumable = None
            self._fail(job, exc)
            return
        if not done:  # it stays queued at its place; its tenant's next turn resumes it
            return
        resumable, job.resumable = job.resumable, None
        self._finish_jobs([(job, None, resumable)])

    def _detach(self, job: Job) -> None:
        """A job whose work runs off the worker (a vLLM request, whose ``future`` ends it) leaves the
        queue now, so its tenant's next job can run; it is answered when its future is done."""
        resumable = job.resumable
        with self._cond:
            try:
                self._free.remove(job)
            except ValueError:
                pass

        def done(future: Any) -> None:
            job.resumable = None
            self._finish_jobs([(job, future.exception(), resumable)])

        resumable.future.add_done_callback(done)

    def _run_batch(self, jobs: list[Job]) -> PassRecord | None:
        prepared: list[tuple[Job, BatchJob]] = self._prepare_jobs(jobs)
        if not prepared:
            return None
        started, clock = time.time(), time.monotonic()
        try:
            results = self.engine.forward_backward([b for _, b in prepared])
        except Exception as exc:  # noqa: BLE001
            for job, _ in prepared:
                self._fail(job, exc)
            return None
        finished = self._pass_end = time.monotonic()
        seconds = finished - clock
        kind = jobs[0].kind
        tokens = [float(sum(len(d.tokens) for d in b.datums)) for _, b in prepared]
        self._charge([job for job, _ in prepared], seconds, tokens)
        with self._cond:
            self.batches.append(len(prepared))
            record = PassRecord(
                started,
                kind,
                len(prepared),
                sum(len(b.datums) for _, b in prepared),
                seconds,
                self._waited_s,
                tenant_ids=[job.tenant or "" for job, _ in prepared],
            )
            self.passes.append(record)
            if kind == "forward_backward":
                self._pass_no += 1
                self._pass_s = seconds if self._pass_s <= 0 else 0.7 * self._pass_s + 0.3 * seconds
                for job, _ in prepared:
                    if job.model_id is not None:
                        self._last_pass[job.model_id] = (self._pass_no, finished)
        self._finish_jobs((job, result.error, result) for (job, _), result in zip(prepared, results))
        return record
