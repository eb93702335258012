"""Token-level cross-entropy for supervised fine-tuning."""

from __future__ import annotations

from typing import Any, Mapping

from twinkle.data_format.output import ModelOutput
from twinkle.loss.base import Loss, LossOutput


class CrossEntropyLoss(Loss):
    """Sum of the negative log-likelihood of every trained label token.

    Normalized by the number of trained tokens of the whole gradient-accumulation window
    (the model backend does that), so the result equals the mean token loss of one big
    batch.

    Args:
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.

    Example::

        model.set_loss("CrossEntropyLoss")
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"CrossEntropyLoss: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def __call__(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> LossOutput:
        """Sum of token losses of ``shift_labels`` given ``outputs['logits']``; normalizer: label-token count."""
        import torch.nn.functional as F

        labels = inputs["shift_labels"]
        num_tokens = inputs.get("num_label_tokens")  # counted by the model before its forward (no sync here)
        if num_tokens is None:
            num_tokens = int((labels != -100).sum())
        fused = None
        if isinstance(outputs, ModelOutput):  # the backend's own: LM head + CE in chunks (fast path)
            fused = outputs.label_cross_entropy_sum(labels, self.label_smoothing, inputs.get("num_label_tokens"))
        if fused is not None:
            return LossOutput(loss=fused, num_tokens=num_tokens)
        logits = outputs["logits"]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
            label_smoothing=self.label_smoothing,
        )
        return LossOutput(loss=loss, num_tokens=num_tokens)
