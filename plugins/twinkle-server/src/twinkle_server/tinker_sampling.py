"""The Tinker API's sampling (``/api/v1``): sampling sessions and ``asample``.

A sampling client is a sampling session bound to a checkpoint (``model_path``), to the base
model, to a weight snapshot (``save_weights_and_get_sampling_client``) or to a training run's
live adapter (``inflight``). ``asample`` queues a sliced generation on the worker (or, with
``twinkle serve --sampler vllm``, a request on vLLM: :mod:`twinkle_server.vllm_sampling`) and returns
a future whose result is a protobuf ``SampleResponse``; options this server does not implement
(top-k sample logprobs, target prompt logprobs) are rejected with a 400 naming them. Results
are fetched through ``retrieve_future`` / ``retrieve_futures`` (:mod:`twinkle_server.tinker_api`).
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from fastapi import APIRouter, Depends, HTTPException

from twinkle_server.auth import current_state, current_tenant
from twinkle_server.scheduler import UserError
from twinkle_server.state import ServerState
from twinkle_server.store import Tenant
from twinkle_server.tinker_bodies import CreateSamplingSessionBody, JoinSamplingSessionBody, SampleBody
from twinkle_server.tinker_common import (
    INFLIGHT_PREFIX,
    bad_request,
    check_base_model,
    future_json,
    session_or_404,
)
from twinkle_server.wire import PROTO_CONTENT_TYPE, encode_sample_response

router = APIRouter(prefix="/api/v1", tags=["tinker"])


@router.post("/create_sampling_session")
def create_sampling_session(
    body: CreateSamplingSessionBody,
    state: ServerState = Depends(current_state),
    tenant: Tenant = Depends(current_tenant),
) -> Any:
    """A sampler bound to a checkpoint (``model_path``) or to the base model."""
    session_or_404(state, tenant, body.session_id)
    check_base_model(state, body.base_model)
    if body.model_path is not None:
        try:
            state.resolve_checkpoint(tenant, body.model_path)
        except LookupError:
            raise HTTPException(404, f"checkpoint {body.model_path} not found") from None
    sid = state.store.create_sampling_session(tenant.id, body.session_id, body.model_path, state.config.model_name)
    return {"type": "create_sampling_session", "sampling_session_id": sid}


@router.post("/join_sampling_session")
def join_sampling_session(
    body: JoinSamplingSessionBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """Allocate a client counter within a sampling session."""
    counter = state.store.join_sampling_session(tenant.id, body.sampling_session_id)
    if counter is None:
        raise HTTPException(404, f"sampling session {body.sampling_session_id!r} not found")
    return {"client_counter": counter}


@router.get("/samplers/{sampler_id}")
def get_sampler(
    sampler_id: str, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """A sampling session's base model and checkpoint path."""
    session = state.store.sampling_session(tenant.id, sampler_id)
    if session is None:
        raise HTTPException(404, f"sampler {sampler_id!r} not found")
    return {"sampler_id": sampler_id, "base_model": session["base_model"], "model_path": session["model_path"]}


_UNSUPPORTED_SAMPLE = {
    "topk_sample_logprobs": lambda b: b.topk_sample_logprobs > 0,
    "target_prompt_logprobs": lambda b: b.target_prompt_logprobs is not None,
    "prompt_alt_tokens_k": lambda b: b.prompt_alt_tokens_k > 0,
    "prompt_logprobs_last_n": lambda b: b.prompt_logprobs_last_n is not None,
}


#: The largest top-k of prompt logprobs served.
MAX_TOPK = 64
#: stop sequences per sample request, and characters per stop string (each is checked after every token)
MAX_STOPS = 64
MAX_STOP_CHARS = 1024


@router.post("/asample")
def asample(
    body: SampleBody, state: ServerState = Depends(current_state), tenant: Tenant = Depends(current_tenant)
) -> Any:
    """Sample completions; the future resolves to a protobuf SampleResponse."""
    unsupported = [name for name, test in _UNSUPPORTED_SAMPLE.items() if test(body)]
    if unsupported:
        raise bad_request(f"sampling options not supported by this server: {', '.join(unsupported)}")
    if not 0 <= body.topk_prompt_logprobs <= MAX_TOPK:
        raise bad_request(f"topk_prompt_logprobs must be between 0 and {MAX_TOPK}")
    if any(c.type != "encoded_text" for c in body.prompt.chunks):
        raise bad_request("only encoded_text prompt chunks are supported (no images or audio)")
    prompt = [t for c in body.prompt.chunks for t in c.tokens]
    params = body.sampling_params
    max_tokens = params.max_tokens if params.max_tokens is not None else 16
    stop_ids: list[int] | None = None
    stop_strings: list[str] = []
    stop = [params.stop] if isinstance(params.stop, str) else params.stop
    if stop is not None and (
        len(stop) > MAX_STOPS or any(isinstance(x, str) and len(x) > MAX_STOP_CHARS for x in stop)
    ):
        raise bad_request(f"stop: at most {MAX_STOPS} stop sequences of at most {MAX_STOP_CHARS} characters each")
    if stop is not None:
        stop_ids = [s for s in stop if isinstance(s, int)]
        stop_strings = [s for s in stop if isinstance(s, str)]
        if not stop_ids and stop_strings:
            stop_ids = None
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise bad_request("temperature must be a finite number >= 0")
    model_path = body.model_path
    snapshot_of: str | None = None
    inflight_run: str | None = None
    if body.sampling_session_id is not None:
        session = state.store.sampling_session(tenant.id, body.sampling_session_id)
        if session is None:
            raise HTTPException(404, f"sampling session {body.sampling_session_id!r} not found")
        model_path = session["model_path"]
        if model_path is not None and model_path.startswith(INFLIGHT_PREFIX):
            inflight_run = model_path[len(INFLIGHT_PREFIX) :]
            model_path = None
            if state.store.run(tenant.id, inflight_run) is None:
                raise HTTPException(404, f"the training run {inflight_run!r} of this inflight sampler is gone")
        # a snapshot's sampler has no checkpoint path; a base-model sampler has none either
        is_snapshot = model_path is None and body.sampling_session_id.startswith("snapshot")
        snapshot_of = body.sampling_session_id if is_snapshot else None
    elif model_path is None:
        if body.base_model is None:
            raise bad_request("sample needs sampling_session_id, model_path or base_model")
        check_base_model(state, body.base_model)
    if model_path is not None:
        try:
            state.resolve_checkpoint(tenant, model_path)
        except LookupError:
            raise HTTPException(404, f"checkpoint {model_path} not found") from None
    state.charge(tenant, (len(prompt) + max_tokens) * body.num_samples)

    used: list[int | None] = []

    def start() -> Any:
        # the worker runs the generation in slices (Scheduler.slice_s), other tenants' work between them
        if inflight_run is not None:
            slot = state.loaded_slot(tenant, inflight_run)
        elif snapshot_of is not None:
            slot = state.snapshot_slots.get(snapshot_of)
            if slot is None:
                raise UserError(
                    "this sampler's weight snapshot is no longer in memory (server restart, its run was "
                    "unloaded, or the adapter pool needed its slot for newer work); create a new sampling client"
                )
            state.touch_snapshot(snapshot_of)
        elif model_path is not None:
            slot = state.sampler_slot(tenant, model_path)
        else:
            slot = None
        used.append(slot)
        # the engine's own generation, or --sampler vllm (which also answers the top-k prompt logprobs)
        extra = {} if state.sampling is state.engine else {"topk_prompt_logprobs": body.topk_prompt_logprobs}
        return state.sampling.start_sample(
            slot,
            prompt,
            num_samples=body.num_samples,
            max_tokens=max_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=params.seed,
            stop_token_ids=stop_ids,
            stop_strings=stop_strings,
            prompt_logprobs=bool(body.prompt_logprobs),
            **extra,
        )

    def finish(generation: Any) -> tuple[str, bytes]:
        sequences, prompt_lps = generation.result()
        if record:
            for i, (_, logprobs, _) in enumerate(sequences):
                state.stability.record(tenant.id, sequence_ids[i], logprobs)
        topk = getattr(generation, "prompt_topk", None)
        if topk is None and body.topk_prompt_logprobs > 0:
            topk = state.engine.prompt_topk_logprobs(used[0], prompt, body.topk_prompt_logprobs)
        return PROTO_CONTENT_TYPE, encode_sample_response(sequences, prompt_lps, topk)

    record = bool(body.record_stability_info)
    prefix = uuid.uuid4().hex
    sequence_ids = [f"seq-{prefix}-{i}" for i in range(body.num_samples)]
    future_id = state.submit(tenant, "sample", start=start, finish=finish)
    if body.sampling_session_id is not None:
        clone = (body.seq_id or 0) // 1_000_000_000
        state.session_futures.add((tenant.id, body.sampling_session_id, clone), future_id)
    return {**future_json(future_id), "sample_sequence_ids": sequence_ids}
