"""Weight synchronization from a trained model into a sampler (``LocalCheckpointEngine`` in core)."""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {
    "checkpoint_engine": {
        "LocalCheckpointEngine": "twinkle.checkpoint_engine.local:LocalCheckpointEngine",
    },
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.checkpoint_engine.base import CheckpointEngine as CheckpointEngine
    from twinkle.checkpoint_engine.local import LocalCheckpointEngine as LocalCheckpointEngine
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__)
