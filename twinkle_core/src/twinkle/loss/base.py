"""The Loss protocol."""

from __future__ import annotations


class Loss:
    """Base of losses: ``loss(inputs, outputs, **kwargs) -> LossOutput``."""
