"""The Tinker loss functions, on per-token log-probabilities: core's (:mod:`twinkle.loss.tinker`).

One implementation per formula: the Tinker API's engine and the ``TinkerLoss`` component of the
twinkle API call the same functions. See :mod:`twinkle.loss.tinker` for the formulas.
"""

from __future__ import annotations

import math
from typing import Any

from twinkle.loss.tinker import (
    LOSS_CONFIG,
    LOSS_INPUTS,
    LOSSES,
    OPTIONAL_INPUTS,
    LossConfigError,
    cispo,
    cross_entropy,
    dro,
    gspo,
    importance_sampling,
    ppo,
    stable_reinforce,
)
from twinkle.loss.tinker import check_loss as _check_loss


def check_loss(loss_fn: str, config: dict[str, Any] | None) -> dict[str, float]:
    """Core's :func:`twinkle.loss.tinker.check_loss`, refusing non-finite values first (a NaN clip
    threshold would make every step NaN; tenants' configs never carry one to the engine).

    Raises:
        LossConfigError: a non-finite value, or what core's check raises.
    """
    for key, value in (config or {}).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise LossConfigError(f"loss_fn_config[{key!r}]={value!r} is not a finite number")
    return _check_loss(loss_fn, config)


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
