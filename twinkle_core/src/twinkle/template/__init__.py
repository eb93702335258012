"""Templates turn Trajectories into tokens: ``dataset.set_template("Template", model_id=...)``."""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {
    "template": {
        "Template": "twinkle.template.base:Template",
        "ChatGLM2Template": "twinkle.template.chat_formats:ChatGLM2Template",
        "ChatGLM3Template": "twinkle.template.chat_formats:ChatGLM3Template",
        "GLM4Template": "twinkle.template.chat_formats:GLM4Template",
        "InternLM2Template": "twinkle.template.chat_formats:InternLM2Template",
        "VisionTemplate": "twinkle.template.vision:VisionTemplate",
    },
}

_EXPORTS = {
    "TemplateError": "twinkle.template.base:TemplateError",
    "SequenceTooLongError": "twinkle.template.base:SequenceTooLongError",
    "ImageLoadError": "twinkle.template.vision:ImageLoadError",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.template.base import SequenceTooLongError as SequenceTooLongError
    from twinkle.template.base import Template as Template
    from twinkle.template.base import TemplateError as TemplateError
    from twinkle.template.chat_formats import ChatGLM2Template as ChatGLM2Template
    from twinkle.template.chat_formats import ChatGLM3Template as ChatGLM3Template
    from twinkle.template.chat_formats import GLM4Template as GLM4Template
    from twinkle.template.chat_formats import InternLM2Template as InternLM2Template
    from twinkle.template.vision import ImageLoadError as ImageLoadError
    from twinkle.template.vision import VisionTemplate as VisionTemplate
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__, _EXPORTS)
