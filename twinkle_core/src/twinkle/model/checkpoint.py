"""Checkpoints: save, load and resume, atomically and in the Hugging Face formats.

One job: what goes to disk and back. ``save`` writes into a temporary directory beside the
target and renames it (nothing half-written is ever left): an adapter as peft writes it
(``adapter_config.json`` + ``adapter_model.safetensors``) or the full model as
transformers writes it (``config.json`` + ``model.safetensors``), plus what
``resume_from_checkpoint`` needs (optimizer, scheduler, RNG per rank, step counters,
dataloader position). The backend provides the tensors through hooks (``export_weights``,
``load_adapter_weights``, ``load_full_weights``, ``optimizer_state_dict`` ...). Mixed into
:class:`~twinkle.model.backend.BackendModel`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from twinkle.dispatch import remote
from twinkle.model.distributed import barrier, broadcast_object
from twinkle.model.files import (
    copy_tokenizer_files,
    json_default,
    load_weight_files,
    nbytes,
    replace_dir,
    rng_state,
    save_weights,
    set_rng_state,
)
from twinkle.model.state import FULL_MODEL, AdapterState
from twinkle.progress import QuietBar, progress

#: The weight file of a peft adapter checkpoint.
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be written or read, with the reason and the fix."""


class CheckpointMixin:
    """get_state_dict, save, load and resume_from_checkpoint of the TwinkleModel protocol."""

    @remote(dispatch="all", collect="first")
    def get_state_dict(self, *, adapter_name: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """The adapter's weights (PEFT key names, as in ``adapter_model.safetensors``), or the full model's.

        Args:
            adapter_name: which adapter (default: the current one).
            **kwargs: backend options (MegatronModel: ``merged=True``, the full weights with
                the adapter merged in).

        Returns:
            ``{name: CPU tensor}``; full-model keys are the transformers names.

        Raises:
            ValueError: the full model's weights asked for while adapters are trained.
        """
        return self.export_weights(self._state(adapter_name), **kwargs)

    @remote(dispatch="all", collect="first")
    def save(
        self,
        output_dir: str | os.PathLike,
        *,
        adapter_name: str | None = None,
        save_optimizer: bool = True,
        save_tokenizer: bool = True,
        dataloader: Any = None,
        overwrite: bool = True,
        original_layout: bool = False,
        **kwargs: Any,
    ) -> str:
        """Write a checkpoint atomically (a temp dir beside ``output_dir``, then a rename).

        Contents: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT) for an
        adapter, or ``config.json`` + ``model.safetensors`` (transformers) for full
        training; with ``save_optimizer`` also ``optimizer.pt``, ``scheduler.pt``,
        ``rng_state_<rank>.pt`` and ``trainer_state.json`` (step counters, and
        ``dataloader.state_dict()`` when a dataloader is given); the tokenizer when known.

        Args:
            output_dir: the checkpoint directory to create (or replace, if ``overwrite``).
            adapter_name: which adapter (default: the current one).
            save_optimizer: also write what :meth:`resume_from_checkpoint` needs.
            save_tokenizer: also write the tokenizer files.
            dataloader: a DataLoader whose ``state_dict()`` is stored for exact resume.
            overwrite: replace an existing directory (otherwise raise).
            original_layout: for a model loaded through a converter (InternLM2, ChatGLM; see
                :mod:`twinkle.convert`), write the full weights in the family's original layout
                and ``config.json`` (with its other files) instead of the transformers layout
                (the backend's ``write_original_layout`` hook).

        Returns:
            The checkpoint path.

        Raises:
            CheckpointError: ``output_dir`` exists (and not ``overwrite``), is a file, or its
                parent cannot be written. Nothing is left behind on failure.
        """
        import torch

        state = self._state(adapter_name)
        target = Path(output_dir).resolve()
        if target.exists() and not target.is_dir():
            raise CheckpointError(f"save: {target} exists and is a file; choose a directory path")
        if target.exists() and not overwrite:
            raise CheckpointError(f"save: {target} already exists; pass overwrite=True or choose a new directory")
        parent = target.parent
        if self.rank == 0:
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CheckpointError(f"save: cannot create the parent directory {parent}: {exc}") from exc
            if not os.access(parent, os.W_OK):
                raise CheckpointError(f"save: {parent} is not writable; choose another output_dir")
        if original_layout and self.has_adapters:
            raise CheckpointError(
                "save(original_layout=True) writes full weights; this model trains LoRA adapters, whose files are in "
                "the transformers layout: save the adapter without original_layout, or train without adapters"
            )
        weights = self.export_weights(state)
        optim_state = None
        if save_optimizer and state.optimizer is not None:
            optim_state = self.optimizer_state_dict(state)
        tmp = parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        if self.world_size > 1:
            tmp = broadcast_object(tmp)
        weight_bytes, optim_bytes = nbytes(weights), nbytes(optim_state)
        bar = (
            progress(total=weight_bytes + optim_bytes, desc=f"save {target.name}", unit="B", unit_scale=True)
            if self.rank == 0
            else QuietBar()
        )
        try:
            if self.rank == 0:
                tmp.mkdir()
                if original_layout:
                    self.write_original_layout(tmp, weights)
                else:
                    self._write_weights(tmp, state, weights)
                bar.update(weight_bytes)
                if save_tokenizer and not original_layout:  # the original layout copies the source's files
                    self._write_tokenizer(tmp)
                if save_optimizer:
                    trainer_state = {
                        "global_step": state.global_step,
                        "adapter_name": None if state.name == FULL_MODEL else state.name,
                        "gradient_accumulation_steps": state.gradient_accumulation_steps,
                        "world_size": self.world_size,
                        "dataloader": dataloader.state_dict() if dataloader is not None else None,
                    }
                    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, default=json_default))
                    if optim_state is not None:
                        torch.save(optim_state, tmp / "optimizer.pt")
                        bar.update(optim_bytes)
                    if state.lr_scheduler is not None:
                        torch.save(state.lr_scheduler.state_dict(), tmp / "scheduler.pt")
            if save_optimizer:
                barrier(self.world_size)
                torch.save(rng_state(), tmp / f"rng_state_{self.rank}.pt")
            barrier(self.world_size)
            if self.rank == 0:
                replace_dir(tmp, target)
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            bar.close()
        barrier(self.world_size)
        return str(target)

    def _write_weights(self, directory: Path, state: AdapterState, weights: dict[str, Any]) -> None:
        """Full weights as transformers writes them, or an adapter as peft writes it."""
        if state.name == FULL_MODEL:
            config = self.model_config()
            if config is not None:
                config.save_pretrained(directory)
            generation_config = self.generation_config()
            if generation_config is not None:
                generation_config.save_pretrained(directory)
            save_weights(directory, weights, "model.safetensors")
            return
        self.adapter_config(state.name).save_pretrained(str(directory))
        save_weights(directory, weights, ADAPTER_WEIGHTS)

    def _write_tokenizer(self, directory: Path) -> None:
        tokenizer = self.tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
            return
        if self.model_dir is not None:
            copy_tokenizer_files(self.model_dir, directory)

    @remote(dispatch="all", collect="first")
    def load(self, checkpoint_dir: str | os.PathLike, *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Load weights from a checkpoint written by :meth:`save` (or by peft / transformers).

        An ``adapter_config.json`` loads a LoRA adapter (added under ``adapter_name``, default
        the current adapter or ``'default'``, if it does not exist yet); a directory with
        ``*.safetensors`` full weights (``config.json`` + ``model.safetensors``) replaces the
        base weights.

        Raises:
            CheckpointError: the directory does not exist, holds neither format, or its
                weights do not fit this model.
        """
        path = Path(checkpoint_dir)
        if not path.is_dir():
            raise CheckpointError(f"load: {path} is not a directory; pass a directory written by model.save(...)")
        if (path / "adapter_config.json").is_file():
            from peft import PeftConfig

            name = adapter_name or (self._default if self._default != FULL_MODEL else "default")
            if name not in self._states:
                self.add_adapter_to_model(name, PeftConfig.from_pretrained(str(path)))
            weight_file = path / ADAPTER_WEIGHTS
            if not weight_file.is_file():
                raise CheckpointError(f"load: {path} has adapter_config.json but no {ADAPTER_WEIGHTS}")
            self.load_adapter_weights(name, load_weight_files([weight_file]), path)
            self._active = None
            self._activate(self._states[name])
            return
        weight_files = sorted(path.glob("*.safetensors"))
        if not weight_files:
            raise CheckpointError(
                f"load: {path} has neither adapter_config.json (a LoRA adapter) nor *.safetensors weights"
            )
        if self.has_adapters:
            raise CheckpointError(f"load: {path} holds full weights but this model trains adapters")
        self.load_full_weights(load_weight_files(weight_files), path)

    @remote(dispatch="all", collect="first")
    def resume_from_checkpoint(
        self,
        checkpoint_dir: str | os.PathLike,
        *,
        adapter_name: str | None = None,
        dataloader: Any = None,
        load_optimizer: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Continue training from :meth:`save` output: weights, optimizer, scheduler, RNG, step counters.

        Set the optimizer and scheduler (same settings) before calling it. Training then
        continues with exactly the numbers of an uninterrupted run.

        Args:
            checkpoint_dir: a directory written by :meth:`save` with ``save_optimizer=True``.
            adapter_name: which adapter (default: the one recorded in the checkpoint).
            dataloader: gets ``load_state_dict(saved_state)`` when the checkpoint has one.
            load_optimizer: also restore optimizer and scheduler state.

        Returns:
            The saved trainer state (``global_step``, ``dataloader`` ...).

        Raises:
            CheckpointError: no ``trainer_state.json``, or optimizer state but no optimizer set.
        """
        import torch

        path = Path(checkpoint_dir)
        state_file = path / "trainer_state.json"
        if not state_file.is_file():
            raise CheckpointError(
                f"resume_from_checkpoint: {path} has no trainer_state.json; save it with model.save(..., "
                f"save_optimizer=True), or use model.load(...) to load weights only"
            )
        trainer_state = json.loads(state_file.read_text())
        name = adapter_name or trainer_state.get("adapter_name")
        self.load(path, adapter_name=name)
        state = self._state(name)
        if load_optimizer and (path / "optimizer.pt").is_file():
            if state.optimizer is None:
                raise CheckpointError("resume_from_checkpoint: call set_optimizer(...) (and set_lr_scheduler) first")
            optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
            self.load_optimizer_state_dict(state, optim_state)
        if load_optimizer and (path / "scheduler.pt").is_file() and state.lr_scheduler is not None:
            state.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng_file = path / f"rng_state_{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        state.global_step = int(trainer_state.get("global_step", 0))
        self.zero_grad(adapter_name=state.name)
        if dataloader is not None and trainer_state.get("dataloader") is not None:
            dataloader.load_state_dict(trainer_state["dataloader"])
        return trainer_state
