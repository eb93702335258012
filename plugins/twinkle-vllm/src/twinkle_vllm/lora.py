"""Named LoRA adapters for vLLM: saved PEFT directories and in-memory tensors.

vLLM loads an adapter from a directory in PEFT's saved format (``adapter_config.json`` plus
``adapter_model.safetensors``) and keys it by an integer id. In-memory tensors (what a
checkpoint engine sends after each optimizer step) are staged into such a directory, in
``/dev/shm`` when it exists (memory, not disk), written to a temporary name and renamed so a
half-written adapter is never loaded, then loaded with ``load_inplace=True`` under the
adapter's id. This uses only vLLM's public LoRA API (``LoRARequest``, ``add_lora``), so it
keeps working across vLLM releases.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


@dataclass
class AdapterSlot:
    """One named adapter held by a VLLMSampler.

    Attributes:
        name: the user's adapter name.
        lora_id: vLLM's integer id for it (stable across weight updates).
        path: the directory vLLM loads, or ``None`` while the adapter has no weights yet
            (a new PEFT adapter's ``B`` is zero, so sampling it equals sampling the base model).
        config: the adapter's LoRA config as a dict (``adapter_config.json``'s content).
        owned: the directory is a staging directory this sampler created (and removes).
        version: how many times tensors were loaded into it.
    """

    name: str
    lora_id: int
    path: str | None
    config: dict[str, Any]
    owned: bool = False
    version: int = 0


def staging_root() -> str:
    """A new private directory for staged adapters (``/dev/shm`` when available)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="twinkle-vllm-lora-", dir=base)


def lora_config_dict(config: Any) -> dict[str, Any]:
    """``config`` (a ``peft.LoraConfig``, a dict of its fields, or a saved adapter dir) as a JSON-ready dict.

    Raises:
        FileNotFoundError: a directory without ``adapter_config.json``.
        TypeError: anything else.
    """
    if isinstance(config, (str, os.PathLike)):
        path = Path(config) / "adapter_config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(config)!r} is not a saved PEFT adapter (no adapter_config.json); save one with "
                "peft_model.save_pretrained(dir) or model.save(dir, adapter_name=...)"
            )
        return json.loads(path.read_text())
    if isinstance(config, Mapping):
        import dataclasses

        from peft import LoraConfig

        accepted = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        unknown = sorted(set(config) - accepted - {"peft_type", "auto_mapping"})
        if unknown:
            raise TypeError(f"LoRA config fields {unknown} are not peft.LoraConfig fields")
        config = LoraConfig(**{k: v for k, v in config.items() if k in accepted})
    if hasattr(config, "to_dict") and hasattr(config, "r"):
        data = config.to_dict()
        return json.loads(json.dumps(data, default=_json_default))
    raise TypeError(
        f"LoRA config must be a peft.LoraConfig, a dict of its fields, or a saved adapter directory; "
        f"got {type(config).__name__}"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if hasattr(value, "value"):  # enums (peft's TaskType)
        return value.value
    return str(value)


def stage_adapter(root: str, name: str, version: int, tensors: Mapping[str, Any], config: dict[str, Any]) -> str:
    """Write ``tensors`` + ``config`` as a PEFT adapter directory under ``root``; returns its path.

    The directory is written under a temporary name and renamed into place.
    """
    from safetensors.torch import save_file

    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    final = Path(root) / f"{safe_name}-v{version}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{safe_name}-", dir=root))
    try:
        contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


def check_lora_names(tensors: Mapping[str, Any]) -> None:
    """Raise a clear error when ``tensors`` are not LoRA tensors in PEFT's saved naming.

    Raises:
        KeyError: a name without ``lora_A`` / ``lora_B`` / ``lora_embedding`` (e.g. base weights
            sent with ``adapter_name=``), or no tensors at all.
    """
    if not tensors:
        raise KeyError("update_weights(adapter_name=...): no LoRA tensors were given")
    bad = [k for k in tensors if "lora_" not in k]
    if bad:
        raise KeyError(
            f"update_weights(adapter_name=...): {bad[:3]} are not LoRA tensors; with adapter_name the names are "
            "PEFT's saved names such as 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' "
            "(model.get_state_dict(adapter_name=...)); send base weights without adapter_name"
        )
