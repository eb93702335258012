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
gets seeded random weights), so tests never download a model. ``random_token_rows`` makes
seeded encoded rows (``input_ids`` and ``labels`` with the prompt masked) to train it on.

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

    Installed entry points that load the same plugin (the same name, or any name whose target
    is the plugin's module) are blocked for the duration, so a plugin's own tests work whether
    or not the plugin is also pip-installed, under any entry-point name.
    """
    name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    disabled = {n.strip() for n in os.environ.get("TWINKLE_DISABLE_PLUGINS", "").split(",") if n.strip()}
    system = PluginSystem(disabled=disabled | {name} | _entry_points_loading(plugin)).load()
    previous = system.pm.get_name(plugin)
    if previous is not None:  # already loaded under another name (e.g. imported by another entry point)
        system.remove_plugin(previous)
    info = system.add_plugin(plugin, name=name)
    if info.error:
        raise RuntimeError(f"the in-test plugin {info.name!r} failed to register:\n{info.error}")
    runtime = initialize(mode=mode, plugins=system, **initialize_kwargs)
    try:
        yield runtime
    finally:
        runtime.shutdown()
        system.remove_plugin(info.name)


def _entry_points_loading(plugin: Any) -> set[str]:
    """Names of the installed ``twinkle`` entry points whose target lives in ``plugin``'s module."""
    from importlib import metadata
    from types import ModuleType

    from twinkle.plugins import CORE_PLUGIN, ENTRY_POINT_GROUP

    module = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
    return {
        ep.name
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
        if ep.name != CORE_PLUGIN and ep.value.partition(":")[0].strip() == module
    }


TINY_MODEL_SHAPE: dict[str, int] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
"""The shape of the test models: 2 layers, hidden 64, intermediate 128, 4 query / 2 key-value heads.

Config fields common to Qwen2/Llama-style configs; pass them on with ``dict(TINY_MODEL_SHAPE, ...)``.
"""


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
    config.update(TINY_MODEL_SHAPE, **config_overrides)
    (root / "config.json").write_text(json.dumps(config))
    return str(root)


def random_token_rows(
    n: int,
    seed: int = 0,
    *,
    vocab: int = 512,
    min_len: int = 5,
    max_len: int = 20,
    first_id: int = 1,
    with_length: bool = False,
) -> list[dict[str, Any]]:
    """``n`` seeded encoded rows of random lengths, for training tests: ``input_ids`` and ``labels``.

    Each row's length is drawn from ``[min_len, max_len]``, its token ids from ``[first_id, vocab)``,
    and a prompt of 1 to ``length - 2`` leading tokens is masked with ``-100`` in ``labels``.

    Args:
        n: how many rows.
        seed: the ``random.Random`` seed (the same seed gives the same rows).
        vocab: token ids stay below it.
        min_len / max_len: the range of lengths (``min_len`` at least 3).
        first_id: the smallest token id (e.g. 3 to keep clear of special tokens).
        with_length: also store each row's ``length``.

    Returns:
        The rows, dicts ready for ``forward_backward(inputs=...)``.

    Example::

        model.forward_backward(inputs=random_token_rows(4, seed=1))
    """
    import random

    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randint(first_id, vocab - 1) for _ in range(length)]
        prompt = rng.randint(1, length - 2)
        row: dict[str, Any] = {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}
        if with_length:
            row["length"] = length
        rows.append(row)
    return rows


@contextlib.contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """Run a block with ``count`` intra-op torch threads, restoring the previous count after.

    Tiny models on a small shared machine run faster on one thread than with OpenMP threads
    spinning against each other.

    Example::

        @pytest.fixture(autouse=True)
        def _one_torch_thread():
            with torch_threads(1):
                yield
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
