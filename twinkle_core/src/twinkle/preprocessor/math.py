"""Math preprocessors: GSM8K and competition math (MATH) rows -> prompts with the ground truth.

The ground truth goes to ``user_data['answer']`` (what the math rewards read); the full
reference solution to ``user_data['solution']``.
"""

from __future__ import annotations

import re
from typing import Any

from twinkle.preprocessor.base import BadRowError, Preprocessor

_CALCULATOR = re.compile(r"<<[^>]*>>")


def gsm8k_answer(answer: str) -> str | None:
    """The final number after ``####`` in a GSM8K answer (commas removed), or ``None``."""
    if "####" not in answer:
        return None
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return final or None


def braced_group(text: str, open_brace: int) -> str | None:
    """The text inside the ``{...}`` group whose ``{`` is at ``text[open_brace]``, nested braces balanced.

    Args:
        text: the text (LaTeX, usually).
        open_brace: the index of the group's opening ``{``.

    Returns:
        The content between the braces, or ``None`` when the group is never closed.

    Example::

        braced_group(r"\\boxed{\\frac{1}{2}} rest", 6)  # -> r"\\frac{1}{2}"
    """
    depth = 0
    for j in range(open_brace, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : j]
    return None


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (nested braces allowed), or ``None``."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    return braced_group(text, i)


class GSM8KProcessor(Preprocessor):
    """GSM8K rows (``question``, ``answer`` ending in ``#### N``) -> a prompt + ground truth.

    Args:
        system: a system prompt (e.g. asking for the final answer after ``####``);
            ``None`` leaves it to the Template.
        with_answer: also add the reference solution as the assistant turn (for SFT).
        on_bad_row: see :class:`Preprocessor`.

    Returns rows ``{'messages': [...user...], 'user_data': {'answer': 'N', 'solution': ...}}``.

    Example::

        dataset.map(GSM8KProcessor(system="Put the final number after ####."))
    """

    def __init__(self, system: str | None = None, with_answer: bool = False, on_bad_row: str = "raise") -> None:
        super().__init__(on_bad_row)
        self.system = system
        self.with_answer = with_answer

    def preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        question = self.text(row, "question")
        solution = self.text(row, "answer")
        answer = gsm8k_answer(solution)
        if answer is None:
            raise BadRowError("answer", "has no final answer after '####'", fix="GSM8K answers end in '#### <number>'")
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": question})
        if self.with_answer:
            messages.append({"role": "assistant", "content": _CALCULATOR.sub("", solution)})
        return {"messages": messages, "user_data": {"answer": answer, "solution": solution}}


class CompetitionMathProcessor(Preprocessor):
    r"""Competition math rows (``problem``, ``solution`` with ``\boxed{...}``) -> a prompt + ground truth.

    Args:
        system: a system prompt; ``None`` leaves it to the Template.
        with_solution: also add the solution as the assistant turn (for SFT).
        on_bad_row: see :class:`Preprocessor`.

    Returns rows ``{'messages': [...], 'user_data': {'answer': <last boxed>, 'solution': ...}}``.

    Example::

        dataset.map("CompetitionMathProcessor", system="Put the final answer in \\boxed{}.")
    """

    def __init__(self, system: str | None = None, with_solution: bool = False, on_bad_row: str = "raise") -> None:
        super().__init__(on_bad_row)
        self.system = system
        self.with_solution = with_solution

    def preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        problem = self.text(row, "problem")
        solution = self.text(row, "solution")
        answer = last_boxed(solution)
        if not answer:
            raise BadRowError("solution", "has no \\boxed{...} answer", fix="the final answer must be in \\boxed{}")
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": problem})
        if self.with_solution:
            messages.append({"role": "assistant", "content": solution})
        return {"messages": messages, "user_data": {"answer": answer, "solution": solution}}
