"""Preprocessors (raw rows -> Trajectory) and filters: ``dataset.map(...)``, ``dataset.filter(...)``."""

from typing import TYPE_CHECKING

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

_EXPORTS = {
    "BadRowError": "twinkle.preprocessor.base:BadRowError",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.preprocessor.base import BadRowError as BadRowError
    from twinkle.preprocessor.base import Filter as Filter
    from twinkle.preprocessor.base import Preprocessor as Preprocessor
    from twinkle.preprocessor.chat import AlpacaProcessor as AlpacaProcessor
    from twinkle.preprocessor.chat import MessagesProcessor as MessagesProcessor
    from twinkle.preprocessor.chat import SelfCognitionProcessor as SelfCognitionProcessor
    from twinkle.preprocessor.filters import EmptyMessageFilter as EmptyMessageFilter
    from twinkle.preprocessor.filters import LengthFilter as LengthFilter
    from twinkle.preprocessor.math import CompetitionMathProcessor as CompetitionMathProcessor
    from twinkle.preprocessor.math import GSM8KProcessor as GSM8KProcessor
    from twinkle.preprocessor.preference import DPOProcessor as DPOProcessor
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__, _EXPORTS)
