"""Resumable KV-cache sampling: a sampling request runs in slices, other work runs between them.

One job: generate completions of one prompt with a model and an adapter, in pieces.
:class:`Generation` holds everything a generation needs between two pieces (the KV cache,
the last logits, the sampled tokens, the random generator), so the scheduler can run
``gen.step(budget_s)`` (decode steps until the time budget is spent), run other tenants'
work on the same model, and call ``step`` again. The sequence of operations on the model
and the random generator is the same however the steps are sliced, so a seeded request
draws the same tokens and log-probabilities sliced or not.

The model is anything callable like a Hugging Face causal LM
(``model(input_ids=..., past_key_values=..., use_cache=True)`` returning ``.logits`` and
``.past_key_values``). The adapter is chosen by ``activate``: a function returning a
context manager that makes the tenant's adapter (or the base) the one the model applies
for the duration of one slice, and raises if that adapter is gone (it was unloaded
between two slices). Engines build a :class:`Generation` for the scheduler (see
``LoRAEngine.start_sample``).

Example::

    gen = Generation(model, [1, 2, 3], activate=lambda: contextlib.nullcontext(), eos_token_ids={0},
                     max_tokens=64, seed=7)
    while not gen.step(0.5):   # about 0.5 s of decoding per call
        run_other_work()
    sequences, prompt_logprobs = gen.result()
"""

from __future__ import annotations

import contextlib
import time
from contextlib import AbstractContextManager
from typing import Any, Callable, Iterator, Sequence

from twinkle_server.tinker_rows import EngineError

#: ``([(tokens, logprobs, stop_reason), ...], prompt logprobs or None)``
SampleResult = tuple[list[tuple[list[int], list[float], str]], "list[float] | None"]


class Generation:
    """One sampling request (``num_samples`` completions of ``prompt``), run in slices.

    Logprobs are the model's own (temperature 1) log-probabilities of the sampled tokens.
    ``stop_token_ids=None`` stops at ``eos_token_ids``. ``seed`` seeds a generator on
    ``device`` (one seed draws the same tokens again on the same device). Each decode step
    copies only the new token ids to the host (for the stop checks); the logprobs come back
    in one copy at the end.

    Args:
        model: the causal LM.
        prompt: token ids (checked by the engine).
        activate: ``activate()`` returns a context manager under which the model applies
            the request's adapter; entered once per slice.
        eos_token_ids: the stop tokens when ``stop_token_ids`` is None.
        tokenizer: decodes completions for ``stop_strings``.
        device: where the ids go (default: the model's first parameter's device).
    """

    def __init__(
        self,
        model: Any,
        prompt: Sequence[int],
        *,
        activate: Callable[[], AbstractContextManager[Any]],
        eos_token_ids: Sequence[int] = (),
        tokenizer: Any = None,
        device: Any = None,
        num_samples: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_k: int | None = -1,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        prompt_logprobs: bool = False,
    ) -> None:
        import torch

        self.model = model
        self.prompt = [int(t) for t in prompt]
        self.activate = activate
        self.tokenizer = tokenizer
        self.device = device if device is not None else next(model.parameters()).device
        self.num_samples = num_samples
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.stop_strings = list(stop_strings)
        self.want_prompt_logprobs = prompt_logprobs
        self.stops = {int(t) for t in (eos_token_ids if stop_token_ids is None else stop_token_ids)}
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed)) if seed is not None else None
        self.tokens: list[list[int]] = [[] for _ in range(num_samples)]
        self.reasons: list[str | None] = [None] * num_samples
        self.prompt_logprobs: list[float] | None = None
        #: decode steps run so far (the prefill is step 0's input).
        self.steps = 0
        #: slices run so far.
        self.slices = 0
        self._step_logprobs: list[Any] = []
        self._past: Any = None
        self._logits: Any = None
        self._done = False

    @property
    def done(self) -> bool:
        """Whether every completion stopped (or reached ``max_tokens``)."""
        return self._done

    def step(self, budget_s: float | None = None) -> bool:
        """Run decode steps for about ``budget_s`` seconds (None: to the end); returns :attr:`done`.

        At least one step runs per call; a further step starts only when the time spent plus
        the last step's time stays within the budget, so a slice overruns it by at most one
        step's time when a single step is longer than the budget.
        """
        import torch

        if self._done:
            return True
        started = time.perf_counter()
        self.slices += 1
        with self.activate(), torch.no_grad():
            if self._logits is None:
                self._prefill()
            last = 0.0
            while not self._done:
                t0 = time.perf_counter()
                self._decode_one()
                last = time.perf_counter() - t0
                if budget_s is not None and time.perf_counter() - started + last > budget_s:
                    break
        if self._done:  # nothing is resumed after the end: free the cache now
            self._past = self._logits = None
        return self._done

    def result(self) -> SampleResult:
        """``([(tokens, logprobs, stop_reason), ...], prompt_logprobs or None)`` once :attr:`done`.

        Raises:
            RuntimeError: the generation has not finished.
        """
        import torch

        if not self._done:
            raise RuntimeError("the generation has not finished; call step() until it returns True")
        # step t's logprob of sample i belongs to it while it ran: its first len(tokens[i]) steps
        by_sample = torch.stack(self._step_logprobs, dim=1).cpu().tolist()
        logprobs = [by_sample[i][: len(self.tokens[i])] for i in range(self.num_samples)]
        return (
            [(self.tokens[i], logprobs[i], self.reasons[i] or "length") for i in range(self.num_samples)],
            self.prompt_logprobs,
        )

    # -- the steps ---------------------------------------------------------------------
    def _prefill(self) -> None:
        import torch

        ids = torch.tensor([self.prompt] * self.num_samples, dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True)
        if self.want_prompt_logprobs:
            lp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
            picked = lp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
            self.prompt_logprobs = [float("nan")] + picked.tolist()
        self._past = out.past_key_values
        self._logits = out.logits[:, -1].float()

    def _decode_one(self) -> None:
        """Draw one token per sample from the current logits; feed them unless every sample stopped."""
        import torch

        logits = self._logits
        lp = torch.log_softmax(logits, dim=-1)
        if self.temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            scores = logits / self.temperature
            if self.top_k is not None and self.top_k > 0:
                kth = torch.topk(scores, min(self.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if self.top_p < 1.0:
                sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
                cum = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
                remove = cum - torch.softmax(sorted_scores, dim=-1) > self.top_p
                sorted_scores = sorted_scores.masked_fill(remove, float("-inf"))
                scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator).squeeze(-1)
        self._step_logprobs.append(lp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1))
        new_tokens = nxt.tolist()  # the one host sync of a step
        self.steps += 1
        for i in range(self.num_samples):
            if self.reasons[i] is not None:
                continue
            tok = new_tokens[i]
            self.tokens[i].append(tok)
            if tok in self.stops:
                self.reasons[i] = "stop"
            elif self.stop_strings:
                text = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
                if any(s in text for s in self.stop_strings):
                    self.reasons[i] = "stop"
        if all(r is not None for r in self.reasons) or self.steps >= self.max_tokens:
            self._done = True
            return
        out = self.model(input_ids=nxt.unsqueeze(-1), past_key_values=self._past, use_cache=True)
        self._past = out.past_key_values
        self._logits = out.logits[:, -1].float()


#: Tinker's sentinel for the first prompt position's top-k (nothing precedes it).
TOPK_SENTINEL_LOGPROB = -99999.0


def prompt_topk_logprobs(model: Any, prompt: Sequence[int], k: int, *, device: Any) -> tuple[Any, Any]:
    """The ``k`` most likely tokens and their log-probabilities at every prompt position (one prefill).

    Returns:
        ``(token_ids, logprobs)``: int32 and float32 arrays of shape ``(len(prompt), k)``; row ``i``
        is the distribution that predicts prompt token ``i``; row 0 (nothing precedes it) is filled
        with Tinker's sentinel (token 0, log-probability -99999).
    """
    import numpy as np
    import torch

    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    top = torch.topk(torch.log_softmax(logits, dim=-1), k, dim=-1)
    token_ids = np.zeros((len(prompt), k), dtype=np.int32)
    logprobs = np.full((len(prompt), k), TOPK_SENTINEL_LOGPROB, dtype=np.float32)
    token_ids[1:] = top.indices.cpu().numpy()
    logprobs[1:] = top.values.cpu().numpy()
    return token_ids, logprobs


def check_sample_request(
    prompt: Sequence[int],
    *,
    vocab_size: int,
    max_length: int,
    num_samples: int,
    max_tokens: int,
    temperature: float,
    top_p: float,
) -> list[int]:
    """The prompt as a list of ints, after checking the request against the model.

    Raises:
        EngineError: an empty or out-of-vocabulary prompt, too many samples or tokens, a bad temperature/top_p.
    """
    from twinkle_server.tinker_rows import EngineError

    prompt = [int(t) for t in prompt]
    if not prompt:
        raise EngineError("the prompt is empty")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise EngineError(f"prompt token ids must be in [0, {vocab_size})")
    if not 1 <= num_samples <= 64:
        raise EngineError("num_samples must be between 1 and 64")
    if max_tokens < 1 or len(prompt) + max_tokens > max_length:
        raise EngineError(
            f"max_tokens={max_tokens} with a {len(prompt)}-token prompt exceeds the model's "
            f"{max_length} positions (or is below 1)"
        )
    if temperature < 0 or not 0 < top_p <= 1:
        raise EngineError("temperature must be >= 0 and top_p in (0, 1]")
    return prompt


class EngineSampling:
    """The engine's sampling entry points (mixed into :class:`twinkle_server.engine.LoRAEngine`).

    They run the engine's shared model with a slot's adapter active (or the base): one prefill
    for prompt top-k logprobs, a whole :class:`Generation` for ``sample``, or a resumable one
    for the scheduler (``start_sample``).
    """

    lock: Any
    core: Any
    slots: dict[int, Any]

    def prompt_topk_logprobs(self, slot_id: int | None, prompt: Sequence[int], k: int) -> tuple[Any, Any]:
        """The ``k`` most likely tokens and their log-probabilities at every prompt position (one prefill).

        See :func:`twinkle_server.sampling.prompt_topk_logprobs`.

        Raises:
            EngineError: bad prompt or ``k``.
        """
        with self.lock:
            prompt = [int(t) for t in prompt]
            if not prompt or min(prompt) < 0 or max(prompt) >= self.vocab_size or len(prompt) > self.max_length:
                raise EngineError(f"the prompt must be 1 to {self.max_length} token ids in [0, {self.vocab_size})")
            if not 1 <= k <= self.vocab_size:
                raise EngineError(f"top-k must be between 1 and {self.vocab_size}")
            with self.adapter_active(slot_id) as model:
                return prompt_topk_logprobs(model, prompt, k, device=self.device)

    def sample(self, slot_id: int | None, prompt: Sequence[int], **params: Any) -> Any:
        """Sample completions of ``prompt`` with a slot's adapter (or the base), in one go.

        Takes :meth:`start_sample`'s parameters; the scheduler runs long requests through
        :meth:`start_sample` in slices instead (the same tokens for the same seed).

        Returns:
            ``([(tokens, logprobs, stop_reason), ...], prompt_logprobs or None)``; the first
            prompt logprob is NaN (nothing precedes it).

        Raises:
            EngineError: bad prompt or parameters.
        """
        with self.lock:
            gen = self.start_sample(slot_id, prompt, **params)
            gen.step(None)
            return gen.result()

    def start_sample(
        self,
        slot_id: int | None,
        prompt: Sequence[int],
        *,
        num_samples: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_k: int = -1,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        prompt_logprobs: bool = False,
    ) -> Any:
        """A resumable :class:`~twinkle_server.sampling.Generation` of ``num_samples`` completions of ``prompt``
        with a slot's adapter (or the base) active on the shared model; ``gen.step(budget_s)`` runs it in slices.

        Logprobs are the model's own (temperature 1) log-probabilities of the sampled tokens,
        so they match what training computes. ``stop_token_ids=None`` stops at EOS. ``seed``
        seeds a generator on the engine's device (one seed draws the same tokens again on the
        same device; the CPU and CUDA draw different streams). A slot freed between two slices
        fails the next one (``EngineError``).

        Raises:
            EngineError: bad prompt or parameters.
        """
        slot = self.slot(slot_id) if slot_id is not None else None
        prompt = check_sample_request(
            prompt,
            vocab_size=self.vocab_size,
            max_length=self.max_length,
            num_samples=num_samples,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
        )

        @contextlib.contextmanager
        def adapter() -> Iterator[None]:
            if slot is not None and self.slots.get(slot.id) is not slot:
                raise EngineError(
                    "the sampler's adapter was unloaded while this request was sampling (its run was unloaded or "
                    "the pool needed the slot); send the request again"
                )
            with self.lock, self.adapter_active(slot_id):
                yield

        return Generation(
            self.core.model,
            prompt,
            activate=adapter,
            eos_token_ids=sorted(self.eos_token_ids),
            tokenizer=self.tokenizer,
            device=self.device,
            num_samples=num_samples,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
            stop_strings=stop_strings,
            prompt_logprobs=prompt_logprobs,
        )
