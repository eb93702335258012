"""PEP 562 module ``__getattr__`` for the public per-kind packages (``twinkle.model`` ...).

``from twinkle.model import TransformersModel`` asks the registry for the model named
``TransformersModel``; so does ``from twinkle.model import MegatronModel`` once
twinkle-megatron is installed. Fixed exports (base classes, data types) are listed per
package and imported lazily too. An unknown capitalized name raises the registry's
``ComponentNotFoundError`` (an ImportError with the list of names and the plugin that brings
it); any other unknown name raises AttributeError, as ``hasattr`` and ``pickle`` expect.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def kind_module(
    module_name: str, kinds: tuple[str, ...], exports: dict[str, str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    exports = dict(exports or {})

    def __getattr__(name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        if name in exports:
            from twinkle._utils import import_target

            return import_target(exports[name])
        from twinkle.registry import ComponentNotFoundError
        from twinkle.runtime import get_registry

        registry = get_registry()
        for kind in kinds:
            if (kind, name) in registry:
                return registry.resolve(kind, name)
        try:
            importlib.import_module(f"{module_name}.{name}")
        except ModuleNotFoundError:
            pass
        else:  # a submodule, e.g. `twinkle.model.base`
            import sys

            return sys.modules[f"{module_name}.{name}"]
        message = registry._not_found_message(kinds[0], name)
        if not name[:1].isupper():
            # Not a component-like (class) name: the plain AttributeError of the module protocol, which
            # hasattr() and pickle's module scan (``whichmodule``) expect; ImportError would escape them.
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}; {message}")
        raise ComponentNotFoundError(message, name=name)

    def __dir__() -> list[str]:
        from twinkle.runtime import get_registry

        registry = get_registry()
        names = set(exports)
        for kind in kinds:
            names.update(registry.names(kind))
        return sorted(names)

    return __getattr__, __dir__
