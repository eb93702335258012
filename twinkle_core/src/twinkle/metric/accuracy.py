"""Token accuracy: the share of trained label tokens the model's argmax predicts."""

from __future__ import annotations

from typing import Any, Mapping

from twinkle.metric.base import Metric


class TokenAccuracy(Metric):
    """``token_acc``: correct argmax predictions / trained label tokens, since the last reset.

    Example::

        model.add_metric("TokenAccuracy")
    """

    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Count correct predictions of ``shift_labels`` in this micro-batch."""
        labels = inputs["shift_labels"]
        mask = labels != -100
        pred = outputs.get("predictions")  # argmax ids from the fused cross-entropy (fast path)
        if pred is None:
            logits = outputs.get("logits")
            if logits is None:
                return
            pred = logits.detach().argmax(dim=-1)
        # counted where the tensors live (no host sync per micro-batch); read in compute()
        self.correct = self.correct + ((pred == labels) & mask).sum()
        self.total = self.total + mask.sum()

    def compute(self) -> dict[str, float]:
        """``{"token_acc": ...}`` (empty before any labelled token)."""
        correct, total = int(self.correct), int(self.total)
        return {"token_acc": correct / total} if total else {}

    def reset(self) -> None:
        """Start counting again."""
        self.correct = 0
        self.total = 0
