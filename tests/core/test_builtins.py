"""Every component core registers resolves to a valid object of its kind (meta-test)."""

from __future__ import annotations

import pytest
from twinkle.plugins import PluginSystem

SYSTEM = PluginSystem(only=()).load()
CORE = [r for r in SYSTEM.registry if r.plugin == "core"]


@pytest.mark.parametrize("registration", CORE, ids=lambda r: f"{r.kind}:{r.name}")
def test_builtin_resolves(registration):
    """Each built-in imports and is a class (or, where the kind allows, a function) of its kind's base."""
    import inspect

    from twinkle._kinds import KIND_BY_NAME
    from twinkle._utils import import_target

    obj = SYSTEM.registry.resolve(registration.kind, registration.name)
    assert obj is import_target(registration.target)
    kind = KIND_BY_NAME[registration.kind]
    if kind.base is not None and inspect.isclass(obj):
        assert issubclass(obj, import_target(kind.base)), registration
    else:
        assert inspect.isclass(obj) or (kind.functions and inspect.isfunction(obj)), registration


def test_every_kind_module_exposes_its_builtins():
    import importlib

    from twinkle._kinds import KIND_BY_NAME

    for registration in CORE:
        kind = KIND_BY_NAME[registration.kind]
        if not kind.importable:
            continue  # launcher modes ('local') are not attributes: twinkle.launcher.local is a module
        module = importlib.import_module(kind.module)
        assert getattr(module, registration.name) is SYSTEM.registry.resolve(registration.kind, registration.name)
