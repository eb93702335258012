"""Discovering and loading plugins: the ``twinkle`` entry-point group, with env-var control.

* ``TWINKLE_PLUGINS=a,b``          load only these entry points (core is always loaded).
* ``TWINKLE_DISABLE_PLUGINS=a,b``  block these entry points.
* ``TWINKLE_TRACE_PLUGINS=1``      print every hook call to stderr.

Loading is lazy and idempotent: nothing is discovered at ``import twinkle``; a
:class:`PluginSystem` loads once, at ``twinkle.initialize()`` or on first registry use. A
plugin that fails to import, or whose registration hook raises, is recorded in
:attr:`PluginSystem.plugins` with its traceback and reported by ``initialize()`` (a
warning) and ``twinkle plugins``; the other plugins load normally.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any, Callable, Iterable

import pluggy

from twinkle import hookspecs
from twinkle.registry import Registry

ENTRY_POINT_GROUP = "twinkle"
CORE_PLUGIN = "core"
_REGISTRATION_HOOKS = ("twinkle_register_components", "twinkle_register_launchers")


class PluginLoadWarning(UserWarning):
    """A plugin failed to load; the others still work."""


@dataclass
class PluginInfo:
    """What is known about one plugin, loaded or not."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    source: str = "entry-point"  # "entry-point", "builtin" or "inline"
    hooks: list[str] = field(default_factory=list)
    error: str | None = None  # the full traceback when loading failed
    blocked: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.blocked

    @property
    def error_summary(self) -> str | None:
        if self.error is None:
            return None
        return self.error.strip().splitlines()[-1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "source": self.source,
            "hooks": self.hooks,
            "blocked": self.blocked,
            "error": self.error,
        }


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


class PluginSystem:
    """A pluggy manager, the registry it fills, and the record of every plugin.

    Example::

        system = PluginSystem()
        system.load()                       # entry points, once
        system.registry.resolve("loss", "CrossEntropyLoss")
    """

    def __init__(
        self, *, only: Iterable[str] | None = None, disabled: Iterable[str] | None = None, trace: bool | None = None
    ) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.plugins: dict[str, PluginInfo] = {}
        self._only = set(only) if only is not None else _env_list("TWINKLE_PLUGINS")
        self._disabled = set(disabled) if disabled is not None else (_env_list("TWINKLE_DISABLE_PLUGINS") or set())
        self._trace = trace if trace is not None else os.environ.get("TWINKLE_TRACE_PLUGINS", "") not in ("", "0")
        self._loaded = False
        if self._trace:
            self.pm.trace.root.setwriter(lambda msg: sys.stderr.write(f"[twinkle trace] {msg}"))
            self.pm.enable_tracing()

    # -- loading -----------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> PluginSystem:
        """Discover entry points and run their registration hooks. Idempotent."""
        if self._loaded:
            return self
        self._loaded = True
        entry_points = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
        if not any(ep.name == CORE_PLUGIN for ep in entry_points):
            # Running from a source tree (no installed metadata): core still registers
            # through the same hook, just without an entry point.
            from twinkle import _builtin

            self._add(
                CORE_PLUGIN,
                _builtin,
                PluginInfo(CORE_PLUGIN, _builtin.__name__, "twinkle-core", _core_version(), source="builtin"),
            )
        for ep in sorted(entry_points, key=lambda e: (e.name != CORE_PLUGIN, e.name)):
            if ep.name in self.plugins:
                continue
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                ep.name, ep.value, dist.metadata["Name"] if dist else None, dist.version if dist else None
            )
            if ep.name != CORE_PLUGIN and (
                ep.name in self._disabled or (self._only is not None and ep.name not in self._only)
            ):
                info.blocked = True
                self.plugins[ep.name] = info
                continue
            try:
                module = ep.load()
            except Exception:  # noqa: BLE001 - a broken plugin must not break the others
                self._fail(info, traceback.format_exc())
                continue
            self._add(ep.name, module, info)
        return self

    def add_plugin(self, plugin: ModuleType | object, name: str | None = None) -> PluginInfo:
        """Register an in-process plugin (a module or an object with hookimpls).

        Used by :mod:`twinkle.testing` and by scripts that define a plugin inline.
        """
        self.load()
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if name in self.plugins and not self.plugins[name].blocked:
            raise ValueError(f"a plugin named {name!r} is already loaded; pick another name or remove it first")
        module_name = getattr(plugin, "__name__", type(plugin).__module__)
        return self._add(name, plugin, PluginInfo(name, module_name, source="inline"))

    def remove_plugin(self, name: str) -> None:
        """Unregister a plugin and every component it registered."""
        info = self.plugins.pop(name, None)
        if info is None:
            raise KeyError(f"no plugin named {name!r}; loaded: {', '.join(self.plugins)}")
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self.registry.unregister_plugin(name)
        self.registry.failed_plugins.pop(name, None)

    def _add(self, name: str, plugin: Any, info: PluginInfo) -> PluginInfo:
        self.plugins[name] = info
        try:
            self.pm.register(plugin, name=name)
        except Exception:  # noqa: BLE001 - e.g. a hookimpl with a misspelled argument
            return self._fail(info, traceback.format_exc())
        info.hooks = sorted(impl_hook for impl_hook in _hooks_of(self.pm, plugin))
        for hook_name in _REGISTRATION_HOOKS:
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is plugin:
                    try:
                        self._call_registration(hook_name, name, impl.function)
                    except Exception:  # noqa: BLE001
                        self.registry.unregister_plugin(name)
                        self.pm.unregister(plugin)
                        return self._fail(info, traceback.format_exc())
        return info

    def _call_registration(self, hook_name: str, plugin_name: str, function: Callable[..., Any]) -> None:
        if hook_name == "twinkle_register_components":

            def register(kind: str, name: str, target: Any, *, override: bool = False, doc: str = "") -> None:
                self.registry.register(kind, name, target, plugin=plugin_name, override=override, doc=doc)
        else:

            def register(mode: str, target: Any, *, override: bool = False, doc: str = "") -> None:  # type: ignore[misc]
                self.registry.register("launcher", mode, target, plugin=plugin_name, override=override, doc=doc)

        if self._trace:
            sys.stderr.write(f"[twinkle trace] {hook_name} [plugin {plugin_name}]\n")
        function(register=register)

    def _fail(self, info: PluginInfo, tb: str) -> PluginInfo:
        info.error = tb
        self.plugins[info.name] = info
        self.registry.failed_plugins[info.name] = info.error_summary or "failed"
        return info

    # -- reporting ---------------------------------------------------------------
    @property
    def hook(self) -> Any:
        """The pluggy hook relay, for lifecycle hooks: ``system.hook.twinkle_runtime_started(...)``."""
        return self.pm.hook

    def failed(self) -> list[PluginInfo]:
        return [info for info in self.plugins.values() if info.error is not None]

    def warn_failures(self) -> None:
        for info in self.failed():
            warnings.warn(
                f"Twinkle plugin {info.name!r} ({info.distribution or info.module} {info.version or ''}) failed to "
                f"load and is skipped: {info.error_summary}. Run `twinkle plugins` for the traceback; other "
                f"components work. Block it with TWINKLE_DISABLE_PLUGINS={info.name}.",
                PluginLoadWarning,
                stacklevel=3,
            )

    def report(self) -> dict[str, Any]:
        """Plugins, their hooks and components, and load errors, as plain data."""
        self.load()
        components: dict[str, list[dict[str, Any]]] = {}
        for registration in self.registry:
            components.setdefault(registration.plugin, []).append(registration.as_dict())
        return {
            "plugins": [
                dict(info.as_dict(), components=components.get(name, []))
                for name, info in sorted(self.plugins.items(), key=lambda kv: (kv[0] != CORE_PLUGIN, kv[0]))
            ],
        }


def _hooks_of(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    return [caller.name for caller in pm.get_hookcallers(plugin) or []]


def _core_version() -> str:
    from twinkle import __version__

    return __version__
