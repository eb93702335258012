"""Launchers turn ``initialize(mode=...)`` into a way of placing components.

``from twinkle.launcher import Launcher`` is the base class; registered launchers
(``local`` and ``http`` in core, ``ray`` from twinkle-ray) resolve through the registry.
"""

from typing import TYPE_CHECKING

_BUILTIN = {
    "launcher": {
        "local": "twinkle.launcher.local:LocalLauncher",
        "http": "twinkle.launcher.http:HTTPLauncher",
    },
}

_EXPORTS = {
    "LocalLauncher": "twinkle.launcher.local:LocalLauncher",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names resolve lazily (PEP 562)
    from twinkle.launcher.base import Launcher as Launcher
    from twinkle.launcher.local import LocalLauncher as LocalLauncher
else:
    from twinkle._kinds import kind_module

    __getattr__, __dir__ = kind_module(__name__, _EXPORTS)
