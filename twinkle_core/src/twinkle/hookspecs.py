"""The plugin contract: every hook a Twinkle plugin can implement.

A plugin is a module with functions decorated by :data:`twinkle.hookimpl` whose names
match the specs below, listed under the ``twinkle`` entry-point group::

    # pyproject.toml
    [project.entry-points.twinkle]
    my_plugin = "my_plugin"

    # my_plugin.py
    import twinkle

    @twinkle.hookimpl
    def twinkle_register_components(register):
        register("loss", "MyLoss", "my_plugin.loss:MyLoss")

Registration hooks take a ``register`` callback (the style of simonw/llm): the plugin
names a kind, a name and a lazy ``"module:attr"`` target, so discovering a plugin never
imports its heavy dependencies. Lifecycle hooks let logging and monitoring plugins
observe a run. Every hook here has a test (``tests/plugin_system/test_hooks.py``) and a
section in ``docs/plugins.md``; a meta-test fails when one is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from twinkle.runtime import Runtime

PROJECT_NAME = "twinkle"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class RegisterComponent(Protocol):
    """The callback handed to :func:`twinkle_register_components`."""

    def __call__(self, kind: str, name: str, target: Any, *, override: bool = False, doc: str = "") -> None: ...


class RegisterLauncher(Protocol):
    """The callback handed to :func:`twinkle_register_launchers`."""

    def __call__(self, mode: str, target: Any, *, override: bool = False, doc: str = "") -> None: ...


@hookspec
def twinkle_register_components(register: RegisterComponent) -> None:
    """Register components (models, samplers, losses, rewards, ...) by name.

    Args:
        register: call ``register(kind, name, target, override=False, doc="")`` once per
            component. ``kind`` is one of :data:`twinkle.registry.KINDS`; ``name`` is what
            users pass to ``set_loss('...')`` or import from ``twinkle.<kind>``;
            ``target`` is a ``"module:attr"`` string (imported only when the component is
            first used) or the object itself. A name already registered by another plugin
            raises :class:`twinkle.registry.DuplicateComponentError` unless
            ``override=True``, which replaces it and records the override.

    Called once per plugin when the plugins are loaded (at ``twinkle.initialize()`` or on
    first registry use). An exception here marks only this plugin as failed.
    """


@hookspec
def twinkle_register_launchers(register: RegisterLauncher) -> None:
    """Register run modes: ``register(mode, target)``.

    Args:
        register: call ``register(mode, "module:LauncherClass")``. ``twinkle.initialize(
            mode=mode)`` instantiates the class with the runtime's options. A launcher
            subclasses :class:`twinkle.launcher.Launcher`.
    """


class RegisterCommand(Protocol):
    """The callback handed to :func:`twinkle_register_commands`."""

    def __call__(self, name: str, target: Any, *, help: str = "") -> None: ...


@hookspec
def twinkle_register_commands(register: RegisterCommand) -> None:
    """Add subcommands to the ``twinkle`` command line (``twinkle serve`` comes from twinkle-server).

    Args:
        register: call ``register(name, target, help="...")`` once per command. ``target``
            is a ``"module:attr"`` string (imported only when that command runs) or a
            callable ``target(parser)`` that adds the command's options to ``parser`` (an
            ``argparse.ArgumentParser``) and sets ``parser.set_defaults(func=run)``, where
            ``run(args) -> int`` is the exit status. ``help`` is the line ``twinkle --help``
            shows. A name core already has (``plugins``) or another plugin took first (by
            plugin name order) is skipped with a warning naming both.

    Called when the ``twinkle`` command builds its parser. An exception here skips only this
    plugin's commands, with a warning.
    """


@hookspec
def twinkle_runtime_started(runtime: Runtime) -> None:
    """Called after :func:`twinkle.initialize` built ``runtime`` and made it current.

    Args:
        runtime: the new :class:`twinkle.runtime.Runtime` (mode, groups, mesh, registry).
    """


@hookspec
def twinkle_runtime_stopped(runtime: Runtime) -> None:
    """Called when ``runtime.shutdown()`` runs, after its launcher released resources.

    Args:
        runtime: the runtime being shut down.
    """


@hookspec
def twinkle_component_created(runtime: Runtime, kind: str, name: str, component: Any) -> None:
    """Called when a registered component is created through the registry.

    Args:
        runtime: the current runtime.
        kind: the component's kind, e.g. ``"loss"``.
        name: the registered name, e.g. ``"GRPOLoss"``.
        component: the new object (a local instance, or a launcher's proxy).
    """


@hookspec
def twinkle_metrics_emitted(runtime: Runtime, source: str, step: int | None, metrics: Mapping[str, Any]) -> None:
    """Called whenever a component reports metrics (e.g. ``model.calculate_metric()``).

    Args:
        runtime: the current runtime.
        source: who emitted them: ``model.calculate_metric()`` sends ``"train"`` / ``"eval"`` for
            the full model and ``"train/<adapter>"`` / ``"eval/<adapter>"`` for a LoRA adapter.
        step: the optimizer step the metrics belong to, if known.
        metrics: name -> value (floats, ints or strings). Do not mutate.
    """
