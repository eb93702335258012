"""The Tinker API's JSON request bodies (pydantic models; the protobuf ones are in ``wire.py``).

Unknown fields are ignored (newer SDKs send more); bounds on ids, counts and sizes are part of
the models, so a body out of range is a 422 before any handler runs.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class CreateSessionBody(_Body):
    tags: list[str] = Field(default_factory=list, max_length=64)
    user_metadata: Optional[dict[str, Any]] = None
    sdk_version: str = ""
    project_id: Optional[str] = None
    display_name: Optional[str] = Field(None, max_length=256)


class SessionIdBody(_Body):
    session_id: str = Field(max_length=200)


class LoraConfigBody(_Body):
    rank: int = Field(ge=1)
    seed: Optional[int] = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelBody(_Body):
    session_id: str = Field(max_length=200)
    model_seq_id: int = Field(ge=0, le=1_000_000_000)
    base_model: str = Field(max_length=500)
    user_metadata: Optional[dict[str, Any]] = None
    lora_config: Optional[LoraConfigBody] = None
    optimizer_config: Optional[dict[str, Any]] = None


class ModelIdBody(_Body):
    model_id: str = Field(max_length=300)


class AdamParamsBody(_Body):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
    type: Optional[Literal["adamw", "adam"]] = None


class OptimStepBody(_Body):
    model_id: str = Field(max_length=300)
    seq_id: Optional[int] = Field(None, ge=0)
    adam_params: Optional[AdamParamsBody] = None
    optimizer_params: Optional[dict[str, Any]] = None
    optim_params: Optional[dict[str, Any]] = None


class SaveWeightsBody(_Body):
    model_id: str = Field(max_length=300)
    path: Optional[str] = Field(None, max_length=300)
    seq_id: Optional[int] = Field(None, ge=0)
    ttl_seconds: Optional[int] = None
    overwrite: bool = False
    user_metadata: Optional[dict[str, str]] = None


class SaveForSamplerBody(SaveWeightsBody):
    sampling_session_seq_id: Optional[int] = None
    kind: str = "snapshot"


class LoadWeightsBody(_Body):
    model_id: Optional[str] = Field(None, max_length=300)
    seq_id: Optional[int] = Field(None, ge=0)
    session_id: Optional[str] = Field(None, max_length=200)
    model_seq_id: Optional[int] = Field(None, ge=0, le=1_000_000_000)
    base_model: Optional[str] = None
    user_metadata: Optional[dict[str, Any]] = None
    path: str = Field(max_length=1000)
    optimizer: bool = False
    optimizer_config: Optional[dict[str, Any]] = None
    weights_access_token: Optional[str] = None


class CreateSamplingSessionBody(_Body):
    session_id: str = Field(max_length=200)
    sampling_session_seq_id: int = Field(ge=0)
    base_model: Optional[str] = None
    model_path: Optional[str] = Field(None, max_length=1000)


class JoinSamplingSessionBody(_Body):
    sampling_session_id: str = Field(max_length=200)


class ChunkBody(_Body):
    tokens: list[int] = Field(default_factory=list)
    type: str = "encoded_text"


class ModelInputBody(_Body):
    chunks: list[ChunkBody]


class SamplingParamsBody(_Body):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    max_tokens: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: Union[str, list[str], list[int], None] = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


class SampleBody(_Body):
    num_samples: int = Field(1, ge=1, le=64)
    prompt: ModelInputBody
    sampling_params: SamplingParamsBody
    base_model: Optional[str] = None
    model_path: Optional[str] = Field(None, max_length=1000)
    sampling_session_id: Optional[str] = Field(None, max_length=200)
    seq_id: Optional[int] = None
    prompt_logprobs: Optional[bool] = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: Optional[Any] = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: Optional[int] = None
    record_stability_info: Optional[bool] = None


class RetrieveFutureBody(_Body):
    request_id: str = Field(max_length=200)
    allow_metadata_only: bool = False


class TinkerPathBody(_Body):
    tinker_path: str = Field(max_length=1000)


class FinishSessionBody(_Body):
    reason: Optional[dict[str, Any]] = None
    detail: Optional[str] = None


class FuturesTargetBody(_Body):
    type: Literal["sampling_session"] = "sampling_session"
    sampling_session_id: str = Field(max_length=200)
    cloned_sampler_id: int = Field(0, ge=0)


class RetrieveFuturesBody(_Body):
    target: FuturesTargetBody
    prev_cursor: int = Field(0, ge=0)
    timeout: Optional[float] = Field(None, ge=0)
    retrieved_request_ids: list[str] = Field(default_factory=list, max_length=10_000)


class CheckpointTtlBody(_Body):
    ttl_seconds: Optional[int] = None
