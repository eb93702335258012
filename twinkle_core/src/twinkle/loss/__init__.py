"""Losses, resolved by name in ``model.set_loss("...")``."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {
    "loss": {
        "CrossEntropyLoss": "twinkle.loss.cross_entropy:CrossEntropyLoss",
    },
}

__getattr__, __dir__ = kind_module(__name__, ("loss",), {"Loss": "twinkle.loss.base:Loss"})
