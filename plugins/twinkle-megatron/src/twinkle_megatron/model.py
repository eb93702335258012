"""MegatronModel: the TwinkleModel protocol on megatron-core.

It *is* a :class:`~twinkle.model.transformers_model.TransformersModel` as far as the user's
loop is concerned: it inherits the loop-facing machinery (per-adapter state, loss and
metric handling, token-normalized gradient accumulation, ``clip_grad_and_step``, atomic
save / resume) so the numbers and the semantics are the same by construction, and replaces
what touches the network itself:

* the network is a megatron-core ``GPTModel`` converted from the Hugging Face checkpoint
  (:mod:`twinkle_megatron.convert`), built on megatron's parallel state for the DeviceMesh
  (:mod:`twinkle_megatron.parallel`);
* LoRA adapters are :mod:`twinkle_megatron.lora` pairs, saved as PEFT adapters;
* full weights are saved in transformers' format (``config.json`` + ``model.safetensors``);
* gradient reductions run over megatron's data-parallel group, and the gradient norm
  over the model-parallel group.

Where a batch becomes a loss: ``forward_backward`` (inherited) -> ``_prepare`` (the
InputProcessor) -> :meth:`MegatronModel._run` (causal/packed attention mask, ``GPTModel``,
logits) -> the adapter's Loss -> ``backward``.

On CPU megatron-core needs the shims in :mod:`twinkle_megatron.compat`; they are applied
while a MegatronModel exists (:meth:`MegatronModel.close` releases them). The optimizer is
any torch optimizer from the registry (``set_optimizer('AdamW', lr=...)``); on CUDA,
``set_optimizer('AdamW', ..., use_megatron_optimizer=True)`` uses megatron-core's optimizer
(see :mod:`twinkle_megatron.megatron_optim`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from twinkle.data_format.output import ModelOutput
from twinkle.dispatch import remote
from twinkle.model.transformers_model import (
    FULL_MODEL,
    CheckpointError,
    TransformersModel,
    _dtype,
    resolve_model_dir,
)

logger = logging.getLogger("twinkle.megatron")


class MegatronModel(TransformersModel):
    """A causal LM trained on megatron-core, with the same API and numbers as TransformersModel.

    Args:
        model_id: a local directory (``config.json`` plus weights; only ``config.json``:
            random initialization with ``seed``, the same weights TransformersModel would
            draw), or ``ms://org/name`` / ``hf://org/name``.
        config: a ``transformers.PretrainedConfig`` (or dict with ``model_type``) instead of
            ``model_id``. Families: qwen2, qwen3, llama, qwen2_moe, qwen3_moe.
        torch_dtype: parameter dtype (``'float32'``, ``'bfloat16'``, ``'float16'``).
        mixed_precision: ``'bf16'``/``'fp16'`` autocast, or ``None``.
        device_mesh: ``tp``/``pp``/``cp``/``ep``/``dp`` map onto megatron's parallel state.
        remote_group: the DeviceGroup to run on (ray/http modes).
        seed: random initialization and LoRA initialization seed (default: runtime's, else 42).
        device: ``'cpu'`` or ``'cuda'`` (default: CUDA when available).
        **kwargs: TransformersModel's ``attn_implementation`` and ``trust_remote_code`` are
            accepted (and have no effect: megatron's attention is its own) so a script can
            swap backends without edits; ``gradient_checkpointing=True`` is refused.

    Raises:
        ValueError: neither or both of ``model_id`` and ``config``; a bad dtype.
        ConversionError: a model family megatron-core cannot express here.
        MeshError: a mesh that does not fit the processes or the device.

    Example::

        model = MegatronModel(model_id="twinkle_core/src/twinkle/assets/tiny-qwen2", device="cpu")
        model.set_optimizer("AdamW", lr=1e-4)
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step(max_grad_norm=1.0)
    """

    def __init__(
        self,
        model_id: str | None = None,
        *,
        config: Any = None,
        torch_dtype: Any = "float32",
        mixed_precision: str | None = None,
        device_mesh: Any = None,
        remote_group: str | None = None,
        seed: int | None = None,
        device: Any = None,
        **kwargs: Any,
    ) -> None:
        import torch
        from twinkle.runtime import current_runtime

        from twinkle_megatron import compat, parallel

        if (model_id is None) == (config is None):
            raise ValueError("MegatronModel needs exactly one of model_id=... (directory or hub id) or config=...")
        if mixed_precision not in (None, "bf16", "fp16", "no"):
            raise ValueError(f"mixed_precision={mixed_precision!r}; use 'bf16', 'fp16' or None")
        unknown = sorted(set(kwargs) - {"attn_implementation", "trust_remote_code", "gradient_checkpointing"})
        if unknown:
            raise TypeError(f"MegatronModel got unexpected keyword arguments {unknown}")
        if kwargs.get("gradient_checkpointing"):
            raise ValueError(
                "MegatronModel: gradient_checkpointing=True is not available (megatron's activation recompute is "
                "not wired in yet); use TransformersModel for it, or a smaller micro-batch"
            )
        runtime = current_runtime()
        if seed is None:
            seed = runtime.seed if runtime is not None and runtime.seed is not None else 42
        self.seed = seed
        self.model_id = model_id
        self.remote_group = remote_group
        self._autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "")
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._device_type = self.device.type
        compat.apply(self._device_type)
        self._shims_applied = True
        mesh = device_mesh if device_mesh is not None else (runtime.global_device_mesh if runtime else None)
        self.parallel = parallel.init_megatron_parallel(mesh, self._device_type)
        from twinkle.mesh import DeviceMesh

        self.device_mesh = mesh or DeviceMesh.from_sizes(world_size=self.parallel.world_size)
        self.rank, self.world_size = self.parallel.rank, self.parallel.world_size
        self.model_dir = resolve_model_dir(model_id) if model_id is not None else None
        dtype = _dtype(torch_dtype)
        self.hf_config, hf_state = self._hf_weights(config, dtype, kwargs.get("trust_remote_code", False))
        self.model = self._build_megatron(hf_state, dtype)
        del hf_state
        self.model.train()
        self._lora = None
        self._peft = None
        self._active: str | None = None
        self._wrapped = True
        self._megatron_optim: dict[str, Any] = {}
        self._base_param_names = [n for n, _ in self.model.named_parameters()]
        self._states = {}
        self._default = FULL_MODEL
        self._states[FULL_MODEL] = self._new_state(FULL_MODEL, list(self.model.parameters()), 1)

    # ------------------------------------------------------------------ set-up
    def _hf_weights(self, config: Any, dtype: Any, trust_remote_code: bool) -> tuple[Any, dict[str, Any]]:
        """The HF config and a full state dict: from the checkpoint, or a seeded random init."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from twinkle.model.transformers_model import _has_weights

        from twinkle_megatron.convert import check_supported

        if config is None:
            if not os.path.isfile(os.path.join(self.model_dir, "config.json")):
                raise FileNotFoundError(
                    f"MegatronModel: {self.model_dir!r} has no config.json; point model_id at a model directory "
                    f"(config.json plus weights) or a hub id such as 'ms://Qwen/Qwen2.5-0.5B-Instruct'"
                )
            config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=trust_remote_code)
        elif isinstance(config, Mapping):
            data = dict(config)
            model_type = data.pop("model_type", None)
            if model_type is None:
                raise ValueError("MegatronModel(config=dict): the dict needs a 'model_type' such as 'qwen2'")
            config = AutoConfig.for_model(model_type, **data)
        check_supported(config)
        load_dtype = dtype if dtype not in (None, "auto") else torch.float32
        if self.model_dir is not None and _has_weights(self.model_dir):
            hf = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=load_dtype)
        else:
            if self.model_dir is not None:
                logger.warning(
                    "MegatronModel: %s has a config.json but no weight files; initializing %s randomly from the "
                    "config with seed %d",
                    self.model_dir,
                    config.model_type,
                    self.seed,
                )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                hf = AutoModelForCausalLM.from_config(config, dtype=load_dtype)
        self._hf_keys = list(hf.state_dict().keys())
        self._hf_generation_config = getattr(hf, "generation_config", None)
        return hf.config, hf.state_dict()

    def _build_megatron(self, hf_state: Mapping[str, Any], dtype: Any) -> Any:
        import torch

        from twinkle_megatron import builder, compat, convert

        spec = convert.megatron_spec_from_hf(self.hf_config, dtype if dtype not in (None, "auto") else torch.float32)
        self._causal_mask_optional = builder.uses_sdpa(spec)
        with torch.random.fork_rng(devices=[]):
            compat.seed_model_parallel(self.seed, self._device_type)
            model = builder.build_gpt_model(spec, device=self.device)
        builder.load_full_state(model, convert.hf_to_megatron(hf_state, self.hf_config))
        return model.to(self.device)

    def _new_state(self, name: str, params: list[Any], gradient_accumulation_steps: int) -> Any:
        state = super()._new_state(name, params, gradient_accumulation_steps)
        state.processor.pad_token_id = getattr(self.hf_config, "pad_token_id", None) or 0
        return state

    def close(self) -> None:
        """Release the CPU shims this model applied (idempotent). The model stays usable until then."""
        from twinkle_megatron import compat

        if getattr(self, "_shims_applied", False):
            compat.restore()
            self._shims_applied = False

    def _activate(self, state: Any) -> None:
        if self._lora is not None and state.name != FULL_MODEL and self._active != state.name:
            self._lora.set_active(state.name)
            self._active = state.name

    def _hf_model(self) -> Any:
        raise TypeError("MegatronModel has no transformers model; use get_state_dict() or save() for HF weights")

    # ------------------------------------------------------------------ adapters
    @remote(dispatch="all", collect="first")
    def add_adapter_to_model(
        self, adapter_name: str, config: Any, gradient_accumulation_steps: int = 1, **kwargs: Any
    ) -> None:
        """Add a named LoRA adapter on the megatron model and make it the default.

        Args:
            adapter_name: a new name (letters, digits, ``_`` and ``-``).
            config: a ``peft.LoraConfig`` or a dict of its fields. ``target_modules`` is
                ``'all-linear'`` or HF names (``q_proj`` ... ``down_proj``).
            gradient_accumulation_steps: micro-batches per optimizer step for this adapter.
            **kwargs: LoraConfig fields overriding ``config``.

        Raises:
            ValueError: a duplicate or invalid name, unsupported LoRA options, or tp_size > 1.

        Example::

            model.add_adapter_to_model("default", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        """
        import torch
        from peft import LoraConfig

        from twinkle_megatron.lora import MegatronLora

        if not isinstance(adapter_name, str) or not adapter_name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"adapter_name {adapter_name!r} must be letters, digits, '_' or '-'")
        if adapter_name in self._states:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; pick another name")
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        if isinstance(config, Mapping):
            config = LoraConfig(**{**config, **kwargs})
        elif kwargs:
            config = type(config)(**{**config.to_dict(), **kwargs})
        lora = self._lora if self._lora is not None else MegatronLora(self.model, self.hf_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + sum(map(ord, adapter_name)))
            params = lora.add(adapter_name, config)
        if self._lora is None:
            for name, p in self.model.named_parameters():
                if ".lora_" not in name:
                    p.requires_grad_(False)
            self._lora = lora
        self._peft = self._lora
        for p in params:
            p.requires_grad_(True)
        previous = self._states.get(self._default)
        state = self._new_state(adapter_name, params, gradient_accumulation_steps)
        if previous is not None and previous.template is not None:
            state.template = previous.template
        self._states.pop(FULL_MODEL, None)
        self._states[adapter_name] = state
        self._default = adapter_name
        self._active = None
        self._activate(state)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """A context in which forwards use the base model without any adapter (reference model)."""
        if self._lora is None:
            yield
            return
        self._lora.set_active(None)
        previous, self._active = self._active, None
        try:
            yield
        finally:
            if previous is not None:
                self._lora.set_active(previous)
            self._active = previous

    # ------------------------------------------------------------------ compute
    def _attention_mask(self, batch: Mapping[str, Any]) -> Any:
        """megatron's boolean mask ``[B, 1, T, T]`` (True = blocked): causal, per packed sequence, no padding keys.

        ``None`` for a batch that is causal only (no padding, one sequence per row) when the
        layers' attention takes that as "causal" (SDPA's flash path needs no mask tensor).
        """
        import torch

        ids = batch["input_ids"]
        length = ids.shape[1]
        pos = batch.get("position_ids")
        packed = pos is not None and ids.shape[0] == 1 and bool((pos[:, 1:] == 0).any())
        pad = batch["attention_mask"] == 0 if "attention_mask" in batch else None
        if pad is not None and not bool(pad.any()):
            pad = None
        if not packed and pad is None and self._causal_mask_optional:
            return None
        blocked = torch.ones(length, length, dtype=torch.bool, device=ids.device).triu(1)[None]
        if packed:
            segment = torch.cumsum((pos == 0).long(), dim=1)
            blocked = blocked | (segment[:, :, None] != segment[:, None, :])
        if pad is not None:
            blocked = blocked | pad[:, None, :]
        return blocked.expand(ids.shape[0], length, length)[:, None]

    def _run(self, batch: Mapping[str, Any]) -> ModelOutput:
        import torch

        ids = batch["input_ids"]
        pos = batch.get("position_ids")
        if pos is None:
            pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        mask = self._attention_mask(batch)
        if self._autocast is not None:
            with torch.autocast(self.device.type, dtype=self._autocast):
                logits = self.model(ids, pos, attention_mask=mask)
            return ModelOutput(logits=logits)
        if not self._fused_head():
            return ModelOutput(logits=self.model(ids, pos, attention_mask=mask))
        from twinkle.patch.fastpath import HiddenStatesOutput

        head = self.model.output_layer
        head.forward = _hidden_states_passthrough
        try:
            hidden = self.model(ids, pos, attention_mask=mask)
        finally:
            del head.forward
        weight = (
            self.model.shared_embedding_or_output_weight()
            if self.model.share_embeddings_and_output_weights
            else head.weight
        )
        return HiddenStatesOutput(hidden_states=hidden, lm_head_weight=weight)

    def _fused_head(self) -> bool:
        """Whether losses get the hidden states and the head (chunked linear cross-entropy, no full logits).

        As TransformersModel's ``FusedLinearCrossEntropy`` patch (switched off by the same name
        in ``TWINKLE_DISABLED_PATCHES``); with tensor parallelism the head is vocabulary-sharded
        and the logits path is used.
        """
        from twinkle.patch.fastpath import disabled_from_env

        return self.parallel.tp == 1 and "FusedLinearCrossEntropy" not in disabled_from_env()

    # ------------------------------------------------------------------ parallel reductions
    def _dp_group(self) -> Any:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    def _all_reduce_floats(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.parallel.dp > 1:
            dist.all_reduce(tensor, group=self._dp_group())
        return tensor.tolist()

    def _all_reduce_grads(self, grads: list[Any]) -> None:
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        if not grads or self.parallel.dp == 1:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self._dp_group())
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)

    # ------------------------------------------------------------------ optimization
    @remote(dispatch="all", collect="first")
    def set_optimizer(self, optimizer_cls: Any = "AdamW", *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Build the optimizer of an adapter (or of the full model) over its trainable parameters.

        Args:
            optimizer_cls: any torch.optim name (``'AdamW'``, ``'SGD'``...), a class, or a
                factory ``f(params, **kwargs)``.
            adapter_name: which adapter (default: the current one).
            use_megatron_optimizer: (CUDA only) use megatron-core's optimizer and DDP grad
                buffers instead (``'AdamW'``, ``'Adam'``, ``'SGD'``); see
                :mod:`twinkle_megatron.megatron_optim`.
            **kwargs: optimizer arguments (``lr=1e-4``, ``weight_decay=0.01``).

        Raises:
            ValueError: ``use_megatron_optimizer`` on CPU, with several adapters, or with an
                optimizer megatron does not provide.

        Example::

            model.set_optimizer("AdamW", lr=1e-4)
        """
        use_megatron = bool(kwargs.pop("use_megatron_optimizer", False))
        if not use_megatron:
            if self._megatron_optim:
                raise ValueError(
                    "this model already trains with use_megatron_optimizer=True (its gradients live in megatron's "
                    "buffers); pass use_megatron_optimizer=True here too"
                )
            super().set_optimizer(optimizer_cls, adapter_name=adapter_name, **kwargs)
            return
        from twinkle_megatron import megatron_optim

        state = self._state(adapter_name)
        others = [n for n, st in self._states.items() if n != state.name and st.optimizer is not None]
        if len(self._states) > 1 or others:
            raise ValueError(
                "use_megatron_optimizer=True wraps the whole model in megatron's DDP; it supports one trained "
                "adapter (or full training) per model"
            )
        if not isinstance(optimizer_cls, str):
            raise ValueError("use_megatron_optimizer=True takes an optimizer name: 'AdamW', 'Adam' or 'SGD'")
        if state.name in self._megatron_optim:
            state.optimizer = megatron_optim.rebuild(self._megatron_optim[state.name], optimizer_cls, kwargs)
        else:
            state.optimizer = megatron_optim.build(self.model, optimizer_cls, kwargs, self._device_type)
        self._megatron_optim[state.name] = state.optimizer
        state.lr_scheduler = None

    @remote(dispatch="all", collect="first")
    def set_lr_scheduler(self, scheduler_cls: Any, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Build the LR scheduler of an adapter on its optimizer (call :meth:`set_optimizer` first).

        Args:
            scheduler_cls: ``'CosineWarmupScheduler'``, ``'LinearWarmupScheduler'``, any
                torch.optim.lr_scheduler name, a class, or a factory ``f(optimizer, **kwargs)``.
            adapter_name: which adapter (default: the current one).
            **kwargs: scheduler arguments (``num_warmup_steps=5, num_training_steps=100``).

        Raises:
            ValueError: no optimizer yet.
        """
        state = self._state(adapter_name)
        megatron = self._megatron_optim.get(state.name)
        if megatron is None or state.optimizer is not megatron:
            super().set_lr_scheduler(scheduler_cls, adapter_name=adapter_name, **kwargs)
            return
        factory = self._registry().resolve("lr_scheduler", scheduler_cls)
        state.lr_scheduler = factory(megatron.torch_optimizer, **kwargs)

    def _megatron_of(self, state: Any) -> Any:
        megatron = self._megatron_optim.get(state.name)
        return megatron if megatron is not None and state.optimizer is megatron else None

    def _finalize_grads(self, state: Any) -> None:
        megatron = self._megatron_of(state)
        if megatron is None:
            super()._finalize_grads(state)
            return
        if state.grads_final:
            return
        (tokens,) = self._all_reduce_floats([state.window_tokens])
        megatron.finish_window(tokens)
        state.grads_final = True

    @remote(dispatch="all", collect="none")
    def step(self, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """One optimizer step with the accumulated (finished) gradients.

        Raises:
            ValueError: no optimizer (call :meth:`set_optimizer`).
        """
        super().step(adapter_name=adapter_name, **kwargs)

    @remote(dispatch="all", collect="none")
    def zero_grad(self, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Drop gradients and start a new accumulation window."""
        state = self._state(adapter_name)
        megatron = self._megatron_of(state)
        if megatron is not None:
            megatron.zero_grad()
        super().zero_grad(adapter_name=adapter_name, **kwargs)

    def _clip(self, state: Any, max_grad_norm: float, norm_type: float) -> Any:
        """Finish and clip the window's gradients; the total norm before clipping.

        The norm covers the whole model: tensor-parallel shards are summed over the
        model-parallel group, replicated parameters counted once. (``clip_grad_norm`` and
        ``clip_grad_and_step`` of TransformersModel call this.)
        """
        import torch

        self._finalize_grads(state)
        megatron = self._megatron_of(state)
        if megatron is not None:
            if norm_type != 2.0:
                raise ValueError(f"clip_grad_norm: megatron's optimizer clips the 2-norm; got norm_type={norm_type}")
            return megatron.clip(max_grad_norm)
        params = [p for p in state.params if p.grad is not None]
        if not params:
            return 0.0
        if self.parallel.tp * self.parallel.pp == 1:
            return torch.nn.utils.clip_grad_norm_(params, max_grad_norm, norm_type=norm_type)
        norm = _model_parallel_grad_norm(params, norm_type)
        coef = max_grad_norm / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_([p.grad for p in params], coef)
        return norm

    # ------------------------------------------------------------------ weights
    def _full_hf_state(self) -> dict[str, Any]:
        from twinkle_megatron import builder, convert

        mg = builder.gather_full_state(self.model)
        hf = convert.megatron_to_hf(mg, self.hf_config, self._hf_keys)
        return {k: v.detach().to("cpu").contiguous() for k, v in hf.items()}

    def _full_state_dict(self) -> dict[str, Any]:
        if self._lora is not None:
            raise ValueError("get_state_dict: this model trains LoRA adapters; pass adapter_name=... for its weights")
        return self._full_hf_state()

    @remote(dispatch="all", collect="first")
    def get_state_dict(self, *, adapter_name: str | None = None, merged: bool = False, **kwargs: Any) -> dict:
        """The adapter's weights (PEFT key names) or the full model's (transformers names).

        Args:
            adapter_name: which adapter (default: the current one).
            merged: with an adapter, the full transformers weights with the adapter merged in.

        Returns:
            ``{name: CPU tensor}``.
        """
        state = self._state(adapter_name)
        if state.name == FULL_MODEL:
            return self._full_hf_state()
        if merged:
            return self._merged_hf_state(state.name)
        return self._lora.peft_state_dict(state.name)

    def _merged_hf_state(self, adapter_name: str) -> dict[str, Any]:
        import torch
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        from twinkle_megatron import builder, convert

        base = convert.megatron_to_hf(builder.gather_full_state(self.model), self.hf_config, self._hf_keys)
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(self.hf_config)
        hf.load_state_dict(base, strict=False, assign=True)
        peft_model = get_peft_model(hf, self._lora.peft_config(adapter_name, None), adapter_name=adapter_name)
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(peft_model, self._lora.peft_state_dict(adapter_name), adapter_name=adapter_name)
        merged = peft_model.merge_and_unload()
        return {k: v.detach().to("cpu").contiguous() for k, v in merged.state_dict().items()}

    def _write_weights(self, directory: Path, state: Any, weights: dict[str, Any]) -> None:
        from safetensors.torch import save_file
        from twinkle.model.transformers_model import _untie

        if state.name == FULL_MODEL:
            self.hf_config.save_pretrained(directory)
            if self._hf_generation_config is not None:
                self._hf_generation_config.save_pretrained(directory)
            save_file(_untie(weights), str(directory / "model.safetensors"), metadata={"format": "pt"})
            return
        config = self._lora.peft_config(state.name, self.model_id)
        config.save_pretrained(str(directory))
        save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})

    @remote(dispatch="all", collect="first")
    def load(self, checkpoint_dir: str | os.PathLike, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Load weights written by :meth:`save` (or by transformers / peft for a supported family).

        An ``adapter_config.json`` loads a LoRA adapter (added under ``adapter_name``,
        default the current adapter or ``'default'``, when missing); a directory with
        ``*.safetensors`` full weights replaces the base weights.

        Raises:
            CheckpointError: the directory does not exist, holds neither format, or its
                weights do not fit.
        """
        from safetensors.torch import load_file

        from twinkle_megatron import builder, convert

        path = Path(checkpoint_dir)
        if not path.is_dir():
            raise CheckpointError(f"load: {path} is not a directory; pass a directory written by model.save(...)")
        if (path / "adapter_config.json").is_file():
            from peft import PeftConfig

            name = adapter_name or (self._default if self._default != FULL_MODEL else "default")
            if name not in self._states:
                self.add_adapter_to_model(name, PeftConfig.from_pretrained(str(path)))
            weight_file = path / "adapter_model.safetensors"
            if not weight_file.is_file():
                raise CheckpointError(f"load: {path} has adapter_config.json but no adapter_model.safetensors")
            try:
                self._lora.load_peft_state_dict(name, load_file(str(weight_file)))
            except ValueError as exc:
                raise CheckpointError(f"load: {path}: {exc}") from exc
            self._active = None
            self._activate(self._states[name])
            return
        weight_files = sorted(path.glob("*.safetensors"))
        if not weight_files:
            raise CheckpointError(
                f"load: {path} has neither adapter_config.json (a LoRA adapter) nor *.safetensors weights"
            )
        if self._lora is not None:
            raise CheckpointError(f"load: {path} holds full weights but this model trains adapters")
        hf_state: dict[str, Any] = {}
        for file in weight_files:
            hf_state.update(load_file(str(file)))
        if getattr(self.hf_config, "tie_word_embeddings", False):
            hf_state.pop("lm_head.weight", None)
        try:
            builder.load_full_state(self.model, convert.hf_to_megatron(hf_state, self.hf_config))
        except ValueError as exc:
            raise CheckpointError(f"load: the weights in {path} do not fit this model: {exc}") from exc

    # ------------------------------------------------------------------ generation
    def generate(
        self, prompts: Sequence[Any], *, max_new_tokens: int = 64, adapter_name: str | None = None, **kwargs: Any
    ) -> list[str]:
        """Greedy generation without a KV cache (for quick checks; use a Sampler for rollouts).

        Args:
            prompts: strings (user messages) or lists of chat messages.
            max_new_tokens: tokens to generate per prompt.
            adapter_name: which adapter (default: the current one).

        Returns:
            The decoded completions.
        """
        import torch

        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ValueError("generate: no tokenizer; call model.set_template('Template') first")
        self._activate(self._state(adapter_name))
        eos = {tokenizer.eos_token_id, getattr(self._hf_generation_config, "eos_token_id", None)} - {None}
        answers: list[str] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for prompt in prompts:
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                if isinstance(ids, Mapping):
                    ids = ids["input_ids"]
                tokens = list(ids)
                start = len(tokens)
                with torch.no_grad():
                    for _ in range(max_new_tokens):
                        batch = {"input_ids": torch.tensor([tokens], device=self.device)}
                        next_id = int(self._run(batch)["logits"][0, -1].argmax())
                        tokens.append(next_id)
                        if next_id in eos:
                            break
                answers.append(tokenizer.decode(tokens[start:], skip_special_tokens=True))
        finally:
            self.model.train(was_training)
        return answers


def _model_parallel_grad_norm(params: list[Any], norm_type: float) -> float:
    """Gradient norm over tensor/pipeline-parallel shards (duplicated parameters counted once)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    if norm_type != 2.0:
        raise ValueError(f"clip_grad_norm: norm_type={norm_type} with tensor/pipeline parallelism; use 2.0")
    total = torch.zeros((), dtype=torch.float64, device=params[0].grad.device)
    for p in params:
        if param_is_not_tensor_parallel_duplicate(p):
            total += p.grad.detach().double().pow(2).sum()
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    return float(total.sqrt())


def _hidden_states_passthrough(hidden: Any, weight: Any = None, runtime_gather_output: Any = None) -> tuple[Any, None]:
    """Stands in for ``GPTModel.output_layer.forward`` so the model returns its final hidden states."""
    return hidden, None
