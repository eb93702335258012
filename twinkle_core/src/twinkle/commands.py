"""Plugin subcommands of the ``twinkle`` command line (the ``twinkle_register_commands`` hook).

Each plugin's hook is called with a ``register(name, target, help="")`` callback. Only the
names and help lines are needed to build ``twinkle --help``; a command's ``target`` is
imported when that command runs, so a plugin's command costs nothing until used.

Commands of official plugins that are not installed still appear, and running one says which
package to install (``twinkle serve`` -> ``pip install twinkle-server``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

#: Commands that official plugins add: command -> (distribution, folder in a checkout).
OFFICIAL_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("twinkle-server", "./plugins/twinkle-server"),
}

#: Commands core defines itself; plugins cannot replace them.
CORE_COMMANDS = frozenset({"plugins"})


class CommandWarning(UserWarning):
    """A plugin's command could not be added (a name collision or a raising hook)."""


@dataclass
class Command:
    """One registered subcommand."""

    name: str
    target: Any
    plugin: str
    help: str = ""

    def configure(self, parser: argparse.ArgumentParser) -> None:
        """Import the target and let it add its options and ``func`` to ``parser``."""
        target = self.target
        if isinstance(target, str):
            from twinkle._utils import import_target

            target = import_target(target)
        target(parser)


def plugin_commands(system: Any = None) -> dict[str, Command]:
    """Every command the loaded plugins register, by name (collisions skipped with a warning)."""
    if system is None:
        from twinkle.plugins import PluginSystem

        system = PluginSystem()
    system.load()
    commands: dict[str, Command] = {}
    impls = system.hook.twinkle_register_commands.get_hookimpls()
    for plugin_name, function in sorted((system.pm.get_name(impl.plugin), impl.function) for impl in impls):
        added: list[Command] = []

        def register(
            name: str, target: Any, *, help: str = "", _plugin: str = plugin_name, _added: list[Command] = added
        ) -> None:
            if not isinstance(name, str) or name.startswith("-") or not name.replace("-", "_").isidentifier():
                raise ValueError(f"command name {name!r} is not a valid subcommand name")
            if not (isinstance(target, str) and ":" in target) and not callable(target):
                raise TypeError(f"command {name!r}: target must be 'module:attr' or a callable, got {target!r}")
            _added.append(Command(name, target, _plugin, help))

        try:
            function(register=register)
        except Exception as exc:  # noqa: BLE001 - one plugin's broken hook must not break the CLI
            warnings.warn(
                f"Twinkle plugin {plugin_name!r}: twinkle_register_commands raised {type(exc).__name__}: {exc}; "
                "its commands are skipped",
                CommandWarning,
                stacklevel=2,
            )
            continue
        for command in added:
            if command.name in CORE_COMMANDS:
                owner = "core"
            elif command.name in commands:
                owner = f"plugin {commands[command.name].plugin!r}"
            else:
                commands[command.name] = command
                continue
            warnings.warn(
                f"Twinkle plugin {plugin_name!r} registers the command {command.name!r}, which {owner} already "
                "has; the plugin's command is skipped",
                CommandWarning,
                stacklevel=2,
            )
    return commands


def missing_command_message(name: str, system: Any = None) -> str:
    """What ``twinkle <name>`` says when an official plugin's command is not available."""
    distribution, folder = OFFICIAL_COMMANDS[name]
    message = (
        f"error: `twinkle {name}` comes from the {distribution} plugin, which is not installed: "
        f"pip install {distribution}   (from a checkout: pip install {folder})"
    )
    if system is not None:
        for info in system.plugins.values():
            if info.distribution == distribution and (info.blocked or info.error):
                why = "blocked (TWINKLE_PLUGINS / TWINKLE_DISABLE_PLUGINS)" if info.blocked else "failed to load"
                message = (
                    f"error: `twinkle {name}` comes from the {distribution} plugin ({info.name!r}), which is "
                    f"installed but {why}" + (f": {info.error_summary}" if info.error else "")
                )
    return message


def add_commands(sub: argparse._SubParsersAction, argv: list[str], system: Any = None) -> Callable[[], int] | None:
    """Add every plugin command (and official ones not installed) to ``sub``.

    Only the command named in ``argv`` is configured (its target imported). Returns a
    function to run instead of parsing when that command cannot run (not installed, or its
    target fails to import), else ``None``.
    """
    if system is None:
        from twinkle.plugins import PluginSystem

        system = PluginSystem()
    commands = plugin_commands(system)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    failure: Callable[[], int] | None = None
    for name, command in commands.items():
        parser = sub.add_parser(name, help=command.help or f"(from plugin {command.plugin!r})")
        if name != chosen:
            continue
        try:
            command.configure(parser)
        except Exception as exc:  # noqa: BLE001
            failure = _fail_with(
                f"error: the command {name!r} of plugin {command.plugin!r} failed to load: {type(exc).__name__}: {exc}"
            )
    for name, (distribution, _) in OFFICIAL_COMMANDS.items():
        if name in commands:
            continue
        sub.add_parser(name, help=f"(not installed: pip install {distribution})", add_help=False)
        if name == chosen:
            failure = _fail_with(missing_command_message(name, system))
    return failure


def _fail_with(text: str) -> Callable[[], int]:
    def fail() -> int:
        print(text, file=sys.stderr)
        return 1

    return fail
