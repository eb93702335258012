"""Preference pairs (DPO): ``prompt`` / ``chosen`` / ``rejected`` -> two conversations."""

from __future__ import annotations

from typing import Any

from twinkle.preprocessor.base import BadRowError, Preprocessor
from twinkle.preprocessor.chat import MessagesProcessor


class DPOProcessor(Preprocessor):
    """Rows with ``prompt``, ``chosen`` and ``rejected`` -> ``messages`` (chosen) + ``rejected_messages``.

    ``prompt`` is text (one user turn) or a list of messages; ``chosen`` / ``rejected`` are
    the assistant's text or a list of messages that follow the prompt. ``Template.encode``
    then encodes both sides (``input_ids`` / ``rejected_input_ids``).

    Args:
        system: a system prompt; ``None`` leaves it to the Template.
        on_bad_row: see :class:`Preprocessor`.

    Example::

        dataset.map("DPOProcessor")
    """

    def __init__(self, system: str | None = None, on_bad_row: str = "raise") -> None:
        super().__init__(on_bad_row)
        self.system = system

    def _turns(self, row: dict[str, Any], name: str, role: str) -> list[dict[str, Any]]:
        value = self.column(row, name)
        if isinstance(value, str):
            if not value.strip():
                raise BadRowError(name, "is empty")
            return [{"role": role, "content": value}]
        if isinstance(value, list) and value:
            return [MessagesProcessor._message(name, j, m) for j, m in enumerate(value)]
        raise BadRowError(name, f"expected text or a list of messages, got {value!r:.60}")

    def preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        prompt = self._turns(row, "prompt", "user")
        chosen = self._turns(row, "chosen", "assistant")
        rejected = self._turns(row, "rejected", "assistant")
        for name, side in (("chosen", chosen), ("rejected", rejected)):
            if side[-1]["role"] != "assistant":
                raise BadRowError(name, "must end with an assistant message")
        head = [{"role": "system", "content": self.system}] if self.system and prompt[0]["role"] != "system" else []
        return {"messages": head + prompt + chosen, "rejected_messages": head + prompt + rejected}
