"""The Advantage protocol: turn per-sample rewards into per-sample advantages.

``advantage(rewards, num_generations=G) -> list[float]`` (same length as ``rewards``).
Rewards arrive flattened with the ``G`` samples of one prompt contiguous::

    [p0/s0, p0/s1, ..., p0/s{G-1}, p1/s0, ..., p1/s{G-1}, ...]

which is exactly the order of
``[seq for response in sampler.sample(prompts, SamplingParams(num_samples=G)) for seq in response.sequences]``.

An estimator may be a subclass of :class:`Advantage` (implement :meth:`compute`) or a
plain function with the same call signature. Implementations work on plain Python floats
(no torch needed); tensors and numpy arrays are accepted as input.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


class Advantage:
    """Base of advantage estimators: ``advantage(rewards, num_generations=G) -> list[float]``."""

    def __call__(self, rewards: Any, num_generations: int = 1) -> list[float]:
        """Validate ``rewards`` and compute one advantage per reward.

        Args:
            rewards: flat sequence of ``B * G`` rewards (list, tuple, numpy array or 1-D tensor),
                the ``G`` samples of each prompt contiguous.
            num_generations: ``G``, samples per prompt.

        Returns:
            ``B * G`` advantages in the same order.

        Raises:
            ValueError: rewards not 1-D / not finite, or their count is not a multiple of ``G``.
        """
        values = as_reward_list(rewards)
        groups = split_groups(values, num_generations, type(self).__name__)
        out = self.compute(groups)
        if len(out) != len(values):
            raise ValueError(f"{type(self).__name__} returned {len(out)} advantages for {len(values)} rewards")
        return out

    def compute(self, groups: list[list[float]]) -> list[float]:
        """Advantages of ``groups`` (B lists of G rewards), flattened in the same order."""
        raise TypeError(f"{type(self).__name__} must implement Advantage.compute")


def as_reward_list(rewards: Any) -> list[float]:
    """``rewards`` as a flat list of finite floats (accepts lists, numpy arrays, 1-D tensors)."""
    if hasattr(rewards, "tolist") and not isinstance(rewards, (list, tuple)):
        rewards = rewards.tolist()
    if not isinstance(rewards, Sequence) or isinstance(rewards, str):
        raise ValueError(f"rewards must be a flat list of numbers, got {type(rewards).__name__}")
    out = []
    for i, r in enumerate(rewards):
        if isinstance(r, (list, tuple)):
            raise ValueError(
                f"rewards must be flat (shape [B*G]) with the samples of one prompt contiguous, "
                f"got a nested sequence at position {i}; flatten it: [r for group in rewards for r in group]"
            )
        value = float(r)
        if not math.isfinite(value):
            raise ValueError(f"reward at position {i} is {value}; rewards must be finite")
        out.append(value)
    return out


def split_groups(values: list[float], num_generations: int, who: str = "advantage") -> list[list[float]]:
    """Split a flat list into contiguous groups of ``num_generations``."""
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"{who}: num_generations must be a positive int, got {num_generations!r}")
    if len(values) % num_generations:
        raise ValueError(
            f"{who}: {len(values)} rewards do not split into groups of num_generations={num_generations}; "
            f"pass B*G rewards with the {num_generations} samples of each prompt contiguous"
        )
    return [values[i : i + num_generations] for i in range(0, len(values), num_generations)]
