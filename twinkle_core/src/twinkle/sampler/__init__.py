"""Samplers: ``from twinkle.sampler import TorchSampler`` (``VLLMSampler`` from twinkle-vllm)."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {
    "sampler": {
        "TorchSampler": "twinkle.sampler.torch_sampler:TorchSampler",
    },
}

__getattr__, __dir__ = kind_module(__name__, ("sampler",), {"Sampler": "twinkle.sampler.base:Sampler"})
