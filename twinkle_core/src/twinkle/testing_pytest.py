"""pytest plugin: the ``twinkle_plugin`` fixture for plugin authors.

Enabled automatically through the ``pytest11`` entry point of twinkle-core::

    def test_my_plugin(twinkle_plugin):
        runtime = twinkle_plugin(my_plugin_module)
        assert "MyLoss" in runtime.registry.names("loss")
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import pytest


@pytest.fixture
def twinkle_plugin() -> Iterator[Callable[..., Any]]:
    """Call it with a plugin (module or object); get a runtime with it registered."""
    from twinkle.testing import registered_plugin

    with contextlib.ExitStack() as stack:

        def add(plugin: Any, name: str | None = None, **kwargs: Any) -> Any:
            return stack.enter_context(registered_plugin(plugin, name, **kwargs))

        yield add
