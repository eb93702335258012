r"""Generalized advantage estimation (GAE) for PPO with a critic.

Per sequence, with per-token rewards :math:`r_t` (usually 0 except the last token's, which holds
the sequence reward), values :math:`V_t` of the state before token :math:`t`, and
:math:`V_T = 0` after the last token (the episode ends)::

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}         (A_T = 0)
    R_t     = A_t + V_t                                (the value targets, "returns")

``lam = 1`` gives Monte-Carlo returns minus the value; ``lam = 0`` the one-step TD error. Works on
plain floats (no torch).
"""

from __future__ import annotations

import math
from typing import Sequence


def gae(
    rewards: Sequence[float], values: Sequence[float], gamma: float = 1.0, lam: float = 0.95
) -> tuple[list[float], list[float]]:
    """Advantages and returns of one sequence (see the module docstring).

    Args:
        rewards: per-token rewards of the completion.
        values: per-token values (same length).
        gamma: discount in ``[0, 1]``.
        lam: GAE's lambda in ``[0, 1]``.

    Returns:
        ``(advantages, returns)``, each as long as ``rewards``.

    Raises:
        ValueError: different lengths, non-finite numbers, or gamma/lam outside ``[0, 1]``.

    Example::

        adv, ret = gae([0.0, 1.0], [0.2, 0.5], gamma=1.0, lam=1.0)   # adv [0.8, 0.5], ret [1.0, 1.0]
    """
    if len(rewards) != len(values):
        raise ValueError(f"gae: {len(rewards)} rewards but {len(values)} values")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gae: gamma and lam must be in [0, 1], got {gamma}, {lam}")
    if not all(math.isfinite(float(x)) for x in [*rewards, *values]):
        raise ValueError("gae: rewards and values must be finite")
    advantages = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        next_value = float(values[t + 1]) if t + 1 < len(values) else 0.0
        delta = float(rewards[t]) + gamma * next_value - float(values[t])
        running = delta + gamma * lam * running
        advantages[t] = running
    returns = [a + float(v) for a, v in zip(advantages, values)]
    return advantages, returns


def whiten(values: Sequence[Sequence[float]], eps: float = 1e-8) -> list[list[float]]:
    """Per-token advantages of a batch shifted to mean 0 and scaled to std 1 over all tokens."""
    flat = [float(x) for seq in values for x in seq]
    if not flat:
        return [list(seq) for seq in values]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat))
    return [[(float(x) - mean) / (std + eps) for x in seq] for seq in values]
