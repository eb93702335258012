"""The Tinker REST API (``/api/v1``), as the official ``tinker`` SDK 0.38 speaks it: sessions, models,
training and futures (sampling: :mod:`twinkle_server.tinker_sampling`; runs and checkpoints:
:mod:`twinkle_server.tinker_runs`).

Training and sampling requests return a future (``{"request_id": ...}``) at once; the
SDK long-polls ``/api/v1/retrieve_future`` for the result, which is protobuf for
``forward_backward``/``forward``/``sample`` and JSON otherwise. Requests of one training
client carry ``seq_id`` and run in that order. Options this server does not implement
(top-k sample logprobs, non-Adam optimizers) are
rejected with a 400 that names them, never silently ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from twinkle_server import tinker_custom_loss
from twinkle_server.auth import current_state, current_tenant
from twinkle_server.engine import BatchJob, JobResult
from twinkle_server.losses import check_loss
from twinkle_server.policy import finite_json
from twinkle_server.quotas import QuotaExceeded
from twinkle_server.scheduler import UserError
from twinkle_server.session_futures import wait_any
from twinkle_server.state import JSON, ServerState, lora_targets
from twinkle_server.store import Tenant
from twinkle_server.tinker_bodies import (
    CreateModelBody,
    CreateSessionBody,
    FinishSessionBody,
    LoadWeightsBody,
    ModelIdBody,
    OptimStepBody,
    RetrieveFutureBody,
    RetrieveFuturesBody,
    SaveForSamplerBody,
    SaveWeightsBody,
    SessionIdBody,
)
from twinkle_server.tinker_common import (
    INFLIGHT_PREFIX,
    bad_request,
    check_base_model,
    check_ttl,
    checkpoint_name,
    future_json,
    run_or_404,
    session_or_404,
    str_dict,
)
from twinkle_server.wire import (
    PROTO_CONTENT_TYPE,
    ForwardBackwardMessage,
    decode_datums,
    encode_forward_backward_output,
    parse_forward_backward,
)

router = APIRouter(prefix="/api/v1", tags=["tinker"])


# -- helpers -------------------------------------------------------------------------
def _json(obj: Any) -> tuple[str, bytes]:
    return JSON, json.dumps(finite_json(obj), allow_nan=False).encode()


#: Answers the tinker SDK sends again with the same ``seq_id`` (so the refused request keeps its turn).
RETRIED_STATUSES = frozenset({408, 409, 429})


@contextlib.contextmanager
def _takes_its_turn(state: ServerState, tenant: Tenant, model_id: str, seq_id: int | None, kind: str) -> Any:
    """A request refused inside still takes its ``seq_id`` turn, so its client's later requests run.

    The run executes one client's requests in ``seq_id`` order; a refused request never reaches
    the queue, so without this its successors would wait for it until ``seq_wait_s``. A refusal
    here (a 4xx the SDK does not retry, a bad value, a quota) queues an empty job in its place
    whose future fails with the same reason, then answers the refusal as before. Only for the
    caller's own run (call it after ``run_or_404``); a ``seq_id`` that cannot be queued (used,
    too far ahead) is left alone.
    """
    try:
        yield
    except (HTTPException, ValueError, QuotaExceeded) as exc:
        status = exc.status_code if isinstance(exc, HTTPException) else getattr(exc, "status", 400)
        if seq_id is not None and status not in RETRIED_STATUSES:
            reason = str(exc.detail if isinstance(exc, HTTPException) else exc)

            def refused() -> tuple[str, bytes]:
                raise UserError(reason)

            with contextlib.suppress(UserError, QuotaExceeded):
                state.submit(tenant, kind, model_id=model_id, seq_id=seq_id, run=refused)
        raise


def _lora_targets(lora: dict[str, Any]) -> tuple[str, ...]:
    """The module names of a run's LoRA switches (``train_attn``/``train_mlp``/``train_unembed``)."""
    try:
        return lora_targets(lora.get("train_attn", True), lora.get("train_mlp", True), lora.get("train_unembed", True))
    except UserError as exc:
        raise bad_request(str(exc)) from None


def _checkpoint_lora(state: ServerState, tenant: Tenant, path: str) -> dict[str, Any]:
    parsed, _ = state.resolve_checkpoint(tenant, path)
    try:
        config = json.loads((state.checkpoint_files(tenant, parsed) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        raise HTTPException(404, f"checkpoint {path} has no readable adapter files") from None
    targets = set(config.get("target_modules", []))
    return {
        "rank": int(config["r"]),
        "alpha": float(config["lora_alpha"]),
        "train_attn": bool(targets & {"q_proj", "k_proj", "v_proj", "o_proj"}),
        "train_mlp": bool(targets & {"gate_proj", "up_proj", "down_proj"}),
        "train_unembed": "lm_head" in targets,
    }


# -- service ---------------------------------------------------------------------------
@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness probe (no authentication)."""
    return {"status": "ok"}


@router.get("/capacity")
def capacity(state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)) -> Any:
    """The adapter pool: device slots (resident, free), adapters paged to host memory, adapters
    unloaded for idleness, host memory used and budget, and the asking tenant's holding and limit
    (a twinkle extension; ``twinkle serve --status`` prints it)."""
    return state.capacity(tenant)


@router.get("/get_server_capabilities")
def get_server_capabilities(state: ServerState = Depends(current_state), _: Tenant = Depends(current_tenant)) -> Any:
    """The hosted base model."""
    return {
        "supported_models": [
            {
                "model_name": state.config.model_name,
                "max_context_length": state.engine.max_length,
                "trainable": True,
                "sampleable": True,
            }
        ]
    }


@router.post("/client/config")
def client_config(_: Tenant = Depends(current_tenant)) -> Any:
    """Feature flags for the SDK: API keys, uncompressed protobuf, httpx transport."""
    return {
        "pjwt_auth_enabled": False,
        "proto_compress_fwdbwd": False,
        "use_pyqwest_transport": False,
        "parallel_fwdbwd_chunks": True,
        "sample_use_retrieve_futures": True,
        "custom_loss_server_side": True,
        "sample_join_sampling_session": True,
    }


@router.post("/client/dynamic_config")
def client_dynamic_config(_: Tenant = Depends(current_tenant)) -> Any:
    """Periodically refreshed SDK flags."""
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@router.post("/telemetry")
def telemetry(_: Tenant = Depends(current_tenant)) -> Any:
    """SDK telemetry is accepted and dropped (this server keeps no client telemetry)."""
    return {"status": "accepted"}


@router.post("/create_session")
def create_session(
    body: CreateSessionBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """Start a session (runs and samplers hang off it)."""
    sid = state.store.create_session(tenant.id, body.user_metadata, body.display_name)
    return {"type": "create_session", "session_id": sid}


@router.post("/session_heartbeat")
def session_heartbeat(
    body: SessionIdBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """Keep a session alive; 410 once it was finished."""
    session = session_or_404(state, tenant, body.session_id)
    if session["finished"]:
        raise HTTPException(410, f"session {body.session_id} has finished")
    state.store.heartbeat(tenant.id, body.session_id)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(
    session_id: str,
    body: FinishSessionBody | None = None,
    state: ServerState = Depends(current_state),
    tenant: Tenant = Depends(current_tenant),
) -> Any:
    """Mark a session finished (its runs stay listed; their checkpoints stay)."""
    session_or_404(state, tenant, session_id)
    state.store.finish_session(tenant.id, session_id)
    return {}


@router.get("/sessions")
def list_sessions(
    limit: int = 20,
    offset: int = 0,
    state: ServerState = Depends(current_state),
    tenant: Tenant = Depends(current_tenant),
) -> Any:
    """The tenant's sessions, newest first."""
    return {"sessions": state.store.list_sessions(tenant.id, max(0, min(limit, 1000)), max(0, offset))}


@router.get("/sessions/{session_id}")
def get_session(
    session_id: str, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """A session's runs and samplers."""
    session = session_or_404(state, tenant, session_id)
    return {
        "training_run_ids": [r.id for r in reversed(state.store.runs(tenant.id, session_id=session_id))],
        "sampler_ids": state.store.sampler_ids(tenant.id, session_id),
        "user_metadata": str_dict(session["user_metadata"]),
        "display_name": session["display_name"],
    }


# -- models ------------------------------------------------------------------------------
@router.post("/create_model")
def create_model(
    body: CreateModelBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """Create a LoRA training run; the future resolves to ``{"model_id": ...}``."""
    session_or_404(state, tenant, body.session_id)
    check_base_model(state, body.base_model)
    if body.lora_config is None:
        raise bad_request("full fine-tuning is not offered; pass a lora_config (create_lora_training_client)")
    opt = (body.optimizer_config or {}).get("type", "adamw")
    if opt != "adamw":
        raise bad_request(f"optimizer {opt!r} is not supported; this server trains with AdamW (AdamOptimizerConfig)")
    if body.lora_config.rank > state.config.max_rank:
        raise bad_request(f"LoRA rank {body.lora_config.rank} exceeds this server's max rank {state.config.max_rank}")
    run_id = f"{body.session_id}:train:{body.model_seq_id}"
    if state.store.run(tenant.id, run_id) is not None:
        raise bad_request(f"training run {run_id} already exists; use a new model_seq_id")
    state.charge(tenant)
    lora = body.lora_config.model_dump()
    with state.admission.lock:  # the check and the creation together: concurrent creations cannot all pass
        if state.store.run(tenant.id, run_id) is not None:
            raise bad_request(f"training run {run_id} already exists; use a new model_seq_id")
        state.admission.check_adapter_quota(tenant)
        # a full pool is a 503 here, not a failed future
        reservation = state.admission.reserve_slot(lora["rank"], _lora_targets(lora))
        state.store.create_run(run_id, tenant.id, body.session_id, state.config.model_name, lora, body.user_metadata)
    state.scheduler.register_model(run_id)

    def run() -> tuple[str, bytes]:
        try:
            return state.create_run_slot(tenant, run_id, lora, reservation)
        except Exception:
            state.store.set_run_state(run_id, "deleted")
            raise
        finally:
            reservation.release()

    return future_json(state.submit(tenant, "create_model", run=run), run_id)


@router.post("/get_info")
def get_info(
    body: ModelIdBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """A run's base model, tokenizer and LoRA rank."""
    run = run_or_404(state, tenant, body.model_id)
    return {
        "type": "get_info",
        "model_data": {
            "arch": type(state.engine.model).__name__,
            "model_name": state.config.model_name,
            "tokenizer_id": str(state.config.model_dir),
        },
        "model_id": run.id,
        "is_lora": True,
        "lora_rank": run.lora["rank"],
        "model_name": state.config.model_name,
    }


@router.post("/unload_model")
def unload_model(
    body: ModelIdBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """Free a run's adapter slot (its checkpoints stay)."""
    run_or_404(state, tenant, body.model_id)

    def run() -> tuple[str, bytes]:
        state.unload_run(tenant, body.model_id)
        return _json({"model_id": body.model_id, "type": "unload_model"})

    return future_json(state.submit(tenant, "unload_model", run=run), body.model_id)


# -- training ------------------------------------------------------------------------------
@router.post(
    "/forward_backward",
    openapi_extra={
        "requestBody": {
            "content": {PROTO_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            "required": True,
        }
    },
)
async def forward_backward(
    request: Request, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """Forward (and backward unless ``forward_only``) with a built-in loss; body is protobuf."""
    if request.headers.get("content-encoding", "identity") not in ("identity", ""):
        raise HTTPException(415, "compressed request bodies are not accepted; send the protobuf uncompressed")
    if PROTO_CONTENT_TYPE not in request.headers.get("content-type", ""):
        raise HTTPException(415, f"forward_backward takes a protobuf body (Content-Type: {PROTO_CONTENT_TYPE})")
    body = await request.body()
    # parsing and decoding run off the event loop (other requests and /healthz keep answering), the
    # tensors only after the run lookup and the rate charge: a request for another tenant's or no run,
    # or over the tenant's rate, costs no decoding
    header = await asyncio.to_thread(parse_forward_backward, body)
    del body
    slot_check = run_or_404(state, tenant, header.model_id)
    kind = "forward" if header.forward_only else "forward_backward"
    with _takes_its_turn(state, tenant, slot_check.id, header.seq_id, kind):
        custom = tinker_custom_loss.bind(state, tenant, slot_check, header) if header.loss_fn == "custom" else None
        config = check_loss(header.loss_fn, header.loss_config)
        if not header.datums:
            raise bad_request("forward_backward needs at least one datum")
        state.charge(tenant, header.tokens)
        datums, spans = await asyncio.to_thread(decode_datums, header)
        if custom is not None:
            custom.prepare_datums(datums)
        message = ForwardBackwardMessage(
            header.model_id, header.seq_id, header.loss_fn, header.loss_config, datums, header.forward_only, spans
        )
        if message.loss_fn == "stable_reinforce":
            _fill_stability(state, tenant, message)
    run_id = slot_check.id

    def prepare() -> BatchJob:
        slot = state.loaded_slot(tenant, run_id)
        state.store.touch_run(run_id)
        return BatchJob(slot, message.datums, message.loss_fn, config, message.forward_only)

    def finish(result: JobResult) -> tuple[str, bytes]:
        if custom is not None:
            custom.finish(result)
        return PROTO_CONTENT_TYPE, encode_forward_backward_output(result)

    future_id = state.submit(
        tenant, kind, model_id=run_id, seq_id=message.seq_id, prepare=prepare, finish=finish, rows=len(message.datums)
    )
    return future_json(future_id, run_id)


def _fill_stability(state: ServerState, tenant: Tenant, message: Any) -> None:
    """Give each stable_reinforce datum the sampler's recorded logprobs, from its provenance spans."""
    for i, datum in enumerate(message.datums):
        spans = message.spans[i] if message.spans else None
        if spans is None:
            if "logprobs" not in datum.inputs:
                raise bad_request(
                    f"datum {i}: stable_reinforce needs provenance (Datum.with_provenance naming the sampled "
                    "sequence_ids) or loss_fn_inputs['logprobs']"
                )
            continue
        if "stability_mask" in datum.inputs:
            raise bad_request(f"datum {i}: with provenance spans the server supplies stability_mask; do not send it")
        # the cookbook also sends the logprobs it saw; the sampler's record (what stable_reinforce is
        # defined against) takes their place
        target = datum.inputs.get("target_tokens")
        length = len(target) if target is not None else len(datum.tokens)
        try:
            q, mask = state.stability.fill(tenant.id, spans, length)
        except ValueError as exc:
            raise bad_request(f"datum {i}: {exc}") from None
        datum.inputs["logprobs"] = q
        datum.inputs["stability_mask"] = mask


@router.post("/optim_step")
def optim_step(
    body: OptimStepBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """One AdamW step with the given AdamParams."""
    run_or_404(state, tenant, body.model_id)
    with _takes_its_turn(state, tenant, body.model_id, body.seq_id, "optim_step"):
        other = body.optimizer_params or body.optim_params
        if body.adam_params is None:
            kind = (other or {}).get("type", "missing")
            raise bad_request(f"optimizer params of type {kind!r} are not supported; send AdamParams")
        params = body.adam_params.model_dump(exclude={"type"})
        state.charge(tenant)

    def prepare() -> tuple[int, dict[str, Any]]:
        return state.loaded_slot(tenant, body.model_id), params

    def finish(metrics: dict[str, float]) -> tuple[str, bytes]:
        return _json({"metrics": metrics})

    return future_json(
        state.submit(tenant, "optim_step", model_id=body.model_id, seq_id=body.seq_id, prepare=prepare, finish=finish),
        body.model_id,
    )


@router.post("/save_weights")
def save_weights(
    body: SaveWeightsBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """Save adapter + optimizer as ``tinker://<run>/weights/<path>`` (atomically)."""
    run_or_404(state, tenant, body.model_id)
    with _takes_its_turn(state, tenant, body.model_id, body.seq_id, "save_weights"):
        name = checkpoint_name(body.path)
        check_ttl(body.ttl_seconds)
        state.expire_checkpoints()
        if not body.overwrite and state.store.checkpoint(tenant.id, body.model_id, "training", name) is not None:
            raise bad_request(f"checkpoint weights/{name} exists; pass overwrite=True or choose another name")
        state.charge(tenant)

    def run() -> tuple[str, bytes]:
        path = state.save_checkpoint(
            tenant, body.model_id, "training", name, metadata=body.user_metadata, ttl_seconds=body.ttl_seconds
        )
        return _json({"path": str(path), "type": "save_weights"})

    return future_json(
        state.submit(tenant, "save_weights", model_id=body.model_id, seq_id=body.seq_id, run=run), body.model_id
    )


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(
    body: SaveForSamplerBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """Save sampler weights by name, or (no name) snapshot them into a new sampling session."""
    run = run_or_404(state, tenant, body.model_id)
    with _takes_its_turn(state, tenant, body.model_id, body.seq_id, "save_weights_for_sampler"):
        check_ttl(body.ttl_seconds)
        if body.kind not in ("snapshot", "inflight"):
            raise bad_request(f"sampling client kind {body.kind!r} is not supported; use 'snapshot' or 'inflight'")
        if body.kind == "inflight" and body.path is not None:
            raise bad_request("kind='inflight' makes a sampling client, not a named checkpoint; send no path")
        name = checkpoint_name(body.path) if body.path is not None else None
        state.charge(tenant)
    if name is not None:

        def run_named() -> tuple[str, bytes]:
            path = state.save_checkpoint(
                tenant, body.model_id, "sampler", name, metadata=body.user_metadata, ttl_seconds=body.ttl_seconds
            )
            return _json({"path": str(path), "type": "save_weights_for_sampler"})

        fid = state.submit(
            tenant, "save_weights_for_sampler", model_id=body.model_id, seq_id=body.seq_id, run=run_named
        )
        return future_json(fid, body.model_id)
    if body.kind == "inflight":
        # samples read the run's live adapter: the weights of this save or newer (Tinker's contract)
        sampler_id = state.store.create_sampling_session(
            tenant.id, run.session_id, INFLIGHT_PREFIX + body.model_id, state.config.model_name
        )

        def run_inflight() -> tuple[str, bytes]:
            state.loaded_slot(tenant, body.model_id)  # in seq_id order: after the steps before this save
            return _json({"path": None, "sampling_session_id": sampler_id, "type": "save_weights_for_sampler"})

        fid = state.submit(
            tenant, "save_weights_for_sampler", model_id=body.model_id, seq_id=body.seq_id, run=run_inflight
        )
        return future_json(fid, body.model_id)
    sampler_id = state.store.create_sampling_session(
        tenant.id, run.session_id, None, state.config.model_name, snapshot=True
    )

    def run_snapshot() -> tuple[str, bytes]:
        state.snapshot(tenant, body.model_id, sampler_id, session_id=run.session_id)
        return _json({"path": None, "sampling_session_id": sampler_id, "type": "save_weights_for_sampler"})

    fid = state.submit(tenant, "save_weights_for_sampler", model_id=body.model_id, seq_id=body.seq_id, run=run_snapshot)
    return future_json(fid, body.model_id)


@router.post("/load_weights")
def load_weights(
    body: LoadWeightsBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """Load a checkpoint into a run, or create a new run from it (``session_id`` + ``model_seq_id``)."""
    if body.weights_access_token is not None:
        raise bad_request("weights_access_token is not supported: checkpoints are private to their tenant")
    check_base_model(state, body.base_model)
    into_run = body.session_id is None and body.model_id is not None
    if into_run:
        run_or_404(state, tenant, body.model_id)
    with (
        _takes_its_turn(state, tenant, body.model_id, body.seq_id, "load_weights")
        if into_run
        else contextlib.nullcontext()
    ):
        try:
            _, row = state.resolve_checkpoint(tenant, body.path)
        except LookupError:
            raise HTTPException(404, f"checkpoint {body.path} not found") from None
        if body.optimizer and not row.has_optimizer:
            raise bad_request(
                f"{body.path} has no optimizer state (sampler checkpoints never do); load it without the optimizer"
            )
        state.charge(tenant)
    if body.session_id is not None:
        if body.model_seq_id is None:
            raise bad_request("load_weights with session_id needs model_seq_id")
        session_or_404(state, tenant, body.session_id)
        run_id = f"{body.session_id}:train:{body.model_seq_id}"
        if state.store.run(tenant.id, run_id) is not None:
            raise bad_request(f"training run {run_id} already exists; use a new model_seq_id")
        lora = _checkpoint_lora(state, tenant, body.path)
        with state.admission.lock:
            if state.store.run(tenant.id, run_id) is not None:
                raise bad_request(f"training run {run_id} already exists; use a new model_seq_id")
            state.admission.check_adapter_quota(tenant)
            reservation = state.admission.reserve_slot(lora["rank"], _lora_targets(lora))
            state.store.create_run(
                run_id, tenant.id, body.session_id, state.config.model_name, lora, body.user_metadata
            )
        state.scheduler.register_model(run_id)

        def run_new() -> tuple[str, bytes]:
            try:
                return state.load_into_run(tenant, run_id, body.path, optimizer=body.optimizer, reservation=reservation)
            except Exception:
                state.store.set_run_state(run_id, "deleted")
                raise
            finally:
                reservation.release()

        return future_json(state.submit(tenant, "load_weights", run=run_new), run_id)
    if body.model_id is None:
        raise bad_request("load_weights needs model_id, or session_id and model_seq_id")
    model_id = body.model_id

    def run_existing() -> tuple[str, bytes]:
        state.loaded_slot(tenant, model_id)
        return state.load_into_run(tenant, model_id, body.path, optimizer=body.optimizer)

    return future_json(
        state.submit(tenant, "load_weights", model_id=model_id, seq_id=body.seq_id, run=run_existing), model_id
    )


# -- futures ----------------------------------------------------------------------------------
@router.post("/retrieve_future")
async def retrieve_future(
    body: RetrieveFutureBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """Long-poll a future: its result, its error, or ``try_again`` after ``long_poll_s``."""
    row = state.store.future(tenant.id, body.request_id)
    if row is None:
        raise HTTPException(404, f"request {body.request_id!r} not found")
    if row.status == "pending":
        event = state.waiters.event(body.request_id)
        row = state.store.future(tenant.id, body.request_id)
        if row is not None and row.status == "pending":
            try:
                await asyncio.wait_for(event.wait(), timeout=state.config.long_poll_s)
            except asyncio.TimeoutError:
                pass
            row = state.store.future(tenant.id, body.request_id)
    if row is None or row.status == "pending":
        return {"type": "try_again", "request_id": body.request_id, "queue_state": "active"}
    if row.status == "failed":
        return {"error": row.error, "category": row.category or "user"}
    if row.content_type == PROTO_CONTENT_TYPE:
        return Response(content=row.result, media_type=PROTO_CONTENT_TYPE)
    return JSONResponse(finite_json(json.loads(row.result or b"null")))


@router.post("/retrieve_futures")
async def retrieve_futures(
    body: RetrieveFuturesBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """Long-poll a sampling session's completions after ``prev_cursor`` (the SDK's batched poller)."""
    if state.store.sampling_session(tenant.id, body.target.sampling_session_id) is None:
        raise HTTPException(404, f"sampling session {body.target.sampling_session_id!r} not found")
    target = (tenant.id, body.target.sampling_session_id, body.target.cloned_sampler_id)
    completions, cursor = state.session_futures.collect(state.store, target, body.prev_cursor)
    wait = state.config.long_poll_s if body.timeout is None else min(body.timeout, state.config.long_poll_s)
    if not completions and wait > 0:
        events = [state.waiters.event(fid) for fid in state.session_futures.pending(target)]
        completions, cursor = state.session_futures.collect(state.store, target, body.prev_cursor)
        if not completions:
            await wait_any(events, wait)
            completions, cursor = state.session_futures.collect(state.store, target, body.prev_cursor)
    return {"completions": completions, "cursor": cursor}
