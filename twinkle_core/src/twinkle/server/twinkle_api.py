"""The twinkle client API (``/twinkle/v1``): http mode's server side.

A client's ``TransformersModel(...)`` becomes an *object* here. The server hosts one
``TransformersModel`` on its base model; every object's adapters live on it under
tenant-scoped names, so a tenant's calls (``add_adapter_to_model``, ``set_optimizer``,
``forward_backward``, ``clip_grad_and_step``, ``save``...) touch only its own adapters,
optimizers and metrics, with the same semantics as in local mode. Only LoRA training is
offered: an object without an adapter cannot train the shared base. Checkpoint
directories are names inside the tenant's own folder on the server.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from twinkle.server import checkpoints as ckpt
from twinkle.server.auth import current_state, current_tenant
from twinkle.server.scheduler import UserError
from twinkle.server.state import JSON, QuotaExceeded, ServerState
from twinkle.server.store import Tenant

router = APIRouter(prefix="/twinkle/v1", tags=["twinkle"])
StateDep = Annotated[ServerState, Depends(current_state)]
TenantDep = Annotated[Tenant, Depends(current_tenant)]
_ADAPTER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: methods whose first argument is a checkpoint directory (mapped into the tenant's folder).
_PATH_METHODS = {"save": "output_dir", "load": "checkpoint_dir", "resume_from_checkpoint": "checkpoint_dir"}
#: methods that need no adapter.
_NO_ADAPTER = {"add_adapter_to_model", "load", "resume_from_checkpoint"}


class CreateObjectBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(max_length=32)
    cls: str = Field(max_length=100)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class CallBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(max_length=100)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


@dataclass
class HostedObject:
    """A client's model: which tenant owns it and its adapters (user name -> scoped name)."""

    id: str
    tenant_id: str
    adapters: dict[str, str] = field(default_factory=dict)
    current: str | None = None


class TwinkleHost:
    """The server-side ``TransformersModel`` and the objects built on it (touched by the worker only)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.objects: dict[str, HostedObject] = {}
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def model(self) -> Any:
        """The hosted model, built on first use (on the worker thread)."""
        if self._model is None:
            from twinkle.launcher.http import build_locally
            from twinkle.model.transformers_model import TransformersModel

            with build_locally():
                self._model = TransformersModel(model_id=str(self.state.config.model_dir), seed=self.state.config.seed)
        return self._model

    def methods(self) -> dict[str, Any]:
        """The remote methods of the hosted model class."""
        from twinkle.dispatch import remote_methods
        from twinkle.model.transformers_model import TransformersModel

        return remote_methods(TransformersModel)

    def folder(self, tenant_id: str) -> Path:
        """The tenant's checkpoint folder for http-mode saves."""
        return self.state.config.state_dir / "twinkle-checkpoints" / ckpt.check_run_id(tenant_id)

    def call(self, obj: HostedObject, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """(Worker) run one method on the hosted model for ``obj``."""
        model = self.model
        fn = getattr(model, method)
        params = inspect.signature(fn).parameters
        if "dataloader" in kwargs:
            raise UserError("dataloader= cannot be sent in http mode; the data loader stays in your process")
        if method == "add_adapter_to_model":
            if not args and "adapter_name" not in kwargs:
                raise UserError("add_adapter_to_model needs an adapter name")
            name = args[0] if args else kwargs.pop("adapter_name")
            args = list(args[1:])
            if not isinstance(name, str) or not _ADAPTER.match(name):
                raise UserError(f"adapter name {name!r}: use 1-64 letters, digits, '_' or '-'")
            if name in obj.adapters:
                raise UserError(f"this model already has an adapter named {name!r}")
            scoped = f"{obj.id}_{name}"
            model.add_adapter_to_model(scoped, *args, **kwargs)
            obj.adapters[name] = scoped
            obj.current = name
            return None
        if method in _PATH_METHODS:
            key = _PATH_METHODS[method]
            raw = args[0] if args else kwargs.pop(key, None)
            args = list(args[1:])
            name = ckpt.check_name(str(raw), "checkpoint directory")
            kwargs[key] = str(self.folder(obj.tenant_id) / name)
            if method != "save" and not Path(kwargs[key]).exists():
                raise UserError(f"no checkpoint named {name!r} (names are private to your tenant)")
        if "adapter_name" in params:
            user_name = kwargs.pop("adapter_name", None) or obj.current
            if user_name is None:
                if method not in _NO_ADAPTER:
                    raise UserError(
                        f"{method}: add a LoRA adapter first (model.add_adapter_to_model('default', LoraConfig(...))); "
                        "http mode trains adapters, never the shared base model"
                    )
                user_name = "default"
                obj.adapters.setdefault(user_name, f"{obj.id}_{user_name}")
                obj.current = user_name
            if user_name not in obj.adapters:
                if method in ("load", "resume_from_checkpoint"):
                    obj.adapters[user_name] = f"{obj.id}_{user_name}"
                else:
                    raise UserError(f"no adapter named {user_name!r}; added: {', '.join(obj.adapters) or '(none)'}")
            kwargs["adapter_name"] = obj.adapters[user_name]
        result = fn(*args, **kwargs)
        if method == "save":
            return Path(str(result)).name
        return result

    def release(self, obj: HostedObject) -> None:
        """(Worker) drop an object's adapters from the hosted model."""
        model = self._model
        if model is None:
            return
        remover = getattr(model, "remove_adapter", None)
        for scoped in obj.adapters.values():
            if remover is not None:
                try:
                    remover(scoped)
                except (KeyError, ValueError):
                    continue


def host(state: ServerState) -> TwinkleHost:
    """The state's :class:`TwinkleHost` (created on first use)."""
    existing = getattr(state, "twinkle_host", None)
    if existing is None:
        existing = TwinkleHost(state)
        state.twinkle_host = existing  # type: ignore[attr-defined]
    return existing


def _object(state: ServerState, tenant: Tenant, object_id: str) -> HostedObject:
    obj = host(state).objects.get(object_id)
    if obj is None or obj.tenant_id != tenant.id:
        raise HTTPException(404, f"object {object_id!r} not found (objects do not survive a server restart)")
    return obj


async def _run(state: ServerState, tenant: Tenant, kind: str, fn: Any) -> Any:
    """Run ``fn`` on the worker and wait for it; returns its JSON result."""

    def run() -> tuple[str, bytes]:
        from twinkle.client.codec import encode

        return JSON, json.dumps({"result": encode(fn())}).encode()

    future_id = state.submit(tenant, f"twinkle.{kind}", run=run)
    while True:
        row = state.store.future(tenant.id, future_id)
        if row is not None and row.status != "pending":
            break
        event = state.waiters.event(future_id)
        row = state.store.future(tenant.id, future_id)
        if row is not None and row.status != "pending":
            break
        try:
            await asyncio.wait_for(event.wait(), timeout=state.config.long_poll_s)
        except asyncio.TimeoutError:
            continue
    if row.status == "failed":
        raise HTTPException(400 if row.category == "user" else 500, row.error)
    return json.loads(row.result or b"null")


@router.get("/whoami")
def whoami(tenant: TenantDep) -> dict[str, str]:
    """The tenant this API key belongs to."""
    return {"tenant": tenant.name}


@router.post("/objects")
async def create_object(body: CreateObjectBody, state: StateDep, tenant: TenantDep) -> dict[str, Any]:
    """Build a model for the client (``kind='model'``, ``cls='TransformersModel'``)."""
    from twinkle.client.codec import CodecError, decode

    if body.kind != "model" or body.cls != "TransformersModel":
        raise HTTPException(
            400, f"http mode hosts kind 'model' / cls 'TransformersModel' only, not {body.kind!r} / {body.cls!r}"
        )
    try:
        args, kwargs = decode(body.args), decode(body.kwargs)
    except CodecError as exc:
        raise HTTPException(400, str(exc)) from None
    model_id = args[0] if args else kwargs.pop("model_id", None)
    served = {state.config.model_name, str(state.config.model_dir)}
    if model_id not in served:
        raise HTTPException(
            400, f"this server hosts {state.config.model_name!r}; pass model_id={state.config.model_name!r}"
        )
    unknown = sorted(set(kwargs) - {"seed", "device", "torch_dtype"})
    if len(args) > 1 or unknown:
        raise HTTPException(
            400, f"options {unknown or args[1:]} cannot be set in http mode: the server owns the base model"
        )
    hosted = host(state)
    mine = sum(1 for o in hosted.objects.values() if o.tenant_id == tenant.id)
    limit = state.limits(tenant).max_adapters
    if mine >= limit:
        raise QuotaExceeded(f"tenant {tenant.name!r} already has {mine} remote models, its limit is {limit}")
    state.charge(tenant)
    obj = HostedObject(f"m{secrets.token_hex(6)}", tenant.id)
    await _run(state, tenant, "create_object", lambda: hosted.model and None)
    hosted.objects[obj.id] = obj
    return {"object_id": obj.id}


@router.post("/objects/{object_id}/call")
async def call_object(object_id: str, body: CallBody, state: StateDep, tenant: TenantDep) -> Any:
    """Run one remote method of the tenant's object; returns ``{"result": ...}``."""
    from twinkle.client.codec import CodecError, decode

    obj = _object(state, tenant, object_id)
    hosted = host(state)
    if body.method not in hosted.methods():
        raise HTTPException(400, f"{body.method!r} is not a remote method of TransformersModel")
    try:
        args, kwargs = decode(body.args), decode(body.kwargs)
    except CodecError as exc:
        raise HTTPException(400, str(exc)) from None
    tokens = _count_tokens(args, kwargs)
    state.charge(tenant, tokens)
    return await _run(state, tenant, body.method, lambda: hosted.call(obj, body.method, args, kwargs))


@router.delete("/objects/{object_id}")
async def delete_object(object_id: str, state: StateDep, tenant: TenantDep) -> dict[str, Any]:
    """Release an object and its adapters."""
    obj = _object(state, tenant, object_id)
    hosted = host(state)
    hosted.objects.pop(object_id, None)
    await _run(state, tenant, "release", lambda: hosted.release(obj))
    return {}


def _count_tokens(args: list[Any], kwargs: dict[str, Any]) -> int:
    inputs = kwargs.get("inputs", args[0] if args else None)
    if isinstance(inputs, dict):
        inputs = [inputs]
    if not isinstance(inputs, list):
        return 0
    return sum(len(row.get("input_ids", [])) for row in inputs if isinstance(row, dict))
