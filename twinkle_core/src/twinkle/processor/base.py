"""The InputProcessor protocol."""

from __future__ import annotations


class InputProcessor:
    """Turns encoded rows into the tensors a model backend consumes."""
