"""Rewards for RL (most come from twinkle-rewards): ``reward(trajectories, **kwargs) -> list[float]``."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {"reward": {}}

__getattr__, __dir__ = kind_module(__name__, ("reward",), {"Reward": "twinkle.reward.base:Reward"})
