"""Input processors: collate, pad or pack encoded rows into model inputs."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {
    "processor": {
        "InputProcessor": "twinkle.processor.base:InputProcessor",
        "PaddingFreeProcessor": "twinkle.processor.base:PaddingFreeProcessor",
    }
}

__getattr__, __dir__ = kind_module(
    __name__, ("processor",), {"InputProcessor": "twinkle.processor.base:InputProcessor"}
)
