"""Templates turn Trajectories into tokens: ``dataset.set_template("Template", model_id=...)``."""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {
    "template": {
        "Template": "twinkle.template.base:Template",
    },
}

_EXPORTS = {
    "TemplateError": "twinkle.template.base:TemplateError",
    "SequenceTooLongError": "twinkle.template.base:SequenceTooLongError",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.template.base import SequenceTooLongError as SequenceTooLongError
    from twinkle.template.base import Template as Template
    from twinkle.template.base import TemplateError as TemplateError
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__, _EXPORTS)
