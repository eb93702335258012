"""Metrics for ``model.add_metric("...")``."""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {
    "metric": {
        "TokenAccuracy": "twinkle.metric.accuracy:TokenAccuracy",
    }
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.metric.accuracy import TokenAccuracy as TokenAccuracy
    from twinkle.metric.base import Metric as Metric
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__)
