"""Twinkle plugin: VLLMSampler and weight sync into vLLM."""

__version__ = "0.1.0"
