"""Preprocessors (raw rows -> Trajectory) and filters."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {"preprocessor": {}, "filter": {}}

__getattr__, __dir__ = kind_module(
    __name__,
    ("preprocessor", "filter"),
    {"Preprocessor": "twinkle.preprocessor.base:Preprocessor", "Filter": "twinkle.preprocessor.base:Filter"},
)
