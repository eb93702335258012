"""Sampling formats: what a :class:`~twinkle.sampler.base.Sampler` takes and returns.

* :class:`SamplingParams` (pydantic, validated once per ``sample`` call): how to sample.
* :class:`SampleResponse`: one per prompt, in prompt order, holding ``num_samples``
  :class:`SampledSequence` objects (plain dataclasses: cheap to build on the hot path).
* Each :class:`SampledSequence` carries a ready-to-train ``input_feature``: the prompt
  tokens followed by the completion tokens, with ``labels`` ``-100`` on the prompt and the
  completion tokens on the completion, plus the prompt Trajectory's ``user_data``.

Layout of RL batches: the samples of one prompt are contiguous. Flattening
``[seq for resp in responses for seq in resp.sequences]`` gives
``prompt0/sample0, prompt0/sample1, ..., prompt1/sample0, ...``, which is the order
:mod:`twinkle.advantage` expects for groups.

Example::

    params = SamplingParams(max_tokens=32, temperature=1.0, num_samples=4, seed=0, stop=["\\n\\n"])
    responses = sampler.sample(prompts, params)
    for response in responses:
        for seq in response.sequences:
            print(seq.text, seq.stop_reason, sum(seq.logprobs))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Why a sequence ended: ``stop`` (EOS, a stop token id or a stop string) or ``length`` (``max_tokens``).
StopReason = Literal["stop", "length"]

IGNORE_INDEX = -100


class SamplingParams(BaseModel):
    """How to sample completions.

    Args:
        max_tokens: most new tokens per completion (>= 1).
        temperature: softmax temperature; ``0`` means greedy decoding.
        top_p: nucleus sampling mass in ``(0, 1]``; ``1`` disables it.
        top_k: keep the ``k`` most likely tokens; ``0`` or ``-1`` disables it.
        seed: makes sampling reproducible (same prompts + params + weights -> same tokens).
        stop: strings that end a completion; the completion's ``text`` ends before the string,
            its ``tokens`` end with the token that completed it.
        stop_token_ids: token ids that end a completion (kept as the last token), in addition
            to the tokenizer's EOS unless ``ignore_eos``.
        ignore_eos: do not stop at the EOS token.
        num_samples: completions per prompt (a GRPO group).
        logprobs: return the log-probability of each sampled token (under the sampling
            distribution before temperature/top-p/top-k, i.e. the model's own ``log_softmax``).
        prompt_logprobs: return the log-probability of each prompt token (``None`` for the first).

    Raises:
        pydantic.ValidationError: a field is out of range (the message names it).

    Example::

        SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, num_samples=8, stop=["</answer>"])
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    num_samples: int = Field(1, ge=1)
    logprobs: bool = True
    prompt_logprobs: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must be non-empty; remove the empty string from `stop`")
        return value

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _ids_as_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, int):
            return [value]
        return value

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (``temperature == 0``)."""
        return self.temperature == 0.0


@dataclass(slots=True)
class SampledSequence:
    """One sampled completion.

    Attributes:
        tokens: completion token ids (ending with the EOS / stop token when ``stop_reason == "stop"``
            and the stop came from a token; for a stop string, ending with the token that completed it).
        logprobs: per-token log-probabilities of ``tokens`` (``None`` if not requested).
        stop_reason: ``"stop"`` or ``"length"``.
        text: decoded completion (special tokens skipped; cut before a matched stop string).
        input_feature: ready-to-train row: ``input_ids`` = prompt + completion, ``labels`` = -100
            on the prompt and the completion tokens after it, ``attention_mask``, ``old_logps``
            (aligned with ``labels``, when logprobs were requested), ``user_data``. Add per-row
            fields such as ``advantages`` before ``model.forward_backward``.
        user_data: the prompt Trajectory's ``user_data`` (ground truth etc.), shared by the group.
        trajectory: the prompt Trajectory with the completion appended as the last assistant
            message (what :class:`~twinkle.reward.base.Reward` takes); for a token prompt, just
            that assistant message and the prompt's ``user_data``.
    """

    tokens: list[int]
    logprobs: list[float] | None
    stop_reason: str
    text: str
    input_feature: dict[str, Any]
    user_data: dict[str, Any] = field(default_factory=dict)
    trajectory: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (for HTTP transport)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SampledSequence:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


@dataclass(slots=True)
class SampleResponse:
    """The samples of one prompt.

    Attributes:
        sequences: ``num_samples`` completions of this prompt.
        prompt_tokens: the prompt's token ids.
        prompt_logprobs: per-prompt-token log-probabilities (``None`` for the first token) when
            ``SamplingParams.prompt_logprobs``; else ``None``.
    """

    sequences: list[SampledSequence]
    prompt_tokens: list[int]
    prompt_logprobs: list[float | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (for HTTP transport)."""
        return {
            "sequences": [s.to_dict() for s in self.sequences],
            "prompt_tokens": list(self.prompt_tokens),
            "prompt_logprobs": self.prompt_logprobs,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SampleResponse:
        """Inverse of :meth:`to_dict`."""
        return cls(
            sequences=[SampledSequence.from_dict(s) for s in data["sequences"]],
            prompt_tokens=list(data["prompt_tokens"]),
            prompt_logprobs=data.get("prompt_logprobs"),
        )


def build_input_feature(
    prompt_tokens: list[int],
    completion_tokens: list[int],
    *,
    logprobs: list[float] | None = None,
    user_data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The training row of one sample: prompt + completion, labels on the completion only.

    When ``logprobs`` is given it is stored as ``old_logps``, aligned with ``labels`` (as long
    as ``input_ids``, 0.0 on the prompt): the behaviour policy's log-probabilities that RL
    losses read (see :mod:`twinkle.loss.base`).

    Example::

        row = build_input_feature([1, 2, 3], [7, 8], logprobs=[-0.1, -0.2])
        # row["input_ids"] == [1, 2, 3, 7, 8]; row["labels"] == [-100, -100, -100, 7, 8]
        # row["old_logps"] == [0.0, 0.0, 0.0, -0.1, -0.2]
    """
    n_prompt = len(prompt_tokens)
    input_ids = list(prompt_tokens) + list(completion_tokens)
    row: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": [IGNORE_INDEX] * n_prompt + list(completion_tokens),
        "attention_mask": [1] * len(input_ids),
    }
    if logprobs is not None:
        if len(logprobs) != len(completion_tokens):
            raise ValueError(f"{len(logprobs)} logprobs for {len(completion_tokens)} completion tokens")
        row["old_logps"] = [0.0] * n_prompt + [float(x) for x in logprobs]
    if user_data:
        row["user_data"] = dict(user_data)
    return row


def as_sampling_params(sampling_params: Any) -> SamplingParams:
    """``None`` (defaults), a :class:`SamplingParams` or a dict of its fields -> SamplingParams.

    Raises:
        TypeError: anything else.
    """
    if sampling_params is None:
        return SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        return sampling_params
    if isinstance(sampling_params, Mapping):
        return SamplingParams(**sampling_params)
    raise TypeError(f"sampling_params must be a SamplingParams or a dict, got {type(sampling_params).__name__}")


def sampled_sequence(
    prompt_ids: list[int],
    tokens: list[int],
    logprobs: list[float] | None,
    stop_reason: str,
    text: str,
    user_data: dict[str, Any],
    trajectory: dict[str, Any] | None,
) -> SampledSequence:
    """One sample as every sampler returns it: tokens, text, the training row and the trajectory.

    A Trajectory prompt gets the completion appended as its last assistant message; a token
    prompt gets a trajectory holding just the completion and the prompt's ``user_data``
    (what rewards read).
    """
    completion = {"role": "assistant", "content": text}
    if trajectory is not None:
        trajectory = {**trajectory, "messages": [*trajectory["messages"], completion]}
    else:
        trajectory = {"messages": [completion], "user_data": user_data}
    return SampledSequence(
        tokens=tokens,
        logprobs=logprobs,
        stop_reason=stop_reason,
        text=text,
        input_feature=build_input_feature(prompt_ids, tokens, logprobs=logprobs, user_data=user_data),
        user_data=user_data,
        trajectory=trajectory,
    )


def flatten_sequences(responses: list[SampleResponse]) -> list[SampledSequence]:
    """All sequences of ``responses`` in group order (the samples of one prompt contiguous)."""
    return [seq for response in responses for seq in response.sequences]
