"""Rewards: GSM8K and math answer accuracy, format, length penalty, countdown, code execution.

Every reward has the one Twinkle signature ``reward(trajectories, **kwargs) -> list[float]``:
the sampled completion is the last assistant message of each trajectory and the ground
truth is read from ``trajectory["user_data"]`` (the key is a constructor argument).
Missing or unusable ground truth raises :class:`twinkle.reward.base.RewardInputError`
naming the key and the fix. Nothing here needs torch.

Example::

    from twinkle_rewards.rewards import GSM8KAccuracyReward

    traj = {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "... #### 5"}],
            "user_data": {"answer": "2 + 3 = 5\\n#### 5"}}
    GSM8KAccuracyReward()([traj])  # [1.0]
"""

from __future__ import annotations

import ast
import math
import operator
import re
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any, Mapping, Sequence

from twinkle.preprocessor.math import braced_group
from twinkle.reward.base import Reward, RewardInputError, check_trajectories, completion_text, ground_truth

from twinkle_rewards.sandbox import run_sandboxed

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# ---------------------------------------------------------------------------------------------
# safe arithmetic


_BIN_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def safe_eval(expression: str, allow_pow: bool = True) -> Fraction:
    """Evaluate an arithmetic expression of numbers, ``+ - * /``, ``**`` (small exponents) and parentheses exactly.

    Raises:
        ValueError: anything else (names, calls, huge powers, division by zero).
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from exc

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _BIN_OPS[type(node.op)](left, right)
        if allow_pow and isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            base, exp = ev(node.left), ev(node.right)
            if exp.denominator != 1 or abs(exp) > 64 or abs(base) > 10**12:
                raise ValueError("power too large or not an integer power")
            if base == 0 and exp < 0:
                raise ValueError("division by zero")
            return base ** int(exp)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
            return _UNARY_OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported element {type(node).__name__} in {expression!r}")

    return ev(tree)


def _to_number(text: str) -> Fraction | None:
    """A number from ``text`` ("1,234", "3/4", "-2.5", "50%", "1e3"), or None."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    percent = t.endswith("%")
    t = t.rstrip("%").strip()
    if not t:
        return None
    try:
        value = safe_eval(t, allow_pow=True)
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return value / 100 if percent else value


def _close(a: Fraction, b: Fraction, rel_tol: float, abs_tol: float) -> bool:
    return a == b or math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=abs_tol)


# ---------------------------------------------------------------------------------------------
# GSM8K


def gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K-style text: after ``####``, in ``<answer>``, ``\\boxed{}``, else the last number."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        m = _NUMBER.search(tail)
        return m.group(0).replace(",", "") if m else tail.strip() or None
    m = _ANSWER_TAG.findall(text)
    if m:
        nums = _NUMBER.findall(m[-1])
        return nums[-1].replace(",", "") if nums else m[-1].strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    nums = _NUMBER.findall(text)
    return nums[-1].replace(",", "") if nums else None


class GSM8KAccuracyReward(Reward):
    """1.0 when the completion's final number equals the GSM8K ground truth, else 0.0.

    The completion's answer is read after ``####``, inside ``<answer>...</answer>`` or
    ``\\boxed{...}``, else the last number in it. The ground truth ``user_data[answer_key]``
    may be the full GSM8K solution (``... #### 72``) or just the number.

    Args:
        answer_key: the ``user_data`` key of the ground truth.
        rel_tol / abs_tol: numeric tolerance.

    Raises:
        RewardInputError: missing ground truth, or ground truth without a number.
    """

    name = "gsm8k_accuracy"

    def __init__(self, answer_key: str = "answer", rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> None:
        self.answer_key = answer_key
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol

    def score(self, completion: str, trajectory: Mapping[str, Any], **kwargs: Any) -> float:
        """See the class docstring."""
        truth_text = str(ground_truth(trajectory, self.answer_key, self))
        truth = gsm8k_answer(truth_text)
        truth_num = _to_number(truth) if truth is not None else None
        if truth_num is None:
            raise RewardInputError(
                f"{self.name}: ground truth user_data[{self.answer_key!r}]={truth_text[:80]!r} has no number; "
                "GSM8K answers end with '#### <number>'"
            )
        got = gsm8k_answer(completion)
        got_num = _to_number(got) if got is not None else None
        return float(got_num is not None and _close(got_num, truth_num, self.rel_tol, self.abs_tol))


# ---------------------------------------------------------------------------------------------
# math (LaTeX)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = text.find("{", idx)
    if i < 0:
        rest = text[idx:].split(None, 1)  # "\boxed 5"
        return rest[1].split()[0] if len(rest) > 1 else None
    return braced_group(text, i)


def _replace_frac(s: str) -> str:
    """``\\frac{a}{b}`` -> ``(a)/(b)`` (nested), ``\\frac12`` -> ``(1)/(2)``."""
    out = s
    for _ in range(20):
        m = re.search(r"\\frac", out)
        if not m:
            break
        i = m.end()
        args = []
        for _k in range(2):
            while i < len(out) and out[i] == " ":
                i += 1
            if i < len(out) and out[i] == "{":
                depth, j = 0, i
                while j < len(out):
                    depth += out[j] == "{"
                    depth -= out[j] == "}"
                    if depth == 0:
                        break
                    j += 1
                args.append(out[i + 1 : j])
                i = j + 1
            elif i < len(out):
                args.append(out[i])
                i += 1
        if len(args) < 2:
            break
        out = out[: m.start()] + f"({args[0]})/({args[1]})" + out[i:]
    return out


def normalize_math(answer: str) -> str:
    """A canonical string form of a LaTeX answer (used for non-numeric comparison and before parsing)."""
    s = answer.strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:mathrm|textbf|mathbf)\{([^{}]*)\}", r"\1", s)
    for a, b in (
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\ ", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\cdot", "*"),
        ("\\times", "*"),
        ("\\div", "/"),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
        ("\\%", "%"),
        ("\\$", ""),
        ("$", ""),
    ):
        s = s.replace(a, b)
    s = _replace_frac(s)
    s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"^[a-zA-Z]\s*=", "", s)  # "x=5" -> "5"
    s = s.rstrip(".")
    return s


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def math_equal(predicted: str, truth: str, rel_tol: float = 1e-4, abs_tol: float = 1e-8) -> bool:
    """Whether two math answers are equivalent: numerically (fractions, decimals, percentages, LaTeX)
    within tolerance, element-wise for tuples/lists, else by normalized string."""
    a, b = normalize_math(predicted), normalize_math(truth)
    if a == b:
        return True
    na, nb = _to_number(a), _to_number(b)
    if na is not None and nb is not None:
        return _close(na, nb, rel_tol, abs_tol)
    strip = lambda x: x[1:-1] if len(x) >= 2 and x[0] in "([" and x[-1] in ")]" else x  # noqa: E731
    pa, pb = _split_top_level(strip(a)), _split_top_level(strip(b))
    if len(pa) > 1 and len(pa) == len(pb):
        return all(math_equal(x, y, rel_tol, abs_tol) for x, y in zip(pa, pb))
    return False


class MathAccuracyReward(Reward):
    """1.0 when the completion's final answer is equivalent to the ground truth, else 0.0.

    The answer is the last ``\\boxed{...}`` of the completion (else ``<answer>...</answer>``,
    else the last number). Equivalence: LaTeX normalized (``\\frac``, ``\\dfrac``, ``\\left``,
    ``\\text{}``, ``$``, ``x=``), then numeric comparison of fractions/decimals/percentages with
    ``rel_tol``/``abs_tol``, element-wise for tuples, else string equality. The ground truth
    ``user_data[answer_key]`` may itself contain ``\\boxed{}``.

    Raises:
        RewardInputError: missing ground truth.
    """

    name = "math_accuracy"

    def __init__(self, answer_key: str = "answer", rel_tol: float = 1e-4, abs_tol: float = 1e-8) -> None:
        self.answer_key = answer_key
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol

    def score(self, completion: str, trajectory: Mapping[str, Any], **kwargs: Any) -> float:
        """See the class docstring."""
        truth = str(ground_truth(trajectory, self.answer_key, self))
        truth = last_boxed(truth) or truth
        predicted = last_boxed(completion)
        if predicted is None:
            tags = _ANSWER_TAG.findall(completion)
            if tags:
                predicted = tags[-1]
            else:
                nums = _NUMBER.findall(completion)
                predicted = nums[-1] if nums else None
        if predicted is None:
            return 0.0
        return float(math_equal(predicted, truth, self.rel_tol, self.abs_tol))


# ---------------------------------------------------------------------------------------------
# format / length


class FormatReward(Reward):
    """1.0 when the completion is ``<think>...</think>`` followed by ``<answer>...</answer>`` (nothing else), else 0.0.

    Args:
        think_tag / answer_tag: the tag names.
        require_think: when False only the answer block is required (optionally preceded by a think block).
    """

    name = "format"

    def __init__(self, think_tag: str = "think", answer_tag: str = "answer", require_think: bool = True) -> None:
        t, a = re.escape(think_tag), re.escape(answer_tag)
        think = rf"<{t}>.*?</{t}>\s*"
        pattern = rf"^\s*{think if require_think else f'(?:{think})?'}<{a}>.*?</{a}>\s*$"
        self.pattern = re.compile(pattern, re.DOTALL)

    def score(self, completion: str, trajectory: Mapping[str, Any], **kwargs: Any) -> float:
        """See the class docstring."""
        return float(bool(self.pattern.match(completion)))


class LengthPenaltyReward(Reward):
    """Soft overlong penalty (DAPO): 0 up to ``max_length - margin``, falling linearly to -1 at ``max_length``.

    ``L`` = completion length in characters (``unit="chars"``), whitespace-separated words
    (``"words"``), or tokens when ``tokenizer`` (anything with ``encode``) is given::

        r = 0                                   if L <= max_length - margin
        r = (max_length - margin - L) / margin  if max_length - margin < L <= max_length
        r = -1                                  if L > max_length

    Raises:
        ValueError: bad ``max_length``/``margin``/``unit``.
    """

    name = "length_penalty"

    def __init__(self, max_length: int, margin: int | None = None, unit: str = "chars", tokenizer: Any = None) -> None:
        if max_length < 1:
            raise ValueError(f"LengthPenaltyReward: max_length must be >= 1, got {max_length}")
        margin = max(1, max_length // 4) if margin is None else margin
        if not 0 < margin <= max_length:
            raise ValueError(f"LengthPenaltyReward: margin must be in (0, max_length], got {margin}")
        if unit not in ("chars", "words"):
            raise ValueError(f"LengthPenaltyReward: unit must be 'chars' or 'words', got {unit!r}")
        self.max_length, self.margin, self.unit, self.tokenizer = max_length, margin, unit, tokenizer

    def length(self, completion: str) -> int:
        """The completion's length in the configured unit."""
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(completion, add_special_tokens=False))
        return len(completion.split()) if self.unit == "words" else len(completion)

    def score(self, completion: str, trajectory: Mapping[str, Any], **kwargs: Any) -> float:
        """See the class docstring."""
        n = self.length(completion)
        free = self.max_length - self.margin
        if n <= free:
            return 0.0
        if n <= self.max_length:
            return (free - n) / self.margin
        return -1.0


# ---------------------------------------------------------------------------------------------
# countdown


class CountdownReward(Reward):
    """Countdown: combine ``user_data["numbers"]`` with ``+ - * /`` to reach ``user_data["target"]``.

    The equation is read from the last ``<answer>...</answer>`` (else the completion's last
    line; a trailing ``= target`` is ignored). Reward: ``1.0`` when it uses each given number
    exactly once (``use_all=True``; at most once otherwise), only arithmetic, and equals the
    target; ``format_score`` when an equation was found but is wrong; ``0.0`` otherwise.

    Raises:
        RewardInputError: missing or non-numeric ``numbers``/``target``.
    """

    name = "countdown"

    def __init__(
        self, numbers_key: str = "numbers", target_key: str = "target", format_score: float = 0.1, use_all: bool = True
    ) -> None:
        self.numbers_key, self.target_key = numbers_key, target_key
        self.format_score, self.use_all = format_score, use_all

    def score(self, completion: str, trajectory: Mapping[str, Any], **kwargs: Any) -> float:
        """See the class docstring."""
        numbers = ground_truth(trajectory, self.numbers_key, self)
        target = ground_truth(trajectory, self.target_key, self)
        try:
            numbers = sorted(int(n) for n in numbers)
            target = Fraction(str(target))
        except (TypeError, ValueError):
            raise RewardInputError(
                f"{self.name}: user_data[{self.numbers_key!r}] must be a list of ints and "
                f"user_data[{self.target_key!r}] a number; got {numbers!r} and {target!r}"
            ) from None
        tags = _ANSWER_TAG.findall(completion)
        equation = tags[-1] if tags else (completion.strip().splitlines() or [""])[-1]
        equation = equation.strip().split("=")[0].strip()
        if not equation or not re.fullmatch(r"[\d+\-*/().\s]+", equation):
            return 0.0
        used = sorted(int(n) for n in re.findall(r"\d+", equation))
        if self.use_all:
            ok_numbers = used == numbers
        else:
            pool = list(numbers)
            ok_numbers = all(pool.remove(n) is None if n in pool else False for n in used)
        try:
            value = safe_eval(equation, allow_pow=False)
        except (ValueError, ZeroDivisionError, RecursionError):
            return self.format_score
        return 1.0 if ok_numbers and value == target else self.format_score


# ---------------------------------------------------------------------------------------------
# code execution

_CODE_BLOCK = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The last fenced code block of ``completion`` (```python ... ```), else the whole text."""
    blocks = _CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


class CodeExecutionReward(Reward):
    """Fraction of ``user_data["tests"]`` (assert snippets) that pass against the completion's code.

    The code (last fenced block, else the whole completion) and then each test run in a
    sandboxed subprocess (:func:`twinkle_rewards.sandbox.run_sandboxed`): fresh temp dir,
    CPU/memory/file-size limits, no network, no process creation, no writes outside the
    temp dir, wall-clock timeout that kills the whole process group. Several completions
    run in parallel (``max_workers``).

    Args:
        tests_key: ``user_data`` key holding a list of test snippets (or one string of code).
        timeout: seconds per completion; memory_mb: address-space limit.
        all_or_nothing: 1.0 only when every test passes (else the pass fraction).

    Raises:
        RewardInputError: missing or empty tests.
    """

    name = "code_execution"

    def __init__(
        self,
        tests_key: str = "tests",
        timeout: float = 5.0,
        memory_mb: int = 512,
        all_or_nothing: bool = False,
        max_workers: int = 2,
    ) -> None:
        self.tests_key, self.timeout, self.memory_mb = tests_key, timeout, memory_mb
        self.all_or_nothing, self.max_workers = all_or_nothing, max_workers

    def _tests(self, trajectory: Mapping[str, Any]) -> list[str]:
        tests = ground_truth(trajectory, self.tests_key, self)
        if isinstance(tests, str):
            tests = [tests]
        if not isinstance(tests, (list, tuple)) or not tests or not all(isinstance(t, str) for t in tests):
            raise RewardInputError(
                f"{self.name}: user_data[{self.tests_key!r}] must be a non-empty list of test snippets "
                f"(e.g. ['assert f(1) == 2']), got {tests!r}"
            )
        return list(tests)

    def score(self, completion: str, trajectory: Mapping[str, Any], **kwargs: Any) -> float:
        """See the class docstring."""
        tests = self._tests(trajectory)
        result = run_sandboxed(extract_code(completion), tests, timeout=self.timeout, memory_mb=self.memory_mb)
        if self.all_or_nothing:
            return float(result.passed == result.total)
        return result.passed / result.total

    def __call__(self, trajectories: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[float]:
        """Score ``trajectories`` in parallel subprocesses; one float each."""
        check_trajectories(trajectories, self)
        jobs = [(completion_text(t, self), t) for t in trajectories]
        for _, t in jobs:  # validate every ground truth before running anything
            self._tests(t)
        with ThreadPoolExecutor(max_workers=max(1, self.max_workers)) as pool:
            return list(pool.map(lambda job: self.score(job[0], job[1]), jobs))
