"""The RL examples learn: GRPO's mean reward rises, DPO's chosen-vs-rejected margin grows, the distilled
student moves to its teacher, PPO with a critic learns, the agent learns to call its tool (fixed seeds, CPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"twinkle_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_grpo_example_reward_rises(capsys):
    summary = load("grpo").main(seed=0)
    curve = summary["rewards"]
    print("GRPO reward curve:", " ".join(f"{r:.2f}" for r in curve))
    assert len(curve) == 60
    # chance level is 1/5 (one digit out of 0..4). Measured with seed 0: first 12 steps 0.219, last 12 0.369
    assert summary["last"] >= summary["first"] + 0.1, summary
    assert summary["last"] >= 0.3, summary
    assert summary["sync_seconds_mean"] > 0


def test_dpo_example_margin_grows():
    summary = load("dpo").main(seed=0)
    margins = summary["margins"]
    print("DPO reward margins over all pairs:", " ".join(f"{m:+.3f}" for m in margins))
    assert abs(margins[0]) < 1e-6  # the adapter starts as the identity: policy == reference
    # measured with seed 0: +0.000 +0.091 +0.112 +0.115 +0.127, accuracy 0.00 -> 0.79
    assert margins[-1] > margins[1] > margins[0], summary  # grows over the run
    assert summary["last"] > 0.08, summary
    assert summary["accuracy"][-1] >= 0.7, summary


def test_distill_on_policy_example_moves_the_student_to_the_teacher():
    summary = load("distill_on_policy").main(seed=0, verbose=False)
    print({k: v for k, v in summary.items() if not isinstance(v, list)})
    assert len(summary["accuracy"]) == 20
    # measured with seed 0: exact KL(student || teacher) at the answer 0.554 -> 0.222 in 20 steps
    assert summary["answer_kl_after"] < 0.6 * summary["answer_kl_before"], summary
    assert summary["answer_kl_before"] > 0.3, summary  # the teacher really differs from the warmed-up base


def test_ppo_critic_example_learns():
    summary = load("ppo_critic").main(seed=0, verbose=False)
    print({k: v for k, v in summary.items() if not isinstance(v, list)})
    assert len(summary["rewards"]) == 40
    # measured with seed 0: mean reward 0.236 -> 0.319 (first vs last 8 steps), value mse 8.95 -> 0.23
    assert summary["last"] >= summary["first"] + 0.05, summary
    assert summary["last_value_mse"] < 0.1 * summary["first_value_mse"], summary


def test_agent_tools_example_learns_to_call_the_tool():
    # The slowest test of the file (about 16 min on the shared, loaded 2-core machine). Smaller runs
    # tried with seed 0 did not learn: 40 warm-up steps (4 tasks x 8, 16 steps) leave malformed calls
    # that cost 0.1, so the policy stops calling (tool-call rate 0.44 -> 0.00 by step 3); 80 warm-up
    # steps with 4 tasks x 8 and lr 1e-2 collapse to "Done." as well (rate 0.94 -> 0.00 by step 9).
    summary = load("agent_tools").main(seed=0, verbose=False)
    print({k: v for k, v in summary.items() if not isinstance(v, list)})
    print("final reward per step:", " ".join(f"{r:.2f}" for r in summary["rewards"]))
    assert len(summary["rewards"]) == 20
    # measured with seed 0: tool-call rate 0.85 -> 0.95 (first vs last 4 steps), final reward 0.375 -> 0.375
    assert summary["last_tool_rate"] >= summary["first_tool_rate"] + 0.05, summary
    assert summary["last_tool_rate"] >= 0.9, summary
    assert summary["last"] >= summary["first"] - 0.05, summary  # calling more did not cost reward
