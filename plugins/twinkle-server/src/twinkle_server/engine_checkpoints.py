"""A Tinker adapter's checkpoints: save one to a directory (peft layout), load one into a new slot.

Mixed into :class:`twinkle_server.engine.LoRAEngine`; the files are core ``TransformersModel.save``'s
(``adapter_model.safetensors``, ``adapter_config.json``, ``optimizer.pt``, ``trainer_state.json``)
with CPU tensors, so a checkpoint written on a GPU server loads on any device. A checkpoint holds
its adapter only: LoRA tensors, never a base weight, so loading one cannot write the shared base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twinkle_server.tinker_rows import EngineError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_STATE = "optimizer.pt"


class SlotCheckpoints:
    """``save_slot`` / ``load_slot`` of the engine (its ``lock``, ``core``, ``slots``, ``using``, ``create_slot``)."""

    lock: Any
    core: Any
    slots: dict[int, Any]

    def save_slot(self, slot_id: int, directory: str | Path, *, optimizer: bool, base_model: str) -> int:
        """Write an adapter (peft layout) and optionally its optimizer into ``directory`` (core's ``save``).

        The directory must exist and be private to this write (the caller renames it into
        place afterwards). The files hold CPU tensors whatever the engine's device, so a
        checkpoint loads on any device. Returns the bytes written.
        """
        import torch
        from safetensors.torch import load_file, save_file

        with self.lock:
            slot = self.slot(slot_id)
            directory = Path(directory)
            self.core.adapter_config(slot.adapter).base_model_name_or_path = base_model
            with self.using([slot.adapter]):
                self.core.save(
                    directory, adapter_name=slot.adapter, save_optimizer=optimizer, save_tokenizer=False, overwrite=True
                )
            # peft adds the base LM head to an adapter that targets it ("embedding layers"): a tenant's
            # checkpoint holds its adapter only (and a load can never write the shared base)
            weights_path = directory / ADAPTER_WEIGHTS
            tensors = load_file(str(weights_path))
            if any(".lora_" not in key for key in tensors):
                save_file(
                    {k: v for k, v in tensors.items() if ".lora_" in k}, str(weights_path), metadata={"format": "pt"}
                )
            optimizer_path = directory / OPTIMIZER_STATE
            if optimizer_path.is_file():  # CPU tensors, whatever the device: the checkpoint loads anywhere
                torch.save(torch.load(optimizer_path, map_location="cpu", weights_only=True), optimizer_path)
            config_path = directory / ADAPTER_CONFIG
            config = json.loads(config_path.read_text())
            config["twinkle_steps"] = slot.steps
            config_path.write_text(json.dumps(config, indent=2))
            for path in directory.iterdir():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
            return sum(p.stat().st_size for p in directory.iterdir())

    def load_slot(self, directory: str | Path, *, optimizer: bool) -> int:
        """Load an adapter (and optionally its optimizer state) into a new slot; returns its id.

        Raises:
            EngineError: the files are missing or do not fit this base model.
        """
        import torch
        from safetensors.torch import load_file

        with self.lock:
            directory = Path(directory)
            try:
                config = json.loads((directory / ADAPTER_CONFIG).read_text())
                tensors = load_file(str(directory / ADAPTER_WEIGHTS))
                rank, alpha, targets = int(config["r"]), float(config["lora_alpha"]), config["target_modules"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise EngineError(f"the checkpoint's adapter files are unreadable: {exc}") from None
            slot_id = self.create_slot(rank, alpha=alpha, targets=targets)
            slot = self.slots[slot_id]
            with self.using([slot.adapter]):  # on the device while its tensors are written
                try:
                    expected = {
                        f"base_model.model.{name}.lora_{kind}.weight": t
                        for name, pair in slot.params.items()
                        for kind, t in zip("AB", pair)
                    }
                    missing = sorted(set(expected) - set(tensors))
                    if missing:
                        raise EngineError(f"checkpoint is missing tensor {missing[0]!r}")
                    if any(tensors[k].shape != t.shape for k, t in expected.items()):
                        raise EngineError("checkpoint tensor shapes do not fit this base model")
                    self.core.load_adapter_weights(slot.adapter, {k: tensors[k] for k in expected}, directory)
                    trainer_state = directory / "trainer_state.json"
                    steps = int(config.get("twinkle_steps", 0))
                    if trainer_state.is_file():
                        steps = int(json.loads(trainer_state.read_text()).get("global_step", steps))
                    slot.state.global_step = steps
                    if optimizer:
                        opt_path = directory / OPTIMIZER_STATE
                        if not opt_path.is_file():
                            raise EngineError("this checkpoint has no optimizer state; load it without the optimizer")
                        # read on the CPU: load_state_dict moves the moments to the adapter's device
                        self.core.load_optimizer_state_dict(
                            slot.state, torch.load(opt_path, weights_only=True, map_location="cpu")
                        )
                except Exception:
                    self.free_slot(slot_id)
                    raise
            return slot_id
