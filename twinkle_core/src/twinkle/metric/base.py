"""The Metric protocol: accumulate per micro-batch, compute on demand, reset."""

from __future__ import annotations

from typing import Any, Mapping


class Metric:
    """Base of metrics accumulated during training or evaluation.

    A model backend calls :meth:`update` after every forward with the collated inputs
    and the outputs (``logits``, ``token_logps``), then :meth:`compute` when the user asks
    for metrics (``model.calculate_metric()``), then :meth:`reset`.

    ``update`` runs after every backward is queued: keep sums as tensors there (``float()`` or
    ``int()`` on a GPU tensor would wait for the backward) and convert them in ``compute``.

    Example::

        class MeanLogp(Metric):
            def __init__(self):
                self.total, self.count = 0.0, 0
            def update(self, inputs, outputs):
                mask = inputs["shift_labels"] != -100
                self.total = self.total + outputs["token_logps"][mask].sum()
                self.count = self.count + mask.sum()
            def compute(self):
                return {"mean_logp": float(self.total) / max(int(self.count), 1)}
            def reset(self):
                self.total, self.count = 0.0, 0
    """

    def update(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Accumulate one micro-batch (no gradients flow here)."""

    def compute(self) -> dict[str, float]:
        """The metric values accumulated since the last :meth:`reset`."""
        return {}

    def reset(self) -> None:
        """Forget everything accumulated."""
