"""The twinkle client API (``/twinkle/v1``): http mode's server side.

A client's ``TransformersModel(...)``, ``TorchSampler(...)`` or ``LocalCheckpointEngine()``
becomes an *object* here, owned by the tenant that created it.

* Models: every object's adapters live on the engine's one ``TransformersModel`` (the
  Tinker runs' adapters are on it too) under tenant-scoped names, so a tenant's calls
  (``add_adapter_to_model``, ``set_optimizer``, ``forward_backward``, ``save``...) touch only
  its own adapters, optimizers and metrics, with the same semantics as in local mode. An
  object that trains before adding an adapter (a full-parameter warm-up) gets a private
  copy of the base model instead (counted in the tenant's object quota); the shared base
  is never trained.
* Samplers: a private ``TorchSampler`` of the base model per object.
* Checkpoint engines: ``engine.sync(model, sampler, adapter_name=...)`` runs here; the
  model and sampler arguments arrive as object references and resolve to the *same
  tenant's* objects only (another tenant's ids are "not found").

Checkpoint directories are names inside the tenant's own folder on the server. This module holds
the routes; the objects and how their calls run are :mod:`twinkle_server.twinkle_host`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from twinkle_server.auth import current_state, current_tenant
from twinkle_server.policy import finite_json
from twinkle_server.quotas import QuotaExceeded
from twinkle_server.scheduler import UserError
from twinkle_server.state import JSON, ServerState
from twinkle_server.store import Tenant
from twinkle_server.twinkle_host import HostedObject, host

logger = logging.getLogger("twinkle_server")
router = APIRouter(prefix="/twinkle/v1", tags=["twinkle"])
StateDep = Annotated[ServerState, Depends(current_state)]
TenantDep = Annotated[Tenant, Depends(current_tenant)]

#: (kind, class) pairs a client may create.
_HOSTED = {
    ("model", "TransformersModel"),
    ("sampler", "TorchSampler"),
    ("checkpoint_engine", "LocalCheckpointEngine"),
}


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


def _object(state: ServerState, tenant: Tenant, object_id: str) -> HostedObject:
    obj = host(state).objects.get(object_id)
    if obj is None or obj.tenant_id != tenant.id:
        raise HTTPException(404, f"object {object_id!r} not found (objects do not survive a server restart)")
    return obj


async def _run(state: ServerState, tenant: Tenant, kind: str, fn: Any) -> Any:
    """Run ``fn`` on the worker and wait for it; returns its JSON result."""

    def run() -> tuple[str, bytes]:
        from twinkle.client.codec import encode
        from twinkle.registry import ComponentNotFoundError

        try:
            result = fn()
        except KeyError as exc:  # a missing adapter/name: the request's problem, not the server's
            raise UserError(str(exc.args[0]) if exc.args else "not found") from None
        except ComponentNotFoundError as exc:  # an optimizer/loss/... name that is not registered
            raise UserError(str(exc)) from None
        except TypeError as exc:  # arguments the method's **kwargs passed on and the callee refused
            logger.info("twinkle.%s: refused arguments: %s", kind, exc)
            raise UserError(f"{kind}: {exc}") from None
        except QuotaExceeded as exc:  # answered with its own status (403), not as a failed job
            return JSON, json.dumps({"quota": str(exc), "status": exc.status, "retry_after": exc.retry_after}).encode()
        return JSON, json.dumps(finite_json({"result": encode(result)}), allow_nan=False).encode()

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
    data = json.loads(row.result or b"null")
    if isinstance(data, dict) and "quota" in data:
        raise QuotaExceeded(data["quota"], data["status"], retry_after=float(data.get("retry_after") or 1.0))
    return data


@router.get("/capacity")
def capacity(state: StateDep, tenant: TenantDep) -> dict[str, Any]:
    """The adapter pool's capacity (the same answer as ``GET /api/v1/capacity``)."""
    return state.capacity(tenant)


@router.get("/whoami")
def whoami(tenant: TenantDep) -> dict[str, str]:
    """The tenant this API key belongs to."""
    return {"tenant": tenant.name}


@router.post("/objects")
async def create_object(body: CreateObjectBody, state: StateDep, tenant: TenantDep) -> dict[str, Any]:
    """Build a model for the client (``kind='model'``, ``cls='TransformersModel'``)."""
    from twinkle.client.codec import CodecError, decode

    if (body.kind, body.cls) not in _HOSTED:
        offered = ", ".join(f"{k} {c!r}" for k, c in sorted(_HOSTED))
        raise HTTPException(400, f"http mode hosts {offered}; not {body.kind!r} / {body.cls!r}")
    try:
        args, kwargs = decode(body.args), decode(body.kwargs)
    except CodecError as exc:
        raise HTTPException(400, str(exc)) from None
    options: dict[str, Any] = {}
    if body.kind != "checkpoint_engine":
        model_id = args[0] if args else kwargs.pop("model_id", None)
        served = {state.config.model_name, str(state.config.model_dir)}
        if model_id not in served:
            raise HTTPException(
                400, f"this server hosts {state.config.model_name!r}; pass model_id={state.config.model_name!r}"
            )
        args = args[1:]
        # the seed picks the weights of a private copy / sampler; the device is the server's (ServerConfig.device)
        options = {"seed": kwargs.pop("seed", state.config.seed)}
        kwargs.pop("device", None)
        if "torch_dtype" in kwargs:
            options["torch_dtype"] = kwargs.pop("torch_dtype")
    if args or kwargs:
        raise HTTPException(
            400, f"options {sorted(kwargs) or args} cannot be set in http mode: the server owns the base model"
        )
    hosted = host(state)
    state.charge(tenant)
    obj = HostedObject(f"m{secrets.token_hex(6)}", tenant.id, kind=body.kind, options=options, tenant=tenant)
    # reserved before the first await: concurrent creations are counted against one ledger (both APIs)
    state.admission.hold(tenant, obj.id, 0 if body.kind == "checkpoint_engine" else 1)
    try:
        await _run(state, tenant, "create_object", lambda: hosted.build(obj, body.cls))
    except BaseException:
        state.admission.release(tenant.id, obj.id)
        raise
    hosted.objects[obj.id] = obj
    return {"object_id": obj.id}


@router.post("/objects/{object_id}/call")
async def call_object(object_id: str, body: CallBody, state: StateDep, tenant: TenantDep) -> Any:
    """Run one remote method of the tenant's object; returns ``{"result": ...}``."""
    from twinkle.client.codec import CodecError, decode

    obj = _object(state, tenant, object_id)
    obj.last_used = time.time()
    hosted = host(state)
    hosted.unpark(obj, tenant)  # an object unloaded for idleness counts against the quota again
    if body.method not in hosted.methods(obj.kind):
        raise HTTPException(400, f"{body.method!r} is not a remote method of this {obj.kind}")
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
    try:
        await _run(state, tenant, "release", lambda: hosted.release(obj))
    finally:
        state.admission.release(tenant.id, object_id)
    return {}


def _count_tokens(args: list[Any], kwargs: dict[str, Any]) -> int:
    inputs = kwargs.get("inputs", args[0] if args else None)
    if isinstance(inputs, dict):
        inputs = [inputs]
    if not isinstance(inputs, list):
        return 0
    return sum(len(row.get("input_ids", [])) for row in inputs if isinstance(row, dict))
