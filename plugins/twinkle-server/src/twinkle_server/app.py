"""The FastAPI application of ``twinkle serve``: limits, error handling, routers.

Errors are JSON ``{"detail": "..."}`` with a 4xx status that names the problem; an
unexpected failure is a 500 that says only that it was logged (tracebacks stay in the
server log, never in a response).

Example::

    app = create_app(ServerConfig(state_dir="/tmp/twinkle"))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from twinkle_server.auth import current_tenant
from twinkle_server.config import ServerConfig
from twinkle_server.engine import EngineError, LoRAEngine
from twinkle_server.quotas import QuotaExceeded
from twinkle_server.scheduler import UserError
from twinkle_server.state import NotFound, ServerState
from twinkle_server.store import Tenant

logger = logging.getLogger("twinkle_server")


class RequestTooLarge(HTTPException):
    """A request body over the server's limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds this server's limit of {limit} bytes; send smaller batches")


class BodyLimitMiddleware:
    """Reject bodies larger than ``max_bytes`` (declared or streamed) with 413."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, "invalid Content-Length header")
                    return
                if declared > self.max_bytes:
                    await _send_json(send, 413, RequestTooLarge(self.max_bytes).detail)
                    return
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


async def _send_json(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(config: ServerConfig, *, engine: LoRAEngine | None = None, vllm_sampler: Any = None) -> FastAPI:
    """Build the app (the worker starts with the app's lifespan).

    Args:
        config: server settings.
        engine: reuse a loaded engine (tests and benchmarks); default: load ``config.model_dir``.
        vllm_sampler: with ``config.sampler`` ``"vllm"``/``"auto"``: reuse a started ``VLLMSampler``
            (``enable_lora=True``, the engine's base weights; tests share one); default: start one.

    Returns:
        The FastAPI application; ``app.state.twinkle`` is its :class:`ServerState`.
    """
    from twinkle import __version__

    from twinkle_server import tinker_api, tinker_custom_loss, tinker_runs, tinker_sampling, tinker_weights, twinkle_api

    state = ServerState(config, engine=engine, vllm_sampler=vllm_sampler)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.waiters.loop = asyncio.get_running_loop()
        state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(
        title="twinkle serve",
        version=__version__,
        description="Multi-tenant LoRA training service: the Tinker API and the twinkle http client API.",
        lifespan=lifespan,
        # no /docs, /redoc (they load scripts from a CDN) and no open /openapi.json
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.twinkle = state
    if config.api_docs:  # the schema only, behind an API key like every route but /healthz

        @app.get("/openapi.json", include_in_schema=False)
        def openapi(_: Tenant = Depends(current_tenant)) -> JSONResponse:
            return JSONResponse(app.openapi())

    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.include_router(tinker_api.router)
    app.include_router(tinker_runs.router)
    app.include_router(tinker_sampling.router)
    app.include_router(tinker_custom_loss.router)
    app.include_router(tinker_weights.router)
    app.include_router(twinkle_api.router)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(QuotaExceeded)
    async def _quota(request: Request, exc: QuotaExceeded) -> JSONResponse:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))} if exc.status in (429, 503) else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    for error_type in (UserError, EngineError, ValueError):

        @app.exception_handler(error_type)
        async def _user(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code in (429, 503):
            headers.setdefault("Retry-After", "1")
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error; the server log has the details"}, status_code=500)

    return app
