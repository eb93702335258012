"""Samplers: ``from twinkle.sampler import TorchSampler`` (``VLLMSampler`` from twinkle-vllm)."""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {
    "sampler": {
        "TorchSampler": "twinkle.sampler.torch_sampler:TorchSampler",
    },
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.sampler.base import Sampler as Sampler
    from twinkle.sampler.torch_sampler import TorchSampler as TorchSampler
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__)
