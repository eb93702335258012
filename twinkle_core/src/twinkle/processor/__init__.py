"""Input processors: collate, pad or pack encoded rows into model inputs."""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {
    "processor": {
        "InputProcessor": "twinkle.processor.base:InputProcessor",
        "PaddingFreeProcessor": "twinkle.processor.base:PaddingFreeProcessor",
    }
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.processor.base import InputProcessor as InputProcessor
    from twinkle.processor.base import PaddingFreeProcessor as PaddingFreeProcessor
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__)
