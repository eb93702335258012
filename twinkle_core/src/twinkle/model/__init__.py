"""Models: ``from twinkle.model import TransformersModel`` (and ``MegatronModel`` from twinkle-megatron)."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {
    "model": {
        "TransformersModel": "twinkle.model.transformers_model:TransformersModel",
    },
}

__getattr__, __dir__ = kind_module(__name__, ("model",), {"TwinkleModel": "twinkle.model.base:TwinkleModel"})
