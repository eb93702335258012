"""Every component core registers resolves to a valid object of its kind (meta-test)."""

from __future__ import annotations

import pytest
from twinkle.plugins import PluginSystem

SYSTEM = PluginSystem(only=()).load()
CORE = [r for r in SYSTEM.registry if r.plugin == "core"]


@pytest.mark.parametrize("registration", CORE, ids=lambda r: f"{r.kind}:{r.name}")
def test_builtin_resolves(registration):
    obj = SYSTEM.registry.resolve(registration.kind, registration.name)
    assert callable(obj)


def test_every_kind_module_exposes_its_builtins():
    import importlib

    from twinkle.registry import KIND_MODULES

    for registration in CORE:
        module = importlib.import_module(KIND_MODULES[registration.kind])
        if registration.kind == "launcher":
            continue  # launcher names ('local') share the namespace with submodules
        assert getattr(module, registration.name) is SYSTEM.registry.resolve(registration.kind, registration.name)
