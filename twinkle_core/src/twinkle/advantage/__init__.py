"""Advantage estimators for RL."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {"advantage": {}}

__getattr__, __dir__ = kind_module(__name__, ("advantage",), {"Advantage": "twinkle.advantage.base:Advantage"})
