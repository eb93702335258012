"""Helpers every Tinker router shares: futures' JSON, 400s, a run or session or 404, checkpoint names and TTLs.

Used by :mod:`twinkle_server.tinker_api` (sessions, models, training, futures),
:mod:`twinkle_server.tinker_sampling` (sampling), :mod:`twinkle_server.tinker_runs` (runs and
checkpoints) and :mod:`twinkle_server.tinker_weights` (external weights).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from fastapi import HTTPException

from twinkle_server import checkpoints as ckpt
from twinkle_server.state import ServerState
from twinkle_server.store import Run, Tenant

__all__ = [
    "INFLIGHT_PREFIX",
    "TTL_RANGE_S",
    "bad_request",
    "check_base_model",
    "check_ttl",
    "checkpoint_name",
    "future_json",
    "iso_time",
    "run_or_404",
    "session_or_404",
    "str_dict",
]

#: the ``model_path`` recorded for an inflight sampling session (``kind="inflight"``): the run it reads
INFLIGHT_PREFIX = "inflight://"


def future_json(request_id: str, model_id: str | None = None) -> dict[str, Any]:
    """The answer to a request queued as a future: ``{"request_id", "model_id"}`` (the SDK polls it)."""
    return {"request_id": request_id, "model_id": model_id}


def iso_time(ts: float) -> str:
    """A unix time as Tinker spells times: ISO 8601 in UTC."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def str_dict(meta: Any) -> dict[str, str] | None:
    """User metadata as Tinker returns it: string values (others JSON-encoded); ``None`` unless a dict."""
    if not isinstance(meta, dict):
        return None
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def bad_request(message: str) -> HTTPException:
    """A 400 naming what is wrong (raise it)."""
    return HTTPException(400, message)


def check_base_model(state: ServerState, base_model: str | None) -> None:
    """A 400 unless ``base_model`` is ``None`` or the model this server hosts."""
    if base_model is not None and base_model != state.config.model_name:
        raise bad_request(
            f"base_model {base_model!r} is not served here; this server hosts {state.config.model_name!r}"
        )


def session_or_404(state: ServerState, tenant: Tenant, session_id: str) -> dict[str, Any]:
    """The tenant's session ``session_id``, or a 404."""
    session = state.store.session(tenant.id, session_id)
    if session is None:
        raise HTTPException(404, f"session {session_id!r} not found")
    return session


def run_or_404(state: ServerState, tenant: Tenant, run_id: str) -> Run:
    """The tenant's training run ``run_id`` (marked as used when live), or a 404."""
    run = state.store.run(tenant.id, run_id)
    if run is None:
        raise HTTPException(404, f"training run {run_id!r} not found")
    if run.state in ("active", "idle"):
        state.store.touch_run(run.id)  # a run in use is not idle (ServerConfig.run_idle_s)
    return run


def checkpoint_name(name: str | None) -> str:
    """A checkpoint name checked as :func:`twinkle_server.checkpoints.check_name` does, or a 400."""
    if name is None:
        raise bad_request("a checkpoint name (path) is required")
    return ckpt.check_name(name)


#: Tinker's accepted checkpoint TTLs: one hour to ten years.
TTL_RANGE_S = (3600, 10 * 365 * 24 * 3600)


def check_ttl(ttl_seconds: int | None) -> None:
    """Raise a 400 unless ``ttl_seconds`` is ``None`` (no expiry) or within :data:`TTL_RANGE_S`."""
    if ttl_seconds is not None and not TTL_RANGE_S[0] <= ttl_seconds <= TTL_RANGE_S[1]:
        raise bad_request(
            f"ttl_seconds must be between {TTL_RANGE_S[0]} (1 hour) and {TTL_RANGE_S[1]} (10 years), "
            f"got {ttl_seconds}; None means no expiry"
        )
