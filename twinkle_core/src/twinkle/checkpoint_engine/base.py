"""The CheckpointEngine protocol."""

from __future__ import annotations


class CheckpointEngine:
    """Moves trained weights (full or LoRA) from a model into a sampler."""
