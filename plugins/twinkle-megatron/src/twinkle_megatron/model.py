"""MegatronModel: the TwinkleModel protocol on megatron-core.

A backend of :class:`~twinkle.model.backend.BackendModel`, like TransformersModel: the
shared base owns the loop-facing machinery (per-adapter state, loss and metric handling,
token-normalized gradient accumulation, ``clip_grad_and_step``, atomic save / resume,
generation), so the numbers and the semantics are the same by construction; this module
implements the backend hooks for what touches the network itself:

* ``setup_distributed``: megatron's parallel state for the DeviceMesh
  (:mod:`twinkle_megatron.parallel`) and, on CPU, the shims of :mod:`twinkle_megatron.compat`;
* ``build_model``: a megatron-core ``GPTModel`` converted from the Hugging Face checkpoint
  (:mod:`twinkle_megatron.convert`), or from the same seeded random init TransformersModel draws;
* ``attach_adapter`` ...: LoRA adapters are :mod:`twinkle_megatron.lora` pairs, saved as PEFT adapters;
* ``export_weights`` / ``load_*_weights``: weights in transformers' and peft's formats;
* ``all_reduce_*``: reductions over megatron's data-parallel group; ``clip_gradients``: the
  gradient norm over the model-parallel group;
* ``build_optimizer``: any torch optimizer from the registry, or on CUDA megatron-core's own
  (``set_optimizer('AdamW', ..., use_megatron_optimizer=True)``, see
  :mod:`twinkle_megatron.megatron_optim`).

Where a batch becomes a loss: ``forward_backward`` (shared) -> ``_prepare`` (the
InputProcessor) -> :meth:`MegatronModel.run_forward` (causal/packed attention mask,
``GPTModel``, logits) -> the adapter's Loss -> ``backward``.

On CPU megatron-core needs the shims in :mod:`twinkle_megatron.compat`; they are applied
while a MegatronModel exists (:meth:`MegatronModel.close` releases them).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Mapping

from twinkle.data_format.output import ModelOutput
from twinkle.model.backend import BackendModel
from twinkle.model.checkpoint import CheckpointError
from twinkle.model.state import FULL_MODEL, AdapterState

logger = logging.getLogger("twinkle.megatron")


class MegatronModel(BackendModel):
    """A causal LM trained on megatron-core, with the same API and numbers as TransformersModel.

    Args:
        model_id: a local directory (``config.json`` plus weights; only ``config.json``:
            random initialization with ``seed``, the same weights TransformersModel would
            draw), or ``ms://org/name`` / ``hf://org/name``.
        config: a ``transformers.PretrainedConfig`` (or dict with ``model_type``) instead of
            ``model_id``. Families: qwen2, qwen3, llama, qwen2_moe, qwen3_moe.
        torch_dtype: parameter dtype (``'float32'``, ``'bfloat16'``, ``'float16'``).
        mixed_precision: ``'bf16'``/``'fp16'`` autocast, or ``None``.
        device_mesh: ``tp``/``pp``/``cp``/``ep``/``dp`` map onto megatron's parallel state.
        remote_group: the DeviceGroup to run on (ray/http modes).
        seed: random initialization and LoRA initialization seed (default: runtime's, else 42).
        device: ``'cpu'`` or ``'cuda'`` (default: CUDA when available).
        **kwargs: TransformersModel's ``attn_implementation`` and ``trust_remote_code`` are
            accepted (and have no effect: megatron's attention is its own) so a script can
            swap backends without edits; ``gradient_checkpointing=True`` is refused.

    ``set_optimizer(..., use_megatron_optimizer=True)`` (CUDA only) uses megatron-core's
    optimizer and DDP gradient buffers (``'AdamW'``, ``'Adam'``, ``'SGD'``; one trained
    adapter or full training per model).

    Raises:
        ValueError: neither or both of ``model_id`` and ``config``; a bad dtype.
        ConversionError: a model family megatron-core cannot express here.
        MeshError: a mesh that does not fit the processes or the device.

    Example::

        model = MegatronModel(model_id="twinkle_core/src/twinkle/assets/tiny-qwen2", device="cpu")
        model.set_optimizer("AdamW", lr=1e-4)
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step(max_grad_norm=1.0)
    """

    def __init__(
        self,
        model_id: str | None = None,
        *,
        config: Any = None,
        torch_dtype: Any = "float32",
        mixed_precision: str | None = None,
        device_mesh: Any = None,
        remote_group: str | None = None,
        seed: int | None = None,
        device: Any = None,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - {"attn_implementation", "trust_remote_code", "gradient_checkpointing"})
        if unknown:
            raise TypeError(f"MegatronModel got unexpected keyword arguments {unknown}")
        if kwargs.get("gradient_checkpointing"):
            raise ValueError(
                "MegatronModel: gradient_checkpointing=True is not available (megatron's activation recompute is "
                "not wired in yet); use TransformersModel for it, or a smaller micro-batch"
            )
        self._trust_remote_code = bool(kwargs.get("trust_remote_code", False))
        self._lora: Any = None
        self._megatron_optim: dict[str, Any] = {}
        self._shims_applied = False
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

    # ------------------------------------------------------------------ set-up
    def setup_distributed(self, device_mesh: Any, device: Any, runtime: Any) -> None:
        """Hook: the device, the CPU shims and megatron's parallel state for the mesh."""
        import torch
        from twinkle.mesh import DeviceMesh

        from twinkle_megatron import compat, parallel

        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._device_type = self.device.type
        compat.apply(self._device_type)
        self._shims_applied = True
        mesh = device_mesh if device_mesh is not None else (runtime.global_device_mesh if runtime else None)
        self.parallel = parallel.init_megatron_parallel(mesh, self._device_type)
        self.device_mesh = mesh or DeviceMesh.from_sizes(world_size=self.parallel.world_size)
        self.rank, self.world_size = self.parallel.rank, self.parallel.world_size

    def build_model(self, config: Any, dtype: Any) -> Any:
        """Hook: the HF weights (checkpoint or seeded random init), converted into a megatron ``GPTModel``."""
        import torch
        from twinkle.model.hf import build_causal_lm

        from twinkle_megatron import builder, compat, convert

        load_dtype = dtype if dtype not in (None, "auto") else torch.float32
        hf = build_causal_lm(
            self.model_dir,
            config,
            dtype=load_dtype,
            seed=self.seed,
            owner="MegatronModel",
            trust_remote_code=self._trust_remote_code,
            check=convert.check_supported,
        )
        self.hf_config = hf.config
        self._hf_keys = list(hf.state_dict().keys())
        self._hf_generation_config = getattr(hf, "generation_config", None)
        hf_state = hf.state_dict()
        del hf
        spec = convert.megatron_spec_from_hf(self.hf_config, load_dtype)
        self._causal_mask_optional = builder.uses_sdpa(spec)
        with torch.random.fork_rng(devices=[]):
            compat.seed_model_parallel(self.seed, self._device_type)
            model = builder.build_gpt_model(spec, device=self.device)
        builder.load_full_state(model, convert.hf_to_megatron(hf_state, self.hf_config))
        return model.to(self.device)

    def model_config(self) -> Any:
        """Hook: the transformers config the model was converted from."""
        return self.hf_config

    def generation_config(self) -> Any:
        """Hook: the checkpoint's generation config (``None`` for a random init without one)."""
        return self._hf_generation_config

    def close(self) -> None:
        """Release the CPU shims this model applied (idempotent). The model stays usable until then."""
        from twinkle_megatron import compat

        if getattr(self, "_shims_applied", False):
            compat.restore()
            self._shims_applied = False

    # ------------------------------------------------------------------ adapters
    def attach_adapter(self, adapter_name: str, config: Any) -> list[Any]:
        """Hook: a :class:`~twinkle_megatron.lora.MegatronLora` adapter; the first one freezes the base weights.

        ``target_modules`` is ``'all-linear'`` or HF names (``q_proj`` ... ``down_proj``).

        Raises:
            ValueError: unsupported LoRA options, or tp_size > 1.
        """
        from twinkle_megatron.lora import MegatronLora

        lora = self._lora if self._lora is not None else MegatronLora(self.model, self.hf_config)
        params = lora.add(adapter_name, config)
        if self._lora is None:
            for name, p in self.model.named_parameters():
                if ".lora_" not in name:
                    p.requires_grad_(False)
            self._lora = lora
        return params

    def activate_adapter(self, adapter_name: str) -> None:
        """Hook: route the LoRA layers through ``adapter_name``."""
        self._lora.set_active(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Hook: not available: megatron LoRA layers keep their adapters.

        Raises:
            ValueError: always.
        """
        raise ValueError(f"MegatronModel cannot remove adapter {adapter_name!r} yet; use a new model instead")

    @contextlib.contextmanager
    def without_adapters(self) -> Iterator[None]:
        """Hook: no adapter in the LoRA layers for the context; the active one afterwards."""
        self._lora.set_active(None)
        try:
            yield
        finally:
            if self.active_adapter is not None:
                self._lora.set_active(self.active_adapter)

    def adapter_config(self, adapter_name: str) -> Any:
        """Hook: the peft ``LoraConfig`` of the adapter, in HF module names."""
        return self._lora.peft_config(adapter_name, self.model_id)

    # ------------------------------------------------------------------ compute
    def _attention_mask(self, batch: Mapping[str, Any]) -> Any:
        """megatron's boolean mask ``[B, 1, T, T]`` (True = blocked): causal, per packed sequence, no padding keys.

        ``None`` for a batch that is causal only (no padding, one sequence per row) when the
        layers' attention takes that as "causal" (SDPA's flash path needs no mask tensor).
        """
        import torch

        ids = batch["input_ids"]
        length = ids.shape[1]
        pos = batch.get("position_ids")
        packed = pos is not None and ids.shape[0] == 1 and bool((pos[:, 1:] == 0).any())
        pad = batch["attention_mask"] == 0 if "attention_mask" in batch else None
        if pad is not None and not bool(pad.any()):
            pad = None
        if not packed and pad is None and self._causal_mask_optional:
            return None
        blocked = torch.ones(length, length, dtype=torch.bool, device=ids.device).triu(1)[None]
        if packed:
            segment = torch.cumsum((pos == 0).long(), dim=1)
            blocked = blocked | (segment[:, :, None] != segment[:, None, :])
        if pad is not None:
            blocked = blocked | pad[:, None, :]
        return blocked.expand(ids.shape[0], length, length)[:, None]

    def run_forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        """Hook: the ``GPTModel`` on a prepared batch: logits, or hidden states and the head for the fused loss."""
        import torch

        ids = batch["input_ids"]
        pos = batch.get("position_ids")
        if pos is None:
            pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        mask = self._attention_mask(batch)
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                logits = self.model(ids, pos, attention_mask=mask)
            return ModelOutput(logits=logits)
        if not self._fused_head():
            return ModelOutput(logits=self.model(ids, pos, attention_mask=mask))
        from twinkle.patch.fastpath import HiddenStatesOutput

        head = self.model.output_layer
        head.forward = _hidden_states_passthrough
        try:
            hidden = self.model(ids, pos, attention_mask=mask)
        finally:
            del head.forward
        weight = (
            self.model.shared_embedding_or_output_weight()
            if self.model.share_embeddings_and_output_weights
            else head.weight
        )
        return HiddenStatesOutput(hidden_states=hidden, lm_head_weight=weight)

    def _fused_head(self) -> bool:
        """Whether losses get the hidden states and the head (chunked linear cross-entropy, no full logits).

        As TransformersModel's ``FusedLinearCrossEntropy`` patch (switched off by the same name
        in ``TWINKLE_DISABLED_PATCHES``); with tensor parallelism the head is vocabulary-sharded
        and the logits path is used.
        """
        from twinkle.patch.fastpath import disabled_from_env

        return self.parallel.tp == 1 and "FusedLinearCrossEntropy" not in disabled_from_env()

    # ------------------------------------------------------------------ parallel reductions
    def _dp_group(self) -> Any:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    def all_reduce_floats(self, values: list[float]) -> list[float]:
        """Hook: the sum over megatron's data-parallel group (tensor-parallel ranks hold the same numbers)."""
        if self.parallel.dp == 1:
            return [float(v) for v in values]
        from twinkle.model.distributed import all_reduce_floats

        return all_reduce_floats(values, self.device, group=self._dp_group())

    def all_reduce_grads(self, grads: list[Any]) -> None:
        """Hook: sum gradients over megatron's data-parallel group."""
        if self.parallel.dp == 1:
            return
        from twinkle.model.distributed import all_reduce_grads

        all_reduce_grads(grads, group=self._dp_group())

    # ------------------------------------------------------------------ optimization
    def build_optimizer(self, state: AdapterState, optimizer_cls: Any, kwargs: dict[str, Any]) -> Any:
        """Hook: a registry optimizer, or megatron-core's with ``use_megatron_optimizer=True`` (CUDA).

        Raises:
            ValueError: ``use_megatron_optimizer`` on CPU, with several adapters, or with an
                optimizer megatron does not provide; a registry optimizer after megatron's.
        """
        use_megatron = bool(kwargs.pop("use_megatron_optimizer", False))
        if not use_megatron:
            if self._megatron_optim:
                raise ValueError(
                    "this model already trains with use_megatron_optimizer=True (its gradients live in megatron's "
                    "buffers); pass use_megatron_optimizer=True here too"
                )
            return super().build_optimizer(state, optimizer_cls, kwargs)
        from twinkle_megatron import megatron_optim

        states = self.adapter_states
        others = [n for n, st in states.items() if n != state.name and st.optimizer is not None]
        if len(states) > 1 or others:
            raise ValueError(
                "use_megatron_optimizer=True wraps the whole model in megatron's DDP; it supports one trained "
                "adapter (or full training) per model"
            )
        if not isinstance(optimizer_cls, str):
            raise ValueError("use_megatron_optimizer=True takes an optimizer name: 'AdamW', 'Adam' or 'SGD'")
        if state.name in self._megatron_optim:
            optimizer = megatron_optim.rebuild(self._megatron_optim[state.name], optimizer_cls, kwargs)
        else:
            optimizer = megatron_optim.build(self.model, optimizer_cls, kwargs, self._device_type)
        self._megatron_optim[state.name] = optimizer
        return optimizer

    def _megatron_of(self, state: AdapterState) -> Any:
        megatron = self._megatron_optim.get(state.name)
        return megatron if megatron is not None and state.optimizer is megatron else None

    def scheduled_optimizer(self, state: AdapterState) -> Any:
        """Hook: megatron's inner torch optimizer when megatron's optimizer drives the state."""
        megatron = self._megatron_of(state)
        return megatron.torch_optimizer if megatron is not None else state.optimizer

    def reduce_gradients(self, state: AdapterState, tokens: float) -> float:
        """Hook: megatron's optimizer finishes its own gradient buffers (reduce, then divide by ``tokens``)."""
        megatron = self._megatron_of(state)
        if megatron is None:
            return super().reduce_gradients(state, tokens)
        megatron.finish_window(tokens)
        return 1.0

    def zero_gradients(self, state: AdapterState) -> None:
        """Hook: also clear megatron's gradient buffers."""
        megatron = self._megatron_of(state)
        if megatron is not None:
            megatron.zero_grad()
        super().zero_gradients(state)

    def clip_gradients(self, state: AdapterState, max_grad_norm: float, norm_type: float) -> Any:
        """Hook: finish and clip the window's gradients; the total norm before clipping.

        The norm covers the whole model: tensor-parallel shards are summed over the
        model-parallel group, replicated parameters counted once.
        """
        import torch

        self.finish_gradients(state)
        megatron = self._megatron_of(state)
        if megatron is not None:
            if norm_type != 2.0:
                raise ValueError(f"clip_grad_norm: megatron's optimizer clips the 2-norm; got norm_type={norm_type}")
            return megatron.clip(max_grad_norm)
        params = [p for p in state.params if p.grad is not None]
        if not params:
            return 0.0
        if self.parallel.tp * self.parallel.pp == 1:
            return torch.nn.utils.clip_grad_norm_(params, max_grad_norm, norm_type=norm_type)
        norm = _model_parallel_grad_norm(params, norm_type)
        coef = max_grad_norm / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_([p.grad for p in params], coef)
        return norm

    # ------------------------------------------------------------------ weights
    def _full_hf_state(self) -> dict[str, Any]:
        from twinkle_megatron import builder, convert

        mg = builder.gather_full_state(self.model)
        hf = convert.megatron_to_hf(mg, self.hf_config, self._hf_keys)
        return {k: v.detach().to("cpu").contiguous() for k, v in hf.items()}

    def export_weights(self, state: AdapterState, *, merged: bool = False, **options: Any) -> dict[str, Any]:
        """Hook: full weights in transformers names, an adapter's in peft names, or (``merged=True``) merged.

        Raises:
            ValueError: the full model's weights while adapters are trained.
        """
        if state.name == FULL_MODEL:
            if self._lora is not None:
                raise ValueError(
                    "get_state_dict: this model trains LoRA adapters; pass adapter_name=... for its weights"
                )
            return self._full_hf_state()
        if merged:
            return self._merged_hf_state(state.name)
        return self._lora.peft_state_dict(state.name)

    def _merged_hf_state(self, adapter_name: str) -> dict[str, Any]:
        import torch
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        from twinkle_megatron import builder, convert

        base = convert.megatron_to_hf(builder.gather_full_state(self.model), self.hf_config, self._hf_keys)
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(self.hf_config)
        hf.load_state_dict(base, strict=False, assign=True)
        peft_model = get_peft_model(hf, self._lora.peft_config(adapter_name, None), adapter_name=adapter_name)
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(peft_model, self._lora.peft_state_dict(adapter_name), adapter_name=adapter_name)
        merged = peft_model.merge_and_unload()
        return {k: v.detach().to("cpu").contiguous() for k, v in merged.state_dict().items()}

    def load_adapter_weights(self, adapter_name: str, state_dict: dict[str, Any], path: Any) -> None:
        """Hook: peft-named adapter weights into the megatron LoRA layers."""
        try:
            self._lora.load_peft_state_dict(adapter_name, state_dict)
        except ValueError as exc:
            raise CheckpointError(f"load: {path}: {exc}") from exc

    def load_full_weights(self, state_dict: dict[str, Any], path: Any) -> None:
        """Hook: transformers-named full weights, converted to megatron's layout."""
        from twinkle_megatron import builder, convert

        if getattr(self.hf_config, "tie_word_embeddings", False):
            state_dict.pop("lm_head.weight", None)
        try:
            builder.load_full_state(self.model, convert.hf_to_megatron(state_dict, self.hf_config))
        except ValueError as exc:
            raise CheckpointError(f"load: the weights in {path} do not fit this model: {exc}") from exc


def _model_parallel_grad_norm(params: list[Any], norm_type: float) -> float:
    """Gradient norm over tensor/pipeline-parallel shards (duplicated parameters counted once)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    if norm_type != 2.0:
        raise ValueError(f"clip_grad_norm: norm_type={norm_type} with tensor/pipeline parallelism; use 2.0")
    total = torch.zeros((), dtype=torch.float64, device=params[0].grad.device)
    for p in params:
        if param_is_not_tensor_parallel_duplicate(p):
            total += p.grad.detach().double().pow(2).sum()
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    return float(total.sqrt())


def _hidden_states_passthrough(hidden: Any, weight: Any = None, runtime_gather_output: Any = None) -> tuple[Any, None]:
    """Stands in for ``GPTModel.output_layer.forward`` so the model returns its final hidden states."""
    return hidden, None
