"""Authentication: every request but the health check carries a tenant's API key.

The key comes in the ``X-API-Key`` header (what the tinker SDK sends) or as
``Authorization: Bearer <key>``. Keys are looked up by their SHA-256 digest; a missing or
unknown key is a 401 that says how to get one.
"""

from __future__ import annotations

from fastapi import HTTPException, Request

from twinkle_server.state import ServerState
from twinkle_server.store import Tenant


def current_state(request: Request) -> ServerState:
    """The :class:`ServerState` of the app serving this request."""
    return request.app.state.twinkle


def current_tenant(request: Request) -> Tenant:
    """The tenant whose API key authenticates this request.

    Raises:
        HTTPException: 401 without a valid key.
    """
    key = request.headers.get("x-api-key")
    if not key:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            key = auth[7:].strip()
    if not key:
        raise HTTPException(
            401, "missing API key: send it in the X-API-Key header (create one with `twinkle serve --add-tenant NAME`)"
        )
    state = current_state(request)
    tenant = state.store.tenant_for_key(key)
    if tenant is None:
        raise HTTPException(401, "invalid API key")
    state.charge_request(tenant)  # every authenticated route is rate-limited
    return tenant
