"""Patches: switchable fixes and fast kernels applied to models."""

from twinkle._kinds import kind_module

_BUILTIN: dict[str, dict[str, str]] = {"patch": {}}

__getattr__, __dir__ = kind_module(__name__, ("patch",), {"Patch": "twinkle.patch.base:Patch"})
