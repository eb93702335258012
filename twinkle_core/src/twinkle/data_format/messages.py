"""Chat data: :class:`Message`, :class:`ToolCall`, :class:`Trajectory`.

These are ``TypedDict`` s: at run time they are plain dicts, so they cost nothing on the
hot path and store in Arrow (Hugging Face ``datasets``) as they are. Keep each field's
type the same across rows of one data set (Arrow needs one schema); tool-call
``arguments`` and ``tools`` may be JSON strings for that reason.

:func:`validate_trajectory` checks one at a boundary (user input, an HTTP request) with
pydantic, imported only when it is called.

Example::

    trajectory: Trajectory = {
        "messages": [
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5"},
        ],
        "user_data": {"answer": "5"},
    }
    validate_trajectory(trajectory)
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

try:  # Python 3.11+
    from typing import NotRequired, Required
except ImportError:  # pragma: no cover - Python 3.10
    from typing_extensions import NotRequired, Required

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")

Role = Literal["system", "user", "assistant", "tool"]


class ToolCallFunction(TypedDict):
    """The function a tool call invokes: its ``name`` and ``arguments`` (a JSON object, or its JSON text)."""

    name: str
    arguments: str | dict[str, Any]


class ToolCall(TypedDict, total=False):
    """One tool call made by the assistant (OpenAI layout).

    Fields: ``id`` (optional), ``type`` (``'function'``), ``function``
    (:class:`ToolCallFunction`).
    """

    id: str
    type: Literal["function"]
    function: Required[ToolCallFunction]


class Message(TypedDict, total=False):
    """One chat message.

    Fields:
        role: ``'system'``, ``'user'``, ``'assistant'`` or ``'tool'``.
        content: the text (may be empty or ``None`` for an assistant message that only
            calls tools).
        reasoning_content: the assistant's reasoning, rendered before ``content`` by
            templates that support it.
        tool_calls: the assistant's :class:`ToolCall` s.
        tool_call_id: for ``role='tool'``, which call this answers.
        name: an optional speaker or tool name.
    """

    role: Required[Role]
    content: str | None
    reasoning_content: NotRequired[str | None]
    tool_calls: NotRequired[list[ToolCall] | None]
    tool_call_id: NotRequired[str | None]
    name: NotRequired[str | None]


class Trajectory(TypedDict, total=False):
    """A conversation plus what goes with it: the unit Preprocessors produce and Templates encode.

    Fields:
        messages: the conversation.
        tools: JSON schemas of the tools offered to the model (a list of dicts, or its
            JSON text).
        user_data: anything else the row carries, e.g. the ground truth a reward
            compares with (``{"answer": "42"}``).
        rejected_messages: for preference pairs (DPO), the conversation with the
            rejected answer; ``messages`` holds the chosen one.
    """

    messages: Required[list[Message]]
    tools: NotRequired[list[dict[str, Any]] | str | None]
    user_data: NotRequired[dict[str, Any] | None]
    rejected_messages: NotRequired[list[Message] | None]


class TrajectoryError(ValueError):
    """A trajectory that does not follow :class:`Trajectory`; the message names the row and field."""


_MODELS: dict[str, Any] = {}


def _pydantic_model() -> Any:
    """The pydantic model of a Trajectory, built on first use (pydantic is imported lazily)."""
    if "trajectory" in _MODELS:
        return _MODELS["trajectory"]
    from pydantic import BaseModel, ConfigDict, field_validator, model_validator

    class _Function(BaseModel):
        model_config = ConfigDict(extra="allow")
        name: str
        arguments: str | dict[str, Any]

    class _ToolCall(BaseModel):
        model_config = ConfigDict(extra="allow")
        id: str | None = None
        type: Literal["function"] = "function"
        function: _Function

    class _Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: Role
        content: str | None = None
        reasoning_content: str | None = None
        tool_calls: list[_ToolCall] | None = None
        tool_call_id: str | None = None
        name: str | None = None

        @model_validator(mode="after")
        def _has_content(self) -> _Message:
            if self.content is None and not (self.role == "assistant" and self.tool_calls):
                raise ValueError(f"a {self.role} message needs 'content' (a string)")
            return self

    class _Trajectory(BaseModel):
        model_config = ConfigDict(extra="allow")
        messages: list[_Message]
        tools: list[dict[str, Any]] | str | None = None
        user_data: dict[str, Any] | None = None
        rejected_messages: list[_Message] | None = None

        @field_validator("messages")
        @classmethod
        def _not_empty(cls, value: list[_Message]) -> list[_Message]:
            if not value:
                raise ValueError("a trajectory needs at least one message")
            return value

    _MODELS["trajectory"] = _Trajectory
    return _Trajectory


def validate_trajectory(trajectory: Any, index: int | None = None) -> Trajectory:
    """Check that ``trajectory`` is a valid :class:`Trajectory` (pydantic, at boundaries only).

    Args:
        trajectory: the candidate (a mapping).
        index: the row number, named in the error.

    Returns:
        The same object, unchanged (a plain dict stays a plain dict).

    Raises:
        TrajectoryError: what is wrong, where (``messages.1.role``), and the allowed values.

    Example::

        validate_trajectory({"messages": [{"role": "user", "content": "hi"}]})
    """
    from pydantic import ValidationError

    where = f"row {index}: " if index is not None else ""
    if not isinstance(trajectory, dict):
        raise TrajectoryError(
            f"{where}a trajectory must be a dict with a 'messages' list, got {type(trajectory).__name__}"
        )
    try:
        _pydantic_model().model_validate(trajectory)
    except ValidationError as exc:
        problems = "; ".join(
            f"field {'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        raise TrajectoryError(
            f"{where}invalid trajectory: {problems}. A trajectory is {{'messages': [{{'role': one of {ROLES}, "
            f"'content': str}}, ...], 'tools'?: [...], 'user_data'?: {{...}}}}"
        ) from None
    return trajectory  # type: ignore[return-value]
