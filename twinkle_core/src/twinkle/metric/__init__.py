"""Metrics for ``model.add_metric("...")``."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {
    "metric": {
        "TokenAccuracy": "twinkle.metric.accuracy:TokenAccuracy",
    }
}

__getattr__, __dir__ = kind_module(__name__, ("metric",), {"Metric": "twinkle.metric.base:Metric"})
