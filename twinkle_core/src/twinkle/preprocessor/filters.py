"""Row filters: by encoded length, and against empty conversations."""

from __future__ import annotations

from typing import Any

from twinkle.preprocessor.base import BadRowError, Filter


class LengthFilter(Filter):
    """Keeps encoded rows whose token count is within ``[min_length, max_length]``.

    Reads ``length`` (or ``len(input_ids)``), so apply it after ``dataset.encode()``.

    Args:
        min_length: the shortest row kept.
        max_length: the longest row kept; ``None``: no upper bound.
        min_trained_tokens: also drop rows with fewer label tokens than this (e.g. 1:
            rows whose assistant turn was truncated away).

    Raises:
        BadRowError: the row is not encoded (no ``length`` / ``input_ids``).

    Example::

        dataset.filter(LengthFilter(max_length=512))
    """

    def __init__(self, min_length: int = 1, max_length: int | None = None, min_trained_tokens: int = 0) -> None:
        if max_length is not None and max_length < min_length:
            raise ValueError(f"LengthFilter: max_length={max_length} is below min_length={min_length}")
        self.min_length = min_length
        self.max_length = max_length
        self.min_trained_tokens = min_trained_tokens

    def __call__(self, row: dict[str, Any]) -> bool:
        length = row.get("length")
        if length is None:
            ids = row.get("input_ids")
            if ids is None:
                raise BadRowError("length", "missing: LengthFilter counts tokens", fix="call dataset.encode() first")
            length = len(ids)
        if length < self.min_length or (self.max_length is not None and length > self.max_length):
            return False
        if self.min_trained_tokens:
            labels = row.get("labels") or []
            return sum(1 for t in labels if t != -100) >= self.min_trained_tokens
        return True

    def __repr__(self) -> str:
        return f"LengthFilter(min_length={self.min_length}, max_length={self.max_length})"


class EmptyMessageFilter(Filter):
    """Drops rows whose conversation is missing or has an empty turn.

    A turn is empty when its content is missing or whitespace (an assistant turn that
    only calls tools is fine).

    Args:
        require_assistant: also drop rows without any assistant turn (nothing to train).

    Example::

        dataset.filter("EmptyMessageFilter", require_assistant=True)
    """

    def __init__(self, require_assistant: bool = False) -> None:
        self.require_assistant = require_assistant

    def __call__(self, row: dict[str, Any]) -> bool:
        messages = row.get("messages")
        if not messages:
            return False
        has_assistant = False
        for message in messages:
            role = message.get("role")
            content = message.get("content")
            if role == "assistant":
                has_assistant = True
                if message.get("tool_calls"):
                    continue
            if not isinstance(content, str) or not content.strip():
                return False
        return has_assistant or not self.require_assistant
