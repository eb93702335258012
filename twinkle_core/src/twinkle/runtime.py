"""``twinkle.initialize``: build a Runtime (mode, groups, mesh, plugins, launcher) and make it current.

There is no hidden module state beyond *which* runtime is current: everything a run
needs hangs off the :class:`Runtime` object, so tests can build and shut down several in
one process, and ``with twinkle.initialize(...):`` restores the previous one on exit.
"""

from __future__ import annotations

import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from twinkle.mesh import DeviceGroup, DeviceMesh, MeshError
from twinkle.plugins import PluginSystem

if TYPE_CHECKING:  # pragma: no cover
    from twinkle.launcher.base import Launcher
    from twinkle.registry import Registry
    from twinkle.tracker.base import Tracker


class _Current:
    """Which runtime is current, and the plugin system used before any initialize()."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.runtime: Runtime | None = None
        self.default_plugins: PluginSystem | None = None


_current = _Current()


@dataclass
class Runtime:
    """Everything one run needs. Create it with :func:`twinkle.initialize`."""

    mode: str
    groups: dict[str, DeviceGroup]
    global_device_mesh: DeviceMesh | None
    plugins: PluginSystem
    nproc_per_node: int | None = None
    seed: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: Where trackers write (created on first write); see :mod:`twinkle.tracker.runs`.
    run_dir: Path | None = None
    #: The trackers fed by ``twinkle_metrics_emitted`` (see ``docs/tracking.md``).
    trackers: list[Tracker] = field(default_factory=list)
    #: Lengths of the DataLoaders asked ``len()`` in this run (to spot a schedule sized in batches).
    dataloader_lengths: set[int] = field(default_factory=set)
    launcher: Launcher = field(init=False, repr=False)
    _previous: Runtime | None = field(default=None, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)
    _torch_seeded: bool = field(default=False, init=False, repr=False)

    @property
    def registry(self) -> Registry:
        return self.plugins.registry

    @property
    def hook(self) -> Any:
        return self.plugins.hook

    @property
    def closed(self) -> bool:
        return self._closed

    def group(self, name: str) -> DeviceGroup:
        try:
            return self.groups[name]
        except KeyError:
            raise MeshError(f"no DeviceGroup named {name!r}; declared: {', '.join(self.groups) or '(none)'}") from None

    def create(self, kind: str, name: Any, *args: Any, **kwargs: Any) -> Any:
        """Resolve ``name`` of ``kind`` through the registry and instantiate it."""
        obj = self.registry.resolve(kind, name)(*args, **kwargs)
        if isinstance(name, str):
            self.plugins.notify("twinkle_component_created", runtime=self, kind=kind, name=name, component=obj)
        return obj

    def emit_metrics(self, source: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Tell lifecycle plugins (and so the trackers) about new metrics.

        A plugin whose hook raises is warned about and skipped."""
        self.plugins.notify("twinkle_metrics_emitted", runtime=self, source=source, step=step, metrics=metrics)

    def seed_torch(self) -> None:
        """Seed torch with the runtime's seed (once; called by components that use torch)."""
        if self.seed is None or self._torch_seeded:
            return
        import torch

        torch.manual_seed(self.seed)
        self._torch_seeded = True

    def shutdown(self) -> None:
        """Release the launcher's resources and stop being current. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.launcher.shutdown()
        finally:
            self.plugins.notify("twinkle_runtime_stopped", runtime=self)
            with _current.lock:
                if _current.runtime is self:
                    _current.runtime = (
                        self._previous if self._previous is not None and not self._previous.closed else None
                    )

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _normalize_groups(groups: DeviceGroup | Iterable[DeviceGroup] | None) -> dict[str, DeviceGroup]:
    if groups is None:
        return {}
    if isinstance(groups, DeviceGroup):
        groups = [groups]
    result: dict[str, DeviceGroup] = {}
    for group in groups:
        if not isinstance(group, DeviceGroup):
            raise MeshError(f"groups must hold DeviceGroup objects, got {type(group).__name__}: {group!r}")
        if group.name in result:
            raise MeshError(f"two DeviceGroups are named {group.name!r}; names must be unique")
        result[group.name] = group
    return result


def initialize(
    mode: str = "local",
    groups: DeviceGroup | Sequence[DeviceGroup] | None = None,
    global_device_mesh: DeviceMesh | None = None,
    nproc_per_node: int | None = None,
    seed: int | None = None,
    *,
    plugins: PluginSystem | None = None,
    run_dir: str | Path | None = None,
    trackers: Sequence[Any] | str | None = None,
    tracker_options: Mapping[str, Mapping[str, Any]] | None = None,
    **mode_options: Any,
) -> Runtime:
    """Load plugins, build the runtime for ``mode`` and make it current.

    Args:
        mode: ``'local'`` (one process or torchrun), ``'http'`` (a ``twinkle serve``
            server), ``'ray'`` (twinkle-ray), or any mode a plugin registers.
        groups: the DeviceGroups components can be placed on (``remote_group=``).
        global_device_mesh: the default mesh for components that are given none.
        nproc_per_node: processes per node (ray mode: GPUs/CPUs per node).
        seed: seeds Python's ``random`` now, and torch when a component first uses it.
        plugins: a prepared :class:`PluginSystem` (tests); default: discover entry points.
        run_dir: the run's directory for trackers (default ``$TWINKLE_RUN_DIR``, else
            ``./twinkle_runs/<timestamp>``); created when the first metric is written.
        trackers: tracker names (kind ``tracker``: ``"jsonl"``, ``"tensorboard"``,
            ``"wandb"``, ``"mlflow"``, or a plugin's) or Tracker objects; default
            ``$TWINKLE_TRACKERS`` (comma-separated), else ``["jsonl"]``; ``[]`` turns tracking off.
        tracker_options: per tracker name, keyword arguments for it
            (``{"wandb": {"project": "sft"}}``).
        **mode_options: passed to the launcher (``address=`` for ray, ``base_url=`` and
            ``api_key=`` for http).

    Returns:
        The new current :class:`Runtime`; ``runtime.shutdown()`` (or ``with``) ends it.

    Raises:
        ComponentNotFoundError: no launcher for ``mode`` (the message names the plugin
            that provides it), or an unknown tracker name.
        ImportError: a selected tracker's library is missing (the message names the install).
        MeshError: invalid groups or a mesh that does not fit the processes.

    Example::

        runtime = twinkle.initialize(mode="local", seed=42)
    """
    system = (plugins or PluginSystem()).load()
    system.warn_failures()
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a string such as 'local', 'ray' or 'http', got {mode!r}")
    if global_device_mesh is not None and not isinstance(global_device_mesh, DeviceMesh):
        raise MeshError(f"global_device_mesh must be a twinkle DeviceMesh, got {type(global_device_mesh).__name__}")
    launcher_cls = system.registry.resolve("launcher", mode)
    runtime = Runtime(
        mode=mode,
        groups=_normalize_groups(groups),
        global_device_mesh=global_device_mesh,
        plugins=system,
        nproc_per_node=nproc_per_node,
        seed=seed,
        options=dict(mode_options),
    )
    from twinkle.tracker.runs import open_trackers, resolve_run_dir

    runtime.run_dir = resolve_run_dir(run_dir)
    runtime.trackers = open_trackers(runtime, trackers, tracker_options)
    if seed is not None:
        random.seed(seed)
    runtime.launcher = launcher_cls(runtime, **mode_options)
    runtime.launcher.start()
    with _current.lock:
        runtime._previous = _current.runtime
        _current.runtime = runtime
    system.notify("twinkle_runtime_started", runtime=runtime)
    return runtime


def log_metrics(metrics: Mapping[str, Any], step: int | None = None, source: str = "user") -> None:
    """Report metrics of your own loop (rewards, eval scores) to the trackers and plugins.

    Example::

        twinkle.log_metrics({"reward": mean_reward, "kl": kl}, step=step, source="rl")
    """
    get_runtime().emit_metrics(source, metrics, step=step)


def current_runtime() -> Runtime | None:
    """The current runtime, or ``None`` before :func:`initialize`."""
    return _current.runtime


def get_runtime() -> Runtime:
    """The current runtime; raises a helpful error before :func:`initialize`."""
    runtime = _current.runtime
    if runtime is None:
        raise RuntimeError("Twinkle is not initialized: call twinkle.initialize(mode='local') first")
    return runtime


def get_plugin_system() -> PluginSystem:
    """The current runtime's plugins, or (before initialize) a lazily loaded default set."""
    runtime = _current.runtime
    if runtime is not None:
        return runtime.plugins
    with _current.lock:
        if _current.default_plugins is None:
            _current.default_plugins = PluginSystem().load()
        return _current.default_plugins


def get_registry() -> Registry:
    """The registry that names resolve in right now."""
    return get_plugin_system().registry


def require_components(requirements: Mapping[str, Iterable[str]], *, exit: bool = False) -> None:
    """Check up front that named components are registered: a script fails in a second, not after building models.

    Loads the plugins (cheap: no torch) and looks the names up without importing them.

    Args:
        requirements: kind -> names, e.g. ``{"reward": ["GSM8KAccuracyReward"]}``.
        exit: raise ``SystemExit`` with the message (no traceback) instead of the error; pass
            ``exit=__name__ == "__main__"`` from a script.

    Raises:
        ComponentNotFoundError: a name is not registered; the message names the plugin that
            provides it and its install command (or the variable that blocks it).

    Example::

        twinkle.runtime.require_components({"reward": ["GSM8KAccuracyReward"]}, exit=__name__ == "__main__")
    """
    import sys

    from twinkle.registry import ComponentNotFoundError

    registry = get_registry()
    missing = [(kind, name) for kind, names in requirements.items() for name in names if (kind, name) not in registry]
    if not missing:
        return
    sentences = []
    for kind, name in missing:
        hint = registry.provider_hint(kind, name)
        sentences.append(f"No {kind} named {name!r}. {hint}" if hint else registry._not_found_message(kind, name))
    message = " ".join(dict.fromkeys(sentences))
    if exit:
        script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "this script"
        raise SystemExit(f"{script} cannot run: {message}")
    raise ComponentNotFoundError(message, name=missing[0][1])


def reset_default_plugins() -> None:
    """Forget the lazily loaded default plugin set (after installing a plugin at run time)."""
    with _current.lock:
        _current.default_plugins = None


def shutdown() -> None:
    """Shut down the current runtime, if any."""
    runtime = _current.runtime
    if runtime is not None:
        runtime.shutdown()
