"""Weight synchronization from a trained model into a sampler (``LocalCheckpointEngine`` in core)."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {
    "checkpoint_engine": {
        "LocalCheckpointEngine": "twinkle.checkpoint_engine.local:LocalCheckpointEngine",
    },
}

__getattr__, __dir__ = kind_module(
    __name__, ("checkpoint_engine",), {"CheckpointEngine": "twinkle.checkpoint_engine.base:CheckpointEngine"}
)
