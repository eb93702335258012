"""The Reward protocol."""

from __future__ import annotations


class Reward:
    """Base of rewards: ``reward(trajectories, **kwargs) -> list[float]``."""
