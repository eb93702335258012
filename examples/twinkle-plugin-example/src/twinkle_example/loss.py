"""LabelSmoothingLoss: cross-entropy against a target smoothed towards the uniform distribution."""

from __future__ import annotations

from typing import Any, Mapping

from twinkle.loss import Loss
from twinkle.loss.base import LossOutput


class LabelSmoothingLoss(Loss):
    """``(1 - smoothing) * NLL(label) + smoothing * mean_v(-log p_v)``, summed over trained tokens.

    Args:
        smoothing: weight of the uniform target, in ``[0, 1)``.

    Example::

        model.set_loss("LabelSmoothingLoss", smoothing=0.1)
    """

    def __init__(self, smoothing: float = 0.1) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"LabelSmoothingLoss: smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> LossOutput:
        import torch

        labels = inputs["shift_labels"]
        mask = labels != -100
        logps = torch.log_softmax(outputs["logits"].float(), dim=-1)
        nll = -torch.gather(logps, -1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
        uniform = -logps.mean(dim=-1)
        per_token = (1.0 - self.smoothing) * nll + self.smoothing * uniform
        return LossOutput(loss=(per_token * mask).sum(), num_tokens=mask.sum())
