"""Adapters and their settings: which adapter a call trains, and what it trains with.

One job: the per-adapter registry of a backend. Every adapter (or the full model, under
:data:`~twinkle.model.state.FULL_MODEL`) has one :class:`~twinkle.model.state.AdapterState`
with its loss, optimizer, scheduler, template, processor and metrics;
``add_adapter_to_model`` / ``remove_adapter`` maintain the registry and call the
backend's ``attach_adapter`` / ``activate_adapter`` / ``delete_adapter`` hooks for the
network itself. Mixed into :class:`~twinkle.model.backend.BackendModel`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

from twinkle.dispatch import remote
from twinkle.model.state import FULL_MODEL, AdapterState


class AdapterMixin:
    """Per-adapter state and the ``set_*`` configuration methods of the TwinkleModel protocol."""

    _states: dict[str, AdapterState]
    _default: str
    _active: str | None

    # ------------------------------------------------------------------ registry
    def _new_state(self, name: str, params: list[Any], gradient_accumulation_steps: int) -> AdapterState:
        from twinkle.loss.cross_entropy import CrossEntropyLoss
        from twinkle.metric.accuracy import TokenAccuracy
        from twinkle.processor.base import InputProcessor

        pad_id = getattr(self.model_config(), "pad_token_id", None) or 0
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

    def state_of(self, adapter_name: str | None = None) -> AdapterState:
        """The :class:`AdapterState` of an adapter (optimizer, scheduler, counters...).

        Raises:
            KeyError: no such adapter (the message lists the added ones).
        """
        return self._state(adapter_name)

    @property
    def adapter_names(self) -> list[str]:
        """The added adapters, in order of addition."""
        return [n for n in self._states if n != FULL_MODEL]

    @property
    def adapter_states(self) -> dict[str, AdapterState]:
        """Every training state by name: the adapters, or ``{FULL_MODEL: state}`` before any was added."""
        return dict(self._states)

    @property
    def has_adapters(self) -> bool:
        """Whether LoRA adapters were added (then the base weights are frozen)."""
        return FULL_MODEL not in self._states

    @property
    def active_adapter(self) -> str | None:
        """The adapter the network currently runs with (``None``: none yet, or the full model)."""
        return self._active

    def _activate(self, state: AdapterState) -> None:
        if self.has_adapters and state.name != FULL_MODEL and self._active != state.name:
            self.activate_adapter(state.name)
            self._active = state.name
        self._ensure_parallel()

    def _ensure_parallel(self) -> None:
        if self.parallelized or self.world_size == 1:
            return
        self.parallelize()
        self.parallelized = True

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
                a configuration the backend refuses (e.g. adding after FSDP wrapped the model).

        Example::

            model.add_adapter_to_model("tenant_a", LoraConfig(r=8, target_modules="all-linear"))
        """
        import torch
        from peft import LoraConfig

        if not isinstance(adapter_name, str) or not adapter_name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"adapter_name {adapter_name!r} must be letters, digits, '_' or '-'")
        if adapter_name in self._states:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; pick another name")
        if any(f".{adapter_name}." in f".{n}." for n in self.base_parameter_names):
            raise ValueError(f"adapter_name {adapter_name!r} clashes with a module name of the model; pick another")
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        if isinstance(config, Mapping):
            config = LoraConfig(**{**config, **kwargs})
        elif kwargs:
            config = type(config)(**{**config.to_dict(), **kwargs})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + sum(map(ord, adapter_name)))
            params = self.attach_adapter(adapter_name, config)
        if not params:
            raise ValueError(f"adapter {adapter_name!r} added no parameters; check target_modules in its config")
        for p in params:
            p.requires_grad_(True)
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
        self.delete_adapter(adapter_name)
        del self._states[adapter_name]
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
        if not self.has_adapters:
            yield
            return
        with self.without_adapters():
            yield

    # ------------------------------------------------------------------ configuration
    def _registry(self) -> Any:
        from twinkle.runtime import get_registry

        return get_registry()

    def _instantiate(self, kind: str, value: Any, kwargs: dict[str, Any]) -> Any:
        if isinstance(value, (str, type)):
            return self._registry().resolve(kind, value)(**kwargs)
        if kwargs:
            raise TypeError(f"{kind}: keyword arguments {sorted(kwargs)} go with a name or class, not an instance")
        return value

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
            **kwargs: optimizer arguments (``lr=1e-4``, ``weight_decay=0.01``); a backend may
                take more (MegatronModel: ``use_megatron_optimizer=True``).

        Example::

            model.set_optimizer(optimizer_cls="AdamW", lr=1e-4)
        """
        state = self._state(adapter_name)
        state.optimizer = self.build_optimizer(state, optimizer_cls, kwargs)
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
        state.lr_scheduler = factory(self.scheduled_optimizer(state), **kwargs)
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

    @property
    def tokenizer(self) -> Any:
        """The tokenizer: the current template's, else one loaded from the model directory, else ``None``."""
        state = self._states.get(self._default)
        template = state.template if state is not None else None
        if template is not None and getattr(template, "tokenizer", None) is not None:
            return template.tokenizer
        if getattr(self, "_tokenizer", None) is None and self.model_dir is not None:
            self._tokenizer = None
            import os

            if os.path.isfile(os.path.join(self.model_dir, "tokenizer_config.json")):
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return getattr(self, "_tokenizer", None)
