"""Model directories on disk: what they hold and how checkpoint files are written.

One job: the file-level facts every backend (and sampler) shares, so each answers the same
way: does a directory hold weights (:func:`has_weights`), where a model id lives
(:func:`resolve_model_dir`), which dtype a name means (:func:`parse_dtype`), which tokenizer
files travel with a checkpoint, how a directory is replaced atomically, and the RNG state
saved for an exact resume. No torch import at module import.

Example::

    from twinkle.model.files import has_weights, parse_dtype
    has_weights("twinkle_core/src/twinkle/assets/tiny-qwen2")  # False: config.json only
    parse_dtype("bf16")                                        # torch.bfloat16
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

#: Suffixes of weight files (transformers, torch and safetensors formats).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: Files with a weight suffix that are not base-model weights: adapters and training state.
NON_WEIGHT_PREFIXES = ("adapter_", "training_", "optimizer", "scheduler", "rng_state")
#: Tokenizer (and generation) files copied into a checkpoint when no tokenizer object is loaded.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


def has_weights(model_dir: str | os.PathLike) -> bool:
    """True when ``model_dir`` holds base-model weight files, not only a config (or an adapter).

    A weight file ends in one of :data:`WEIGHT_SUFFIXES`; adapter weights
    (``adapter_model.safetensors``) and training state (``optimizer.pt``, ``scheduler.pt``,
    ``rng_state_0.pt``, ``training_args.bin``) do not count. A directory with ``config.json``
    and no weights is initialized randomly (seeded) by the backends and samplers.

    Args:
        model_dir: a local directory (a missing one holds no weights).

    Example::

        has_weights("twinkle_core/src/twinkle/assets/tiny-qwen2")  # False: config.json only
    """
    root = Path(model_dir)
    if not root.is_dir():
        return False
    return any(
        entry.name.endswith(WEIGHT_SUFFIXES) and not entry.name.startswith(NON_WEIGHT_PREFIXES)
        for entry in root.iterdir()
        if entry.is_file()
    )


def resolve_model_dir(model_id: str | os.PathLike) -> str:
    """A local directory for ``model_id``: a local path, ``ms://org/name`` or ``hf://org/name``.

    The same as :func:`twinkle.hub.resolve_model_dir` (hub ids download or reuse the cache).

    Raises:
        FileNotFoundError: a local path that does not exist.
        HubError: neither a local path nor a hub id, or the hub library is missing.
    """
    from twinkle.hub import resolve_model_dir as hub_resolve

    return str(hub_resolve(model_id))


def parse_dtype(name: Any) -> Any:
    """The torch dtype for ``name`` (``'float32'``, ``'bf16'``, ``'half'``, a ``torch.dtype``...).

    ``None`` and ``'auto'`` are returned as they are (the checkpoint's own dtype).

    Raises:
        ValueError: an unknown name.
    """
    import torch

    if name is None or name == "auto" or isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    value = getattr(torch, aliases.get(str(name), str(name)), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use 'float32', 'bfloat16' or 'float16'")
    return value


def untie(weights: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``weights`` in which no two tensors share memory (safetensors refuses shared storage).

    A tensor that shares memory with an earlier one (tied embeddings and LM head) is cloned.
    """
    seen: set[int] = set()
    out = {}
    for key, value in weights.items():
        ptr = value.data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def nbytes(obj: Any) -> int:
    """Bytes of every tensor in ``obj`` (a tensor, or dicts/lists/tuples of them, as in an optimizer state)."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return int(obj.numel() * obj.element_size())
    if isinstance(obj, Mapping):
        return sum(nbytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(value) for value in obj)
    return 0


def save_weights(directory: Path, weights: dict[str, Any], file_name: str) -> None:
    """Write ``weights`` as ``directory / file_name`` in safetensors format (tied tensors untied)."""
    from safetensors.torch import save_file

    save_file(untie(weights), str(directory / file_name), metadata={"format": "pt"})


def load_weight_files(files: list[Path]) -> dict[str, Any]:
    """All tensors of the given safetensors files, merged into one dict (shards of one model)."""
    from safetensors.torch import load_file

    state_dict: dict[str, Any] = {}
    for file in files:
        state_dict.update(load_file(str(file)))
    return state_dict


def copy_tokenizer_files(model_dir: str | os.PathLike, directory: Path) -> None:
    """Copy the :data:`TOKENIZER_FILES` that ``model_dir`` has into ``directory``."""
    for name in TOKENIZER_FILES:
        source = Path(model_dir) / name
        if source.is_file():
            shutil.copy2(source, directory / name)


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished directory ``tmp`` to ``target``, replacing what is there (renames only)."""
    if not target.exists():
        os.replace(tmp, target)
        return
    trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, trash)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(trash, target)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """The Python, numpy, torch (and CUDA) random states, for an exact resume."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for trainer state: arrays and tensors as lists, the rest as strings."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple, range)):
        return list(value)
    return str(value)
