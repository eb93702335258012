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


#: Scheduler arguments that give the schedule's length in scheduler steps (optimizer steps here).
TOTAL_STEP_ARGS = ("num_training_steps", "total_steps", "total_iters", "T_max")


def schedule_total(kwargs: dict[str, Any]) -> int | None:
    """The schedule's length from a scheduler's arguments, if they give one."""
    for key in TOTAL_STEP_ARGS:
        value = kwargs.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def schedule_length_warning(
    kwargs: dict[str, Any], gradient_accumulation_steps: int, dataloader_lengths: Any = ()
) -> str | None:
    """Why the schedule will not finish, or None.

    Twinkle's model steps its LR scheduler once per optimizer step (``clip_grad_and_step`` at
    the end of each accumulation window). A schedule sized with ``len(dataloader)`` counts
    batches: with ``gradient_accumulation_steps=k`` one pass over the data makes only
    ``len(dataloader) / k`` optimizer steps, and a cosine schedule ends ``1/k`` of the way.
    The check fires when the length equals a DataLoader's length seen in this runtime.
    """
    total = schedule_total(kwargs)
    if total is None or gradient_accumulation_steps <= 1 or total not in set(dataloader_lengths):
        return None
    steps = total // gradient_accumulation_steps
    key = next(k for k in TOTAL_STEP_ARGS if kwargs.get(k) == total)
    return (
        f"the LR schedule will not finish: {key}={total} is len(dataloader), which counts batches, but the "
        f"scheduler counts optimizer steps, one per {gradient_accumulation_steps} batches "
        f"(gradient_accumulation_steps={gradient_accumulation_steps}). One pass over the data makes {steps} "
        f"optimizer steps and leaves the schedule at {steps}/{total}. Pass {key}=len(dataloader) // "
        f"{gradient_accumulation_steps} (times the number of epochs)."
    )


def check_schedule_length(scheduler: Any, kwargs: dict[str, Any], gradient_accumulation_steps: int) -> None:
    """Remember the schedule's length on ``scheduler`` and warn when it will not finish."""
    import warnings

    from twinkle.runtime import current_runtime

    total = schedule_total(kwargs)
    if total is not None:
        try:
            scheduler.twinkle_total_steps = total
        except AttributeError:  # a scheduler with __slots__: no progress metric
            pass
    runtime = current_runtime()
    message = schedule_length_warning(
        kwargs, gradient_accumulation_steps, runtime.dataloader_lengths if runtime is not None else ()
    )
    if message:
        warnings.warn(message, UserWarning, stacklevel=3)


def step_keys(state: Any) -> dict[str, Any]:
    """The step counters of a model's metrics: which step is which.

    ``optimizer_step``: optimizer steps taken (the LR scheduler's and trackers' x axis);
    ``micro_batches``: micro-batches (``forward_backward`` calls) taken, ``optimizer_step x
    gradient_accumulation_steps`` plus those in the open window; ``lr_schedule_progress``:
    ``optimizer_step / num_training_steps`` when the scheduler was given a length (1.0 = done).
    """
    keys: dict[str, Any] = {
        "optimizer_step": state.global_step,
        "micro_batches": state.global_step * state.gradient_accumulation_steps + state.micro_step,
    }
    total = getattr(state.lr_scheduler, "twinkle_total_steps", None)
    if total:
        keys["lr_schedule_progress"] = state.global_step / total
    return keys
