"""Rewards for RL (most come from twinkle-rewards): ``reward(trajectories, **kwargs) -> list[float]``."""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {"reward": {}}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.reward.base import Reward as Reward
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__)
