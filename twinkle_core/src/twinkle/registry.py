"""The component registry: kind -> name -> lazy target, with the plugin that registered it.

Every name a user passes as a string (``set_loss('GRPOLoss')``, ``set_optimizer('AdamW')``,
``dataset.set_template('Template')``, ``initialize(mode='ray')``) and every public
``from twinkle.<kind> import Name`` resolves here. Targets are ``"module:attr"`` strings
imported on first use, so discovery stays cheap.

Duplicate rule: registering a (kind, name) that another plugin already registered raises
:class:`DuplicateComponentError`, unless the later registration passes ``override=True``;
then it wins, ``Registration.overrides`` names the plugin it replaced and a
:class:`ComponentOverrideWarning` naming both plugins is shown (once per process). Registering the
same target again from the same plugin is a no-op (loading is idempotent).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

from twinkle._kinds import KIND_BY_NAME, KINDS, install_hint, official_provider
from twinkle._utils import close_matches, describe_target, import_target

__all__ = [
    "KINDS",
    "Registry",
    "Registration",
    "RegistryError",
    "UnknownKindError",
    "DuplicateComponentError",
    "ComponentNotFoundError",
    "ComponentLoadError",
    "InvalidComponentError",
    "ComponentOverrideWarning",
]


class ComponentOverrideWarning(UserWarning):
    """A plugin replaced another plugin's component with ``override=True``."""


#: (kind, name, replaced plugin, overriding plugin) already warned about in this process.
_WARNED_OVERRIDES: set[tuple[str, str, str, str]] = set()


class RegistryError(Exception):
    """Base class of registry errors."""


class UnknownKindError(RegistryError, ValueError):
    """A kind that is not one of :data:`KINDS`."""


class DuplicateComponentError(RegistryError):
    """Two plugins registered the same (kind, name) without ``override=True``."""


class ComponentNotFoundError(RegistryError, ImportError, LookupError):
    """No component of this kind has this name.

    Subclasses ImportError so that ``from twinkle.model import Nope`` shows this message.
    """


class ComponentLoadError(RegistryError, ImportError):
    """A registered target could not be imported, or is not a valid component."""


class InvalidComponentError(ComponentLoadError, TypeError):
    """A resolved component does not follow its kind's protocol."""


@dataclass
class Registration:
    """One registered component."""

    kind: str
    name: str
    target: Any
    plugin: str
    doc: str = ""
    overrides: str | None = None
    _loaded: Any = field(default=None, repr=False, compare=False)

    @property
    def target_path(self) -> str:
        return describe_target(self.target)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "target": self.target_path,
            "plugin": self.plugin,
            "doc": self.doc,
            "overrides": self.overrides,
        }


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        hint = close_matches(kind, list(KINDS))
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise UnknownKindError(f"Unknown component kind {kind!r}.{extra} Kinds: {', '.join(KINDS)}.")
    return kind


class Registry:
    """kind -> name -> :class:`Registration`.

    Example::

        registry = Registry()
        registry.register("loss", "MyLoss", "my_pkg.loss:MyLoss", plugin="my-plugin")
        MyLoss = registry.resolve("loss", "MyLoss")
    """

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
        #: plugin name -> one-line load error, to explain missing names.
        self.failed_plugins: dict[str, str] = {}
        #: plugin name -> (its distribution, what blocked it), to explain missing names.
        self.blocked_plugins: dict[str, tuple[str | None, str]] = {}

    # -- writing -----------------------------------------------------------------
    def register(
        self, kind: str, name: str, target: Any, *, plugin: str, override: bool = False, doc: str = ""
    ) -> Registration:
        """Register ``name`` under ``kind``. See the module docstring for the duplicate rule."""
        check_kind(kind)
        if not isinstance(name, str) or not name:
            raise ValueError(f"plugin {plugin!r}: a {kind} name must be a non-empty string, got {name!r}")
        if isinstance(target, str) and ":" not in target:
            raise ValueError(
                f"plugin {plugin!r}: target {target!r} for {kind} {name!r} must look like 'package.module:attr'"
            )
        existing = self._entries[kind].get(name)
        overrides = None
        if existing is not None:
            same = existing.plugin == plugin and existing.target_path == describe_target(target)
            if same:
                return existing
            if not override:
                raise DuplicateComponentError(
                    f"{kind} {name!r} is registered twice: by plugin {existing.plugin!r} ({existing.target_path}) "
                    f"and by plugin {plugin!r} ({describe_target(target)}). Pass override=True in the later "
                    f"registration to replace it, or block one plugin with TWINKLE_DISABLE_PLUGINS={plugin}."
                )
            overrides = existing.plugin
            key = (kind, name, existing.plugin, plugin)
            if key not in _WARNED_OVERRIDES:
                _WARNED_OVERRIDES.add(key)
                warnings.warn(
                    f"plugin {plugin!r} replaces {kind} {name!r} of plugin {existing.plugin!r} "
                    f"({existing.target_path} -> {describe_target(target)}) with override=True. If that is not "
                    f"what you want, block it with TWINKLE_DISABLE_PLUGINS={plugin}.",
                    ComponentOverrideWarning,
                    stacklevel=3,
                )
        registration = Registration(kind, name, target, plugin, doc, overrides)
        self._entries[kind][name] = registration
        return registration

    def unregister_plugin(self, plugin: str) -> None:
        """Remove every registration made by ``plugin``."""
        for entries in self._entries.values():
            for name in [n for n, r in entries.items() if r.plugin == plugin]:
                del entries[name]

    # -- reading -----------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[check_kind(kind)])

    def __contains__(self, key: tuple[str, str]) -> bool:
        kind, name = key
        return name in self._entries.get(kind, {})

    def __iter__(self) -> Iterator[Registration]:
        for kind in KINDS:
            yield from self._entries[kind].values()

    def get(self, kind: str, name: str) -> Registration:
        """The registration of ``name``, or a :class:`ComponentNotFoundError` that helps."""
        entries = self._entries[check_kind(kind)]
        try:
            return entries[name]
        except KeyError:
            raise ComponentNotFoundError(self._not_found_message(kind, name), name=name) from None

    def resolve(self, kind: str, name: Any) -> Any:
        """The class or function registered as ``name``; non-string ``name`` passes through.

        Raises:
            ComponentNotFoundError: no such name (the message lists the registered names,
                close matches, and the ``pip install`` that provides an official name).
            ComponentLoadError: the target failed to import.
            InvalidComponentError: the target is not a valid component of ``kind``.
        """
        if not isinstance(name, str):
            return name
        registration = self.get(kind, name)
        if registration._loaded is None:
            try:
                obj = import_target(registration.target)
            except Exception as exc:  # noqa: BLE001 - re-raised with context
                raise ComponentLoadError(
                    f"{kind} {name!r} from plugin {registration.plugin!r} failed to import "
                    f"{registration.target_path}: {type(exc).__name__}: {exc}"
                ) from exc
            _validate(kind, name, registration, obj)
            registration._loaded = obj
        return registration._loaded

    def provider_hint(self, kind: str, name: str) -> str | None:
        """The sentence that says how to get an official name: install its plugin, or unblock it."""
        provider = official_provider(kind, name)
        if provider is None:
            return None
        blocked = {dist: (plugin, why) for plugin, (dist, why) in self.blocked_plugins.items() if dist}
        if provider in blocked:
            plugin, why = blocked[provider]
            return (
                f"It is provided by the official plugin {provider!r}, which is installed but blocked by {why} "
                f"(entry point {plugin!r}); allow it to use {name!r}."
            )
        return f"It is provided by the official plugin {provider!r}; install it: {install_hint(provider)}"

    def _not_found_message(self, kind: str, name: str) -> str:
        known = self.names(kind)
        lines = [f"No {kind} named {name!r}."]
        provider_hint = self.provider_hint(kind, name)
        if provider_hint:
            lines.append(provider_hint)
        hints = close_matches(name, known)
        if hints:
            lines.append(f"Did you mean: {', '.join(repr(h) for h in hints)}?")
        lines.append(f"Registered {kind} names: {', '.join(known) if known else '(none)'}.")
        if self.failed_plugins:
            failed = "; ".join(f"{p}: {e}" for p, e in self.failed_plugins.items())
            lines.append(f"These plugins failed to load (run `twinkle plugins` for details): {failed}.")
        if self.blocked_plugins:
            blocked_list = ", ".join(f"{p} (by {why})" for p, (_, why) in sorted(self.blocked_plugins.items()))
            lines.append(f"Blocked plugins, not loaded: {blocked_list}.")
        return " ".join(lines)


def _validate(kind: str, name: str, registration: Registration, obj: Any) -> None:
    record = KIND_BY_NAME[kind]
    base_path = record.base
    if inspect.isclass(obj):
        if base_path is None:
            return
        try:
            base = import_target(base_path)
        except ImportError:  # the base needs an optional dependency; nothing to check against
            return
        if not issubclass(obj, base):
            raise InvalidComponentError(
                f"{kind} {name!r} from plugin {registration.plugin!r} resolves to {registration.target_path}, "
                f"which does not subclass {base_path.replace(':', '.')}. Subclass it so Twinkle can call it."
            )
        return
    if callable(obj) and (record.functions or base_path is None):
        return
    raise InvalidComponentError(
        f"{kind} {name!r} from plugin {registration.plugin!r} resolves to {registration.target_path} "
        f"({type(obj).__name__}), which is not a class{' or function' if record.functions else ''}."
    )
