"""The server's Tinker sampling on twinkle-vllm's ``VLLMSampler`` (``twinkle serve --sampler vllm``).

One job: serve :meth:`LoRAEngine.start_sample`'s requests from a vLLM engine that holds its own
copy of the same base model, with each tenant's LoRA adapter pushed into it in memory.

* **Weights.** vLLM loads the base from the engine's model directory (its own copy: vLLM
  cannot run on the training model's tensors; it never writes the base the engine trains on).
  A tenant's adapter (a ``tinker<N>`` adapter of the engine) is pushed as LoRA tensors in
  PEFT naming (``VLLMSampler.update_weights(adapter_name=...)``) whenever it changed since its
  last push: its version is the adapter's optimizer step count (an adapter's weights change
  only by ``optim_step``; a loaded checkpoint, a sampler checkpoint and a snapshot are each a
  new adapter). The tensors are read on the worker under the engine's lock, so a push never
  sees half an optimizer step, and a request samples its run's weights as of its start or
  newer (Tinker's contract).
* **No lock while vLLM generates.** A request's ``start`` (on the scheduler's worker) checks
  it, reads the adapter if it changed and hands it to this module's thread; the worker goes
  on with training at once. The thread drives vLLM's engine itself (``add_request`` /
  ``step``), so requests of every tenant are batched continuously by vLLM's own scheduler.
  Each pushed version is a vLLM adapter of its own (``tinker3@5``): a push happens between two
  engine steps with other requests running (no prefix-cache reset is needed, vLLM keys cached
  blocks by adapter name and path), requests already running on the older version finish on
  it, and a superseded version is removed once no request runs on it.
* **Same semantics as the torch path** (:mod:`twinkle_server.sampling`): the raw
  (temperature 1) log-probabilities of the sampled tokens (vLLM's ``raw_logprobs``), prompt
  log-probabilities with NaN first, ``stop_token_ids=None`` stops at the engine's EOS ids
  while explicit ids replace them, stop strings end a completion without cutting tokens,
  ``top_k <= 0`` and ``top_p = 1`` disable those filters, ``seed`` makes a request repeat
  itself (vLLM's streams, not torch's: the same seed draws other tokens than the torch path).
* **What vLLM cannot serve falls back to the torch path** (the engine's sliced generation):
  an adapter on modules vLLM does not adapt (``lm_head``: Tinker's ``train_unembed``) or of a
  rank above vLLM's limit, or one whose push failed.

Example::

    sampling = VLLMSampling(engine, max_loras=4, engine_args={"gpu_memory_utilization": 0.3})
    gen = sampling.start_sample(slot_id, [1, 2, 3], max_tokens=16, temperature=0)
    gen.future.result()  # the scheduler answers from a callback instead of waiting
    sequences, prompt_logprobs = gen.result()
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import uuid
from typing import Any, Sequence

logger = logging.getLogger("twinkle_server")

#: modules vLLM applies no LoRA to (Qwen2-style models in vLLM 0.32 refuse an ``lm_head`` adapter).
UNSUPPORTED_TARGETS = frozenset({"lm_head"})
#: the LoRA ranks vLLM's engine accepts as ``max_lora_rank``.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: default fraction of the accelerator's memory vLLM takes (weights plus KV cache); the training
#: engine shares the device. On the CPU backend it is a fraction of the NUMA node's memory.
DEFAULT_MEMORY_FRACTION = 0.3
#: vLLM samples greedily below this temperature (its ``_SAMPLING_EPS``), where it refuses ``n > 1``.
GREEDY_BELOW = 1e-5
#: default KV cache of vLLM's CPU backend (it reads ``gpu_memory_utilization`` against the whole NUMA node).
DEFAULT_CPU_KV_BYTES = 1 << 30


def vllm_available() -> bool:
    """Whether twinkle-vllm and vLLM import here (``--sampler auto`` picks vLLM then)."""
    try:
        import twinkle_vllm.sampler  # noqa: F401
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def vllm_max_lora_rank(max_rank: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that holds ``max_rank``."""
    return next((r for r in VLLM_RANKS if r >= max_rank), VLLM_RANKS[-1])


class VLLMGeneration:
    """One sampling request on vLLM: ``num_samples`` completions of a prompt.

    :attr:`future` resolves (to this object) when vLLM finished it; the scheduler answers the
    request then (:meth:`result`, :attr:`prompt_topk`), without a turn on the worker.
    """

    def __init__(
        self, prompt: list[int], params: Any, lora: tuple[str, int] | None, *, prompt_logprobs: bool, topk: int
    ) -> None:
        self.request_id = f"twinkle-{uuid.uuid4().hex}"
        self.prompt = prompt
        self.params = params
        #: ``(adapter name, version)`` the request needs pushed, or None for the base model.
        self.lora = lora
        self.want_prompt_logprobs = prompt_logprobs
        self.topk = topk
        self.future: concurrent.futures.Future[VLLMGeneration] = concurrent.futures.Future()
        self._sequences: list[tuple[list[int], list[float], str]] = []
        self._prompt_logprobs: list[float] | None = None
        #: ``(token ids, logprobs)`` of shape ``(len(prompt), k)`` when ``topk`` was asked (else None).
        self.prompt_topk: tuple[Any, Any] | None = None
        #: the vLLM adapter (``name@version``) it runs on, while it runs.
        self.vllm_adapter: str | None = None
        #: how many times each completion is repeated in the result (greedy ``num_samples``).
        self.copies = 1

    @property
    def done(self) -> bool:
        return self.future.done()

    def step(self, budget_s: float | None = None) -> bool:
        """Wait up to ``budget_s`` seconds (None: to the end) for vLLM; returns :attr:`done`."""
        try:
            self.future.result(timeout=budget_s)
        except concurrent.futures.TimeoutError:
            return False
        return True

    def result(self) -> Any:
        """``([(tokens, logprobs, stop_reason), ...], prompt_logprobs or None)``, like the torch path's.

        Raises:
            RuntimeError: not finished. The request's own error when vLLM failed it.
        """
        if not self.future.done():
            raise RuntimeError("the vLLM request has not finished")
        self.future.result()  # raises the request's error
        return self._sequences, self._prompt_logprobs

    def _fill(self, output: Any) -> None:
        """Turn vLLM's ``RequestOutput`` into the torch path's result shapes."""
        import numpy as np

        from twinkle_server.sampling import TOPK_SENTINEL_LOGPROB

        for completion in sorted(output.outputs, key=lambda c: c.index):
            if completion.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM ended the request ({completion.finish_reason})")
            tokens = [int(t) for t in completion.token_ids]
            logprobs = [float(step[t].logprob) for step, t in zip(completion.logprobs or [], tokens)]
            reason = "length" if completion.finish_reason == "length" else "stop"
            self._sequences.extend((list(tokens), list(logprobs), reason) for _ in range(self.copies))
        steps = output.prompt_logprobs
        if self.want_prompt_logprobs and steps is not None:
            self._prompt_logprobs = [math.nan] + [float(steps[i][t].logprob) for i, t in enumerate(self.prompt) if i]
        if self.topk > 0 and steps is not None:
            k = self.topk
            ids = np.zeros((len(self.prompt), k), dtype=np.int32)
            lps = np.full((len(self.prompt), k), TOPK_SENTINEL_LOGPROB, dtype=np.float32)
            for i in range(1, len(self.prompt)):
                # vLLM returns the k best and the prompt token (whatever its rank): keep ranks 1..k
                best = sorted(((lp.rank, t, lp.logprob) for t, lp in steps[i].items() if lp.rank <= k))[:k]
                for j, (_, t, lp) in enumerate(best):
                    ids[i, j], lps[i, j] = t, lp
            self.prompt_topk = (ids, lps)


class VLLMSampling:
    """Tinker sampling on a ``VLLMSampler`` over the engine's base model, adapters pushed on change.

    Args:
        engine: the server's :class:`~twinkle_server.engine.LoRAEngine`.
        sampler: a started ``VLLMSampler`` with ``enable_lora=True`` over the same base weights
            (tests share one); default: one is started on ``engine.model_dir``.
        max_loras: adapters in one vLLM batch (vLLM's ``max_loras``).
        seed: seed of the base weights when the model directory has none (the engine's).
        engine_args: more ``vllm.LLM`` arguments. Without ``gpu_memory_utilization`` or
            ``kv_cache_memory_bytes``: 0.3 of the GPU (the training engine shares it), or a 1 GiB KV
            cache on the CPU; also ``max_model_len``, ``max_num_seqs`` ...
    """

    def __init__(
        self,
        engine: Any,
        *,
        sampler: Any = None,
        max_loras: int = 4,
        seed: int = 0,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        self.engine = engine
        self._owns_sampler = sampler is None
        if sampler is None:
            from twinkle_vllm.sampler import VLLMSampler

            options = dict(engine_args or {})
            if "gpu_memory_utilization" not in options and "kv_cache_memory_bytes" not in options:
                if engine.device.type == "cuda":
                    options["gpu_memory_utilization"] = DEFAULT_MEMORY_FRACTION
                else:  # the CPU backend would take the fraction of the whole NUMA node's memory
                    options["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_BYTES
            sampler = VLLMSampler(
                str(engine.model_dir),
                torch_dtype="bfloat16" if engine.device.type == "cuda" else "float32",
                seed=seed,
                enable_lora=True,
                max_lora_rank=vllm_max_lora_rank(engine.max_rank),
                max_loras=max(1, max_loras),
                **options,
            )
        self.sampler = sampler
        self.max_lora_rank = int(sampler.engine_options.get("max_lora_rank", 16))
        self.eos_token_ids = sorted(engine.eos_token_ids)
        #: prompt plus completion tokens at most: the engine's positions, or vLLM's ``max_model_len`` if smaller.
        self.max_length = min(engine.max_length, int(sampler.llm.llm_engine.model_config.max_model_len))
        #: (worker) adapter name -> the version last read for a push.
        self._captured: dict[str, int] = {}
        self._cond = threading.Condition()
        self._incoming: list[VLLMGeneration] = []
        #: adapter name -> (version, tensors, LoRA config) waiting to be pushed.
        self._pending: dict[str, tuple[int, dict[str, Any], dict[str, Any]]] = {}
        #: adapter name -> why its push failed (it samples on the torch path from then on).
        self._broken: dict[str, str] = {}
        #: (vLLM thread) adapter name -> newest version vLLM holds.
        self._pushed: dict[str, int] = {}
        #: (vLLM thread) vLLM adapter (``name@version``) -> requests running on it.
        self._loaded: dict[str, int] = {}
        #: statistics (tests and benchmarks): pushes applied (and of those, applied while requests ran on
        #: vLLM), requests finished.
        self.pushes = 0
        self.pushes_while_running = 0
        self.finished = 0
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="twinkle-vllm-sampling", daemon=True)
        self._thread.start()

    # -- the worker's side ------------------------------------------------------------------
    def serves(self, slot: Any) -> bool:
        """Whether vLLM can sample this slot's adapter (else the torch path does)."""
        return (
            not (set(slot.targets) & UNSUPPORTED_TARGETS)
            and slot.rank <= self.max_lora_rank
            and slot.adapter not in self._broken
        )

    def start_sample(
        self,
        slot_id: int | None,
        prompt: Sequence[int],
        *,
        num_samples: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_k: int | None = -1,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> Any:
        """(Worker) start a request: a :class:`VLLMGeneration` running on vLLM, or, for an adapter vLLM
        cannot serve, the engine's sliced :class:`~twinkle_server.sampling.Generation` (see
        :meth:`LoRAEngine.start_sample` for the parameters).

        Raises:
            EngineError: bad prompt or parameters, or the slot is not loaded.
        """
        from twinkle_server.engine import EngineError
        from twinkle_server.sampling import check_sample_request

        engine = self.engine
        slot = engine.slot(slot_id) if slot_id is not None else None
        if slot is not None and not self.serves(slot):
            return engine.start_sample(
                slot_id,
                prompt,
                num_samples=num_samples,
                max_tokens=max_tokens,
                temperature=temperature,
                top_k=top_k if top_k is not None else -1,
                top_p=top_p,
                seed=seed,
                stop_token_ids=stop_token_ids,
                stop_strings=stop_strings,
                prompt_logprobs=prompt_logprobs,
            )
        prompt = check_sample_request(
            prompt,
            vocab_size=engine.vocab_size,
            max_length=self.max_length,
            num_samples=num_samples,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
        )
        if topk_prompt_logprobs and not 1 <= topk_prompt_logprobs <= engine.vocab_size:
            raise EngineError(f"top-k must be between 1 and {engine.vocab_size}")
        lora = self._capture(slot) if slot is not None else None
        # vLLM refuses n > 1 with greedy sampling: one completion, copied (the torch path's copies are equal too)
        greedy_copies = num_samples if temperature < GREEDY_BELOW and num_samples > 1 else 1
        params = self._params(
            num_samples=num_samples // greedy_copies,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
            stop_strings=stop_strings,
            prompt_logprobs=max(int(topk_prompt_logprobs), 0) if (prompt_logprobs or topk_prompt_logprobs) else None,
        )
        gen = VLLMGeneration(prompt, params, lora, prompt_logprobs=prompt_logprobs, topk=int(topk_prompt_logprobs))
        gen.copies = greedy_copies
        with self._cond:
            if not self._running:
                raise EngineError("the vLLM sampler is shutting down")
            self._incoming.append(gen)
            self._cond.notify_all()
        return gen

    def _capture(self, slot: Any) -> tuple[str, int]:
        """(Worker) the adapter's current version; its tensors are read for a push when that version is new."""
        import torch

        engine = self.engine
        with engine.lock:
            version = int(slot.steps)
            name = slot.adapter
            if self._captured.get(name) != version:
                with engine.using([name]), torch.no_grad():  # on the device, no optimizer step in between
                    tensors = {
                        f"base_model.model.{module}.lora_{kind}.weight": weight.detach().to("cpu", copy=True)
                        for module, pair in slot.params.items()
                        for kind, weight in zip("AB", pair)
                    }
                config = {
                    "r": slot.rank,
                    "lora_alpha": slot.alpha,
                    "target_modules": sorted(slot.targets),
                    "lora_dropout": 0.0,
                    "bias": "none",
                }
                with self._cond:
                    self._pending[name] = (version, tensors, config)
                self._captured[name] = version
        return name, version

    def _params(
        self,
        *,
        num_samples: int,
        max_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float,
        seed: int | None,
        stop_token_ids: Sequence[int] | None,
        stop_strings: Sequence[str],
        prompt_logprobs: int | None,
    ) -> Any:
        """vLLM's ``SamplingParams`` with the torch path's semantics (see the module docstring)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from twinkle_server.engine import EngineError

        stops = self.eos_token_ids if stop_token_ids is None else [int(t) for t in stop_token_ids]
        try:
            return SamplingParams(
                n=num_samples,
                max_tokens=max_tokens,
                temperature=temperature,
                top_k=top_k if top_k is not None and top_k > 0 else 0,
                top_p=top_p,
                seed=seed,
                ignore_eos=True,  # the stop ids below are the whole set, EOS included unless replaced
                stop_token_ids=stops or None,
                stop=list(stop_strings) or None,
                logprobs=0,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=True,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
        except Exception as exc:  # noqa: BLE001 - vLLM's own check of the request: the client's error
            raise EngineError(f"vLLM refused the sampling parameters: {exc}") from None

    # -- the vLLM thread -------------------------------------------------------------------
    def _loop(self) -> None:
        llm_engine = self.sampler.llm.llm_engine
        active: dict[str, VLLMGeneration] = {}
        while True:
            with self._cond:
                if self._running and not self._incoming and not active:
                    self._cond.wait(timeout=1.0)
                if not self._running:
                    break
                incoming, self._incoming = self._incoming, []
                wanted = {g.lora[0] for g in incoming if g.lora}
                pushes = {n: self._pending.pop(n) for n in list(self._pending) if n in wanted}
            if pushes:
                before = self.pushes
                self._push(pushes, incoming)
                if active:
                    self.pushes_while_running += self.pushes - before
            for gen in incoming:
                if not gen.future.done():
                    self._add(llm_engine, gen, active)
            if active:
                try:
                    outputs = llm_engine.step()
                except Exception as exc:  # noqa: BLE001 - every running request learns of it
                    logger.exception("vLLM step failed")
                    outputs = []
                    self._abort(llm_engine, active, exc)
                for output in outputs:
                    gen = active.pop(output.request_id, None) if output.finished else None
                    if gen is None:
                        continue
                    self._release(gen)
                    try:
                        gen._fill(output)
                    except Exception as exc:  # noqa: BLE001
                        gen.future.set_exception(exc)
                        continue
                    self.finished += 1
                    gen.future.set_result(gen)
            self._drop_unused()
        self._abort(llm_engine, active, RuntimeError("the server is stopping"))
        with self._cond:
            left, self._incoming = self._incoming, []
        for gen in left:
            if not gen.future.done():
                gen.future.set_exception(RuntimeError("the server is stopping"))

    @staticmethod
    def _vllm_name(name: str, version: int) -> str:
        """vLLM's adapter name of one version of an engine adapter."""
        return f"{name}@{version}"

    def _push(self, pushes: dict[str, tuple[int, dict[str, Any], dict[str, Any]]], incoming: list[Any]) -> None:
        """(vLLM thread) load each adapter's newest version into vLLM under a name of its own.

        A new name (and staging path) per version: vLLM's prefix-cache blocks are keyed by both, so
        nothing cached for an older version is reused and no cache reset is needed, and requests
        still running on the older version finish on it (it is removed once none uses it).
        """
        from twinkle_server.engine import EngineError

        for name, (version, tensors, config) in pushes.items():
            if self._pushed.get(name, -1) >= version:
                continue
            try:
                self.sampler.update_weights(
                    tensors, adapter_name=self._vllm_name(name, version), peft_config=config, reset_prefix_cache=False
                )
            except Exception as exc:  # noqa: BLE001 - those requests fail; the adapter samples on torch from now on
                logger.exception("pushing adapter %s into vLLM failed", name)
                self._broken[name] = str(exc)
                error = EngineError(f"this adapter could not be loaded into the vLLM sampler ({exc}); send it again")
                for gen in incoming:
                    if gen.lora and gen.lora[0] == name and not gen.future.done():
                        gen.future.set_exception(error)
                continue
            self._pushed[name] = version
            self._loaded.setdefault(self._vllm_name(name, version), 0)
            self.pushes += 1

    def _add(self, llm_engine: Any, gen: VLLMGeneration, active: dict[str, VLLMGeneration]) -> None:
        lora_request = None
        try:
            if gen.lora is not None:
                name, version = gen.lora
                if self._pushed.get(name, -1) < version:
                    raise RuntimeError(f"adapter {name} version {version} was not pushed to vLLM")
                gen.vllm_adapter = self._vllm_name(name, self._pushed[name])  # the newest: this version or later
                lora_request = self.sampler.lora_request(gen.vllm_adapter)
            llm_engine.add_request(
                gen.request_id, {"prompt_token_ids": gen.prompt}, gen.params, lora_request=lora_request
            )
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            gen.vllm_adapter = None
            gen.future.set_exception(exc)
            return
        if gen.vllm_adapter is not None:
            self._loaded[gen.vllm_adapter] += 1
        active[gen.request_id] = gen

    def _release(self, gen: VLLMGeneration) -> None:
        if gen.vllm_adapter is not None:
            self._loaded[gen.vllm_adapter] -= 1
            gen.vllm_adapter = None

    def _abort(self, llm_engine: Any, active: dict[str, VLLMGeneration], error: BaseException) -> None:
        if active:
            try:
                llm_engine.abort_request(list(active))
            except Exception:  # noqa: BLE001
                logger.exception("aborting vLLM requests failed")
        for gen in active.values():
            self._release(gen)
            if not gen.future.done():
                gen.future.set_exception(error)
        active.clear()

    def _drop_unused(self) -> None:
        """(vLLM thread) remove the vLLM adapters no request runs on that are superseded by a newer
        version or whose engine adapter is gone."""
        live = None
        for vname, users in list(self._loaded.items()):
            if users:
                continue
            name, _, version = vname.rpartition("@")
            if self._pushed.get(name) == int(version):
                if live is None:
                    live = {slot.adapter for slot in list(self.engine.slots.values())}
                if name in live:
                    continue
                self._pushed.pop(name, None)
            del self._loaded[vname]
            try:
                self.sampler.remove_adapter(vname, reset_prefix_cache=False)
            except Exception:  # noqa: BLE001 - a leftover adapter costs memory, not correctness
                logger.exception("removing adapter %s from vLLM failed", vname)

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the thread (running requests fail), forget this server's adapters; stop vLLM if started here."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        self._thread.join(timeout=60)
        for vname in list(self._loaded):
            try:
                self.sampler.remove_adapter(vname)
            except Exception:  # noqa: BLE001
                pass
        self._loaded.clear()
        self._pushed.clear()
        if self._owns_sampler:
            self.sampler.close()
