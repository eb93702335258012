"""Models: ``from twinkle.model import TransformersModel`` (and ``MegatronModel`` from twinkle-megatron)."""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {
    "model": {
        "TransformersModel": "twinkle.model.transformers_model:TransformersModel",
    },
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.model.base import TwinkleModel as TwinkleModel
    from twinkle.model.transformers_model import TransformersModel as TransformersModel
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__)
