"""TransformersModel: the TwinkleModel protocol on transformers + peft.

A facade: :class:`~twinkle.model.backend.BackendModel` implements the protocol (adapters,
compute, token-normalized accumulation, clip/step, metrics, checkpoints, generation) and
this module implements its backend hooks for a ``transformers`` causal LM with peft LoRA
adapters, data parallelism (DDP-style all-reduce) and FSDP2.

Where a batch becomes a loss: ``forward_backward`` (:mod:`twinkle.model.compute`) ->
``_prepare`` (InputProcessor collate) -> :meth:`TransformersModel.run_forward` (the HF
model, logits) -> ``Loss`` (a sum and its token count) -> ``backward`` (gradients
accumulate) -> ``finish_gradients`` (:mod:`twinkle.model.training`: divide by the window's
token count over all data ranks) -> ``clip_grad_and_step``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Sequence

from twinkle.data_format.output import ModelOutput
from twinkle.dispatch import remote
from twinkle.model.backend import BackendModel
from twinkle.model.checkpoint import CheckpointError
from twinkle.model.files import resolve_model_dir
from twinkle.model.state import FULL_MODEL, AdapterState
from twinkle.processor.base import VISION_FIELDS, VISION_TOKEN_FIELDS

#: Batch fields passed to the model as they are (vision-language models).
VISION_INPUTS: tuple[str, ...] = (*VISION_FIELDS, *VISION_TOKEN_FIELDS)

__all__ = ["FULL_MODEL", "AdapterState", "CheckpointError", "TransformersModel", "resolve_model_dir"]


class TransformersModel(BackendModel):
    """A causal LM from transformers, trained with full parameters or named peft LoRA adapters.

    Args:
        model_id: a local directory (``config.json`` plus weights; a directory with only
            ``config.json`` is initialized randomly from the config with ``seed``), or a
            hub id ``ms://org/name`` / ``hf://org/name``.
        config: a ``transformers.PretrainedConfig`` (or dict with ``model_type``) to build a
            randomly initialized model from, instead of ``model_id``.
        torch_dtype: parameter dtype: ``'float32'`` (default), ``'bfloat16'``, ``'float16'``, ``'auto'``.
        mixed_precision: ``'bf16'`` / ``'fp16'`` autocast for the forward pass, or ``None``.
        attn_implementation: ``'sdpa'`` (default), ``'eager'``, ``'flash_attention_2'`` ...
        device_mesh: the DeviceMesh; ``dp`` -> data parallel gradient all-reduce (DDP),
            ``fsdp`` -> FSDP2 ``fully_shard``. Default: the runtime's global mesh, or all
            torchrun ranks as ``dp``.
        remote_group: the DeviceGroup to run on (ray/http modes).
        seed: seeds random initialization and LoRA initialization (default: the runtime's
            seed, else 42).
        device: ``'cpu'``/``'cuda'``/``'cuda:1'``; default: CUDA (this rank's GPU) if available.
        gradient_checkpointing: trade compute for activation memory.
        trust_remote_code: passed to transformers.
        patches: the ``patch`` components to apply (names, classes or instances); default:
            every registered patch that is enabled by default (the GPU fast path, see
            :mod:`twinkle.patch.fastpath`).
        disabled_patches: patch names to switch off (also ``TWINKLE_DISABLED_PATCHES``).
        enabled_patches: patches to apply on top of ``patches`` (or of the default ones), such as
            those that are off by default (also ``TWINKLE_ENABLED_PATCHES``):
            ``enabled_patches=["Fp8FrozenGemms"]``.
        freeze_vision: on a vision-language model, keep the vision tower and projector frozen
            (full training leaves them, LoRA skips them); ``False`` trains them too.
        **model_kwargs: passed to ``from_pretrained`` / ``from_config``.

    Raises:
        ValueError: neither or both of ``model_id`` and ``config``; a bad dtype.
        FileNotFoundError: a local ``model_id`` without ``config.json``.

    Example::

        model = TransformersModel(model_id="twinkle_core/src/twinkle/assets/tiny-qwen2")
        model.add_adapter_to_model("default", LoraConfig(r=8, target_modules="all-linear"))
        model.set_optimizer("AdamW", lr=1e-4)
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
    """

    def __init__(
        self,
        model_id: str | None = None,
        *,
        config: Any = None,
        torch_dtype: Any = "float32",
        mixed_precision: str | None = None,
        attn_implementation: str | None = "sdpa",
        device_mesh: Any = None,
        remote_group: str | None = None,
        seed: int | None = None,
        device: Any = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        patches: Sequence[Any] | None = None,
        disabled_patches: Sequence[str] | None = (),
        enabled_patches: Sequence[Any] | None = (),
        freeze_vision: bool = True,
        **model_kwargs: Any,
    ) -> None:
        from twinkle.patch.fastpath import resolve_patches

        self._freeze_vision = freeze_vision
        self._attn_implementation = attn_implementation
        self._trust_remote_code = trust_remote_code
        self._gradient_checkpointing = gradient_checkpointing
        self._model_kwargs = model_kwargs
        self._patches = resolve_patches(patches, disabled_patches, enabled_patches)
        self._peft: Any = None
        super().__init__(
            model_id,
            config=config,
            torch_dtype=torch_dtype,
            mixed_precision=mixed_precision,
            device_mesh=device_mesh,
            remote_group=remote_group,
            seed=seed,
            device=device,
        )

    # ------------------------------------------------------------------ build
    def build_model(self, config: Any, dtype: Any) -> Any:
        """Hook: the transformers model on ``self.device`` with the fast-path patches applied."""
        from twinkle.model.hf import build_causal_lm
        from twinkle.patch.fastpath import apply_patches

        extra = dict(self._model_kwargs)
        if self._attn_implementation is not None:
            extra["attn_implementation"] = self._attn_implementation
        model = None
        if config is None:  # a family in a remote-code layout: a registered converter maps it (twinkle.convert)
            from twinkle.convert.base import load_converted
            from twinkle.model.hf import check_model_dir

            check_model_dir(self.model_dir, owner="TransformersModel")
            model = load_converted(self.model_dir, dtype=dtype, seed=self.seed, **extra)
        if model is None:
            model = build_causal_lm(
                self.model_dir, config, dtype=dtype, seed=self.seed, trust_remote_code=self._trust_remote_code, **extra
            )
        model.to(self.device)
        if self._freeze_vision:  # vision-language models: train the language model (twinkle.model.vision)
            from twinkle.model.vision import freeze_vision

            freeze_vision(model)
        if self._gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        # The fast path: registered `patch` components (twinkle.patch.fastpath), re-applied per adapter.
        self.fast_path_patches = apply_patches(model, self._patches)
        return model

    def write_original_layout(self, directory: Any, weights: dict[str, Any]) -> None:
        """Hook: full weights in the original layout of a model loaded through a converter (:mod:`twinkle.convert`)."""
        from twinkle.convert.base import save_original

        save_original(self._hf_model(), directory, weights)

    def _hf_model(self) -> Any:
        """The transformers model without the peft wrapper."""
        return self._peft.get_base_model() if self._peft is not None else self.model

    def model_config(self) -> Any:
        """Hook: the transformers config."""
        return self._hf_model().config

    def generation_config(self) -> Any:
        """Hook: the transformers generation config (``None`` when the model has none)."""
        return getattr(self._hf_model(), "generation_config", None)

    def parallelize(self) -> None:
        """Hook: FSDP2 ``fully_shard`` on an ``fsdp`` mesh, else rank 0's weights on every rank (DDP)."""
        from twinkle.model.distributed import apply_fsdp, broadcast_module

        if self.device_mesh.fsdp > 1:
            apply_fsdp(self.model, self._hf_model(), self.device_mesh, self.device.type)
            from twinkle.patch.fastpath import set_flag

            # The fused LM-head path calls the inner decoder directly, which would bypass the FSDP
            # root's unshard of the embeddings and head: keep the plain forward under FSDP.
            set_flag(self.model, "fused_linear_ce", False)
            for state in self._states.values():  # fully_shard replaced the parameters with sharded ones
                state.params = self.trainable_parameters(state)
        else:
            broadcast_module(self.model)

    # ------------------------------------------------------------------ adapters
    def attach_adapter(self, adapter_name: str, config: Any) -> list[Any]:
        """Hook: add a peft adapter (wrapping the model in a PeftModel on the first one)."""
        from peft import get_peft_model

        from twinkle.patch.fastpath import apply_patches

        if self.parallelized and self.device_mesh.fsdp > 1:
            raise ValueError("add every adapter before the first forward when training with FSDP")
        if getattr(config, "task_type", None) is None:
            config.task_type = "CAUSAL_LM"
        if self._freeze_vision:  # LoRA on the language model only, "all-linear" included
            from twinkle.model.vision import exclude_vision

            exclude_vision(config, self._hf_model())
        first = self._peft is None
        if first:
            self._peft = get_peft_model(self.model, config, adapter_name=adapter_name)
            self.model = self._peft
        else:
            self._peft.add_adapter(adapter_name, config)
        marker = f".{adapter_name}."
        params = [p for n, p in self.model.named_parameters() if marker in n]
        if first:
            self.model.to(self.device)
        else:  # only the new adapter: the others may be paged to host memory (twinkle.model.paging)
            for p in params:
                if p.device != self.device:
                    p.data = p.data.to(self.device)
        for p in params:
            p.requires_grad_(True)
        if params:
            self.fast_path_patches = apply_patches(self.model, self._patches)
        if self.parallelized and self.world_size > 1 and self.device_mesh.fsdp == 1:
            from twinkle.model.distributed import broadcast_module

            broadcast_module(self.model)
        return params

    def activate_adapter(self, adapter_name: str) -> None:
        """Hook: peft's ``set_adapter``."""
        self._peft.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Hook: peft's ``delete_adapter``."""
        self._peft.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def without_adapters(self) -> Iterator[None]:
        """Hook: peft's ``disable_adapter`` context."""
        with self._peft.disable_adapter():
            yield

    def adapter_config(self, adapter_name: str) -> Any:
        """Hook: the adapter's peft config, naming the base model when it came from a directory."""
        config = self._peft.peft_config[adapter_name]
        if self.model_dir is not None and not config.base_model_name_or_path:
            config.base_model_name_or_path = self.model_id
        return config

    # ------------------------------------------------------------------ compute
    def run_forward(self, batch: Any) -> ModelOutput:
        """Hook: the HF model on a prepared batch (causal masks, packed-sequence varlen attention, autocast).

        Returns logits, or hidden states and the LM head for the fused loss
        (:func:`twinkle.patch.fastpath.run_model`).
        """
        import torch

        model_inputs = {"input_ids": batch["input_ids"], "position_ids": batch.get("position_ids"), "use_cache": False}
        for key in VISION_INPUTS:  # vision-language models: images and their token types
            if key in batch:
                model_inputs[key] = batch[key]
        if "attention_mask" in batch:
            model_inputs["attention_mask"] = batch["attention_mask"]
        elif model_inputs["position_ids"] is None and "cu_seq_lens_q" not in batch:
            from twinkle.patch.fastpath import causal_masks  # whole unpadded rows: no mask to build

            masks = causal_masks(self._hf_model(), batch["input_ids"].shape[-1])
            if masks is not None:
                model_inputs["attention_mask"] = masks
        context = contextlib.nullcontext()
        if "cu_seq_lens_q" in batch:  # packed sequences: varlen attention over their boundaries
            from twinkle.patch.varlen import packed_inputs

            context = packed_inputs(self._hf_model(), batch, model_inputs)
        from twinkle.patch.fastpath import run_model  # logits, or hidden states for the fused loss

        with context:
            if self.autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    return run_model(self.model, model_inputs)
            return run_model(self.model, model_inputs)

    def _run(self, batch: Any) -> ModelOutput:
        """:meth:`run_forward` under its earlier name (benchmarks and tests call it)."""
        return self.run_forward(batch)

    def generate_ids(self, input_ids: list[int], *, max_new_tokens: int, tokenizer: Any, **kwargs: Any) -> list[int]:
        """Hook: transformers' greedy ``generate`` (with its KV cache)."""
        import torch

        ids = torch.tensor([input_ids], device=self.device)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
        return out[0, ids.shape[1] :].tolist()

    # ------------------------------------------------------------------ gradients and optimizer state
    def reduce_gradients(self, state: AdapterState, tokens: float) -> float:
        """Hook: under FSDP2 the gradients are already averaged over the ranks (factor ``world / tokens``)."""
        if self.world_size > 1 and self.device_mesh.fsdp > 1:
            return self.world_size / tokens if tokens else 0.0
        return super().reduce_gradients(state, tokens)

    def _fsdp(self) -> bool:
        return self.world_size > 1 and self.device_mesh.fsdp > 1

    def optimizer_state_dict(self, state: AdapterState) -> dict[str, Any]:
        """Hook: the optimizer state; gathered into full tensors under FSDP."""
        if not self._fsdp():
            return super().optimizer_state_dict(state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            self.model, state.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_optimizer_state_dict(self, state: AdapterState, optimizer_state: dict[str, Any]) -> None:
        """Hook: restore the optimizer state; re-sharded under FSDP."""
        if not self._fsdp():
            super().load_optimizer_state_dict(state, optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            self.model, state.optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True)
        )

    # ------------------------------------------------------------------ weights
    def _gathered_state_dict(self) -> dict[str, Any]:
        """Every parameter and buffer (full tensors even under FSDP)."""
        if self._fsdp() and self.parallelized:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict()

    def _full_state_dict(self) -> dict[str, Any]:
        """The full transformers state dict as CPU tensors (:func:`twinkle.model.export.export_model` reads it)."""
        if self._peft is not None:
            raise ValueError("get_state_dict: this model trains LoRA adapters; pass adapter_name=... for its weights")
        return {k: v.detach().to("cpu").contiguous() for k, v in self._gathered_state_dict().items()}

    def _barrier(self) -> None:
        from twinkle.model.distributed import barrier

        barrier(self.world_size)

    def export_weights(self, state: AdapterState, **options: Any) -> dict[str, Any]:
        """Hook: peft's adapter state dict, or the full transformers state dict (CPU tensors)."""
        if state.name == FULL_MODEL:
            return self._full_state_dict()
        from peft import get_peft_model_state_dict

        state_dict = get_peft_model_state_dict(
            self._peft, state_dict=self._gathered_state_dict(), adapter_name=state.name
        )
        return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}

    def load_adapter_weights(self, adapter_name: str, state_dict: dict[str, Any], path: Any) -> None:
        """Hook: peft's ``set_peft_model_state_dict``; unexpected keys are an error."""
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self._peft, state_dict, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise CheckpointError(f"load: {len(unexpected)} adapter weights do not fit this model: {unexpected[:3]}")

    def load_full_weights(self, state_dict: dict[str, Any], path: Any) -> None:
        """Hook: ``load_state_dict`` of transformers names (a tied LM head may be absent)."""
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        tied = {k for k in missing if "lm_head" in k and getattr(self.model.config, "tie_word_embeddings", False)}
        if unexpected or set(missing) - tied:
            raise CheckpointError(
                f"load: the weights in {path} do not fit this model: missing {sorted(set(missing) - tied)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )

    # ------------------------------------------------------------------ export
    @remote(dispatch="all", collect="first")
    def export(
        self,
        output_dir: str | os.PathLike,
        *,
        dtype: Any = "bfloat16",
        merge: bool = True,
        adapter_name: str | None = None,
        **kwargs: Any,
    ) -> str:
        """A Hugging Face checkpoint that plain transformers and vLLM load: the LoRA merged into
        its base (``merge=True``), or the adapter alone; weights in ``dtype``. The live model is
        unchanged. See :func:`twinkle.model.export.export_model` (``save_tokenizer``,
        ``max_shard_size``, ``overwrite``) and ``push_to_hub`` there.

        Example::

            model.export("exported", dtype="bfloat16")
        """
        from twinkle.model.export import export_model

        return export_model(self, output_dir, dtype=dtype, merge=merge, adapter_name=adapter_name, **kwargs)
