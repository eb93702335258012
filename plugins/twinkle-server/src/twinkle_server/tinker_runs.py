"""The Tinker API's runs and checkpoints (``/api/v1``): list, inspect, delete, expire.

``RestClient``'s listing and management calls: the tenant's training runs
(``/training_runs``), a run's checkpoints and every checkpoint of the tenant (``/checkpoints``),
deleting a run or a checkpoint, a checkpoint's TTL, and a checkpoint's base model and LoRA
settings (``/weights_info``). Same authentication as every Tinker route (an API key; a tenant
sees only its own runs). Saving and loading checkpoints are training-client requests, queued in
``seq_id`` order: :mod:`twinkle_server.tinker_api`.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Response

from twinkle_server import checkpoints as ckpt
from twinkle_server.auth import current_state, current_tenant
from twinkle_server.state import ServerState
from twinkle_server.store import CheckpointRow, Run, Tenant
from twinkle_server.tinker_bodies import CheckpointTtlBody, TinkerPathBody
from twinkle_server.tinker_common import check_ttl, iso_time, run_or_404, str_dict

router = APIRouter(prefix="/api/v1", tags=["tinker"])


# -- JSON ----------------------------------------------------------------------------------------
def _checkpoint_json(row: CheckpointRow, expires: float | None = None) -> dict[str, Any]:
    path = ckpt.TinkerPath(row.run_id, row.kind, row.name)
    return {
        "checkpoint_id": path.checkpoint_id,
        "checkpoint_type": row.kind,
        "time": iso_time(row.created),
        "tinker_path": str(path),
        "size_bytes": row.size_bytes,
        "public": False,
        "user_metadata": str_dict(row.user_metadata),
        "expires_at": iso_time(expires) if expires is not None else None,
    }


def _checkpoints_json(state: ServerState, tenant: Tenant, rows: list[CheckpointRow]) -> list[dict[str, Any]]:
    """Listed checkpoints with their expiry (expired ones were deleted before listing)."""
    expiries = state.store.checkpoint_expiries(tenant.id)
    return [_checkpoint_json(r, expiries.get((r.run_id, r.kind, r.name))) for r in rows]


def _run_json(state: ServerState, tenant: Tenant, run: Run) -> dict[str, Any]:
    state.expire_checkpoints()
    rows = state.store.checkpoints(tenant.id, run.id)
    listed = _checkpoints_json(state, tenant, rows)
    training = [c for r, c in zip(rows, listed) if r.kind == "training"]
    sampler = [c for r, c in zip(rows, listed) if r.kind == "sampler"]
    return {
        "training_run_id": run.id,
        "base_model": run.base_model,
        "model_owner": tenant.name,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": run.lora["rank"],
        "last_request_time": iso_time(run.last_request),
        "last_checkpoint": training[-1] if training else None,
        "last_sampler_checkpoint": sampler[-1] if sampler else None,
        "user_metadata": str_dict(run.user_metadata),
    }


# -- routes --------------------------------------------------------------------------------------
@router.get("/training_runs")
def list_training_runs(
    limit: int = 20,
    offset: int = 0,
    state: ServerState = Depends(current_state),
    tenant: Tenant = Depends(current_tenant),
) -> Any:
    """The tenant's training runs, newest first."""
    limit, offset = max(0, min(limit, 1000)), max(0, offset)
    runs = state.store.runs(tenant.id, limit, offset)
    total = len(state.store.runs(tenant.id, 1_000_000, 0))
    return {
        "training_runs": [_run_json(state, tenant, r) for r in runs],
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    }


@router.get("/training_runs/{run_id}")
def get_training_run(
    run_id: str, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """One training run."""
    return _run_json(state, tenant, run_or_404(state, tenant, run_id))


@router.delete("/training_runs/{run_id}", status_code=204)
def delete_training_run(
    run_id: str, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Response:
    """Delete a training run: unload it and delete all its checkpoints (a twinkle extension)."""
    run_or_404(state, tenant, run_id)
    state.unload_run(tenant, run_id, delete=True)
    return Response(status_code=204)


@router.get("/training_runs/{run_id}/checkpoints")
def list_checkpoints(
    run_id: str, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """A run's checkpoints, oldest first."""
    run_or_404(state, tenant, run_id)
    state.expire_checkpoints()
    return {"checkpoints": _checkpoints_json(state, tenant, state.store.checkpoints(tenant.id, run_id)), "cursor": None}


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}", status_code=204)
def delete_checkpoint(
    run_id: str,
    checkpoint_id: str,
    state: ServerState = Depends(current_state),
    tenant: Tenant = Depends(current_tenant),
) -> Response:
    """Delete one checkpoint (``weights/<name>`` or ``sampler_weights/<name>``)."""
    kind, name = ckpt.parse_checkpoint_id(checkpoint_id)
    run_or_404(state, tenant, run_id)
    try:
        state.delete_checkpoint(tenant, run_id, kind, name)
    except LookupError:
        raise HTTPException(404, f"checkpoint {checkpoint_id} of {run_id} not found") from None
    return Response(status_code=204)


@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl", status_code=204)
def set_checkpoint_ttl(
    run_id: str,
    checkpoint_id: str,
    body: CheckpointTtlBody,
    state: ServerState = Depends(current_state),
    tenant: Tenant = Depends(current_tenant),
) -> Response:
    """Set a checkpoint to expire ``ttl_seconds`` from now, or (``None``) never."""
    kind, name = ckpt.parse_checkpoint_id(checkpoint_id)
    run_or_404(state, tenant, run_id)
    check_ttl(body.ttl_seconds)
    state.expire_checkpoints()
    if state.store.checkpoint(tenant.id, run_id, kind, name) is None:
        raise HTTPException(404, f"checkpoint {checkpoint_id} of {run_id} not found")
    expires = None if body.ttl_seconds is None else time.time() + body.ttl_seconds
    state.store.set_checkpoint_expiry(tenant.id, run_id, kind, name, expires)
    return Response(status_code=204)


@router.get("/checkpoints")
def list_user_checkpoints(
    limit: int = 100,
    offset: int = 0,
    state: ServerState = Depends(current_state),
    tenant: Tenant = Depends(current_tenant),
) -> Any:
    """All of the tenant's checkpoints."""
    limit, offset = max(0, min(limit, 1000)), max(0, offset)
    state.expire_checkpoints()
    rows = state.store.checkpoints(tenant.id, None, limit, offset)
    total = len(state.store.checkpoints(tenant.id))
    return {
        "checkpoints": _checkpoints_json(state, tenant, rows),
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    }


@router.post("/weights_info")
def weights_info(
    body: TinkerPathBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """Base model and LoRA settings of a checkpoint."""
    try:
        parsed, _ = state.resolve_checkpoint(tenant, body.tinker_path)
    except LookupError:
        raise HTTPException(404, f"checkpoint {body.tinker_path} not found") from None
    run = state.store.run(tenant.id, parsed.run_id)
    lora = run.lora if run is not None else {}
    return {
        "base_model": state.config.model_name,
        "optimizer_config": {"type": "adamw"},
        "is_lora": True,
        "lora_rank": lora.get("rank"),
        "train_unembed": lora.get("train_unembed"),
        "train_mlp": lora.get("train_mlp"),
        "train_attn": lora.get("train_attn"),
    }
