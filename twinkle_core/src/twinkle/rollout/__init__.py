"""Async off-policy RL building blocks: a rollout buffer with bounded staleness, policy versions on
every sample, partial rollouts and a local rollout worker (the sampler in a thread).

The user keeps the loop. The trainer owns a *policy version* (0 after the first weight sync, +1
after each update it syncs to the sampler). Every sample carries the version its first token was
sampled with and, for partial rollouts, the version of each token.

* :class:`RolloutBuffer`: a thread-safe queue between the sampler and the trainer.
  *Admission control* (AReaL's rule): a producer may start ``n`` new samples only while
  ``started + n <= (version + max_staleness + 1) * batch_size``, so no sample can come out more
  than ``max_staleness`` versions behind when the trainer consumes ``batch_size`` samples per
  version; :meth:`RolloutBuffer.get` also drops anything older (``dropped`` counts them).
  ``max_staleness=0`` is the synchronous loop.
* :func:`sample_partial`: sampling in chunks of ``chunk_tokens`` new tokens; between chunks the
  sampler may receive new weights and unfinished sequences continue under them, the version of
  each token recorded (``Rollout.token_versions``).
* :class:`RolloutWorker`: local mode, a thread that keeps sampling into the buffer while the
  trainer trains; :meth:`RolloutWorker.sync` updates the sampler's weights between chunks.

Example::

    buffer = RolloutBuffer(batch_size=32, max_staleness=1)
    worker = RolloutWorker(sampler, buffer, next_prompts, params, adapter_name="default").start()
    for step in range(steps):
        rollouts = buffer.get(32)                      # at most 1 version behind
        rows = [r.row(advantages=a) for r, a in zip(rollouts, advantages_of(rollouts))]
        model.forward_backward(inputs=rows); model.clip_grad_and_step()
        worker.sync_weights(model, adapter_name="default")   # version + 1
    worker.stop()
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator


@dataclass
class Rollout:
    """One sampled sequence and the policy versions that produced it.

    Attributes:
        sequence: the :class:`~twinkle.data_format.sampling.SampledSequence`.
        version: the policy version of its first sampled token (the oldest).
        token_versions: the policy version of each completion token (partial rollouts span several).
        group: an id shared by the samples of one prompt (GRPO groups stay together).
        extra: anything a postprocess step adds (rewards, advantages ...).
    """

    sequence: Any
    version: int
    token_versions: list[int] = field(default_factory=list)
    group: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latest_version(self) -> int:
        """The version of the newest token (== ``version`` unless the rollout was partial)."""
        return max(self.token_versions, default=self.version)

    def staleness(self, current_version: int) -> int:
        """How many versions behind ``current_version`` its oldest token is."""
        return current_version - self.version

    def row(self, **fields: Any) -> dict[str, Any]:
        """The training row (``sequence.input_feature``) with ``policy_version`` and ``fields`` added."""
        return dict(self.sequence.input_feature, policy_version=self.version, **fields)


class RolloutBuffer:
    """A bounded-staleness queue of :class:`Rollout` between samplers and the trainer (thread-safe).

    Args:
        batch_size: samples the trainer consumes per policy version (for admission control).
        max_staleness: the most versions a consumed sample may be behind (0 = synchronous).
        capacity: most samples held at once (``put`` waits for room); default
            ``(max_staleness + 1) * batch_size``.

    Raises:
        ValueError: ``batch_size < 1``, ``max_staleness < 0`` or ``capacity < batch_size``.

    Example::

        buffer = RolloutBuffer(batch_size=8, max_staleness=2)
        buffer.admit(8)                     # blocks while sampling 8 more would be too far ahead
        buffer.put([Rollout(seq, version=buffer.version) for seq in sequences])
        batch = buffer.get(8)
        buffer.set_version(buffer.version + 1)
    """

    def __init__(self, batch_size: int, max_staleness: int = 1, capacity: int | None = None):
        if batch_size < 1:
            raise ValueError(f"RolloutBuffer: batch_size must be >= 1, got {batch_size}")
        if max_staleness < 0:
            raise ValueError(f"RolloutBuffer: max_staleness must be >= 0, got {max_staleness}")
        capacity = (max_staleness + 1) * batch_size if capacity is None else capacity
        if capacity < batch_size:
            raise ValueError(f"RolloutBuffer: capacity {capacity} is below batch_size {batch_size}")
        self.batch_size = batch_size
        self.max_staleness = max_staleness
        self.capacity = capacity
        self._items: deque[Rollout] = deque()
        self._cond = threading.Condition()
        self._version = 0
        self._started = 0
        self._closed = False
        self.dropped = 0
        self.consumed = 0

    # -- versions ----------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The trainer's current policy version."""
        return self._version

    def set_version(self, version: int) -> None:
        """The trainer moved to ``version`` (after syncing new weights); wakes waiting producers."""
        with self._cond:
            if version < self._version:
                raise ValueError(f"RolloutBuffer: version went back from {self._version} to {version}")
            self._version = version
            self._cond.notify_all()

    # -- producer side -----------------------------------------------------------------------
    def can_admit(self, n: int) -> bool:
        """Whether ``n`` more samples may start now (see the module docstring)."""
        return self._started + n <= (self._version + self.max_staleness + 1) * self.batch_size

    def admit(self, n: int, timeout: float | None = None) -> bool:
        """Wait until ``n`` new samples may start, and count them as started.

        Returns:
            True when admitted; False on timeout or after :meth:`close`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed and not self.can_admit(n):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            if self._closed:
                return False
            self._started += n
            return True

    def put(self, rollouts: Iterable[Rollout], timeout: float | None = None) -> bool:
        """Add finished rollouts (waits for room up to ``capacity``). False on timeout or after close."""
        rollouts = list(rollouts)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed and len(self._items) + len(rollouts) > max(self.capacity, len(rollouts)):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            if self._closed:
                return False
            self._items.extend(rollouts)
            self._cond.notify_all()
            return True

    # -- consumer side -----------------------------------------------------------------------
    def get(self, n: int, timeout: float | None = None) -> list[Rollout]:
        """Take ``n`` rollouts, oldest first, none more than ``max_staleness`` versions behind.

        Rollouts that became too stale are dropped (counted in ``dropped``), and their slots are
        given back to admission control so producers can replace them.

        Raises:
            TimeoutError: fewer than ``n`` usable rollouts arrived within ``timeout``.
            RuntimeError: the buffer was closed before ``n`` arrived.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._drop_stale()
                if len(self._items) >= n:
                    out = [self._items.popleft() for _ in range(n)]
                    self.consumed += n
                    self._cond.notify_all()
                    return out
                if self._closed:
                    raise RuntimeError(f"RolloutBuffer closed with {len(self._items)} of {n} rollouts")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"RolloutBuffer: {len(self._items)} of {n} rollouts after {timeout} s")
                self._cond.wait(left)

    def _drop_stale(self) -> None:
        oldest = self._version - self.max_staleness
        keep = [r for r in self._items if r.version >= oldest]
        dropped = len(self._items) - len(keep)
        if dropped:
            self.dropped += dropped
            self._started -= dropped  # their slots can be sampled again
            self._items = deque(keep)
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        """Wake every waiter; later ``admit``/``put`` return False and ``get`` raises."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def stats(self) -> dict[str, float]:
        """``buffer_size``, ``buffer_dropped``, ``buffer_consumed``, ``policy_version``."""
        with self._cond:
            return {
                "buffer_size": len(self._items),
                "buffer_dropped": self.dropped,
                "buffer_consumed": self.consumed,
                "policy_version": self._version,
            }


def sample_partial(
    sampler: Any,
    prompts: list[Any],
    sampling_params: Any,
    *,
    chunk_tokens: int,
    version: Callable[[], int],
    between_chunks: Callable[[], None] | None = None,
    adapter_name: str | None = None,
) -> list[list[Rollout]]:
    """Sample in chunks of ``chunk_tokens`` new tokens; unfinished sequences continue under whatever
    weights the sampler holds when the next chunk starts (a partial rollout).

    Args:
        sampler: any :class:`~twinkle.sampler.base.Sampler`.
        prompts: as for ``Sampler.sample``.
        sampling_params: as for ``Sampler.sample`` (``max_tokens`` is the total per sequence).
            Stop strings are matched within a chunk; prefer ``stop_token_ids`` across chunks.
        chunk_tokens: new tokens per chunk (>= 1).
        version: returns the policy version of the weights the last ``sample`` call used (read right
            after every call; :class:`RolloutWorker` records it while holding its lock).
        between_chunks: called between chunks (where a worker applies pending weight updates).
        adapter_name: the adapter to sample with.

    Returns:
        Per prompt, ``num_samples`` :class:`Rollout` objects (group order), each with
        ``token_versions`` and ``version`` = the first token's version.
    """
    from twinkle.data_format.sampling import as_sampling_params, sampled_sequence

    if chunk_tokens < 1:
        raise ValueError(f"sample_partial: chunk_tokens must be >= 1, got {chunk_tokens}")
    params = as_sampling_params(sampling_params)
    total = params.max_tokens
    first = sampler.sample(
        prompts, params.model_copy(update={"max_tokens": min(chunk_tokens, total)}), adapter_name=adapter_name
    )
    v = version()  # read right after each call: the version the call sampled with
    states = []
    for p, response in enumerate(first):
        for seq in response.sequences:
            states.append(
                {
                    "group": p,
                    "prompt": list(response.prompt_tokens),
                    "tokens": list(seq.tokens),
                    "logprobs": None if seq.logprobs is None else list(seq.logprobs),
                    "versions": [v] * len(seq.tokens),
                    "reason": seq.stop_reason,
                    "text": seq.text,
                    "first": seq,
                }
            )
    round_ = 0
    while True:
        todo = [s for s in states if s["reason"] == "length" and len(s["tokens"]) < total]
        if not todo:
            break
        if between_chunks is not None:
            between_chunks()
        round_ += 1
        update: dict[str, Any] = {"num_samples": 1}
        if params.seed is not None:
            update["seed"] = params.seed + 7919 * round_
        for s in todo:  # one continuation per sequence (each has its own length so far)
            n = min(chunk_tokens, total - len(s["tokens"]))
            more = sampler.sample(
                [{"input_ids": s["prompt"] + s["tokens"]}],
                params.model_copy(update={**update, "max_tokens": n}),
                adapter_name=adapter_name,
            )[0].sequences[0]
            v = version()
            s["tokens"] += more.tokens
            if s["logprobs"] is not None and more.logprobs is not None:
                s["logprobs"] += more.logprobs
            s["versions"] += [v] * len(more.tokens)
            s["reason"] = more.stop_reason
            s["text"] += more.text
    out: list[list[Rollout]] = [[] for _ in first]
    for s in states:
        seq = s["first"]
        trajectory = seq.trajectory
        if trajectory is not None and len(s["tokens"]) != len(seq.tokens):
            trajectory = {**trajectory, "messages": trajectory["messages"][:-1]}
            if not trajectory["messages"]:
                trajectory = None
        if len(s["tokens"]) != len(seq.tokens):
            seq = sampled_sequence(
                s["prompt"], s["tokens"], s["logprobs"], s["reason"], s["text"], seq.user_data, trajectory
            )
        out[s["group"]].append(
            Rollout(seq, version=min(s["versions"], default=v), token_versions=s["versions"], group=s["group"])
        )
    return out


class RolloutWorker:
    """Local mode: a thread that keeps sampling into a :class:`RolloutBuffer` while the trainer trains.

    Args:
        sampler: the sampler (its weights are updated only through :meth:`sync`).
        buffer: where finished rollouts go; its admission control paces the worker.
        next_prompts: returns the next prompts to sample (called in the worker thread).
        sampling_params: as for ``Sampler.sample``.
        adapter_name: the adapter to sample with.
        chunk_tokens: sample in chunks (partial rollouts; a sync waits at most one chunk);
            ``None``: whole sequences (a sync waits for the current ``sample`` call).
        postprocess: called in the worker thread on each prompt batch's rollouts (e.g. rewards and
            group advantages into ``Rollout.extra``) before they enter the buffer.

    With a ``seed`` in ``sampling_params``, prompt batch ``k`` (0, 1, ...) samples with ``seed + k``: a
    reproducible stream that does not repeat itself.

    Example::

        worker = RolloutWorker(sampler, buffer, lambda: problems, SamplingParams(num_samples=8)).start()
        ...
        worker.sync(lambda: engine.sync(model, sampler, adapter_name="default"))
        worker.stop()
    """

    def __init__(
        self,
        sampler: Any,
        buffer: RolloutBuffer,
        next_prompts: Callable[[], list[Any]],
        sampling_params: Any,
        *,
        adapter_name: str | None = None,
        chunk_tokens: int | None = None,
        postprocess: Callable[[list[Rollout]], None] | None = None,
    ):
        from twinkle.data_format.sampling import as_sampling_params

        self.sampler = sampler
        self.buffer = buffer
        self.next_prompts = next_prompts
        self.params = as_sampling_params(sampling_params)
        self.adapter_name = adapter_name
        self.chunk_tokens = chunk_tokens
        self.postprocess = postprocess
        self._lock = threading.Lock()  # held while the sampler samples or receives weights
        self._turn = threading.Condition()  # a waiting sync goes before the next sample call
        self._syncs_waiting = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.batches = 0

    def start(self) -> RolloutWorker:
        """Start the worker thread; returns self."""
        self._thread = threading.Thread(target=self._run, name="twinkle-rollout-worker", daemon=True)
        self._thread.start()
        return self

    def sync(self, update: Callable[[], Any]) -> Any:
        """Run ``update`` (a weight sync) while the sampler is idle, then bump the policy version."""
        with self._sync_turn():
            result = update()
            self.buffer.set_version(self.buffer.version + 1)
        return result

    @contextlib.contextmanager
    def _sync_turn(self) -> Iterator[None]:
        """Hold the sampler for a sync: the worker's next sample call (or chunk) waits for it."""
        with self._turn:
            self._syncs_waiting += 1
        try:
            with self._lock:
                yield
        finally:
            with self._turn:
                self._syncs_waiting -= 1
                self._turn.notify_all()

    @contextlib.contextmanager
    def _sample_turn(self) -> Iterator[None]:
        """Hold the sampler for one sample call, after any sync that is waiting."""
        with self._turn:
            while self._syncs_waiting:
                self._turn.wait()
        with self._lock:
            yield

    def sync_weights(self, model: Any, adapter_name: str | None = None, *, peft_config: Any = None) -> dict[str, float]:
        """Send ``model``'s weights to the sampler, pausing sampling only while they load; then bump the version.

        The weights are gathered from the trainer while the sampler keeps sampling, and loaded
        between two sample calls (or chunks). In ray mode (``model`` and ``sampler`` are proxies of
        separate groups) the weights stay in Ray's object store: the sampler's actor fetches them
        from the trainer's without a round trip through this process.

        Args:
            model: the trained model (``get_state_dict(adapter_name=...)``).
            adapter_name: sync only this LoRA adapter (the sampler must have it already, e.g. from a
                first ``engine.sync(model, sampler, adapter_name=...)``, unless ``peft_config`` is given);
                ``None``: the full weights.
            peft_config: the adapter's ``LoraConfig``, for a sampler that lacks the adapter.

        Returns:
            ``sync_seconds`` (the whole sync) and ``sync_pause_seconds`` (how long sampling paused).

        Example::

            worker.sync_weights(model, adapter_name="default")
        """
        start = time.perf_counter()
        kwargs = {} if adapter_name is None else {"adapter_name": adapter_name}
        gather = model.get_state_dict
        if callable(getattr(gather, "remote", None)):  # ray mode: keep the weights in the object store
            weights = gather.remote(**kwargs)
            while not weights.ready():
                time.sleep(0.001)
        else:
            weights = gather(**kwargs)
        with self._sync_turn():
            paused = time.perf_counter()
            self.sampler.update_weights(weights, adapter_name=adapter_name, peft_config=peft_config)
            self.buffer.set_version(self.buffer.version + 1)
            end = time.perf_counter()
        return {"sync_seconds": end - start, "sync_pause_seconds": end - paused}

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the thread (after its current chunk) and close the buffer; re-raises a worker error."""
        self._stop.set()
        self.buffer.close()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None:
            raise RuntimeError("the rollout worker failed") from self.error

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                prompts = self.next_prompts()
                if not self.buffer.admit(len(prompts) * self.params.num_samples, timeout=None):
                    return
                groups = self._sample(prompts)
                base = self.batches * len(prompts)
                rollouts = []
                for group in groups:
                    for r in group:
                        r.group += base
                        rollouts.append(r)
                self.batches += 1
                if self.postprocess is not None:
                    self.postprocess(rollouts)
                if not self.buffer.put(rollouts):
                    return
        except BaseException as exc:  # surfaced by stop() and by the trainer's get() timing out
            self.error = exc
            self.buffer.close()

    def _sample(self, prompts: list[Any]) -> list[list[Rollout]]:
        params = self.params
        if params.seed is not None:
            params = params.model_copy(update={"seed": params.seed + self.batches})
        if self.chunk_tokens is None:
            with self._sample_turn():
                version = self.buffer.version
                responses = self.sampler.sample(prompts, params, adapter_name=self.adapter_name)
            return [
                [
                    Rollout(seq, version=version, token_versions=[version] * len(seq.tokens), group=p)
                    for seq in r.sequences
                ]
                for p, r in enumerate(responses)
            ]
        worker = self

        class _Locked:  # every sample call of a chunk holds the lock; syncs run between chunks
            version = 0

            def sample(self, *args: Any, **kwargs: Any) -> Any:
                with worker._sample_turn():
                    self.version = worker.buffer.version
                    return worker.sampler.sample(*args, **kwargs)

        locked = _Locked()
        return sample_partial(
            locked,
            prompts,
            params,
            chunk_tokens=self.chunk_tokens,
            version=lambda: locked.version,
            adapter_name=self.adapter_name,
        )
