"""Weight synchronization from a trained model into a sampler."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {"checkpoint_engine": {}}

__getattr__, __dir__ = kind_module(
    __name__, ("checkpoint_engine",), {"CheckpointEngine": "twinkle.checkpoint_engine.base:CheckpointEngine"}
)
