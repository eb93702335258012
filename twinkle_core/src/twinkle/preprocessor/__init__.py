"""Preprocessors (raw rows -> Trajectory) and filters: ``dataset.map(...)``, ``dataset.filter(...)``."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {
    "preprocessor": {
        "SelfCognitionProcessor": "twinkle.preprocessor.chat:SelfCognitionProcessor",
        "AlpacaProcessor": "twinkle.preprocessor.chat:AlpacaProcessor",
        "MessagesProcessor": "twinkle.preprocessor.chat:MessagesProcessor",
        "GSM8KProcessor": "twinkle.preprocessor.math:GSM8KProcessor",
        "CompetitionMathProcessor": "twinkle.preprocessor.math:CompetitionMathProcessor",
        "DPOProcessor": "twinkle.preprocessor.preference:DPOProcessor",
    },
    "filter": {
        "LengthFilter": "twinkle.preprocessor.filters:LengthFilter",
        "EmptyMessageFilter": "twinkle.preprocessor.filters:EmptyMessageFilter",
    },
}

__getattr__, __dir__ = kind_module(
    __name__,
    ("preprocessor", "filter"),
    {
        "Preprocessor": "twinkle.preprocessor.base:Preprocessor",
        "Filter": "twinkle.preprocessor.base:Filter",
        "BadRowError": "twinkle.preprocessor.base:BadRowError",
    },
)
