"""TransformersModel: the TwinkleModel protocol on transformers + peft.

Where a batch becomes a loss, in this file: :meth:`TransformersModel.forward_backward`
-> ``_prepare`` (InputProcessor collate) -> ``_run`` (the HF model, logits) ->
``Loss`` (a sum and its token count) -> ``backward`` (gradients accumulate) ->
``_finalize_grads`` (divide by the window's token count over all data ranks) ->
``clip_grad_and_step``.

Per-adapter state (optimizer, scheduler, loss, template, processor, metrics, accumulation
window, counters) lives in one :class:`AdapterState` per adapter; switching adapters is a
dict lookup plus peft's ``set_adapter`` when the active adapter changes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from twinkle.data_format.output import ModelOutput
from twinkle.dispatch import remote
from twinkle.loss.base import Loss, LossOutput, token_logps
from twinkle.model.base import TwinkleModel

logger = logging.getLogger("twinkle.model")

#: The state key of full-parameter training (no adapter).
FULL_MODEL = "__full__"
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be written or read, with the reason and the fix."""


@dataclass
class AdapterState:
    """Everything one adapter (or the full model) trains with.

    Attributes:
        name: the adapter name (``FULL_MODEL`` for full-parameter training).
        params: the parameters this state's optimizer updates.
        gradient_accumulation_steps: micro-batches per optimizer step.
        global_step: optimizer steps taken.
        micro_step: micro-batches accumulated in the current window.
        window_tokens: sum of ``LossOutput.num_tokens`` in the current window (this rank).
    """

    name: str
    params: list[Any]
    loss: Loss
    processor: Any
    gradient_accumulation_steps: int = 1
    optimizer: Any = None
    lr_scheduler: Any = None
    template: Any = None
    train_metrics: list[Any] = field(default_factory=list)
    eval_metrics: list[Any] = field(default_factory=list)
    global_step: int = 0
    micro_step: int = 0
    window_tokens: float = 0.0
    grads_final: bool = False
    last_grad_norm: float | None = None
    last_loss: tuple[float, float] = (0.0, 0.0)  # (loss sum, tokens) of the last backward
    pending: tuple[Any, Any] | None = None
    pending_loss: Any = None
    # reporting since the last calculate_metric
    report: dict[str, float] = field(default_factory=dict)
    eval_report: dict[str, float] = field(default_factory=dict)
    report_started: float | None = None

    def reset_report(self, is_training: bool = True) -> None:
        if is_training:
            self.report = {"loss_sum": 0.0, "loss_tokens": 0.0, "input_tokens": 0.0, "busy_s": 0.0}
            self.report_started = None
            for metric in self.train_metrics:
                metric.reset()
        else:
            self.eval_report = {"loss_sum": 0.0, "loss_tokens": 0.0}
            for metric in self.eval_metrics:
                metric.reset()


def resolve_model_dir(model_id: str) -> str:
    """A local directory for ``model_id`` (local path, ``ms://org/name`` or ``hf://org/name``).

    Uses :func:`twinkle.hub.resolve_model_dir` when the data pipeline provides it.

    Raises:
        FileNotFoundError: a local path that does not exist.
    """
    try:
        from twinkle.hub import resolve_model_dir as hub_resolve
    except ImportError:
        hub_resolve = None
    if hub_resolve is not None:
        return str(hub_resolve(model_id))
    if os.path.isdir(model_id):
        return model_id
    if model_id.startswith("ms://"):
        from modelscope import snapshot_download

        return snapshot_download(model_id[len("ms://") :])
    if model_id.startswith("hf://"):
        from huggingface_hub import snapshot_download as hf_download

        return hf_download(model_id[len("hf://") :])
    raise FileNotFoundError(
        f"model_id {model_id!r} is neither a local directory nor a hub id; use a directory with config.json, "
        f"'ms://org/name' (ModelScope) or 'hf://org/name' (Hugging Face)"
    )


def _has_weights(model_dir: str) -> bool:
    root = Path(model_dir)
    return any(any(root.glob(pattern)) for pattern in _WEIGHT_PATTERNS)


def _dtype(name: Any) -> Any:
    import torch

    if name is None or name == "auto" or isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    value = getattr(torch, aliases.get(str(name), str(name)), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use 'float32', 'bfloat16' or 'float16'")
    return value


class TransformersModel(TwinkleModel):
    """A causal LM from transformers, trained with full parameters or named peft LoRA adapters.

    Args:
        model_id: a local directory (``config.json`` plus weights; a directory with only
            ``config.json`` is initialized randomly from the config with ``seed``), or a
            hub id ``ms://org/name`` / ``hf://org/name``.
        config: a ``transformers.PretrainedConfig`` (or dict with ``model_type``) to build a
            randomly initialized model from, instead of ``model_id``.
        torch_dtype: parameter dtype: ``'float32'`` (default), ``'bfloat16'``, ``'float16'``, ``'auto'``.
        mixed_precision: ``'bf16'`` / ``'fp16'`` autocast for the forward pass, or ``None``.
        attn_implementation: ``'sdpa'`` (default), ``'eager'``, ``'flash_attention_2'`` ...
        device_mesh: the DeviceMesh; ``dp`` -> data parallel gradient all-reduce (DDP),
            ``fsdp`` -> FSDP2 ``fully_shard``. Default: the runtime's global mesh, or all
            torchrun ranks as ``dp``.
        remote_group: the DeviceGroup to run on (ray/http modes).
        seed: seeds random initialization and LoRA initialization (default: the runtime's
            seed, else 42).
        device: ``'cpu'``/``'cuda'``/``'cuda:1'``; default: CUDA (this rank's GPU) if available.
        gradient_checkpointing: trade compute for activation memory.
        trust_remote_code: passed to transformers.
        patches: the ``patch`` components to apply (names, classes or instances); default:
            every registered patch that is enabled by default (the GPU fast path, see
            :mod:`twinkle.patch.fastpath`).
        disabled_patches: patch names to switch off (also ``TWINKLE_DISABLED_PATCHES``).
        enabled_patches: patches to apply on top of ``patches`` (or of the default ones), such as
            those that are off by default (also ``TWINKLE_ENABLED_PATCHES``):
            ``enabled_patches=["Fp8FrozenGemms"]``.
        **model_kwargs: passed to ``from_pretrained`` / ``from_config``.

    Raises:
        ValueError: neither or both of ``model_id`` and ``config``; a bad dtype.
        FileNotFoundError: a local ``model_id`` without ``config.json``.

    Example::

        model = TransformersModel(model_id="twinkle_core/src/twinkle/assets/tiny-qwen2")
        model.add_adapter_to_model("default", LoraConfig(r=8, target_modules="all-linear"))
        model.set_optimizer("AdamW", lr=1e-4)
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
    """

    def __init__(
        self,
        model_id: str | None = None,
        *,
        config: Any = None,
        torch_dtype: Any = "float32",
        mixed_precision: str | None = None,
        attn_implementation: str | None = "sdpa",
        device_mesh: Any = None,
        remote_group: str | None = None,
        seed: int | None = None,
        device: Any = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        patches: Sequence[Any] | None = None,
        disabled_patches: Sequence[str] | None = (),
        enabled_patches: Sequence[Any] | None = (),
        **model_kwargs: Any,
    ) -> None:
        import torch

        from twinkle.runtime import current_runtime

        if (model_id is None) == (config is None):
            raise ValueError("TransformersModel needs exactly one of model_id=... (directory or hub id) or config=...")
        if mixed_precision not in (None, "bf16", "fp16", "no"):
            raise ValueError(f"mixed_precision={mixed_precision!r}; use 'bf16', 'fp16' or None")
        runtime = current_runtime()
        if seed is None:
            seed = runtime.seed if runtime is not None and runtime.seed is not None else 42
        self.seed = seed
        self.model_id = model_id
        self.remote_group = remote_group
        self._autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "")
        self._setup_distributed(device_mesh, device, runtime)
        self.model_dir = resolve_model_dir(model_id) if model_id is not None else None
        self.model = self._build(config, _dtype(torch_dtype), attn_implementation, trust_remote_code, model_kwargs)
        self.model.to(self.device)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        # The fast path: registered `patch` components (twinkle.patch.fastpath), re-applied per adapter.
        from twinkle.patch.fastpath import apply_patches, resolve_patches

        self._patches = resolve_patches(patches, disabled_patches, enabled_patches)
        self.fast_path_patches = apply_patches(self.model, self._patches)
        self._base_param_names = [n for n, _ in self.model.named_parameters()]
        self._peft = None
        self._active: str | None = None
        self._wrapped = False
        self._states: dict[str, AdapterState] = {}
        self._default = FULL_MODEL
        self._states[FULL_MODEL] = self._new_state(FULL_MODEL, [p for p in self.model.parameters()], 1)

    # ------------------------------------------------------------------ set-up
    def _setup_distributed(self, device_mesh: Any, device: Any, runtime: Any) -> None:
        import torch
        import torch.distributed as dist

        from twinkle.launcher.local import torchrun_world
        from twinkle.mesh import DeviceMesh, MeshError

        rank, local_rank, world = torchrun_world()
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        mesh = device_mesh if device_mesh is not None else (runtime.global_device_mesh if runtime else None)
        if mesh is None:
            mesh = DeviceMesh.from_sizes(dp_size=world)
        if mesh.world_size != world:
            raise MeshError(
                f"TransformersModel: device_mesh {mesh.describe()} needs {mesh.world_size} processes but this run has "
                f"{world}; launch with `torchrun --nproc_per_node {mesh.world_size}`"
            )
        unsupported = [d for d in ("tp", "pp", "cp", "sp") if mesh.size(d) > 1]
        if unsupported:
            raise MeshError(
                f"TransformersModel supports dp and fsdp meshes; {mesh.describe()} uses {', '.join(unsupported)}. "
                f"Use MegatronModel (pip install twinkle-megatron) for tensor/pipeline/context parallelism."
            )
        self.device_mesh = mesh
        self.rank, self.world_size = rank, world
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")

    def _build(self, config: Any, dtype: Any, attn: str | None, trust_remote_code: bool, kwargs: dict) -> Any:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        extra = dict(kwargs)
        if attn is not None:
            extra["attn_implementation"] = attn
        if config is None and not os.path.isfile(os.path.join(self.model_dir, "config.json")):
            raise FileNotFoundError(
                f"TransformersModel: {self.model_dir!r} has no config.json; point model_id at a model directory "
                f"(config.json plus weights) or a hub id such as 'ms://Qwen/Qwen2.5-0.5B-Instruct'"
            )
        if config is None:  # a family in a remote-code layout: a registered converter maps it (twinkle.convert)
            from twinkle.convert.base import load_converted

            converted = load_converted(self.model_dir, dtype=dtype, seed=self.seed, **extra)
            if converted is not None:
                return converted
        if config is None and _has_weights(self.model_dir):
            return AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=dtype, trust_remote_code=trust_remote_code, **extra
            )
        if config is None:
            config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=trust_remote_code)
            logger.warning(
                "TransformersModel: %s has a config.json but no weight files; initializing %s randomly "
                "from the config with seed %d",
                self.model_dir,
                config.model_type,
                self.seed,
            )
        elif isinstance(config, Mapping):
            data = dict(config)
            model_type = data.pop("model_type", None)
            if model_type is None:
                raise ValueError("TransformersModel(config=dict): the dict needs a 'model_type' such as 'qwen2'")
            config = AutoConfig.for_model(model_type, **data)
        else:
            # the model's own copy: patches change its config (attention implementation), the caller's stays
            config = copy.deepcopy(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if dtype not in (None, "auto"):
                extra["dtype"] = dtype
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **extra)

    def _new_state(self, name: str, params: list[Any], gradient_accumulation_steps: int) -> AdapterState:
        from twinkle.loss.cross_entropy import CrossEntropyLoss
        from twinkle.metric.accuracy import TokenAccuracy
        from twinkle.processor.base import InputProcessor

        pad_id = getattr(self.model.config, "pad_token_id", None) or 0
        state = AdapterState(
            name=name,
            params=params,
            loss=CrossEntropyLoss(),
            processor=InputProcessor(pad_token_id=pad_id),
            gradient_accumulation_steps=gradient_accumulation_steps,
            train_metrics=[TokenAccuracy()],
            eval_metrics=[TokenAccuracy()],
        )
        state.reset_report(True)
        state.reset_report(False)
        return state

    def _state(self, adapter_name: str | None) -> AdapterState:
        name = self._default if adapter_name is None else adapter_name
        state = self._states.get(name)
        if state is None:
            adapters = [n for n in self._states if n != FULL_MODEL]
            raise KeyError(
                f"no adapter named {name!r}; added adapters: {', '.join(adapters) or '(none)'}. "
                f"Add it with model.add_adapter_to_model({name!r}, LoraConfig(...))"
            )
        return state

    def _activate(self, state: AdapterState) -> None:
        if self._peft is not None and state.name != FULL_MODEL and self._active != state.name:
            self._peft.set_adapter(state.name)
            self._active = state.name
        self._ensure_wrapped()

    def _ensure_wrapped(self) -> None:
        if self._wrapped or self.world_size == 1:
            return
        if self.device_mesh.fsdp > 1:
            self._apply_fsdp()
            for state in self._states.values():  # fully_shard replaced the parameters with sharded ones
                state.params = self._current_params(state)
        else:
            self._broadcast_parameters()
        self._wrapped = True

    def _broadcast_parameters(self) -> None:
        import torch.distributed as dist

        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            dist.broadcast(tensor.data, src=0)

    def _apply_fsdp(self) -> None:
        from torch.distributed.fsdp import fully_shard

        from twinkle.patch.model_walk import decoder_layers

        torch_mesh = self.device_mesh.to_torch(self.device.type)
        base = self._hf_model()
        layers = decoder_layers(base)
        if not layers:
            raise ValueError(f"FSDP: could not find the decoder layers of {type(base).__name__}")
        for layer in layers:
            fully_shard(layer, mesh=torch_mesh)
        fully_shard(self.model, mesh=torch_mesh)
        from twinkle.patch.fastpath import set_flag

        # The fused LM-head path calls the inner decoder directly, which would bypass the FSDP
        # root's unshard of the embeddings and head: keep the plain forward under FSDP.
        set_flag(self.model, "fused_linear_ce", False)

    def _hf_model(self) -> Any:
        """The transformers model without the peft wrapper."""
        return self._peft.get_base_model() if self._peft is not None else self.model

    @property
    def tokenizer(self) -> Any:
        """The tokenizer: the current template's, else one loaded from the model directory, else ``None``."""
        state = self._states.get(self._default)
        template = state.template if state is not None else None
        if template is not None and getattr(template, "tokenizer", None) is not None:
            return template.tokenizer
        if getattr(self, "_tokenizer", None) is None and self.model_dir is not None:
            self._tokenizer = None
            if os.path.isfile(os.path.join(self.model_dir, "tokenizer_config.json")):
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return getattr(self, "_tokenizer", None)

    # ------------------------------------------------------------------ adapters
    @remote(dispatch="all", collect="first")
    def add_adapter_to_model(
        self, adapter_name: str, config: Any, gradient_accumulation_steps: int = 1, **kwargs: Any
    ) -> None:
        """Add a named LoRA adapter on the shared base model and make it the default.

        Args:
            adapter_name: a new name (letters, digits, ``_`` and ``-``).
            config: a ``peft.LoraConfig`` (or any peft config), or a dict of LoraConfig fields.
            gradient_accumulation_steps: micro-batches per optimizer step for this adapter.
            **kwargs: LoraConfig fields overriding ``config`` (e.g. ``r=16``).

        Raises:
            ValueError: a duplicate or invalid name, ``gradient_accumulation_steps < 1``, or
                adding after FSDP wrapped the model.

        Example::

            model.add_adapter_to_model("tenant_a", LoraConfig(r=8, target_modules="all-linear"))
        """
        import torch
        from peft import LoraConfig, get_peft_model

        if not isinstance(adapter_name, str) or not adapter_name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"adapter_name {adapter_name!r} must be letters, digits, '_' or '-'")
        if adapter_name in self._states:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; pick another name")
        if any(f".{adapter_name}." in f".{n}." for n in self._base_param_names):
            raise ValueError(f"adapter_name {adapter_name!r} clashes with a module name of the model; pick another")
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        if self._wrapped and self.device_mesh.fsdp > 1:
            raise ValueError("add every adapter before the first forward when training with FSDP")
        if isinstance(config, Mapping):
            config = LoraConfig(**{**config, **kwargs})
        elif kwargs:
            config = type(config)(**{**config.to_dict(), **kwargs})
        if getattr(config, "task_type", None) is None:
            config.task_type = "CAUSAL_LM"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + sum(map(ord, adapter_name)))
            if self._peft is None:
                self._peft = get_peft_model(self.model, config, adapter_name=adapter_name)
                self.model = self._peft
            else:
                self._peft.add_adapter(adapter_name, config)
        self.model.to(self.device)
        marker = f".{adapter_name}."
        params = [p for n, p in self.model.named_parameters() if marker in n]
        if not params:
            raise ValueError(f"adapter {adapter_name!r} added no parameters; check target_modules in its config")
        for p in params:
            p.requires_grad_(True)
        from twinkle.patch.fastpath import apply_patches

        self.fast_path_patches = apply_patches(self.model, self._patches)
        previous = self._states.get(self._default)
        state = self._new_state(adapter_name, params, gradient_accumulation_steps)
        if previous is not None and previous.template is not None:
            state.template = previous.template
        if previous is not None:  # set_processor before the adapter was added still holds
            state.processor = previous.processor
        self._states.pop(FULL_MODEL, None)
        self._states[adapter_name] = state
        self._default = adapter_name
        self._active = None
        self._activate(state)
        if self._wrapped and self.world_size > 1 and self.device_mesh.fsdp == 1:
            self._broadcast_parameters()

    @remote(dispatch="all", collect="first")
    def remove_adapter(self, adapter_name: str) -> None:
        """Delete an adapter and its state (a tenant leaving); the default becomes the last one left.

        Raises:
            KeyError: no such adapter.
            ValueError: it is the only adapter (the model would become full-parameter again).
        """
        self._state(adapter_name)
        if adapter_name == FULL_MODEL or len(self._states) == 1:
            raise ValueError(f"cannot remove {adapter_name!r}: it is the only adapter; add another one first")
        del self._states[adapter_name]
        self._peft.delete_adapter(adapter_name)
        self._active = None
        if self._default == adapter_name:
            self._default = next(reversed(self._states))
        self._activate(self._states[self._default])

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """A context in which forwards use the base model without any adapter (reference model).

        Example::

            with model.adapters_disabled():
                ref = model.forward_only(inputs=batch)
        """
        if self._peft is None:
            yield
            return
        with self._peft.disable_adapter():
            yield

    # ------------------------------------------------------------------ configuration
    def _registry(self) -> Any:
        from twinkle.runtime import get_registry

        return get_registry()

    @remote(dispatch="all", collect="first")
    def set_loss(self, loss_cls: Any, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Set the Loss of an adapter.

        Args:
            loss_cls: a registered name (``'CrossEntropyLoss'``), a Loss class, or an instance.
            adapter_name: which adapter (default: the current one).
            **kwargs: constructor arguments.

        Raises:
            ComponentNotFoundError: an unknown name (the message lists the registered ones).
        """
        self._state(adapter_name).loss = self._instantiate("loss", loss_cls, kwargs)

    @remote(dispatch="all", collect="first")
    def set_optimizer(self, optimizer_cls: Any = "AdamW", *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Build the optimizer of an adapter over its trainable parameters.

        Args:
            optimizer_cls: any torch.optim name (``'AdamW'``, ``'SGD'``...), a class, or a
                factory ``f(params, **kwargs)``.
            adapter_name: which adapter (default: the current one).
            **kwargs: optimizer arguments (``lr=1e-4``, ``weight_decay=0.01``).

        Example::

            model.set_optimizer(optimizer_cls="AdamW", lr=1e-4)
        """
        state = self._state(adapter_name)
        factory = self._registry().resolve("optimizer", optimizer_cls)
        params = [p for p in state.params if p.requires_grad or state.name != FULL_MODEL]
        if self.world_size > 1 and self.device_mesh.fsdp > 1:
            self._activate(state)
            params = self._current_params(state)
        if "lr" in kwargs:
            kwargs["lr"] = float(kwargs["lr"])
        from twinkle.patch.fastpath import optimizer_kwargs

        kwargs = optimizer_kwargs(self.model, factory, params, kwargs)
        state.optimizer = factory(params, **kwargs)
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
        if state.optimizer is None:
            raise ValueError("set_lr_scheduler: call set_optimizer(...) first; the scheduler drives its lr")
        factory = self._registry().resolve("lr_scheduler", scheduler_cls)
        state.lr_scheduler = factory(state.optimizer, **kwargs)
        from twinkle.optim.schedulers import check_schedule_length

        check_schedule_length(state.lr_scheduler, kwargs, state.gradient_accumulation_steps)

    @remote(dispatch="all", collect="first")
    def set_template(self, template_cls: Any, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Set the Template of an adapter (encodes rows that carry ``messages`` but no ``input_ids``).

        Args:
            template_cls: a registered name (``'Template'``), a class, or an instance.
            adapter_name: which adapter (default: the current one).
            **kwargs: constructor arguments; ``model_id`` defaults to this model's.
        """
        if isinstance(template_cls, (str, type)) and "model_id" not in kwargs and self.model_dir is not None:
            kwargs["model_id"] = self.model_dir
        state = self._state(adapter_name)
        state.template = self._instantiate("template", template_cls, kwargs)
        tokenizer = getattr(state.template, "tokenizer", None)
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
            state.processor.pad_token_id = tokenizer.pad_token_id

    @remote(dispatch="all", collect="first")
    def set_processor(self, processor_cls: Any, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Set the InputProcessor of an adapter (``'InputProcessor'``, ``'PaddingFreeProcessor'``, class, instance).

        Example::

            model.set_processor("InputProcessor", padding_free=True)
        """
        self._state(adapter_name).processor = self._instantiate("processor", processor_cls, kwargs)

    @remote(dispatch="all", collect="first")
    def add_metric(
        self, metric_cls: Any, *, adapter_name: str | None = None, is_training: bool | None = None, **kwargs: Any
    ) -> None:
        """Add a Metric to an adapter.

        Args:
            metric_cls: a registered name (``'TokenAccuracy'``), a class, or an instance.
            adapter_name: which adapter (default: the current one).
            is_training: ``True``: training metrics only; ``False``: evaluation
                (forward_only) only; ``None`` (default): both (an instance: training only).
        """
        state = self._state(adapter_name)
        if not isinstance(metric_cls, (str, type)):
            (state.eval_metrics if is_training is False else state.train_metrics).append(metric_cls)
            return
        if is_training in (None, True):
            state.train_metrics.append(self._instantiate("metric", metric_cls, kwargs))
        if is_training in (None, False):
            state.eval_metrics.append(self._instantiate("metric", metric_cls, kwargs))

    def _instantiate(self, kind: str, value: Any, kwargs: dict[str, Any]) -> Any:
        if isinstance(value, (str, type)):
            return self._registry().resolve(kind, value)(**kwargs)
        if kwargs:
            raise TypeError(f"{kind}: keyword arguments {sorted(kwargs)} go with a name or class, not an instance")
        return value

    # ------------------------------------------------------------------ compute
    def _prepare(self, state: AdapterState, inputs: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
        batch = self._prepare_batch(state, inputs, extra)
        if "shift_labels" in batch and "num_label_tokens" not in batch:
            # counted now, before the forward is queued: losses need it on the host, and reading it
            # after the forward would make the host wait for the whole forward before queuing backward
            batch["num_label_tokens"] = int((batch["shift_labels"] != -100).sum())
        return batch

    def _prepare_batch(self, state: AdapterState, inputs: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(inputs, Mapping) and "input_ids" not in inputs:
            inputs = [inputs]
        if isinstance(inputs, Mapping):
            return state.processor(inputs, device=self.device)
        rows = list(inputs)
        if extra:
            for key, values in extra.items():
                if not isinstance(values, Sequence) or len(values) != len(rows):
                    raise ValueError(f"forward_backward: {key}= must be a list with one entry per row ({len(rows)})")
            rows = [{**row, **{k: v[i] for k, v in extra.items()}} for i, row in enumerate(rows)]
        if rows and isinstance(rows[0], Mapping) and "input_ids" not in rows[0] and state.template is not None:
            rows = [{**state.template.encode(row), **row} if "input_ids" not in row else row for row in rows]
        return state.processor(rows, device=self.device)

    def _run(self, batch: Mapping[str, Any]) -> ModelOutput:
        import torch

        model_inputs = {"input_ids": batch["input_ids"], "position_ids": batch.get("position_ids"), "use_cache": False}
        if "attention_mask" in batch:
            model_inputs["attention_mask"] = batch["attention_mask"]
        elif model_inputs["position_ids"] is None and "cu_seq_lens_q" not in batch:
            from twinkle.patch.fastpath import causal_masks  # whole unpadded rows: no mask to build

            masks = causal_masks(self._hf_model(), batch["input_ids"].shape[-1])
            if masks is not None:
                model_inputs["attention_mask"] = masks
        context = contextlib.nullcontext()
        if "cu_seq_lens_q" in batch:  # packed sequences: varlen attention over their boundaries
            from twinkle.patch.varlen import packed_inputs

            context = packed_inputs(self._hf_model(), batch, model_inputs)
        from twinkle.patch.fastpath import run_model  # logits, or hidden states for the fused loss

        with context:
            if self._autocast is not None:
                with torch.autocast(self.device.type, dtype=self._autocast):
                    return run_model(self.model, model_inputs)
            return run_model(self.model, model_inputs)

    @remote(dispatch="slice_dp", collect="mean")
    def forward(self, inputs: Any, *, adapter_name: str | None = None, **kwargs: Any) -> ModelOutput:
        """Run the model with gradients; :meth:`calculate_loss` and :meth:`backward` use the result.

        Args:
            inputs: a batch (``list[dict]`` encoded rows, or a dict of tensors).
            adapter_name: which adapter (default: the current one).
            **kwargs: extra per-row fields for the loss (lists with one entry per row).

        Returns:
            ModelOutput with ``logits`` ``[B, T, V]``.
        """
        state = self._state(adapter_name)
        self._activate(state)
        if state.report_started is None:
            state.report_started = time.perf_counter()
        batch = self._prepare(state, inputs, kwargs)
        outputs = self._run(batch)
        state.pending = (batch, outputs)
        state.pending_loss = None
        return outputs

    @remote(dispatch="all", collect="mean")
    def calculate_loss(self, *, adapter_name: str | None = None, **kwargs: Any) -> float:
        """Apply the adapter's Loss to the last :meth:`forward`; returns the loss normalized by its tokens.

        Raises:
            RuntimeError: no forward to compute a loss for.
        """
        result = self._compute_loss(self._state(adapter_name))
        tokens = float(result.num_tokens)
        return float(result.loss.detach()) / tokens if tokens else 0.0

    @staticmethod
    def _compute_loss(state: AdapterState) -> LossOutput:
        """The adapter's Loss on the pending forward, kept for backward (no host sync: the loss stays a tensor)."""
        if state.pending is None:
            raise RuntimeError("calculate_loss: call forward(inputs) first")
        batch, outputs = state.pending
        result = state.loss(batch, outputs)
        if not isinstance(result, LossOutput):
            raise TypeError(f"{type(state.loss).__name__} returned {type(result).__name__}; a Loss returns LossOutput")
        state.pending_loss = result
        return result

    @remote(dispatch="all", collect="none")
    def backward(self, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Back-propagate the last loss; gradients add up until the optimizer step.

        Raises:
            RuntimeError: no loss to back-propagate.
        """
        state = self._state(adapter_name)
        result = state.pending_loss
        if result is None:
            raise RuntimeError("backward: call forward(inputs) and calculate_loss() first")
        if state.micro_step >= state.gradient_accumulation_steps:
            logger.warning(
                "adapter %r: %d micro-batches accumulated with gradient_accumulation_steps=%d and no step; "
                "call clip_grad_and_step() after each forward_backward",
                state.name,
                state.micro_step + 1,
                state.gradient_accumulation_steps,
            )
        batch, outputs = state.pending
        # the numbers to report are copied to the host while the backward is queued: reading them
        # afterwards waits only for the forward, so the host goes on queuing the optimizer step
        # while the GPU runs the backward
        scalars = {"loss": result.loss, "num_tokens": result.num_tokens}
        scalars["input_tokens"] = (batch["row_ids"] >= 0).sum() if "row_ids" in batch else batch["input_ids"].numel()
        for key, value in (result.extra or {}).items():
            scalars[f"extra:{key}"] = value
        host = _HostScalars(scalars)
        result.loss.backward()
        values = host.values()
        state.window_tokens += values["num_tokens"]
        state.micro_step += 1
        state.grads_final = False
        state.last_loss = (values["loss"], values["num_tokens"])
        report = state.report
        report["loss_sum"] += values["loss"]
        report["loss_tokens"] += values["num_tokens"]
        report["input_tokens"] += values["input_tokens"]
        for key in result.extra or {}:
            report[f"extra:{key}"] = report.get(f"extra:{key}", 0.0) + values[f"extra:{key}"]
            report[f"extra_n:{key}"] = report.get(f"extra_n:{key}", 0.0) + 1
        with _no_grad():
            for metric in state.train_metrics:
                metric.update(batch, outputs)
        state.pending = None
        state.pending_loss = None

    @remote(dispatch="slice_dp", collect="mean")
    def forward_backward(self, inputs: Any, *, adapter_name: str | None = None, **kwargs: Any) -> ModelOutput:
        """forward + calculate_loss + backward on one micro-batch.

        Args:
            inputs: a DataLoader batch (``list[dict]``) or a dict of tensors.
            adapter_name: which adapter (default: the current one).
            **kwargs: extra per-row fields that reach the Loss (``advantages=[...]`` ...).

        Returns:
            ModelOutput with ``loss`` (normalized over this micro-batch on every data rank)
            and ``num_tokens``.

        Example::

            out = model.forward_backward(inputs=batch)
            model.clip_grad_and_step()
        """
        started = time.perf_counter()
        state = self._state(adapter_name)
        self.forward(inputs, adapter_name=state.name, **kwargs)
        result = self._compute_loss(state)
        self.backward(adapter_name=state.name)  # reads the loss without waiting for the backward
        loss_sum, tokens = state.last_loss
        if self.world_size > 1:
            loss_sum, tokens = self._all_reduce_floats([loss_sum, tokens])
        state.report["busy_s"] += time.perf_counter() - started
        out = ModelOutput(loss=loss_sum / tokens if tokens else 0.0, num_tokens=int(tokens))
        if result.extra:
            out.update({k: float(v) for k, v in result.extra.items()})
        return out

    @remote(dispatch="slice_dp", collect="mean")
    def forward_only(
        self,
        inputs: Any,
        *,
        adapter_name: str | None = None,
        disable_adapters: bool = False,
        return_logits: bool = False,
        **kwargs: Any,
    ) -> ModelOutput:
        """Run without gradients: per-token log-probs of the labels, loss and eval metrics.

        Args:
            inputs: a batch; rows without ``labels`` score every token.
            adapter_name: which adapter (default: the current one).
            disable_adapters: use the base model (the RL reference model).
            return_logits: also return ``logits``.

        Returns:
            ModelOutput with ``logps`` (per row, aligned with its ``labels``; 0.0 where the
            label is -100), ``loss``, ``num_tokens`` and (if asked) ``logits``.
        """
        import torch

        state = self._state(adapter_name)
        self._activate(state)
        batch = self._prepare(state, inputs, kwargs)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.adapters_disabled() if disable_adapters else contextlib.nullcontext():
                outputs = self._run(batch)
                logps = token_logps(batch, outputs)
                mask = batch["shift_labels"] != -100
                tokens = batch["num_label_tokens"]  # counted in _prepare
                loss_sum = float(-(logps * mask).sum())
                for metric in state.eval_metrics:
                    metric.update(batch, outputs)
        finally:
            self.model.train(was_training)
        state.eval_report["loss_sum"] += loss_sum
        state.eval_report["loss_tokens"] += tokens
        out = ModelOutput(
            logps=_per_row_logps(batch, logps), loss=loss_sum / tokens if tokens else 0.0, num_tokens=tokens
        )
        if return_logits:
            out["logits"] = outputs["logits"]
        return out

    # ------------------------------------------------------------------ optimization
    def _current_params(self, state: AdapterState) -> list[Any]:
        if state.name == FULL_MODEL:
            return [p for p in self.model.parameters() if p.requires_grad]
        marker = f".{state.name}."
        return [p for n, p in self.model.named_parameters() if marker in n]

    def _all_reduce_floats(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def _finalize_grads(self, state: AdapterState, *, apply_scale: bool = True) -> float:
        """Average gradients over data ranks and divide by the window's total token count (once per window).

        With ``apply_scale=False`` (one process only) the division is left to the caller, which
        gets the factor back: :meth:`_clip` folds it into the clipping multiply, one pass over
        the gradients instead of two. Returns the factor still to apply (1.0 once applied).
        """
        if state.grads_final:
            return 1.0
        import torch

        grads = [p.grad for p in state.params if p.grad is not None]
        tokens = state.window_tokens
        if self.world_size > 1:
            (tokens,) = self._all_reduce_floats([tokens])
            if self.device_mesh.fsdp > 1:
                scale = self.world_size / tokens if tokens else 0.0  # FSDP2 already averaged over ranks
            else:
                scale = 1.0 / tokens if tokens else 0.0
                self._all_reduce_grads(grads)
        else:
            scale = 1.0 / tokens if tokens else 0.0
        state.grads_final = True
        if not apply_scale and self.world_size == 1:
            return scale
        if grads and scale != 1.0:
            torch._foreach_mul_(grads, scale)
        return 1.0

    def _all_reduce_grads(self, grads: list[Any]) -> None:
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)

    @remote(dispatch="all", collect="first")
    def clip_grad_norm(
        self, max_grad_norm: float = 1.0, norm_type: float = 2.0, *, adapter_name: str | None = None, **kwargs: Any
    ) -> float:
        """Finish the window's gradients and clip them to ``max_grad_norm``.

        Returns:
            The total gradient norm before clipping (over all ranks).
        """
        state = self._state(adapter_name)
        state.last_grad_norm = float(self._clip(state, max_grad_norm, norm_type))
        return state.last_grad_norm

    def _clip(self, state: AdapterState, max_grad_norm: float, norm_type: float) -> Any:
        """Finish and clip the window's gradients; the total norm as a tensor (0.0 without gradients), no sync.

        In one process the window's ``1 / tokens`` and the clip factor multiply the gradients
        together (the norm of the unscaled gradients times ``1 / tokens`` is the norm of the
        scaled ones), so the gradients are read twice (norm, multiply) instead of three times.
        """
        import torch

        scale = self._finalize_grads(state, apply_scale=False)
        params = [p for p in state.params if p.grad is not None]
        if not params:
            return 0.0
        grads = [p.grad for p in params]
        if scale == 1.0 or any(type(g) is not torch.Tensor for g in grads):  # DTensor (FSDP): torch's own path
            if scale != 1.0:
                torch._foreach_mul_(grads, scale)
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, norm_type=norm_type)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        norm = torch.nn.utils.get_total_norm(grads, norm_type) * scale
        # clip_grads_with_norm_'s factor (same epsilon), times the window's 1 / tokens
        factor = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0) * scale
        for group in _by_device_and_dtype(grads):
            torch._foreach_mul_(group, factor.to(group[0].device))
        return norm

    @remote(dispatch="all", collect="none")
    def step(self, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """One optimizer step with the accumulated (finished) gradients.

        Raises:
            ValueError: no optimizer (call :meth:`set_optimizer`).
        """
        state = self._state(adapter_name)
        if state.optimizer is None:
            raise ValueError(
                f"adapter {state.name!r} has no optimizer; call model.set_optimizer('AdamW', lr=1e-4) before stepping"
            )
        self._finalize_grads(state)
        state.optimizer.step()
        state.global_step += 1

    @remote(dispatch="all", collect="none")
    def zero_grad(self, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Drop gradients and start a new accumulation window."""
        state = self._state(adapter_name)
        for p in state.params:
            p.grad = None
        state.micro_step = 0
        state.window_tokens = 0.0
        state.grads_final = False

    @remote(dispatch="all", collect="none")
    def lr_step(self, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Advance the adapter's LR scheduler (no-op without one)."""
        state = self._state(adapter_name)
        if state.lr_scheduler is not None:
            state.lr_scheduler.step()

    @remote(dispatch="all", collect="first")
    def clip_grad_and_step(
        self, max_grad_norm: float = 1.0, norm_type: float = 2.0, *, adapter_name: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """At the end of the accumulation window: clip, step, zero_grad and lr_step.

        Call it after every forward_backward; it only steps once
        ``gradient_accumulation_steps`` micro-batches have been accumulated.

        Returns:
            ``{"stepped": False}`` mid-window, else ``{"stepped": True, "grad_norm", "lr", "step"}``.
        """
        state = self._state(adapter_name)
        if state.micro_step < state.gradient_accumulation_steps:
            return {"stepped": False, "step": state.global_step}
        lr = self._lr(state)
        norm = self._clip(state, max_grad_norm, norm_type)
        self.step(adapter_name=state.name)
        self.zero_grad(adapter_name=state.name)
        self.lr_step(adapter_name=state.name)
        # read the norm once the optimizer step is queued: the GPU runs it while the host waits
        state.last_grad_norm = float(norm)
        return {"stepped": True, "grad_norm": state.last_grad_norm, "lr": lr, "step": state.global_step}

    @staticmethod
    def _lr(state: AdapterState) -> float | None:
        if state.optimizer is None:
            return None
        return float(state.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ metrics
    @remote(dispatch="all", collect="first")
    def calculate_metric(self, is_training: bool = True, *, adapter_name: str | None = None, **kwargs: Any) -> dict:
        """Metrics since the last call, then reset them; also emitted to lifecycle plugins.

        Training: ``step`` (= ``optimizer_step``, optimizer steps taken), ``micro_batches``
        (forward_backward calls in total), ``lr_schedule_progress`` (optimizer steps / the
        schedule's length, when it has one), ``loss`` (token-weighted), ``grad_norm`` (last step), ``lr``,
        ``mfu`` (where the device's peak is known, :mod:`twinkle.model.mfu`),
        ``tokens_per_s`` (non-padding input tokens over all ranks / wall time),
        ``token_acc`` and the adapter's added metrics. Evaluation (``is_training=False``):
        ``loss`` and metrics of the forward_only calls.

        Example::

            metric = model.calculate_metric(is_training=True)
        """
        from twinkle.optim.schedulers import step_keys
        from twinkle.runtime import current_runtime

        state = self._state(adapter_name)
        if is_training:
            report = state.report
            loss_sum, loss_tokens, input_tokens = report["loss_sum"], report["loss_tokens"], report["input_tokens"]
            if self.world_size > 1:
                loss_sum, loss_tokens, input_tokens = self._all_reduce_floats([loss_sum, loss_tokens, input_tokens])
            elapsed = time.perf_counter() - state.report_started if state.report_started else 0.0
            result: dict[str, Any] = {"step": state.global_step, **step_keys(state)}
            if loss_tokens:
                result["loss"] = loss_sum / loss_tokens
            if state.last_grad_norm is not None:
                result["grad_norm"] = state.last_grad_norm
            lr = self._lr(state)
            if lr is not None:
                result["lr"] = lr
            if elapsed > 0:
                result["tokens_per_s"] = input_tokens / elapsed
                from twinkle.model.mfu import mfu

                lora = state.name != FULL_MODEL
                value = mfu(self._hf_model(), lora, result["tokens_per_s"], self.world_size, self.device)
                if value is not None:  # a known accelerator peak (or TWINKLE_PEAK_TFLOPS)
                    result["mfu"] = value
            for key in [k for k in report if k.startswith("extra:")]:
                name = key[len("extra:") :]
                result[name] = report[key] / report[f"extra_n:{name}"]
            for metric in state.train_metrics:
                result.update(metric.compute())
        else:
            report = state.eval_report
            result = {"step": state.global_step, **step_keys(state)}
            if report["loss_tokens"]:
                result["loss"] = report["loss_sum"] / report["loss_tokens"]
            for metric in state.eval_metrics:
                result.update(metric.compute())
        state.reset_report(is_training)
        runtime = current_runtime()
        if runtime is not None and self.rank == 0:
            source = "train" if is_training else "eval"
            if state.name != FULL_MODEL:
                source = f"{source}/{state.name}"
            runtime.emit_metrics(source, result, step=state.global_step)
        return result

    # ------------------------------------------------------------------ weights
    @remote(dispatch="all", collect="first")
    def get_state_dict(self, *, adapter_name: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """The adapter's weights (PEFT key names, as in ``adapter_model.safetensors``), or the full model's.

        Returns:
            ``{name: CPU tensor}``; full-model keys are the transformers names.
        """
        state = self._state(adapter_name)
        if state.name == FULL_MODEL:
            return self._full_state_dict()
        from peft import get_peft_model_state_dict

        state_dict = get_peft_model_state_dict(
            self._peft, state_dict=self._gathered_state_dict(), adapter_name=state.name
        )
        return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}

    def _gathered_state_dict(self) -> dict[str, Any]:
        """Every parameter and buffer (full tensors even under FSDP)."""
        if self.world_size > 1 and self.device_mesh.fsdp > 1 and self._wrapped:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict()

    def _full_state_dict(self) -> dict[str, Any]:
        if self._peft is not None:
            raise ValueError("get_state_dict: this model trains LoRA adapters; pass adapter_name=... for its weights")
        return {k: v.detach().to("cpu").contiguous() for k, v in self._gathered_state_dict().items()}

    @remote(dispatch="all", collect="first")
    def save(
        self,
        output_dir: str | os.PathLike,
        *,
        adapter_name: str | None = None,
        save_optimizer: bool = True,
        save_tokenizer: bool = True,
        dataloader: Any = None,
        overwrite: bool = True,
        original_layout: bool = False,
        **kwargs: Any,
    ) -> str:
        """Write a checkpoint atomically (a temp dir beside ``output_dir``, then a rename).

        Contents: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT) for an
        adapter, or ``config.json`` + ``model.safetensors`` (transformers) for full
        training; with ``save_optimizer`` also ``optimizer.pt``, ``scheduler.pt``,
        ``rng_state_<rank>.pt`` and ``trainer_state.json`` (step counters, and
        ``dataloader.state_dict()`` when a dataloader is given); the tokenizer when known.

        Args:
            output_dir: the checkpoint directory to create (or replace, if ``overwrite``).
            adapter_name: which adapter (default: the current one).
            save_optimizer: also write what :meth:`resume_from_checkpoint` needs.
            save_tokenizer: also write the tokenizer files.
            dataloader: a DataLoader whose ``state_dict()`` is stored for exact resume.
            overwrite: replace an existing directory (otherwise raise).
            original_layout: for a model loaded through a converter (InternLM2, ChatGLM; see
                :mod:`twinkle.convert`), write the full weights in the family's original layout
                and ``config.json`` (with its other files) instead of the transformers layout.

        Returns:
            The checkpoint path.

        Raises:
            CheckpointError: ``output_dir`` exists (and not ``overwrite``), is a file, or its
                parent cannot be written. Nothing is left behind on failure.
        """
        import torch

        state = self._state(adapter_name)
        target = Path(output_dir).resolve()
        if target.exists() and not target.is_dir():
            raise CheckpointError(f"save: {target} exists and is a file; choose a directory path")
        if target.exists() and not overwrite:
            raise CheckpointError(f"save: {target} already exists; pass overwrite=True or choose a new directory")
        parent = target.parent
        if self.rank == 0:
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CheckpointError(f"save: cannot create the parent directory {parent}: {exc}") from exc
            if not os.access(parent, os.W_OK):
                raise CheckpointError(f"save: {parent} is not writable; choose another output_dir")
        if original_layout and self._peft is not None:
            raise CheckpointError(
                "save(original_layout=True) writes full weights; this model trains LoRA adapters, whose files are in "
                "the transformers layout: save the adapter without original_layout, or train without adapters"
            )
        weights = self.get_state_dict(adapter_name=state.name) if self._peft is not None else self._full_state_dict()
        optim_state = None
        if save_optimizer and state.optimizer is not None:
            optim_state = self._optimizer_state(state)
        tmp = parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        if self.world_size > 1:
            tmp = self._broadcast_object(tmp)
        try:
            if self.rank == 0:
                tmp.mkdir()
                if original_layout:
                    from twinkle.convert.base import save_original

                    save_original(self._hf_model(), tmp, weights)
                else:
                    self._write_weights(tmp, state, weights)
                if save_tokenizer and not original_layout:  # the original layout copies the source's files
                    self._write_tokenizer(tmp)
                if save_optimizer:
                    trainer_state = {
                        "global_step": state.global_step,
                        "adapter_name": None if state.name == FULL_MODEL else state.name,
                        "gradient_accumulation_steps": state.gradient_accumulation_steps,
                        "world_size": self.world_size,
                        "dataloader": dataloader.state_dict() if dataloader is not None else None,
                    }
                    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, default=_json_default))
                    if optim_state is not None:
                        torch.save(optim_state, tmp / "optimizer.pt")
                    if state.lr_scheduler is not None:
                        torch.save(state.lr_scheduler.state_dict(), tmp / "scheduler.pt")
            if save_optimizer:
                self._barrier()
                torch.save(_rng_state(), tmp / f"rng_state_{self.rank}.pt")
            self._barrier()
            if self.rank == 0:
                _replace_dir(tmp, target)
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._barrier()
        return str(target)

    @remote(dispatch="all", collect="first")
    def export(
        self,
        output_dir: str | os.PathLike,
        *,
        dtype: Any = "bfloat16",
        merge: bool = True,
        adapter_name: str | None = None,
        **kwargs: Any,
    ) -> str:
        """A Hugging Face checkpoint that plain transformers and vLLM load: the LoRA merged into
        its base (``merge=True``), or the adapter alone; weights in ``dtype``. The live model is
        unchanged. See :func:`twinkle.model.export.export_model` (``save_tokenizer``,
        ``max_shard_size``, ``overwrite``) and ``push_to_hub`` there.

        Example::

            model.export("exported", dtype="bfloat16")
        """
        from twinkle.model.export import export_model

        return export_model(self, output_dir, dtype=dtype, merge=merge, adapter_name=adapter_name, **kwargs)

    def _optimizer_state(self, state: AdapterState) -> dict[str, Any]:
        if self.world_size > 1 and self.device_mesh.fsdp > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(
                self.model, state.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return state.optimizer.state_dict()

    def _write_weights(self, directory: Path, state: AdapterState, weights: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        if state.name == FULL_MODEL:
            base = self._hf_model()
            base.config.save_pretrained(directory)
            if getattr(base, "generation_config", None) is not None:
                base.generation_config.save_pretrained(directory)
            save_file(_untie(weights), str(directory / "model.safetensors"), metadata={"format": "pt"})
            return
        config = self._peft.peft_config[state.name]
        if self.model_dir is not None and not config.base_model_name_or_path:
            config.base_model_name_or_path = self.model_id
        config.save_pretrained(str(directory))
        save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})

    def _write_tokenizer(self, directory: Path) -> None:
        tokenizer = self.tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
            return
        if self.model_dir is not None:
            for name in _TOKENIZER_FILES:
                source = Path(self.model_dir) / name
                if source.is_file():
                    shutil.copy2(source, directory / name)

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def _broadcast_object(self, value: Any) -> Any:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @remote(dispatch="all", collect="first")
    def load(self, checkpoint_dir: str | os.PathLike, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Load weights from a checkpoint written by :meth:`save` (or by peft / transformers).

        An ``adapter_config.json`` loads a LoRA adapter (added under ``adapter_name``, default
        the current adapter or ``'default'``, if it does not exist yet); a ``config.json``
        with ``model.safetensors`` loads full weights.

        Raises:
            CheckpointError: the directory does not exist or holds neither format.
        """
        from safetensors.torch import load_file

        path = Path(checkpoint_dir)
        if not path.is_dir():
            raise CheckpointError(f"load: {path} is not a directory; pass a directory written by model.save(...)")
        if (path / "adapter_config.json").is_file():
            from peft import PeftConfig, set_peft_model_state_dict

            name = adapter_name or (self._default if self._default != FULL_MODEL else "default")
            if name not in self._states:
                self.add_adapter_to_model(name, PeftConfig.from_pretrained(str(path)))
            weight_file = path / "adapter_model.safetensors"
            if not weight_file.is_file():
                raise CheckpointError(f"load: {path} has adapter_config.json but no adapter_model.safetensors")
            result = set_peft_model_state_dict(self._peft, load_file(str(weight_file)), adapter_name=name)
            unexpected = getattr(result, "unexpected_keys", None) or []
            if unexpected:
                raise CheckpointError(
                    f"load: {len(unexpected)} adapter weights do not fit this model: {unexpected[:3]}"
                )
            self._active = None
            self._activate(self._states[name])
            return
        weight_files = sorted(path.glob("*.safetensors"))
        if not weight_files:
            raise CheckpointError(
                f"load: {path} has neither adapter_config.json (a LoRA adapter) nor *.safetensors weights"
            )
        if self._peft is not None:
            raise CheckpointError(f"load: {path} holds full weights but this model trains adapters")
        state_dict: dict[str, Any] = {}
        for file in weight_files:
            state_dict.update(load_file(str(file)))
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        tied = {k for k in missing if "lm_head" in k and getattr(self.model.config, "tie_word_embeddings", False)}
        if unexpected or set(missing) - tied:
            raise CheckpointError(
                f"load: the weights in {path} do not fit this model: missing {sorted(set(missing) - tied)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )

    @remote(dispatch="all", collect="first")
    def resume_from_checkpoint(
        self,
        checkpoint_dir: str | os.PathLike,
        *,
        adapter_name: str | None = None,
        dataloader: Any = None,
        load_optimizer: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Continue training from :meth:`save` output: weights, optimizer, scheduler, RNG, step counters.

        Set the optimizer and scheduler (same settings) before calling it. Training then
        continues with exactly the numbers of an uninterrupted run.

        Args:
            checkpoint_dir: a directory written by :meth:`save` with ``save_optimizer=True``.
            adapter_name: which adapter (default: the one recorded in the checkpoint).
            dataloader: gets ``load_state_dict(saved_state)`` when the checkpoint has one.
            load_optimizer: also restore optimizer and scheduler state.

        Returns:
            The saved trainer state (``global_step``, ``dataloader`` ...).

        Raises:
            CheckpointError: no ``trainer_state.json``, or optimizer state but no optimizer set.
        """
        import torch

        path = Path(checkpoint_dir)
        state_file = path / "trainer_state.json"
        if not state_file.is_file():
            raise CheckpointError(
                f"resume_from_checkpoint: {path} has no trainer_state.json; save it with model.save(..., "
                f"save_optimizer=True), or use model.load(...) to load weights only"
            )
        trainer_state = json.loads(state_file.read_text())
        name = adapter_name or trainer_state.get("adapter_name")
        self.load(path, adapter_name=name)
        state = self._state(name)
        if load_optimizer and (path / "optimizer.pt").is_file():
            if state.optimizer is None:
                raise CheckpointError("resume_from_checkpoint: call set_optimizer(...) (and set_lr_scheduler) first")
            optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
            if self.world_size > 1 and self.device_mesh.fsdp > 1:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(
                    self.model, state.optimizer, optim_state, options=StateDictOptions(full_state_dict=True)
                )
            else:
                state.optimizer.load_state_dict(optim_state)
        if load_optimizer and (path / "scheduler.pt").is_file() and state.lr_scheduler is not None:
            state.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng_file = path / f"rng_state_{self.rank}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        state.global_step = int(trainer_state.get("global_step", 0))
        self.zero_grad(adapter_name=state.name)
        if dataloader is not None and trainer_state.get("dataloader") is not None:
            dataloader.load_state_dict(trainer_state["dataloader"])
        return trainer_state

    # ------------------------------------------------------------------ generation
    def generate(
        self, prompts: Sequence[Any], *, max_new_tokens: int = 64, adapter_name: str | None = None, **kwargs: Any
    ) -> list[str]:
        """Greedy generation (for quick checks; use a Sampler for RL rollouts).

        Args:
            prompts: strings (user messages) or lists of chat messages.
            max_new_tokens: tokens to generate per prompt.
            adapter_name: which adapter (default: the current one).

        Returns:
            The decoded completions.

        Example::

            model.generate(["who are you?"], max_new_tokens=32)
        """
        import torch

        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ValueError("generate: no tokenizer; call model.set_template('Template') first")
        state = self._state(adapter_name)
        template = state.template
        self._activate(state)
        answers: list[str] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for prompt in prompts:
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
                if template is not None:
                    ids = template.encode({"messages": messages}, add_generation_prompt=True)["input_ids"]
                else:
                    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                    if isinstance(ids, Mapping):
                        ids = ids["input_ids"]
                input_ids = torch.tensor([list(ids)], device=self.device)
                with torch.no_grad():
                    out = self.model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                        **kwargs,
                    )
                answers.append(tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True))
        finally:
            self.model.train(was_training)
        return answers

    @property
    def adapter_names(self) -> list[str]:
        """The added adapters, in order of addition."""
        return [n for n in self._states if n != FULL_MODEL]

    def state_of(self, adapter_name: str | None = None) -> AdapterState:
        """The :class:`AdapterState` of an adapter (optimizer, scheduler, counters...)."""
        return self._state(adapter_name)


# ---------------------------------------------------------------------- helpers
class _HostScalars:
    """Scalars (numbers or 0-d tensors) read on the host without making it wait for later GPU work.

    CUDA tensors are copied into pinned memory behind an event when this object is built;
    :meth:`values` waits for that event only, not for whatever was queued after it (a backward).

    Example::

        host = _HostScalars({"loss": loss})
        loss.backward()                  # queued
        host.values()["loss"]            # waits for the forward only
    """

    def __init__(self, scalars: Mapping[str, Any]) -> None:
        self._values: dict[str, float] = {}
        self._event: Any = None
        cuda = {}
        for key, value in scalars.items():
            if getattr(value, "is_cuda", False):
                cuda[key] = value
            else:
                self._values[key] = float(value.detach() if hasattr(value, "detach") else value)
        if cuda:
            import torch

            device = next(iter(cuda.values())).device
            stacked = torch.stack([v.detach().reshape(()).to(device, torch.float64) for v in cuda.values()])
            self._buffer = torch.empty(stacked.shape, dtype=torch.float64, pin_memory=True)
            self._buffer.copy_(stacked, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(device))
            self._keys = list(cuda)

    def values(self) -> dict[str, float]:
        """The floats (waits for the copies started in the constructor)."""
        if self._event is not None:
            self._event.synchronize()
            self._values.update(zip(self._keys, self._buffer.tolist()))
            self._event = None
        return self._values


def _by_device_and_dtype(tensors: Sequence[Any]) -> list[list[Any]]:
    """``tensors`` grouped by (device, dtype), the unit a multi-tensor kernel takes."""
    groups: dict[tuple[Any, Any], list[Any]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


@contextlib.contextmanager
def _no_grad() -> Iterator[None]:
    import torch

    with torch.no_grad():
        yield


def _per_row_logps(batch: Mapping[str, Any], logps: Any) -> list[list[float]]:
    """Per input row, the log-prob of each label (aligned with the row's labels; first position 0.0)."""
    values = logps.detach().float().cpu()
    row_ids = batch.get("row_ids")
    if row_ids is None:  # a batch of tensors given as is: one sequence per row, right-padded if masked
        mask = batch.get("attention_mask")
        lengths = mask.sum(-1).tolist() if mask is not None else [values.shape[1]] * values.shape[0]
        return [[0.0, *values[r, : int(n) - 1].tolist()] for r, n in enumerate(lengths)]
    rows = row_ids.cpu()
    result: list[list[float]] = []
    if rows.shape[0] == 1 and int(rows.max()) > 0:
        flat_rows, flat_vals = rows[0], values[0]
        count = int(flat_rows.max()) + 1
        offset = 0
        for r in range(count):
            n = int((flat_rows == r).sum())
            result.append([0.0, *flat_vals[offset : offset + n - 1].tolist()])
            offset += n
        return result
    for r in range(rows.shape[0]):
        n = int((rows[r] >= 0).sum())
        result.append([0.0, *values[r, : n - 1].tolist()])
    return result


def _untie(weights: dict[str, Any]) -> dict[str, Any]:
    """safetensors refuses shared storage: clone tensors that share memory with an earlier one."""
    seen: set[int] = set()
    out = {}
    for key, value in weights.items():
        ptr = value.data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def _replace_dir(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, trash)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(trash, target)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple, range)):
        return list(value)
    return str(value)
