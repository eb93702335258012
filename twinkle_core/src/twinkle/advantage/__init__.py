"""Advantage estimators for RL: ``GRPOAdvantage``, ``RLOOAdvantage``, ``REINFORCEAdvantage``."""

from typing import TYPE_CHECKING

_BUILTIN: dict[str, dict[str, str]] = {
    "advantage": {
        "GRPOAdvantage": "twinkle.advantage.estimators:GRPOAdvantage",
        "RLOOAdvantage": "twinkle.advantage.estimators:RLOOAdvantage",
        "REINFORCEAdvantage": "twinkle.advantage.estimators:REINFORCEAdvantage",
    },
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.advantage.base import Advantage as Advantage
    from twinkle.advantage.estimators import GRPOAdvantage as GRPOAdvantage
    from twinkle.advantage.estimators import REINFORCEAdvantage as REINFORCEAdvantage
    from twinkle.advantage.estimators import RLOOAdvantage as RLOOAdvantage
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__)
