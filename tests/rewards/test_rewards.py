"""twinkle-rewards: one call signature, answer extraction and equivalence, clear errors (torch-free)."""

from __future__ import annotations

import sys

import pytest
from twinkle.reward.base import Reward, RewardInputError, call_reward
from twinkle_rewards.rewards import (
    CodeExecutionReward,
    CountdownReward,
    FormatReward,
    GSM8KAccuracyReward,
    LengthPenaltyReward,
    MathAccuracyReward,
    math_equal,
)


def traj(completion: str, **user_data) -> dict:
    return {
        "messages": [{"role": "user", "content": "question"}, {"role": "assistant", "content": completion}],
        "user_data": user_data,
    }


def test_torch_is_not_imported():
    import twinkle_rewards.rewards  # noqa: F401

    assert "torch" not in sys.modules


def test_registered_through_the_plugin():
    from twinkle.runtime import get_registry

    registry = get_registry()
    for name in (
        "GSM8KAccuracyReward",
        "MathAccuracyReward",
        "FormatReward",
        "LengthPenaltyReward",
        "CountdownReward",
        "CodeExecutionReward",
    ):
        cls = registry.resolve("reward", name)
        assert issubclass(cls, Reward)
        assert registry.get("reward", name).plugin != "core"


def test_gsm8k():
    reward = GSM8KAccuracyReward()
    out = reward(
        [
            traj("12 * 9 = 108, so #### 1,200", answer="steps\n#### 1200"),
            traj("<answer>120</answer>", answer="#### 120"),
            traj("I think it is 7.", answer="7"),
            traj("It is 8.", answer="#### 7"),
            traj("no number at all", answer="#### 7"),
        ]
    )
    assert out == [1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("predicted", "truth", "equal"),
    [
        (r"\dfrac{1}{2}", "0.5", True),
        (r"\frac12", r"\frac{1}{2}", True),
        (r"(1, \frac{3}{2})", "(1,1.5)", True),
        (r"50\%", "0.5", True),
        ("x = 3", "3", True),
        (r"\left( 2, 3 \right)", "(2,3)", True),
        ("3.14159", "3.1416", True),  # within rel_tol=1e-4
        ("3.2", "3.1416", False),
        (r"\text{Monday}", "Monday", True),
        ("4", "5", False),
    ],
)
def test_math_equal(predicted, truth, equal):
    assert math_equal(predicted, truth) is equal


def test_math_reward_reads_the_last_boxed_answer():
    reward = MathAccuracyReward()
    assert reward([traj(r"first \boxed{2} then \boxed{\frac{3}{4}}", answer=r"\boxed{0.75}")]) == [1.0]
    assert reward([traj(r"\boxed{\frac{3}{5}}", answer="0.75")]) == [0.0]
    assert reward([traj("no answer", answer="1")]) == [0.0]


def test_format_reward():
    reward = FormatReward()
    assert reward(
        [
            traj("<think>2+2 is 4</think>\n<answer>4</answer>"),
            traj("<answer>4</answer>"),
            traj("<think>x</think><answer>4</answer> trailing"),
        ]
    ) == [1.0, 0.0, 0.0]
    assert FormatReward(require_think=False)([traj("<answer>4</answer>")]) == [1.0]


def test_length_penalty():
    reward = LengthPenaltyReward(max_length=10, margin=4)
    assert reward([traj("x" * 6), traj("x" * 8), traj("x" * 10), traj("x" * 11)]) == [0.0, -0.5, -1.0, -1.0]
    assert LengthPenaltyReward(3, 1, unit="words")([traj("a b"), traj("a b c d")]) == [0.0, -1.0]
    with pytest.raises(ValueError, match="margin"):
        LengthPenaltyReward(10, 20)


def test_countdown():
    reward = CountdownReward()
    gt = {"numbers": [2, 3, 5], "target": 16}
    out = reward(
        [
            traj("<think>..</think><answer>(3 + 5) * 2</answer>", **gt),
            traj("<answer>3 + 5 + 2</answer>", **gt),  # wrong value
            traj("<answer>(3 + 5) * 2 * 1</answer>", **gt),  # uses a number not given
            traj("<answer>__import__('os')</answer>", **gt),  # not arithmetic
            traj("(3+5)*2 = 16", **gt),  # last line, trailing "= target"
        ]
    )
    assert out == [1.0, 0.1, 0.1, 0.0, 1.0]


def test_code_reward_scores_tests():
    reward = CodeExecutionReward(timeout=5)
    code = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "def add(a, b):\n    return a - b"
    tests = ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]
    assert reward([traj(code, tests=tests), traj(wrong, tests=tests)]) == [1.0, 0.5]
    assert CodeExecutionReward(all_or_nothing=True)([traj(wrong, tests=tests)]) == [0.0]


@pytest.mark.parametrize(
    ("reward", "user_data", "match"),
    [
        (GSM8KAccuracyReward(), {}, r"user_data\['answer'\]"),
        (GSM8KAccuracyReward(), {"answer": "no digits"}, "has no number"),
        (MathAccuracyReward(), {"answer": "  "}, r"user_data\['answer'\]"),
        (CountdownReward(), {"numbers": [1, 2]}, r"user_data\['target'\]"),
        (CountdownReward(), {"numbers": ["a"], "target": 3}, "list of ints"),
        (CodeExecutionReward(), {"tests": []}, r"user_data\['tests'\]"),
        (CodeExecutionReward(), {"tests": [1]}, "non-empty list of test snippets"),
    ],
)
def test_bad_ground_truth_is_a_clear_error(reward, user_data, match):
    with pytest.raises(RewardInputError, match=match):
        reward([traj("1", **user_data)])


def test_one_signature_validated():
    reward = GSM8KAccuracyReward()
    with pytest.raises(RewardInputError, match="list of trajectories"):
        reward(traj("1", answer="1"))
    with pytest.raises(RewardInputError, match="no assistant message"):
        reward([{"messages": [{"role": "user", "content": "hi"}], "user_data": {"answer": "1"}}])

    def bad_length(trajectories, **kwargs):
        return [1.0]

    with pytest.raises(ValueError, match="returned 1 rewards for 2"):
        call_reward(bad_length, [traj("1"), traj("2")])

    def nan_reward(trajectories, **kwargs):
        return [float("nan")] * len(trajectories)

    with pytest.raises(ValueError, match="non-finite"):
        call_reward(nan_reward, [traj("1")])
