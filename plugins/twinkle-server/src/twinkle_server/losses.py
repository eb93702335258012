"""The Tinker loss functions, on per-token log-probabilities: core's (:mod:`twinkle.loss.tinker`).

One implementation per formula: the Tinker API's engine and the ``TinkerLoss`` component of the
twinkle API call the same functions. See :mod:`twinkle.loss.tinker` for the formulas.
"""

from __future__ import annotations

from twinkle.loss.tinker import (
    LOSS_CONFIG,
    LOSS_INPUTS,
    LOSSES,
    OPTIONAL_INPUTS,
    LossConfigError,
    check_loss,
    cispo,
    cross_entropy,
    dro,
    gspo,
    importance_sampling,
    ppo,
    stable_reinforce,
)

__all__ = [
    "LOSS_CONFIG",
    "LOSS_INPUTS",
    "LOSSES",
    "OPTIONAL_INPUTS",
    "LossConfigError",
    "check_loss",
    "cispo",
    "cross_entropy",
    "dro",
    "gspo",
    "importance_sampling",
    "ppo",
    "stable_reinforce",
]
