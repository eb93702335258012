"""Launchers turn ``initialize(mode=...)`` into a way of placing components.

``from twinkle.launcher import Launcher`` is the base class; registered launchers
(``local`` and ``http`` in core, ``ray`` from twinkle-ray) resolve through the registry.
"""

from twinkle._kinds import kind_module

_BUILTIN = {
    "launcher": {
        "local": "twinkle.launcher.local:LocalLauncher",
        "http": "twinkle.launcher.http:HTTPLauncher",
    },
}

__getattr__, __dir__ = kind_module(
    __name__,
    ("launcher",),
    {
        "Launcher": "twinkle.launcher.base:Launcher",
        "LocalLauncher": "twinkle.launcher.local:LocalLauncher",
    },
)
