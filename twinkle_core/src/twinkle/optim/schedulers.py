"""Warmup schedulers: linear warmup, then cosine or linear decay (per optimizer step)."""

from __future__ import annotations

import math
from typing import Any


def _check(num_warmup_steps: int, num_training_steps: int, name: str) -> None:
    if num_warmup_steps < 0:
        raise ValueError(f"{name}: num_warmup_steps must be >= 0, got {num_warmup_steps}")
    if num_training_steps < 1:
        raise ValueError(
            f"{name}: num_training_steps must be >= 1, got {num_training_steps}; pass the number of optimizer steps "
            f"(e.g. len(dataloader) // gradient_accumulation_steps)"
        )


def _lambda_lr(optimizer: Any, fn: Any, last_epoch: int) -> Any:
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, fn, last_epoch=last_epoch)


def CosineWarmupScheduler(  # noqa: N802 - a scheduler "class" as users name it
    optimizer: Any,
    num_warmup_steps: int = 0,
    num_training_steps: int = 1,
    num_cycles: float = 0.5,
    min_lr_ratio: float = 0.0,
    last_epoch: int = -1,
) -> Any:
    """Linear warmup from 0 to the optimizer's lr over ``num_warmup_steps``, then cosine decay.

    Args:
        optimizer: the torch optimizer.
        num_warmup_steps: optimizer steps of linear warmup.
        num_training_steps: total optimizer steps; the cosine reaches ``min_lr_ratio * lr`` there.
        num_cycles: 0.5 = half a cosine (from lr down to the minimum).
        min_lr_ratio: the floor, as a fraction of the peak lr.
        last_epoch: for resuming (torch convention).

    Returns:
        A ``torch.optim.lr_scheduler.LambdaLR``; ``state_dict()`` / ``load_state_dict()`` resume it.

    Raises:
        ValueError: negative warmup or fewer than one training step.

    Example::

        model.set_lr_scheduler("CosineWarmupScheduler", num_warmup_steps=5, num_training_steps=100)
    """
    _check(num_warmup_steps, num_training_steps, "CosineWarmupScheduler")

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return (step + 1) / (num_warmup_steps + 1)
        progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
        progress = min(progress, 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine

    return _lambda_lr(optimizer, factor, last_epoch)


def LinearWarmupScheduler(  # noqa: N802
    optimizer: Any,
    num_warmup_steps: int = 0,
    num_training_steps: int = 1,
    min_lr_ratio: float = 0.0,
    last_epoch: int = -1,
) -> Any:
    """Linear warmup over ``num_warmup_steps``, then linear decay to ``min_lr_ratio * lr``.

    Args and return value as in :func:`CosineWarmupScheduler`.

    Example::

        model.set_lr_scheduler("LinearWarmupScheduler", num_warmup_steps=2, num_training_steps=50)
    """
    _check(num_warmup_steps, num_training_steps, "LinearWarmupScheduler")

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return (step + 1) / (num_warmup_steps + 1)
        progress = min((step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps), 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)

    return _lambda_lr(optimizer, factor, last_epoch)
