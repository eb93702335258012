"""Helpers for testing plugins and components.

``registered_plugin`` registers an in-test plugin for the duration of a ``with`` block
and removes it (and everything it registered) afterwards::

    from twinkle.testing import registered_plugin

    class MyPlugin:
        @twinkle.hookimpl
        def twinkle_register_components(self, register):
            register("loss", "MyLoss", MyLoss)

    def test_my_loss():
        with registered_plugin(MyPlugin()) as runtime:
            assert runtime.registry.resolve("loss", "MyLoss") is MyLoss

``write_tiny_model_dir`` writes a model directory small enough for unit tests: the bundled
tokenizer with a 2-layer, 64-wide Qwen2 ``config.json`` and no weights (a model built from it
gets seeded random weights), so tests never download a model.

The pytest plugin in :mod:`twinkle.testing_pytest` exposes the same as the
``twinkle_plugin`` fixture (``pytest -p twinkle.testing_pytest``, or it is auto-loaded
when twinkle-core is installed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from twinkle.plugins import PluginSystem
from twinkle.runtime import Runtime, initialize


@contextlib.contextmanager
def registered_plugin(
    plugin: Any, name: str | None = None, *, mode: str = "local", **initialize_kwargs: Any
) -> Iterator[Runtime]:
    """Initialize a fresh runtime with ``plugin`` added, yield it, then tear both down.

    An installed entry point of the same name is blocked for the duration, so a plugin's
    own tests work whether or not the plugin is also pip-installed.
    """
    name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    disabled = {n.strip() for n in os.environ.get("TWINKLE_DISABLE_PLUGINS", "").split(",") if n.strip()}
    system = PluginSystem(disabled=disabled | {name}).load()
    info = system.add_plugin(plugin, name=name)
    if info.error:
        raise RuntimeError(f"the in-test plugin {info.name!r} failed to register:\n{info.error}")
    runtime = initialize(mode=mode, plugins=system, **initialize_kwargs)
    try:
        yield runtime
    finally:
        runtime.shutdown()
        system.remove_plugin(info.name)


_SMALL_QWEN2 = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def write_tiny_model_dir(target: str | os.PathLike[str], **config_overrides: Any) -> str:
    """Write the bundled tiny-qwen2 tokenizer with a smaller ``config.json`` (no weights) into ``target``.

    The config is the bundled one with a 2-layer, 64-wide shape (hidden 64, intermediate 128,
    4 query / 2 key-value heads), then ``config_overrides`` on top.

    Args:
        target: an existing (empty) directory.
        **config_overrides: ``config.json`` fields to set, e.g. ``num_hidden_layers=1``.

    Returns:
        ``target`` as a string, ready for ``model_id=``.

    Example::

        model = TransformersModel(model_id=write_tiny_model_dir(tmp_path), device="cpu")
    """
    from twinkle import assets

    source = assets.path("tiny-qwen2")
    root = Path(target)
    for file in source.iterdir():
        if file.name != "config.json":
            shutil.copy2(file, root / file.name)
    config = json.loads((source / "config.json").read_text())
    config.update(_SMALL_QWEN2, **config_overrides)
    (root / "config.json").write_text(json.dumps(config))
    return str(root)
