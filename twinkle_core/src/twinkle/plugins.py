"""Discovering and loading plugins: the ``twinkle`` entry-point group, with env-var control.

* ``TWINKLE_PLUGINS=a,b``          load only these plugins (core is always loaded).
* ``TWINKLE_DISABLE_PLUGINS=a,b``  block these plugins.
* ``TWINKLE_TRACE_PLUGINS=1``      print every hook call to stderr.

Both lists take entry-point names (``rewards``) or distribution names (``twinkle-rewards``,
every entry point of that distribution). A name that is neither, among the installed plugins,
raises :class:`PluginSelectionError` listing them; so does disabling ``core``, which cannot be.

Loading is lazy and idempotent: nothing is discovered at ``import twinkle``; a
:class:`PluginSystem` loads once, at ``twinkle.initialize()`` or on first registry use. Load
order: core first, then the entry points sorted by name, then in-process plugins
(:meth:`PluginSystem.add_plugin`) in the order they are added. A plugin that fails to import,
or whose registration hook raises (a name another plugin registered first included), is
recorded in :attr:`PluginSystem.plugins` with its traceback and reported by ``initialize()`` (a
warning) and ``twinkle plugins``; the other plugins load normally.

Lifecycle hooks (``twinkle_runtime_started``, ``twinkle_metrics_emitted``, ...) go through
:meth:`PluginSystem.notify`, one plugin at a time: a plugin whose hook raises is named in a
:class:`PluginHookWarning` (once per plugin and hook) and the run and the other plugins go on.
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


class PluginHookWarning(UserWarning):
    """A plugin's lifecycle hook raised; the run and the other plugins go on."""


class PluginSelectionError(ValueError):
    """``TWINKLE_PLUGINS`` / ``TWINKLE_DISABLE_PLUGINS`` name something they cannot mean."""


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
    blocked_by: str | None = None  # why: "TWINKLE_DISABLE_PLUGINS", "TWINKLE_PLUGINS", ...
    hook_errors: dict[str, str] = field(default_factory=dict)  # lifecycle hook -> its last error

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
            "blocked_by": self.blocked_by,
            "error": self.error,
            "hook_errors": dict(self.hook_errors),
        }


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


def _distribution_of(ep: metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else None


def _canonical(name: str) -> str:
    """A distribution name the way pip compares them (PEP 503): ``Twinkle_Rewards`` == ``twinkle-rewards``."""
    return "-".join(name.replace("_", "-").replace(".", "-").lower().split("-"))


def _expand(
    names: set[str], entry_points: list[metadata.EntryPoint], variable: str | None
) -> tuple[set[str], list[str]]:
    """Entry-point names meant by ``names`` (entry-point or distribution names), and the names that match none."""
    by_dist: dict[str, set[str]] = {}
    for ep in entry_points:
        dist = _distribution_of(ep)
        if dist:
            by_dist.setdefault(_canonical(dist), set()).add(ep.name)
    known = {ep.name for ep in entry_points}
    result: set[str] = set()
    unknown: list[str] = []
    for name in sorted(names):
        if name in known:
            result.add(name)
        elif _canonical(name) in by_dist:
            result |= by_dist[_canonical(name)]
        elif variable is None:
            result.add(name)  # set from code (e.g. an in-process plugin's name): taken as given
        else:
            unknown.append(name)
    return result, unknown


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
        self._only_from = None if only is not None else "TWINKLE_PLUGINS"
        self._disabled = set(disabled) if disabled is not None else (_env_list("TWINKLE_DISABLE_PLUGINS") or set())
        self._disabled_from = None if disabled is not None else "TWINKLE_DISABLE_PLUGINS"
        self._warned_hooks: set[tuple[str, str]] = set()
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
        entry_points = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
        only, disabled = self._selection(entry_points)
        self._loaded = True
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
            if ep.name != CORE_PLUGIN and (ep.name in disabled or (only is not None and ep.name not in only)):
                info.blocked = True
                if ep.name in disabled:
                    info.blocked_by = self._disabled_from or "disabled=..."
                else:
                    info.blocked_by = self._only_from or "only=..."
                self.plugins[ep.name] = info
                self.registry.blocked_plugins[ep.name] = (info.distribution, info.blocked_by)
                continue
            try:
                module = ep.load()
            except Exception:  # noqa: BLE001 - a broken plugin must not break the others
                self._fail(info, traceback.format_exc())
                continue
            self._add(ep.name, module, info)
        return self

    def _selection(self, entry_points: list[metadata.EntryPoint]) -> tuple[set[str] | None, set[str]]:
        """The entry-point names to load only (``None``: all) and to block; distribution names expanded.

        Raises:
            PluginSelectionError: a name in an environment variable is no installed plugin, or
                ``TWINKLE_DISABLE_PLUGINS`` names core.
        """
        core_names = {CORE_PLUGIN, "twinkle-core"}
        disabled, unknown_disabled = _expand(self._disabled, entry_points, self._disabled_from)
        if self._disabled_from and ({_canonical(n) for n in self._disabled} & core_names):
            raise PluginSelectionError(
                f"{self._disabled_from}={','.join(sorted(self._disabled))} names core, which cannot be disabled: it "
                "holds the registry, the hooks and the local launcher. To replace one of its components, register "
                "yours with override=True."
            )
        only = None
        unknown_only: list[str] = []
        if self._only is not None:
            wanted = {n for n in self._only if _canonical(n) not in core_names}
            only, unknown_only = _expand(wanted, entry_points, self._only_from)
        for variable, unknown in ((self._only_from, unknown_only), (self._disabled_from, unknown_disabled)):
            if unknown:
                installed = sorted(
                    f"{ep.name} ({_distribution_of(ep)})" if _distribution_of(ep) else ep.name
                    for ep in entry_points
                    if ep.name != CORE_PLUGIN
                )
                raise PluginSelectionError(
                    f"{variable} names {', '.join(repr(n) for n in unknown)}, which is no installed Twinkle plugin "
                    f"(neither an entry-point name nor a distribution name). Installed plugins: "
                    f"{', '.join(installed) or '(none besides core)'}. Run `twinkle plugins` to list them."
                )
        return only, disabled

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

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call lifecycle hook ``hook_name`` on every plugin, isolating each one.

        Plugins are called in pluggy's order (the last registered first). A plugin whose hook
        raises is recorded (``PluginInfo.hook_errors``, ``twinkle plugins``) and named in one
        :class:`PluginHookWarning` per plugin and hook; the other plugins are still called and
        the caller (``initialize()``, ``calculate_metric()``, ...) goes on.
        """
        caller = getattr(self.pm.hook, hook_name)
        impls = caller.get_hookimpls()
        if not impls:
            caller(**kwargs)  # nothing to call; pluggy still traces the call (TWINKLE_TRACE_PLUGINS)
            return
        plugins = {impl.plugin_name: impl.plugin for impl in reversed(impls)}  # pluggy's call order
        for plugin_name in plugins:
            others = [p for n, p in plugins.items() if n != plugin_name]
            try:
                self.pm.subset_hook_caller(hook_name, others)(**kwargs) if others else caller(**kwargs)
            except Exception as exc:  # noqa: BLE001 - one plugin's observer must not stop the run
                self._hook_failed(hook_name, plugin_name, exc)

    def _hook_failed(self, hook_name: str, plugin_name: str, exc: BaseException) -> None:
        summary = f"{type(exc).__name__}: {exc}"
        info = self.plugins.get(plugin_name)
        if info is not None:
            info.hook_errors[hook_name] = summary
        if (plugin_name, hook_name) in self._warned_hooks:
            return
        self._warned_hooks.add((plugin_name, hook_name))
        where = f" ({info.distribution or info.module})" if info is not None else ""
        warnings.warn(
            f"Twinkle plugin {plugin_name!r}{where} raised in {hook_name} and is skipped for this call: {summary}. "
            f"The run goes on (this warning is shown once per plugin and hook); `twinkle plugins` lists the error. "
            f"Block the plugin with TWINKLE_DISABLE_PLUGINS={plugin_name}.",
            PluginHookWarning,
            stacklevel=4,
        )

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

    def check(self) -> dict[str, list[dict[str, Any]]]:
        """Import every registered target and validate it against its kind (``twinkle plugins --check``).

        Returns:
            ``{"ok": [...], "unavailable": [...], "broken": [...]}``, each a list of
            registrations (:meth:`Registration.as_dict`) with an ``error`` line. ``unavailable``:
            a module outside the plugin's own package is not installed (``torch`` for core's model
            without the ``torch`` extra): installing it fixes the name. ``broken``: anything else
            (a missing module or attribute inside the plugin's package, a class of the wrong
            base, an exception at import), and every plugin that failed to load.
        """
        from twinkle.registry import ComponentLoadError

        self.load()
        result: dict[str, list[dict[str, Any]]] = {"ok": [], "unavailable": [], "broken": []}
        for registration in list(self.registry):
            entry = registration.as_dict()
            try:
                self.registry.resolve(registration.kind, registration.name)
            except ComponentLoadError as exc:
                cause = exc.__cause__
                info = self.plugins.get(registration.plugin)
                own_package = (info.module if info else registration.target_path).partition(":")[0].split(".")[0]
                missing = getattr(cause, "name", None) if isinstance(cause, ModuleNotFoundError) else None
                if missing and missing.split(".")[0] != own_package:
                    entry["error"] = f"needs {missing!r}, which is not installed"
                    result["unavailable"].append(entry)
                else:
                    entry["error"] = str(exc)
                    result["broken"].append(entry)
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                entry["error"] = f"{type(exc).__name__}: {exc}"
                result["broken"].append(entry)
            else:
                result["ok"].append(entry)
        for info in self.failed():
            result["broken"].append(
                {"kind": None, "name": None, "plugin": info.name, "target": info.module, "error": info.error_summary}
            )
        return result

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
