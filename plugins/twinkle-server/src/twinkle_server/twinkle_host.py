"""The objects the twinkle client API hosts for its tenants, and how their calls run.

:class:`TwinkleHost` (one per server, :func:`host`) builds a client's ``TransformersModel``,
``TorchSampler`` or ``LocalCheckpointEngine`` as a :class:`HostedObject` owned by its tenant and
runs its remote methods on the worker thread:

* a model trains its adapters on the engine's one shared ``TransformersModel`` under
  tenant-scoped names (admitted against the adapter pool and the tenant's quota), or, when it
  trains before adding an adapter, on a private copy of the base; the shared base is never trained;
* checkpoint directories map into the tenant's own folder, and adapter checkpoints that hold
  anything but LoRA weights are refused;
* arguments that name another object resolve to the same tenant's objects only;
* objects idle past ``ServerConfig.run_idle_s`` are parked or released (:func:`expire_idle_objects`).

The routes of ``/twinkle/v1`` that reach these objects are :mod:`twinkle_server.twinkle_api`.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twinkle_server import checkpoints as ckpt
from twinkle_server.adapter_pool import AdapterPoolFull
from twinkle_server.policy import check_adapter_options, check_finite_tree, served_model_ids
from twinkle_server.quotas import QuotaExceeded
from twinkle_server.scheduler import UserError
from twinkle_server.state import ServerState
from twinkle_server.store import Tenant

__all__ = ["HostedObject", "TwinkleHost", "expire_idle_objects", "host"]

_ADAPTER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: methods whose first argument is a checkpoint directory (mapped into the tenant's folder).
_PATH_METHODS = {
    "save": "output_dir",
    "export": "output_dir",
    "load": "checkpoint_dir",
    "resume_from_checkpoint": "checkpoint_dir",
}
#: path methods that write (the others read an existing checkpoint).
_WRITES = {"save", "export"}
#: methods that need no adapter.
_NO_ADAPTER = {"add_adapter_to_model", "load", "resume_from_checkpoint"}
#: methods whose arguments are settings (never data): non-finite numbers are refused.
_CONFIG_METHODS = {
    "add_adapter_to_model",
    "set_optimizer",
    "set_lr_scheduler",
    "set_loss",
    "set_processor",
    "set_template",
    "clip_grad_and_step",
    "clip_grad_norm",
    "step",
}


@dataclass
class HostedObject:
    """A client's object: its owner, kind, and either its adapters on the shared model or its own instance.

    ``instance`` is None for a model on the shared base (``adapters`` maps user name -> scoped
    name); otherwise it is the object's private model, sampler or checkpoint engine.
    """

    id: str
    tenant_id: str
    adapters: dict[str, str] = field(default_factory=dict)
    current: str | None = None
    kind: str = "model"
    instance: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    tenant: Tenant | None = None
    #: ``time.time()`` of the object's last request (idle objects are unloaded like idle runs)
    last_used: float = field(default_factory=time.time)
    #: unloaded for idleness: its adapters hold no memory and it holds no quota until its next call
    parked: bool = False


class _AdapterView:
    """A shared-model object as a checkpoint engine sees it: only its own adapters, under the user's names."""

    def __init__(self, model: Any, obj: HostedObject, engine: Any = None) -> None:
        self._model = model
        self._obj = obj
        self._engine = engine
        peft = getattr(model, "_peft", None)
        configs = getattr(peft, "peft_config", {}) or {}
        self.model = SimpleNamespace(peft_config={name: configs.get(s) for name, s in obj.adapters.items()})

    def adapter_names(self) -> list[str]:
        """The object's adapters (user names)."""
        return list(self._obj.adapters)

    def get_state_dict(self, *, adapter_name: str | None = None) -> dict[str, Any]:
        """One adapter's LoRA tensors; the shared base cannot be exported."""
        if adapter_name is None:
            raise UserError("sync(model, sampler): this model trains on the shared base; pass adapter_name=...")
        if adapter_name not in self._obj.adapters:
            raise UserError(f"no adapter named {adapter_name!r}; added: {', '.join(self._obj.adapters) or '(none)'}")
        scoped = self._obj.adapters[adapter_name]
        with self._engine.using([scoped]) if self._engine is not None else contextlib.nullcontext():
            return self._model.get_state_dict(adapter_name=scoped)


class TwinkleHost:
    """The server-side ``TransformersModel`` and the objects built on it (touched by the worker only)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.objects: dict[str, HostedObject] = {}
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def model(self) -> Any:
        """The shared model: the engine's core ``TransformersModel`` (:class:`~twinkle_server.engine.LoRAEngine`).

        Every model object's adapters live on it under tenant-scoped names, beside the Tinker
        runs' adapters: one set of base weights and one training engine for both APIs.
        """
        if self._model is None:
            model = self.state.engine.core
            # a step whose loss or gradient norm is not finite is skipped and reported, the adapter unchanged
            model.skip_nonfinite_steps = True
            self._model = model
        return self._model

    def methods(self, kind: str = "model") -> set[str]:
        """The methods a client may call on an object of ``kind``."""
        from twinkle.dispatch import remote_methods

        if kind == "checkpoint_engine":
            return {"sync"}
        if kind == "sampler":
            from twinkle.sampler.torch_sampler import TorchSampler

            return set(remote_methods(TorchSampler))
        from twinkle.model.transformers_model import TransformersModel

        return set(remote_methods(TransformersModel))

    def build(self, obj: HostedObject, cls: str) -> None:
        """(Worker) build the object's private instance (samplers, engines) or make sure the shared model exists."""
        from twinkle.launcher.http import build_locally

        with build_locally():
            if obj.kind == "sampler":
                from twinkle.sampler.torch_sampler import TorchSampler

                obj.instance = TorchSampler(
                    model_id=str(self.state.config.model_dir), device=self.state.engine.device, **obj.options
                )
            elif obj.kind == "checkpoint_engine":
                from twinkle.checkpoint_engine.local import LocalCheckpointEngine

                obj.instance = LocalCheckpointEngine()
            else:
                _ = self.model

    def _private_model(self, obj: HostedObject) -> Any:
        """(Worker) give a model object its own copy of the base model (full-parameter training)."""
        from twinkle.launcher.http import build_locally
        from twinkle.model.transformers_model import TransformersModel

        with build_locally():
            obj.instance = TransformersModel(
                model_id=str(self.state.config.model_dir), device=self.state.engine.device, **obj.options
            )
        obj.instance.skip_nonfinite_steps = True
        return obj.instance

    def resolve(self, value: Any, tenant_id: str) -> Any:
        """Replace object references in ``value`` by the tenant's own objects (a view for shared models).

        Raises:
            UserError: an id that is not one of this tenant's objects.
        """
        from twinkle.client.codec import ObjectRef

        if isinstance(value, list):
            return [self.resolve(v, tenant_id) for v in value]
        if isinstance(value, dict):
            return {k: self.resolve(v, tenant_id) for k, v in value.items()}
        if not isinstance(value, ObjectRef):
            return value
        obj = self.objects.get(value.object_id)
        if obj is None or obj.tenant_id != tenant_id:
            raise UserError(f"object {value.object_id!r} not found (objects are private to their tenant)")
        if obj.instance is not None:
            return obj.instance
        return _AdapterView(self.model, obj, self.state.pool)

    def folder(self, tenant_id: str) -> Path:
        """The tenant's checkpoint folder for http-mode saves."""
        return self.state.config.state_dir / "twinkle-checkpoints" / ckpt.check_run_id(tenant_id)

    def call(self, obj: HostedObject, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """(Worker) run one method of ``obj`` (on its own instance, or for its adapters on the shared model)."""
        with self.state.engine.lock:
            if self.objects.get(obj.id) is not obj:  # deleted (or expired) while this call was queued
                raise UserError(f"object {obj.id!r} was deleted before this call ran")
            return self._call(obj, method, args, kwargs)

    def _call(self, obj: HostedObject, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if "dataloader" in kwargs:
            raise UserError("dataloader= cannot be sent in http mode; the data loader stays in your process")
        args, kwargs = self.resolve(args, obj.tenant_id), self.resolve(kwargs, obj.tenant_id)
        if method in _CONFIG_METHODS:  # NaN/Inf settings (a learning rate, a clip threshold) are refused
            check_finite_tree(method, [args, kwargs])
        if not (obj.kind == "sampler" and method == "set_template"):  # the sampler maps its own below
            config = self.state.config
            served = {config.model_name, str(config.model_dir)}
            args = served_model_ids(args, served, str(config.model_dir), where=method)
            kwargs = served_model_ids(kwargs, served, str(config.model_dir), where=method)
        if obj.kind == "model" and obj.instance is None and not obj.adapters and self._trains_base(obj, method, kwargs):
            self._private_model(obj)
        if obj.instance is not None:
            if obj.kind == "sampler":
                args, kwargs = self._sampler_arguments(obj, method, args, kwargs)
            elif method in _PATH_METHODS:
                args, kwargs = self._map_path(obj, method, args, kwargs)
            fn = getattr(obj.instance, method)
            _bind(fn, method, args, kwargs)
            result = fn(*args, **kwargs)
            return Path(str(result)).name if method in _WRITES else result
        model = self.model
        fn = getattr(model, method)
        params = inspect.signature(fn).parameters
        if method == "add_adapter_to_model":
            if not args and "adapter_name" not in kwargs:
                raise UserError("add_adapter_to_model needs an adapter name")
            name = args[0] if args else kwargs.pop("adapter_name")
            args = list(args[1:])
            if not isinstance(name, str) or not _ADAPTER.fullmatch(name):
                raise UserError(f"adapter name {name!r}: use 1-64 letters, digits, '_' or '-'")
            if name in obj.adapters:
                raise UserError(f"this model already has an adapter named {name!r}")
            if len(args) > 2:
                raise UserError("add_adapter_to_model takes (adapter_name, config, gradient_accumulation_steps)")
            config = args[0] if args else kwargs.get("config")
            options = {k: v for k, v in kwargs.items() if k != "config"}
            if len(args) > 1:
                options["gradient_accumulation_steps"] = args[1]
            check_adapter_options(config, options, max_rank=self.state.config.max_rank)
            _bind(model.add_adapter_to_model, method, [f"{obj.id}_{name}", *args], kwargs)
            self._admit(obj, model, name, args, kwargs)
            return None
        if method == "remove_adapter":
            if len(args) > 1 or set(kwargs) - {"adapter_name"}:
                raise UserError("remove_adapter takes one argument, the adapter name")
            user_name = args[0] if args else kwargs.get("adapter_name")
            if user_name not in obj.adapters:
                raise UserError(f"no adapter named {user_name!r}; added: {', '.join(obj.adapters) or '(none)'}")
            with self.state.pool.using([]):  # the pool's lock: nothing pages while the adapter goes
                self.state.pool.disown(obj.adapters[user_name])
                model.remove_adapter(obj.adapters[user_name])
            del obj.adapters[user_name]
            if obj.current == user_name:
                obj.current = next(iter(obj.adapters), None)
            self.state.admission.hold(self._tenant(obj), obj.id, max(1, len(obj.adapters)))
            return None
        if method in _PATH_METHODS:
            args, kwargs = self._map_path(obj, method, args, kwargs)
            directory = Path(kwargs[_PATH_METHODS[method]])
            if method not in _WRITES and not (directory / "adapter_config.json").is_file():
                if not obj.adapters and self._private_left(obj):
                    return getattr(self._private_model(obj), method)(*args, **kwargs)
                raise UserError(
                    f"{directory.name!r} holds full weights, which cannot load into the shared base model; "
                    "load LoRA adapter checkpoints here, or load full weights into a model that trains full parameters"
                )
            if method not in _WRITES:
                _check_adapter_weights(directory)
        if "adapter_name" in params:
            user_name = kwargs.pop("adapter_name", None) or obj.current
            if user_name is None:
                if method not in _NO_ADAPTER:
                    raise UserError(
                        f"{method}: add a LoRA adapter first (model.add_adapter_to_model('default', LoraConfig(...))); "
                        "http mode never trains the shared base model, and this tenant's "
                        f"{self.state.config.max_private_models_per_tenant} full-parameter model(s) are in use"
                    )
                user_name = "default"
            if user_name not in obj.adapters:
                if method in ("load", "resume_from_checkpoint"):
                    if not isinstance(user_name, str) or not _ADAPTER.fullmatch(user_name):
                        raise UserError(f"adapter name {user_name!r}: use 1-64 letters, digits, '_' or '-'")
                    self._admit_checkpoint(obj, model, user_name, Path(kwargs[_PATH_METHODS[method]]))
                else:
                    raise UserError(f"no adapter named {user_name!r}; added: {', '.join(obj.adapters) or '(none)'}")
            kwargs["adapter_name"] = obj.adapters[user_name]
        _bind(fn, method, args, kwargs)
        pool = self.state.pool
        with pool.using([kwargs["adapter_name"]] if "adapter_name" in kwargs else []):  # paged in, held
            result = fn(*args, **kwargs)
        for scoped in obj.adapters.values():  # load / resume_from_checkpoint may have added one
            if scoped in getattr(model, "adapter_names", ()) and not pool.owns(scoped):
                pool.adopt(scoped)
        if method in _WRITES:
            return Path(str(result)).name
        return result

    def _admit(self, obj: HostedObject, model: Any, name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        """(Worker) add the object's adapter ``name`` to the shared model: quota held, base weights kept frozen."""
        scoped = f"{obj.id}_{name}"
        # the object's first adapter is covered by the object itself; each further one is one more unit
        self.state.admission.hold(self._tenant(obj), obj.id, max(1, len(obj.adapters) + 1))
        own = model.state_of(obj.adapters[obj.current]) if obj.current in obj.adapters else None
        try:
            model.add_adapter_to_model(scoped, *args, **kwargs)
        except BaseException:
            self.state.admission.hold(self._tenant(obj), obj.id, max(1, len(obj.adapters)))
            raise
        _inherit_settings(model, scoped, own)
        trained = self.state.engine.trainable_base_weights()
        if trained:  # any other option that unfroze base weights: undo it and refuse
            for param in self.state.engine.base_parameters.values():
                param.requires_grad_(False)
            try:
                model.remove_adapter(scoped)
            except ValueError:  # the model's only adapter stays, unused and frozen
                pass
            self.state.admission.hold(self._tenant(obj), obj.id, max(1, len(obj.adapters)))
            raise UserError(
                f"this adapter config would train the shared base model's weights ({trained[0]}, ...); "
                "use bias='none' and no base-weight options, or train full parameters on a model without adapters"
            )
        try:  # into the adapter pool: a full pool is a 503, and the adapter goes again
            self.state.pool.adopt(scoped)
        except AdapterPoolFull as exc:
            model.remove_adapter(scoped)
            self.state.admission.hold(self._tenant(obj), obj.id, max(1, len(obj.adapters)))
            raise QuotaExceeded(str(exc), 503, retry_after=exc.retry_after) from None
        obj.adapters[name] = scoped
        obj.current = name

    def _admit_checkpoint(self, obj: HostedObject, model: Any, name: str, directory: Path) -> None:
        """(Worker) a checkpoint loading into a new adapter passes the same checks as ``add_adapter_to_model``.

        Its ``adapter_config.json`` may come from a private full-parameter model (where any
        option is allowed): an option that would write the shared base, a rank over the limit
        or one adapter too many is refused before peft sees it.
        """
        from peft import PeftConfig

        try:
            config = PeftConfig.from_pretrained(str(directory))
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"{directory.name!r}: unreadable adapter_config.json ({exc})") from None
        # metadata peft writes on save, not options
        for key, value in (("base_model_name_or_path", None), ("revision", None), ("inference_mode", False)):
            if hasattr(config, key):
                setattr(config, key, value)
        check_adapter_options(config, {}, max_rank=self.state.config.max_rank)
        self._admit(obj, model, name, [config], {})

    def _tenant(self, obj: HostedObject) -> Tenant:
        return obj.tenant or Tenant(obj.tenant_id, obj.tenant_id)

    def _trains_base(self, obj: HostedObject, method: str, kwargs: dict[str, Any]) -> bool:
        """Whether ``method`` on an adapter-less model object trains the base and may get a private copy."""
        if method in _NO_ADAPTER or kwargs.get("adapter_name"):
            return False
        try:
            from twinkle.model.transformers_model import TransformersModel

            params = inspect.signature(getattr(TransformersModel, method)).parameters
        except (AttributeError, TypeError, ValueError):
            return False
        if "adapter_name" not in params:
            return False
        return self._private_left(obj)

    def _private_left(self, obj: HostedObject) -> bool:
        """Whether ``obj``'s tenant may get one more private full-parameter model."""
        private = sum(
            1
            for o in self.objects.values()
            if o.tenant_id == obj.tenant_id and o.kind == "model" and o.instance is not None
        )
        return private < self.state.config.max_private_models_per_tenant

    def _sampler_arguments(
        self, obj: HostedObject, method: str, args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Keep a sampler's file arguments inside the tenant's folder and its template on the served model."""
        if method == "add_adapter":
            config = args[1] if len(args) > 1 else kwargs.get("config")
            if isinstance(config, str):
                name = ckpt.check_name(config, "adapter directory")
                path = self.folder(obj.tenant_id) / name
                if not path.exists():
                    raise UserError(f"no checkpoint named {name!r} (names are private to your tenant)")
                if len(args) > 1:
                    args = [args[0], str(path), *args[2:]]
                else:
                    kwargs["config"] = str(path)
        if method == "set_template":
            model_id = kwargs.pop("model_id", None)
            served = {None, self.state.config.model_name, str(self.state.config.model_dir)}
            if model_id not in served or (args and not isinstance(args[0], str)):
                raise UserError("set_template: pass a registered template name; the tokenizer is the served model's")
            kwargs["model_id"] = str(self.state.config.model_dir)
        return args, kwargs

    def _map_path(
        self, obj: HostedObject, method: str, args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Turn the checkpoint-directory argument into a path inside the tenant's folder."""
        key = _PATH_METHODS[method]
        raw = args[0] if args else kwargs.pop(key, None)
        args = list(args[1:])
        name = ckpt.check_name(str(raw), "checkpoint directory")
        kwargs[key] = str(self.folder(obj.tenant_id) / name)
        if method not in _WRITES and not Path(kwargs[key]).exists():
            raise UserError(f"no checkpoint named {name!r} (names are private to your tenant)")
        return args, kwargs

    def release(self, obj: HostedObject) -> None:
        """(Worker) drop an object's adapters from the hosted model (or its private instance)."""
        with self.state.engine.lock:
            self._release(obj)

    def _release(self, obj: HostedObject) -> None:
        if obj.instance is not None:
            obj.instance = None
            return
        model = self._model
        if model is None:
            return
        remover = getattr(model, "remove_adapter", None)
        for scoped in obj.adapters.values():
            self.state.pool.disown(scoped)
            if remover is not None:
                try:
                    remover(scoped)
                except (KeyError, ValueError):
                    continue

    def park(self, obj: HostedObject, before: float) -> bool:
        """(Worker) unload an idle object's adapters (they come back on its next call) and free its
        quota units, unless a request touched it since ``before``; returns whether it was parked."""
        if obj.parked or obj.last_used >= before or self.objects.get(obj.id) is not obj:
            return False
        pool = self.state.pool
        for scoped in obj.adapters.values():
            pool.park_adapter(scoped)
        obj.parked = True
        self.state.admission.release(obj.tenant_id, obj.id)
        return True

    def unpark(self, obj: HostedObject, tenant: Tenant) -> None:
        """Count a parked object against its tenant's quota again (its adapters reload on use).

        Raises:
            QuotaExceeded: 403 when the tenant's limit has no room for it now.
        """
        if not obj.parked:
            return
        try:
            self.state.admission.hold(tenant, obj.id, max(1, len(obj.adapters)))
        except QuotaExceeded as exc:
            raise QuotaExceeded(
                f"object {obj.id} was unloaded after {self.state.config.run_idle_s:.0f} s idle and reloading it "
                f"would exceed the tenant's limit: {exc}"
            ) from None
        obj.parked = False


def _check_adapter_weights(directory: Path) -> None:
    """Refuse an adapter checkpoint holding any tensor that is not a LoRA matrix.

    peft loads a key without ``lora_`` (a ``modules_to_save`` copy saved by a private model,
    or a crafted base-weight name) straight into the model: on the shared model, into the
    base every tenant uses.
    """
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the client's checkpoint problem
            raise UserError(f"{directory.name!r}: unreadable weights {file.name!r} ({exc})") from None
        foreign = [k for k in keys if ".lora_" not in k]
        if foreign:
            raise UserError(
                f"{directory.name!r} holds {len(foreign)} tensor(s) that are not LoRA weights ({foreign[0]}, ...); "
                "only LoRA adapter weights load into the shared base model"
            )


def _inherit_settings(model: Any, scoped: str, own: Any) -> None:
    """A new adapter takes its template and processor from the object's current adapter, never another tenant's.

    (Core copies them from the model's previous default adapter, which on the shared model may
    be any tenant's or a Tinker run's.)
    """
    from twinkle.processor.base import InputProcessor

    state = model.state_of(scoped)
    if own is not None:
        state.template, state.processor = own.template, own.processor
    else:
        state.template = None
        state.processor = InputProcessor(pad_token_id=getattr(model.model_config(), "pad_token_id", None) or 0)


def _bind(fn: Any, method: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Check the arguments fit ``fn``'s signature: a wrong call is the client's mistake (a 400)."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as exc:
        raise UserError(f"{method}: {exc}") from None
    except ValueError:  # no signature to check
        pass


def expire_idle_objects(state: ServerState, before: float) -> int:
    """Unload the objects whose last request was before ``before``: their units leave the tenant's
    quota. A model on the shared base is parked (its adapters unloaded, reloaded on its next call);
    a private instance (sampler, full-parameter model, checkpoint engine) is released. Returns how many."""
    hosted = getattr(state, "twinkle_host", None)
    if hosted is None:
        return 0
    idle = [obj for obj in list(hosted.objects.values()) if obj.last_used < before and not obj.parked]
    for obj in idle:
        if obj.instance is None and obj.kind == "model" and state.engine_parks:
            state.scheduler.call_soon(lambda obj=obj: hosted.park(obj, before))
            continue
        hosted.objects.pop(obj.id, None)
        state.scheduler.call_soon(lambda obj=obj: hosted.release(obj))
        state.admission.release(obj.tenant_id, obj.id)
    return len(idle)


def host(state: ServerState) -> TwinkleHost:
    """The state's :class:`TwinkleHost` (created on first use)."""
    existing = getattr(state, "twinkle_host", None)
    if existing is None:
        existing = TwinkleHost(state)
        state.twinkle_host = existing  # type: ignore[attr-defined]
    return existing
