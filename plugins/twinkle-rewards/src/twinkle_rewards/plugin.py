"""Entry point of twinkle-rewards: registers its components with Twinkle (lazy targets, nothing heavy imported)."""

from __future__ import annotations

import twinkle


@twinkle.hookimpl
def twinkle_register_components(register) -> None:  # noqa: ANN001
    for name in (
        "GSM8KAccuracyReward",
        "MathAccuracyReward",
        "FormatReward",
        "LengthPenaltyReward",
        "CountdownReward",
        "CodeExecutionReward",
    ):
        register("reward", name, f"twinkle_rewards.rewards:{name}")
