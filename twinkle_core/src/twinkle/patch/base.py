"""The Patch protocol."""

from __future__ import annotations


class Patch:
    """A named, switchable change applied to a model (a fix or a fast kernel)."""
