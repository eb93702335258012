"""Advantage estimators for RL: ``GRPOAdvantage``, ``RLOOAdvantage``, ``REINFORCEAdvantage``."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {
    "advantage": {
        "GRPOAdvantage": "twinkle.advantage.estimators:GRPOAdvantage",
        "RLOOAdvantage": "twinkle.advantage.estimators:RLOOAdvantage",
        "REINFORCEAdvantage": "twinkle.advantage.estimators:REINFORCEAdvantage",
    },
}

__getattr__, __dir__ = kind_module(__name__, ("advantage",), {"Advantage": "twinkle.advantage.base:Advantage"})
