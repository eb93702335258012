"""Templates turn Trajectories into tokens: ``dataset.set_template("Template", model_id=...)``."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {
    "template": {
        "Template": "twinkle.template.base:Template",
    },
}

__getattr__, __dir__ = kind_module(
    __name__,
    ("template",),
    {
        "Template": "twinkle.template.base:Template",
        "TemplateError": "twinkle.template.base:TemplateError",
        "SequenceTooLongError": "twinkle.template.base:SequenceTooLongError",
    },
)
