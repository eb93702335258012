"""The Template: Trajectory -> tokens."""

from __future__ import annotations


class Template:
    """Encodes Trajectories with a tokenizer's chat template."""
