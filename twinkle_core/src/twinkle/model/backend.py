"""The shared base of model backends and the named hooks a backend implements.

One job: the hook surface. :class:`BackendModel` implements the whole
:class:`~twinkle.model.base.TwinkleModel` protocol once (adapters and their settings,
token-normalized gradient accumulation, clip/step, metrics, checkpoints, generation: the
mixins of :mod:`twinkle.model.adapters`, :mod:`~twinkle.model.compute`,
:mod:`~twinkle.model.training`, :mod:`~twinkle.model.checkpoint`,
:mod:`~twinkle.model.generation`) and calls a backend through named hooks for what
touches the network itself, in the spirit of torchtitan's ``ModelSpec``:

=========================== ========= ===================================================
hook                        required  job
=========================== ========= ===================================================
``build_model``             yes       build the network on ``self.device`` (a torch module)
``run_forward``             yes       a prepared batch -> ModelOutput with ``logits``
``setup_distributed``       no        device, DeviceMesh, rank, world size (torchrun dp)
``parallelize``             no        wrap for data parallelism before the first compute
``model_config``            no        the transformers config (pad id, saved config.json)
``generation_config``       no        the generation config saved with full weights
``attach_adapter``          LoRA      add a LoRA adapter to the network; its parameters
``activate_adapter``        LoRA      make an adapter the one forwards use
``delete_adapter``          LoRA      remove an adapter from the network
``without_adapters``        LoRA      context: forwards use the base weights
``adapter_config``          LoRA      the peft config saved with an adapter
``trainable_parameters``    no        an adapter's (or the full model's) parameters now
``all_reduce_floats``       no        sum host numbers over the data-parallel ranks
``all_reduce_grads``        no        sum gradients over the data-parallel ranks
``reduce_gradients``        no        finish a window's gradients; the factor to apply
``clip_gradients``          no        clip; the total norm before clipping
``zero_gradients``          no        drop the gradients of a state
``build_optimizer``         no        an optimizer for a state (registry name/class/factory)
``scheduled_optimizer``     no        the optimizer an LR scheduler drives
``optimizer_state_dict``    no        the optimizer state to save (full, on every rank)
``load_optimizer_state_dict`` no      restore it
``export_weights``          save      a state's weights as ``{HF/peft name: CPU tensor}``
``load_adapter_weights``    load      load peft adapter weights into an adapter
``load_full_weights``       load      load transformers-named full weights
``write_original_layout``   no        full weights in a converted family's original layout
``generate_ids``            no        greedy new token ids for one prompt
=========================== ========= ===================================================

"required" yes: every backend; LoRA: to train adapters; save/load: to checkpoint. The
tuple :data:`BACKEND_HOOKS` lists them; docs/model.md ("Writing a backend") shows a
minimal backend, and ``tests/core/model/test_backend_contract.py`` pins the contract.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from twinkle.model.adapters import AdapterMixin
from twinkle.model.base import TwinkleModel
from twinkle.model.checkpoint import CheckpointMixin
from twinkle.model.compute import ComputeMixin
from twinkle.model.files import parse_dtype, resolve_model_dir
from twinkle.model.generation import GenerationMixin
from twinkle.model.state import FULL_MODEL, AdapterState
from twinkle.model.training import TrainingMixin

#: The hooks a backend may implement (see the module docstring for which are required).
BACKEND_HOOKS = (
    "build_model",
    "run_forward",
    "setup_distributed",
    "parallelize",
    "model_config",
    "generation_config",
    "attach_adapter",
    "activate_adapter",
    "delete_adapter",
    "without_adapters",
    "adapter_config",
    "trainable_parameters",
    "all_reduce_floats",
    "all_reduce_grads",
    "reduce_gradients",
    "clip_gradients",
    "zero_gradients",
    "build_optimizer",
    "scheduled_optimizer",
    "optimizer_state_dict",
    "load_optimizer_state_dict",
    "export_weights",
    "load_adapter_weights",
    "load_full_weights",
    "write_original_layout",
    "generate_ids",
)


def _not_implemented(self: Any, hook: str, why: str) -> NotImplementedError:
    return NotImplementedError(f"{type(self).__name__} does not implement the backend hook {hook!r} ({why})")


class BackendModel(AdapterMixin, ComputeMixin, TrainingMixin, CheckpointMixin, GenerationMixin, TwinkleModel):
    """The TwinkleModel protocol implemented once; a backend subclasses it and implements hooks.

    The constructor validates the common arguments, places the model
    (:meth:`setup_distributed`), resolves ``model_id`` to a directory, calls
    :meth:`build_model` and creates the full model's training state. A backend stores its
    own options *before* calling ``super().__init__`` (``build_model`` runs inside it).

    Args:
        model_id: a local directory or a hub id (``ms://org/name``, ``hf://org/name``).
        config: a config (object or dict) to build a randomly initialized model from instead.
        torch_dtype: parameter dtype name or ``torch.dtype`` (see :func:`twinkle.model.files.parse_dtype`).
        mixed_precision: ``'bf16'`` / ``'fp16'`` autocast for the forward, or ``None``.
        device_mesh: the DeviceMesh (default: the runtime's, else all ranks as ``dp``).
        remote_group: the DeviceGroup to run on (ray/http modes).
        seed: random initialization and LoRA initialization seed (default: runtime's, else 42).
        device: ``'cpu'``/``'cuda'``/``'cuda:1'`` (default: this rank's GPU if available).

    Attributes set here, read by hooks: ``seed``, ``model_id``, ``model_dir``, ``device``,
    ``device_mesh``, ``rank``, ``world_size``, ``autocast_dtype``, ``model`` (the network),
    ``base_parameter_names``, ``parallelized``.

    Raises:
        ValueError: neither or both of ``model_id`` and ``config``; a bad dtype or mixed precision.
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
    ) -> None:
        import torch

        from twinkle.runtime import current_runtime

        owner = type(self).__name__
        if (model_id is None) == (config is None):
            raise ValueError(f"{owner} needs exactly one of model_id=... (directory or hub id) or config=...")
        if mixed_precision not in (None, "bf16", "fp16", "no"):
            raise ValueError(f"mixed_precision={mixed_precision!r}; use 'bf16', 'fp16' or None")
        runtime = current_runtime()
        if seed is None:
            seed = runtime.seed if runtime is not None and runtime.seed is not None else 42
        self.seed = seed
        self.model_id = model_id
        self.remote_group = remote_group
        #: the autocast dtype of the forward (``None``: no autocast); ``run_forward`` applies it
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "")
        self.setup_distributed(device_mesh, device, runtime)
        self.model_dir = resolve_model_dir(model_id) if model_id is not None else None
        self.parallelized = False
        self.model = self.build_model(config, parse_dtype(torch_dtype))
        self.model.train()
        self.base_parameter_names = [n for n, _ in self.model.named_parameters()]
        self._active: str | None = None
        self._states: dict[str, AdapterState] = {}
        self._default = FULL_MODEL
        self._states[FULL_MODEL] = self._new_state(FULL_MODEL, list(self.model.parameters()), 1)

    # ------------------------------------------------------------------ build hooks
    def build_model(self, config: Any, dtype: Any) -> Any:
        """Hook (required): build the network on ``self.device`` and return it (a ``torch.nn.Module``).

        Args:
            config: the ``config=`` argument (object or dict), or ``None``: build from
                ``self.model_dir`` (weights when :func:`twinkle.model.files.has_weights`, else
                a random init seeded with ``self.seed``).
            dtype: the parsed ``torch_dtype`` (a ``torch.dtype``, ``'auto'`` or ``None``).
        """
        raise _not_implemented(self, "build_model", "build the network")

    def run_forward(self, batch: Any) -> Any:
        """Hook (required): run the network on a prepared batch (tensors on ``self.device``).

        ``batch`` is what the adapter's InputProcessor returns: ``input_ids``, ``labels``,
        ``shift_labels``, optionally ``attention_mask``, ``position_ids`` and the packed-
        sequence fields. Apply ``self.autocast_dtype`` when set.

        Returns:
            A :class:`~twinkle.data_format.output.ModelOutput` with ``logits`` ``[B, T, V]``
            (or a ``HiddenStatesOutput`` for the fused loss).
        """
        raise _not_implemented(self, "run_forward", "run the network")

    def setup_distributed(self, device_mesh: Any, device: Any, runtime: Any) -> None:
        """Hook: set ``self.device``, ``self.device_mesh``, ``self.rank`` and ``self.world_size``.

        The default places one process per torchrun rank on a ``dp``/``fsdp`` mesh
        (:func:`twinkle.model.distributed.setup_torchrun`) and starts the process group.
        """
        from twinkle.model.distributed import setup_torchrun

        placement = setup_torchrun(device_mesh, device, runtime, owner=type(self).__name__)
        self.device, self.device_mesh = placement.device, placement.device_mesh
        self.rank, self.world_size = placement.rank, placement.world_size

    def parallelize(self) -> None:
        """Hook: wrap the network for data parallelism; called once, before the first compute on >1 rank.

        The default does nothing (gradients are all-reduced by :meth:`reduce_gradients`).
        """

    def model_config(self) -> Any:
        """Hook: the transformers config of the network (pad token id; ``config.json`` of full saves)."""
        return getattr(self.model, "config", None)

    def generation_config(self) -> Any:
        """Hook: the generation config saved with full weights (and its end tokens), or ``None``."""
        return getattr(self.model, "generation_config", None)

    # ------------------------------------------------------------------ adapter hooks
    def attach_adapter(self, adapter_name: str, config: Any) -> list[Any]:
        """Hook (LoRA): add the adapter described by the peft ``config`` to the network.

        Runs under a forked RNG seeded for the adapter. The first adapter freezes the base
        weights.

        Returns:
            The adapter's parameters (its optimizer trains these).
        """
        raise _not_implemented(self, "attach_adapter", "LoRA adapters")

    def activate_adapter(self, adapter_name: str) -> None:
        """Hook (LoRA): make ``adapter_name`` the adapter forwards (and gradients) use."""
        raise _not_implemented(self, "activate_adapter", "LoRA adapters")

    def delete_adapter(self, adapter_name: str) -> None:
        """Hook (LoRA): remove an adapter from the network."""
        raise _not_implemented(self, "delete_adapter", "removing adapters")

    @contextlib.contextmanager
    def without_adapters(self) -> Iterator[None]:
        """Hook (LoRA): a context in which forwards use the base weights only."""
        raise _not_implemented(self, "without_adapters", "disabling adapters")
        yield  # pragma: no cover

    def adapter_config(self, adapter_name: str) -> Any:
        """Hook (LoRA, save): the peft config written as ``adapter_config.json``."""
        raise _not_implemented(self, "adapter_config", "saving adapters")

    def trainable_parameters(self, state: AdapterState) -> list[Any]:
        """Hook: the parameters ``state`` trains as they are now (after sharding replaced them)."""
        if state.name == FULL_MODEL:
            return [p for p in self.model.parameters() if p.requires_grad]
        marker = f".{state.name}."
        return [p for n, p in self.model.named_parameters() if marker in n]

    # ------------------------------------------------------------------ reduction hooks
    def all_reduce_floats(self, values: list[float]) -> list[float]:
        """Hook: the sum of host numbers over the data-parallel ranks (token counts, loss sums)."""
        from twinkle.model.distributed import all_reduce_floats

        return all_reduce_floats(values, self.device)

    def all_reduce_grads(self, grads: list[Any]) -> None:
        """Hook: sum gradients over the data-parallel ranks, in place."""
        from twinkle.model.distributed import all_reduce_grads

        all_reduce_grads(grads)

    def reduce_gradients(self, state: AdapterState, tokens: float) -> float:
        """Hook: reduce the window's gradients over the data ranks; the factor still to multiply them by.

        Args:
            state: the training state whose window ends.
            tokens: the window's token count summed over the data-parallel ranks.

        Returns:
            ``1 / tokens`` by default (gradients are sums): :meth:`finish_gradients` applies it.
        """
        if self.world_size > 1:
            self.all_reduce_grads([p.grad for p in state.params if p.grad is not None])
        return 1.0 / tokens if tokens else 0.0

    def zero_gradients(self, state: AdapterState) -> None:
        """Hook: drop the gradients of ``state``'s parameters."""
        for p in state.params:
            p.grad = None

    # ------------------------------------------------------------------ optimizer hooks
    def build_optimizer(self, state: AdapterState, optimizer_cls: Any, kwargs: dict[str, Any]) -> Any:
        """Hook: the optimizer of ``state`` (``optimizer_cls``: registry name, class or factory)."""
        factory = self._registry().resolve("optimizer", optimizer_cls)
        params = [p for p in state.params if p.requires_grad or state.name != FULL_MODEL]
        if self.world_size > 1 and self.device_mesh.fsdp > 1:
            self._activate(state)
            params = self.trainable_parameters(state)
        if "lr" in kwargs:
            kwargs["lr"] = float(kwargs["lr"])
        from twinkle.patch.fastpath import optimizer_kwargs

        kwargs = optimizer_kwargs(self.model, factory, params, kwargs)
        return factory(params, **kwargs)

    def scheduled_optimizer(self, state: AdapterState) -> Any:
        """Hook: the (torch) optimizer whose learning rate an LR scheduler of ``state`` drives."""
        return state.optimizer

    def optimizer_state_dict(self, state: AdapterState) -> dict[str, Any]:
        """Hook: the optimizer state to save (complete, even when the optimizer is sharded)."""
        return state.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: AdapterState, optimizer_state: dict[str, Any]) -> None:
        """Hook: restore what :meth:`optimizer_state_dict` returned."""
        state.optimizer.load_state_dict(optimizer_state)

    # ------------------------------------------------------------------ weight hooks
    def export_weights(self, state: AdapterState, **options: Any) -> dict[str, Any]:
        """Hook (save): ``state``'s weights as CPU tensors: peft names for an adapter, transformers names else.

        Raises:
            ValueError: the full model's weights while adapters are trained.
        """
        raise _not_implemented(self, "export_weights", "saving weights")

    def load_adapter_weights(self, adapter_name: str, state_dict: dict[str, Any], path: Any) -> None:
        """Hook (load): load peft-named adapter weights read from ``path``.

        Raises:
            CheckpointError: weights that do not fit the adapter.
        """
        raise _not_implemented(self, "load_adapter_weights", "loading adapters")

    def load_full_weights(self, state_dict: dict[str, Any], path: Any) -> None:
        """Hook (load): load transformers-named full weights read from ``path``.

        Raises:
            CheckpointError: weights that do not fit the model.
        """
        raise _not_implemented(self, "load_full_weights", "loading full weights")

    def write_original_layout(self, directory: Any, weights: dict[str, Any]) -> None:
        """Hook: write full weights in the original layout of a converted checkpoint (``save(original_layout=True)``).

        Raises:
            CheckpointError: the backend has no original layout to write.
        """
        from twinkle.model.checkpoint import CheckpointError

        raise CheckpointError(f"save(original_layout=True): {type(self).__name__} has no original layout to write")
