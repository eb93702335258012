"""The Sampler protocol."""

from __future__ import annotations

from twinkle.component import Component


class Sampler(Component):
    """Base of samplers (TorchSampler in core, VLLMSampler in twinkle-vllm)."""
