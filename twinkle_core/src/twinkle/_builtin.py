"""Core's own components, registered through the same hook as any third-party plugin.

Each public kind package (``twinkle/loss/__init__.py`` ...; the packages are the ``module`` of
the records in :data:`twinkle._kinds.KIND_TABLE`) lists its built-ins in a
``_BUILTIN = {kind: {name: "module:attr"}}`` table; importing those packages is cheap
(they only define tables and a lazy ``__getattr__``).
"""

from __future__ import annotations

import importlib

from twinkle._kinds import kind_packages
from twinkle.hookspecs import hookimpl

# The trackers' feed: core observes metrics through the same lifecycle hooks as any plugin.
from twinkle.tracker.hooks import twinkle_metrics_emitted, twinkle_runtime_stopped  # noqa: F401


def builtin_tables() -> dict[str, dict[str, dict[str, str]]]:
    """package -> kind -> name -> target."""
    return {package: getattr(importlib.import_module(package), "_BUILTIN", {}) for package in kind_packages()}


@hookimpl
def twinkle_register_components(register) -> None:  # noqa: ANN001 - the hookspec types it
    for table in builtin_tables().values():
        for kind, entries in table.items():
            if kind == "launcher":
                continue
            for name, target in entries.items():
                register(kind, name, target)


@hookimpl
def twinkle_register_launchers(register) -> None:  # noqa: ANN001
    for mode, target in builtin_tables()["twinkle.launcher"]["launcher"].items():
        register(mode, target)


@hookimpl
def twinkle_register_commands(register) -> None:  # noqa: ANN001
    register("plot", "twinkle.plot:configure_parser", help="plot loss, lr, reward and throughput of runs")
    register(
        "export",
        "twinkle.model.export:configure_parser",
        help="merge a LoRA into its base as a Hugging Face checkpoint (optionally push it to a hub)",
    )
