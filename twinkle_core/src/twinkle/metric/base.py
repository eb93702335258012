"""The Metric protocol."""

from __future__ import annotations


class Metric:
    """Base of metrics accumulated during training or evaluation."""
