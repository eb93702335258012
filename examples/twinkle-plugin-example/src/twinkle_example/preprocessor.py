"""QAPairProcessor: rows with ``question`` and ``answer`` columns -> chat trajectories."""

from __future__ import annotations

from typing import Any

from twinkle.preprocessor import Preprocessor


class QAPairProcessor(Preprocessor):
    """``{'question': q, 'answer': a}`` -> a user/assistant Trajectory (answer kept in user_data).

    Args:
        system: an optional system prompt to prepend.
        on_bad_row: ``'raise'`` or ``'drop'`` (see :class:`twinkle.preprocessor.Preprocessor`).

    Example::

        QAPairProcessor()([{"question": "2+2?", "answer": "4"}])
    """

    def __init__(self, system: str | None = None, on_bad_row: str = "raise") -> None:
        super().__init__(on_bad_row=on_bad_row)
        self.system = system

    def preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        question = self.text(row, "question")
        answer = self.text(row, "answer")
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return {"messages": messages, "user_data": {"answer": answer}}
