"""Advantage estimators: GRPO (group / batch / no scaling), RLOO and REINFORCE with a baseline.

All take flat rewards with the ``G`` samples of each prompt contiguous (see
:mod:`twinkle.advantage.base`) and return plain floats.
"""

from __future__ import annotations

import math

from twinkle.advantage.base import Advantage


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    """Sample standard deviation (``n - 1``; as ``torch.std``); 0 for one value."""
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


class GRPOAdvantage(Advantage):
    """Group-relative advantages: ``A_i = (r_i - mean(group)) / (std + eps)``.

    Args:
        scale: ``"group"`` divides by the std of the prompt's group (GRPO), ``"batch"`` by the
            std of all rewards in the call, ``"none"`` does not divide (Dr. GRPO).
        eps: added to the std (``1e-4``, as TRL).

    Example::

        GRPOAdvantage()([1.0, 0.0, 0.0, 0.0], num_generations=4)  # -> about [1.5, -0.5, -0.5, -0.5]
    """

    SCALES = ("group", "batch", "none")

    def __init__(self, scale: str = "group", eps: float = 1e-4) -> None:
        if scale not in self.SCALES:
            raise ValueError(f"GRPOAdvantage: scale={scale!r} must be one of {self.SCALES}")
        self.scale = scale
        self.eps = eps

    def compute(self, groups: list[list[float]]) -> list[float]:
        """See the class docstring."""
        batch_std = _std([r for g in groups for r in g]) if self.scale == "batch" else 0.0
        out: list[float] = []
        for group in groups:
            m = _mean(group)
            if self.scale == "group":
                denom = _std(group) + self.eps
            elif self.scale == "batch":
                denom = batch_std + self.eps
            else:
                denom = 1.0
            out.extend((r - m) / denom for r in group)
        return out


class RLOOAdvantage(Advantage):
    """REINFORCE leave-one-out: ``A_i = r_i - mean_{j != i}(r_j)`` within each group.

    Equivalent to ``G / (G - 1) * (r_i - mean(group))``. Needs ``G >= 2``.

    Example::

        RLOOAdvantage()([1.0, 0.0, 0.0], num_generations=3)  # -> [1.0, -0.5, -0.5]
    """

    def compute(self, groups: list[list[float]]) -> list[float]:
        """See the class docstring."""
        out: list[float] = []
        for group in groups:
            n = len(group)
            if n < 2:
                raise ValueError("RLOOAdvantage needs num_generations >= 2 (a leave-one-out baseline)")
            total = sum(group)
            out.extend(r - (total - r) / (n - 1) for r in group)
        return out


class REINFORCEAdvantage(Advantage):
    """REINFORCE with a baseline: ``A_i = r_i - b``.

    Args:
        baseline: ``"batch"``: ``b`` is the mean reward of the call; ``"group"``: the mean of the
            prompt's group; ``"ema"``: an exponential moving average of past batch means
            (``b <- momentum * b + (1 - momentum) * mean``, updated after use; starts at the first
            batch's mean); ``"none"``: ``b = 0`` (plain REINFORCE).
        momentum: EMA momentum for ``baseline="ema"``.
        whiten: also divide by the batch std (+1e-8).

    Example::

        REINFORCEAdvantage()([1.0, 0.0, 1.0, 0.0])  # -> [0.5, -0.5, 0.5, -0.5]
    """

    BASELINES = ("batch", "group", "ema", "none")

    def __init__(self, baseline: str = "batch", momentum: float = 0.9, whiten: bool = False) -> None:
        if baseline not in self.BASELINES:
            raise ValueError(f"REINFORCEAdvantage: baseline={baseline!r} must be one of {self.BASELINES}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"REINFORCEAdvantage: momentum={momentum} must be in [0, 1)")
        self.baseline = baseline
        self.momentum = momentum
        self.whiten = whiten
        self.running: float | None = None

    def compute(self, groups: list[list[float]]) -> list[float]:
        """See the class docstring."""
        flat = [r for g in groups for r in g]
        batch_mean = _mean(flat)
        if self.baseline == "group":
            out = [r - _mean(g) for g in groups for r in g]
        else:
            if self.baseline == "batch":
                b = batch_mean
            elif self.baseline == "ema":
                b = batch_mean if self.running is None else self.running
                self.running = b * self.momentum + (1.0 - self.momentum) * batch_mean
            else:
                b = 0.0
            out = [r - b for r in flat]
        if self.whiten:
            s = _std(flat) + 1e-8
            out = [a / s for a in out]
        return out
