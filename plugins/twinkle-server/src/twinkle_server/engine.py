"""One base model, many LoRA adapters: batched multi-LoRA training and sampling.

The engine loads the base model once (frozen) and wraps its linear layers in
:class:`MultiLoRALinear`. Each tenant's adapter lives in a *slot*: its own low-rank
``A``/``B`` tensors and its own AdamW optimizer. A batch may hold rows of several slots:
the base matmul runs once for every row, and each slot's low-rank update is added to its
own rows only, so one forward/backward pass trains several tenants' adapters at once and
each gradient reaches only its own tenant's tensors.

The engine runs on one device (``device="auto"``: CUDA when torch sees a GPU, else the
CPU): the base model and every slot's tensors and optimizer state live there, request data
is copied there in one transfer per tensor, and results come back in one transfer per pass.

Not thread-safe: the server drives an engine from one worker thread.

Example::

    engine = LoRAEngine(tiny_model_dir(), max_adapters=4, max_rank=16, device="cpu")
    slot = engine.create_slot(rank=8)
    [result] = engine.forward_backward([BatchJob(slot, [Datum([1, 2, 3], {"target_tokens": [2, 3, 4]})])])
    engine.optim_step(slot, learning_rate=1e-3)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from twinkle_server.losses import LOSS_INPUTS, LOSSES, OPTIONAL_INPUTS, check_loss

#: Short module names per Tinker LoRA switch.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "unembed": ("lm_head",),
}
ALL_TARGETS = tuple(name for group in TARGET_GROUPS.values() for name in group)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_STATE = "optimizer.pt"


class EngineError(ValueError):
    """A request the engine cannot serve, with the reason and the fix (shown to the user)."""


@dataclass
class Datum:
    """One training sequence: input tokens and per-token loss inputs (numpy arrays or lists)."""

    tokens: Sequence[int]
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchJob:
    """One request's part of a batched pass: the slot, its datums and its loss."""

    slot: int
    datums: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_config: dict[str, Any] | None = None
    forward_only: bool = False


@dataclass
class JobResult:
    """Per-datum outputs (name -> float32 numpy array) and metrics of one job, or its error."""

    outputs: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    error: Exception | None = None


@dataclass
class Slot:
    """One adapter: rank, scaling, targeted modules, tensors and optimizer."""

    id: int
    rank: int
    alpha: float
    targets: tuple[str, ...]
    params: dict[str, tuple[Any, Any]]
    optimizer: Any = None
    steps: int = 0

    def parameters(self) -> list[Any]:
        """The trainable tensors in a fixed order (module name, then A before B)."""
        return [t for name in sorted(self.params) for t in self.params[name]]


class _Router:
    """Which rows of the current batch belong to which slot (read by every MultiLoRALinear).

    ``groups`` lists ``(slot, rows)`` for consecutive runs of rows in batch order; a single
    group covers the whole batch (``rows`` is then ignored).
    """

    def __init__(self) -> None:
        self.groups: list[tuple[int, int]] = []


def _multi_lora_linear_class() -> type:
    import torch

    class MultiLoRALinear(torch.nn.Module):
        """A frozen ``nn.Linear`` plus per-slot low-rank updates applied to each slot's rows.

        The batch is split into each slot's consecutive rows (views, no copies), each part gets
        its own slot's ``x A^T B^T * scale``, and one concatenation adds all updates to the base
        output at once: the cost over the base matmul is the low-rank products alone, however
        many slots share the batch.
        """

        def __init__(self, base: torch.nn.Linear, router: _Router) -> None:
            super().__init__()
            self.base = base
            self.router = router
            self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

        @property
        def weight(self) -> torch.Tensor:
            return self.base.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.base(x)
            groups = self.router.groups
            if not groups:
                return out
            if len(groups) == 1:
                adapter = self.adapters.get(groups[0][0])
                if adapter is None:
                    return out
                a, b, scale = adapter
                return out + (x @ a.t()) @ b.t() * scale
            if not any(slot in self.adapters for slot, _ in groups):
                return out
            deltas = []
            for (slot, _), part in zip(groups, x.split([rows for _, rows in groups], dim=0)):
                adapter = self.adapters.get(slot)
                if adapter is None:
                    deltas.append(part.new_zeros(*part.shape[:-1], out.shape[-1]))
                    continue
                a, b, scale = adapter
                deltas.append((part @ a.t()) @ b.t() * scale)
            return out + torch.cat(deltas, dim=0)

    return MultiLoRALinear


def _adam_hyperparameters(hyper: dict[str, float]) -> tuple[float, float, float, float, float, float]:
    """``(lr, beta1, beta2, eps, weight_decay, grad_clip_norm)`` from AdamParams fields, checked.

    Raises:
        EngineError: an unknown field or a value out of range.
    """
    defaults = {
        "learning_rate": 1e-4,
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-12,
        "weight_decay": 0.0,
        "grad_clip_norm": 0.0,
    }
    unknown = sorted(set(hyper) - set(defaults))
    if unknown:
        raise EngineError(f"unknown AdamParams {unknown}; this server takes {sorted(defaults)}")
    values = {k: float(hyper.get(k, v)) for k, v in defaults.items()}
    checks = {
        "learning_rate": values["learning_rate"] >= 0,
        "beta1": 0 <= values["beta1"] < 1,
        "beta2": 0 <= values["beta2"] < 1,
        "eps": values["eps"] >= 0,
        "weight_decay": values["weight_decay"] >= 0,
        "grad_clip_norm": values["grad_clip_norm"] >= 0,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise EngineError(f"AdamParams out of range: {', '.join(bad)}")
    return tuple(values.values())  # type: ignore[return-value]


def resolve_device(device: Any = "auto") -> Any:
    """The ``torch.device`` an engine runs on: ``"auto"``/None picks CUDA when available, else the CPU.

    A CUDA device without an index gets the current one (``cuda`` -> ``cuda:0``), so it
    compares equal to the device of tensors moved there.

    Args:
        device: ``"auto"``, None, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.

    Raises:
        EngineError: the string names no device, or a CUDA device this machine does not have.

    Example::

        resolve_device("cpu")  # device(type='cpu')
    """
    import torch

    if device is None or device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise EngineError(
            f"unknown device {device!r}; use 'auto' (CUDA when available, else the CPU), 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(
                f"device {device!r} asks for CUDA but torch sees no GPU here; use device='cpu' (or 'auto')"
            )
        count = torch.cuda.device_count()
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        elif resolved.index >= count:
            raise EngineError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif resolved.type == "meta":
        raise EngineError("device 'meta' holds no weights; use 'auto', 'cpu' or 'cuda'")
    elif resolved.type != "cpu":
        try:
            torch.empty(0, device=resolved)
        except (AssertionError, RuntimeError) as exc:
            raise EngineError(f"device {device!r} is not usable here ({exc}); use 'auto', 'cpu' or 'cuda'") from None
    return resolved


def _to_cpu(value: Any) -> Any:
    """``value`` (nested dicts/lists/tuples of tensors, e.g. an optimizer state dict) with every tensor on the CPU."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _has_weights(model_dir: Path) -> bool:
    from twinkle.model.files import has_weights

    return has_weights(model_dir)


class LoRAEngine:
    """The base model with a pool of LoRA slots.

    Args:
        model_dir: a local Hugging Face model directory. Without weight files the model is
            built from its ``config.json`` with weights seeded by ``seed`` (deterministic, so
            adapters saved before a restart fit the same base after it).
        max_adapters: slots in the pool (training adapters and loaded sampler adapters).
        max_rank: the largest LoRA rank accepted.
        seed: seed of the random base weights (only used without weight files).
        device: where the base model, the adapters and their optimizer state live: ``"auto"``
            (default: CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            The weights are built on the CPU first, so every device starts from the same values.

    Raises:
        EngineError: ``model_dir`` is not a model directory, or ``device`` is unknown or absent.

    Example::

        engine = LoRAEngine(tiny_model_dir(), max_adapters=4, device="cuda")
    """

    def __init__(
        self, model_dir: str | Path, *, max_adapters: int = 8, max_rank: int = 64, seed: int = 0, device: Any = "auto"
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer
        from twinkle.model.hf import auto_model_class

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise EngineError(f"{self.model_dir} has no config.json; pass a local Hugging Face model directory")
        target = resolve_device(device)
        self._device = target
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        config = AutoConfig.from_pretrained(self.model_dir)
        auto_class = auto_model_class(str(self.model_dir), config)  # vision-language bases: image-text-to-text
        if _has_weights(self.model_dir):
            model = auto_class.from_pretrained(self.model_dir, dtype=torch.float32)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = auto_class.from_config(config, dtype=torch.float32)
        model.to(target)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        text = config.get_text_config()  # the config itself, or a vision-language model's text part
        self.vocab_size = int(text.vocab_size)
        self.max_length = int(getattr(text, "max_position_embeddings", 4096))
        eos = text.eos_token_id if text.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        self.pad_token_id = int(text.pad_token_id or 0)
        #: the base weights by their Hugging Face names (before the LoRA wrappers), tied ones under each name.
        self.base_parameters: dict[str, Any] = dict(model.named_parameters(remove_duplicate=False))
        self._router = _Router()
        self.modules: dict[str, Any] = {}
        wrapper_cls = _multi_lora_linear_class()
        for name, module in list(model.named_modules()):
            short = name.rsplit(".", 1)[-1]
            if short in ALL_TARGETS and isinstance(module, torch.nn.Linear):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                wrapper = wrapper_cls(module, self._router)
                setattr(parent, child, wrapper)
                self.modules[name] = wrapper
        self.slots: dict[int, Slot] = {}

    @property
    def device(self) -> Any:
        """The ``torch.device`` of the base weights, the adapters and their optimizer state."""
        return self._device

    def share_base_weights(self, model: Any) -> int:
        """Make ``model`` use this engine's base tensors instead of its own copies.

        ``model`` is another instance of the same architecture (the twinkle API's
        ``TransformersModel`` of the same base): each of its parameters whose name, shape,
        dtype and device match a base weight here is replaced by that very tensor, frozen,
        so the process holds one set of base weights. Call it before adapters are added.

        Returns:
            How many of ``model``'s parameters now are this engine's tensors.

        Example::

            hf_model = AutoModelForCausalLM.from_config(engine.config)
            engine.share_base_weights(hf_model) == len(list(hf_model.named_parameters(remove_duplicate=False)))
        """
        shared = 0
        for prefix, module in model.named_modules(remove_duplicate=False):
            for name, param in list(module.named_parameters(recurse=False)):
                mine = self.base_parameters.get(f"{prefix}.{name}" if prefix else name)
                if mine is None or (mine.shape, mine.dtype, mine.device) != (param.shape, param.dtype, param.device):
                    continue
                if mine is not param:
                    setattr(module, name, mine)
                shared += 1
        return shared

    def trainable_base_weights(self) -> list[str]:
        """Names of base weights that would receive gradients (empty when the base is frozen, as it must be)."""
        return [name for name, param in self.base_parameters.items() if param.requires_grad]

    def warmup(self) -> None:
        """Run one throw-away training step and a short generation (first calls are slow in torch)."""
        if self.free_slots <= 0:
            return
        slot = self.create_slot(1)
        try:
            self.forward_backward([BatchJob(slot, [Datum([1, 2, 3, 4], {"target_tokens": [2, 3, 4, 5]})])])
            self.sample(slot, [1, 2, 3], max_tokens=2, temperature=0)
        finally:
            self.free_slot(slot)

    # -- slots ---------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        """How many more adapters fit in the pool."""
        return self.max_adapters - len(self.slots)

    def create_slot(
        self, rank: int, *, alpha: float | None = None, targets: Sequence[str] = ALL_TARGETS, seed: int | None = None
    ) -> int:
        """Allocate a fresh adapter (``A`` random, ``B`` zero, so it starts as the base model).

        Args:
            rank: LoRA rank (1..max_rank).
            alpha: scaling numerator (update = B A x * alpha / rank); default 32.
            targets: short module names to adapt (``q_proj``, ..., ``lm_head``).
            seed: seeds ``A``'s initialisation.

        Returns:
            The slot id.

        Raises:
            EngineError: the pool is full, the rank is out of range or a target is unknown.
        """
        import torch

        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.max_rank:
            raise EngineError(f"LoRA rank {rank!r} is out of range; this server accepts ranks 1..{self.max_rank}")
        unknown = sorted(set(targets) - set(ALL_TARGETS))
        if unknown or not targets:
            raise EngineError(
                f"unknown LoRA target modules {unknown or list(targets)}; choose from {list(ALL_TARGETS)}"
            )
        if self.free_slots <= 0:
            raise EngineError(
                f"all {self.max_adapters} LoRA slots of this server are in use; "
                "unload a training run or try again later"
            )
        slot_id = next(i for i in range(self.max_adapters + len(self.slots) + 1) if i not in self.slots)
        gen = torch.Generator().manual_seed(seed if seed is not None else slot_id * 7919 + 17)
        params: dict[str, tuple[Any, Any]] = {}
        for name, module in self.modules.items():
            if name.rsplit(".", 1)[-1] not in targets:
                continue
            base = module.base
            bound = 1.0 / math.sqrt(base.in_features)
            # drawn on the CPU (the same values on every device), then moved to the engine's device
            a = ((torch.rand(rank, base.in_features, generator=gen) * 2 - 1) * bound).to(self.device)
            b = torch.zeros(base.out_features, rank, device=self.device)
            params[name] = (a.requires_grad_(True), b.requires_grad_(True))
        slot = Slot(slot_id, rank, float(alpha if alpha is not None else 32.0), tuple(sorted(set(targets))), params)
        self._attach(slot)
        return slot_id

    def _attach(self, slot: Slot) -> None:
        self.slots[slot.id] = slot
        scale = slot.alpha / slot.rank
        for name, (a, b) in slot.params.items():
            self.modules[name].adapters[slot.id] = (a, b, scale)

    def free_slot(self, slot_id: int) -> None:
        """Release a slot and its tensors (no error when already free)."""
        slot = self.slots.pop(slot_id, None)
        if slot is None:
            return
        for name in slot.params:
            self.modules[name].adapters.pop(slot_id, None)

    def slot(self, slot_id: int) -> Slot:
        """The slot with this id."""
        try:
            return self.slots[slot_id]
        except KeyError:
            raise EngineError(f"adapter slot {slot_id} is not loaded") from None

    # -- training --------------------------------------------------------------------
    def _prepare(self, job: BatchJob) -> tuple[list[tuple[Any, dict[str, Any]]], dict[str, float]]:
        """Check a job; returns its rows as ``(token ids, {input name: array})`` numpy pairs, and its loss config."""
        import numpy as np

        self.slot(job.slot)
        config = check_loss(job.loss_fn, job.loss_config)
        if not job.datums:
            raise EngineError("a forward_backward request needs at least one datum")
        required = LOSS_INPUTS[job.loss_fn]
        allowed = set(required) | set(OPTIONAL_INPUTS.get(job.loss_fn, ()))
        rows = []
        for i, datum in enumerate(job.datums):
            tokens = np.asarray(datum.tokens, dtype=np.int64).reshape(-1)
            n = tokens.shape[0]
            if n == 0:
                raise EngineError(f"datum {i} has an empty model_input")
            if n > self.max_length:
                raise EngineError(f"datum {i} has {n} tokens; the base model takes at most {self.max_length}")
            if tokens.min() < 0 or tokens.max() >= self.vocab_size:
                raise EngineError(f"datum {i} has token ids outside the vocabulary [0, {self.vocab_size})")
            missing = [k for k in required if k not in datum.inputs]
            if missing:
                raise EngineError(f"datum {i}: loss {job.loss_fn!r} needs loss_fn_inputs {missing}")
            extra = sorted(set(datum.inputs) - allowed)
            if extra:
                raise EngineError(
                    f"datum {i}: loss_fn_inputs {extra} are not used by {job.loss_fn!r} (it takes {sorted(allowed)})"
                )
            inputs: dict[str, Any] = {}
            for key, value in datum.inputs.items():
                arr = np.asarray(value).reshape(-1)
                if arr.shape[0] != n:
                    raise EngineError(
                        f"datum {i}: loss_fn_inputs[{key!r}] has {arr.shape[0]} entries but model_input has {n} tokens"
                    )
                if key == "target_tokens":
                    arr = arr.astype(np.int64)
                    if arr.min() < 0 or arr.max() >= self.vocab_size:
                        raise EngineError(f"datum {i}: target_tokens outside the vocabulary [0, {self.vocab_size})")
                    inputs[key] = arr
                else:
                    floats = arr.astype(np.float32)
                    if not np.isfinite(floats).all():
                        raise EngineError(f"datum {i}: loss_fn_inputs[{key!r}] holds NaN or infinity")
                    inputs[key] = floats
            rows.append((tokens, inputs))
        return rows, config

    def forward_backward(self, jobs: Sequence[BatchJob]) -> list[JobResult]:
        """Run several requests (of different slots) as one padded batch.

        Jobs must all be ``forward_only`` or all not. A job with invalid input gets its
        error in its :class:`JobResult` and does not disturb the others. Gradients
        accumulate in each slot until :meth:`optim_step`.

        The batch goes to the engine's device in one transfer per input (padded to the
        longest row), and all outputs and losses come back in one transfer.

        Returns:
            One :class:`JobResult` per job, in order.
        """
        import numpy as np
        import torch

        results = [JobResult() for _ in jobs]
        prepared: list[tuple[int, list[tuple[Any, dict[str, Any]]], dict[str, float]]] = []
        for j, job in enumerate(jobs):
            try:
                rows, config = self._prepare(job)
            except (EngineError, ValueError) as exc:
                results[j].error = exc
                continue
            prepared.append((j, rows, config))
        if not prepared:
            return results
        forward_only = all(jobs[j].forward_only for j, _, _ in prepared)
        all_rows = [row for _, rows, _ in prepared for row in rows]
        longest = max(tokens.shape[0] for tokens, _ in all_rows)
        ids_np = np.full((len(all_rows), longest), self.pad_token_id, dtype=np.int64)
        mask_np = np.zeros((len(all_rows), longest), dtype=np.int64)
        # every loss input of every row, padded: one host-to-device copy per input name
        padded_np: dict[str, Any] = {}
        for r, (tokens, inputs) in enumerate(all_rows):
            n = tokens.shape[0]
            ids_np[r, :n] = tokens
            mask_np[r, :n] = 1
            for key, arr in inputs.items():
                if key not in padded_np:
                    padded_np[key] = np.zeros((len(all_rows), longest), dtype=arr.dtype)
                padded_np[key][r, :n] = arr
        device = self.device
        ids = torch.from_numpy(ids_np).to(device)
        mask = torch.from_numpy(mask_np).to(device)
        padded = {key: torch.from_numpy(arr).to(device) for key, arr in padded_np.items()}
        targets = padded["target_tokens"]
        self._router.groups = [(jobs[j].slot, len(rows)) for j, rows, _ in prepared]
        try:
            with torch.set_grad_enabled(not forward_only):
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                logp_all = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                total = None
                r = 0
                # what is sent back, in order: per job, per datum its {name: shape} outputs, then the job's loss
                layout: list[tuple[int, list[dict[str, tuple[int, ...]]]]] = []
                tensors: list[Any] = []
                for j, rows, config in prepared:
                    job_loss = None
                    shapes: list[dict[str, tuple[int, ...]]] = []
                    for tokens, inputs in rows:
                        n = tokens.shape[0]
                        row_inputs = {key: padded[key][r, :n] for key in inputs}
                        loss, out = LOSSES[jobs[j].loss_fn](logp_all[r, :n], row_inputs, config)
                        job_loss = loss if job_loss is None else job_loss + loss
                        shapes.append({key: tuple(value.shape) for key, value in out.items()})
                        tensors.extend(value.detach().float().reshape(-1) for value in out.values())
                        r += 1
                    tensors.append(job_loss.detach().float().reshape(-1))
                    layout.append((j, shapes))
                    total = job_loss if total is None else total + job_loss
                if not forward_only and total is not None and total.requires_grad:
                    total.backward()
        finally:
            self._router.groups = []
        # one device-to-host copy of every output and loss, split back per datum and job
        flat = torch.cat(tensors).cpu().numpy()
        offset = 0
        for j, shapes in layout:
            for datum_shapes in shapes:
                outputs = {}
                for key, shape in datum_shapes.items():
                    size = math.prod(shape)
                    outputs[key] = flat[offset : offset + size].reshape(shape).copy()
                    offset += size
                results[j].outputs.append(outputs)
            results[j].metrics = {"loss:sum": float(flat[offset])}
            offset += 1
        return results

    def optim_step(self, slot_id: int, **hyper: float) -> dict[str, float]:
        """One AdamW step of a slot, then clear its gradients (:meth:`optim_steps` for one slot).

        Args:
            slot_id: the slot.
            **hyper: ``learning_rate`` (1e-4), ``beta1`` (0.9), ``beta2`` (0.95), ``eps`` (1e-12),
                ``weight_decay`` (0), ``grad_clip_norm`` (0: no clipping).

        Returns:
            Metrics: ``grad_norm`` (before clipping) and ``step``.

        Raises:
            EngineError: the slot is not loaded or a hyperparameter is out of range.
        """
        [result] = self.optim_steps([(slot_id, hyper)])
        if isinstance(result, Exception):
            raise result
        return result

    def optim_steps(self, requests: Sequence[tuple[int, dict[str, float]]]) -> list[dict[str, float] | Exception]:
        """AdamW steps of several slots at once (each with its own hyperparameters and state).

        Slots with equal hyperparameters step together in one multi-tensor (``foreach``)
        update: the same arithmetic as one optimizer per slot, without a round of small
        kernels per slot. Each slot keeps its own optimizer state (saved with its checkpoints).

        Args:
            requests: ``(slot id, hyperparameters)`` pairs (see :meth:`optim_step`); a slot at most once.

        Returns:
            Per request, in order: the metrics (``grad_norm`` before clipping, ``step``), or the
            :class:`EngineError` that request failed with (the others still step).
        """
        import torch

        results: list[dict[str, float] | Exception] = [{} for _ in requests]
        groups: dict[tuple[float, ...], list[tuple[int, Slot]]] = {}
        for i, (slot_id, hyper) in enumerate(requests):
            try:
                slot = self.slot(slot_id)
                key = _adam_hyperparameters(hyper)
            except EngineError as exc:
                results[i] = exc
                continue
            groups.setdefault(key, []).append((i, slot))
        # gradient norms stay on the device until one transfer at the end
        norms: dict[int, Any] = {}
        for (lr, beta1, beta2, eps, weight_decay, clip), members in groups.items():
            for i, slot in members:
                grads = [p.grad for p in slot.parameters() if p.grad is not None]
                if grads:
                    norms[i] = torch.nn.utils.get_total_norm(grads, foreach=True)
            # a slot whose gradients are not finite (a NaN or infinite loss) skips the step: its adapter
            # and optimizer state stay as they were (one host read per group of slots)
            finite = {i: True for i, _ in members}
            if any(i in norms for i, _ in members):
                checked = [i for i, _ in members if i in norms]
                flags = torch.stack([norms[i].float() for i in checked]).isfinite().cpu().tolist()
                finite.update(zip(checked, flags))
            params: list[Any] = []
            stepping = []
            for i, slot in members:
                own = slot.parameters()
                if not finite[i]:
                    for p in own:
                        p.grad = None
                    results[i] = {"grad_norm": 0.0, "skipped_non_finite": 1.0, "step": float(slot.steps)}
                    continue
                stepping.append((i, slot))
                if slot.optimizer is None:
                    slot.optimizer = torch.optim.AdamW(own, lr=lr, foreach=True)
                for group in slot.optimizer.param_groups:
                    group.update(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
                if i in norms and clip > 0:
                    torch.nn.utils.clip_grads_with_norm_(own, clip, norms[i], foreach=True)
                results[i] = {"grad_norm": 0.0}
                params.extend(own)
            members = stepping
            if not members:
                continue
            # one optimizer over every member's tensors, holding the members' own state objects
            fused = torch.optim.AdamW(
                params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, foreach=True
            )
            for _, slot in members:
                for p in slot.parameters():
                    if p in slot.optimizer.state:
                        fused.state[p] = slot.optimizer.state[p]
            fused.step()
            for i, slot in members:
                for p in slot.parameters():
                    if p in fused.state:
                        slot.optimizer.state[p] = fused.state[p]
                    p.grad = None
                slot.steps += 1
                results[i]["step"] = float(slot.steps)
        if norms:
            values = torch.stack([norm.float() for norm in norms.values()]).cpu().tolist()
            for i, value in zip(norms, values):
                results[i]["grad_norm"] = value  # type: ignore[index]
        return results

    # -- checkpoints -------------------------------------------------------------------
    def save_slot(self, slot_id: int, directory: str | Path, *, optimizer: bool, base_model: str) -> int:
        """Write an adapter (peft layout) and optionally its optimizer into ``directory``.

        The directory must exist and be private to this write (the caller renames it into
        place afterwards). The files hold CPU tensors whatever the engine's device, so a
        checkpoint loads on any device. Returns the bytes written.
        """
        import torch
        from safetensors.torch import save_file

        slot = self.slot(slot_id)
        directory = Path(directory)
        tensors = {}
        for name, (a, b) in slot.params.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().contiguous().cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().contiguous().cpu()
        save_file(tensors, str(directory / ADAPTER_WEIGHTS))
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": slot.rank,
            "lora_alpha": slot.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": list(slot.targets),
            "base_model_name_or_path": base_model,
            "twinkle_steps": slot.steps,
        }
        (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        if optimizer and slot.optimizer is not None:
            torch.save(_to_cpu(slot.optimizer.state_dict()), directory / OPTIMIZER_STATE)
        for path in directory.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        return sum(p.stat().st_size for p in directory.iterdir())

    def load_slot(self, directory: str | Path, *, optimizer: bool) -> int:
        """Load an adapter (and optionally its optimizer state) into a new slot; returns its id.

        The tensors go straight to the engine's device (a checkpoint saved on another device loads too).

        Raises:
            EngineError: the files are missing or do not fit this base model.
        """
        import torch
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            config = json.loads((directory / ADAPTER_CONFIG).read_text())
            tensors = load_file(str(directory / ADAPTER_WEIGHTS), device=str(self.device))
        except (OSError, ValueError) as exc:
            raise EngineError(f"the checkpoint's adapter files are unreadable: {exc}") from None
        slot_id = self.create_slot(
            int(config["r"]), alpha=float(config["lora_alpha"]), targets=config["target_modules"]
        )
        slot = self.slots[slot_id]
        try:
            for name, (a, b) in slot.params.items():
                new_a = tensors[f"base_model.model.{name}.lora_A.weight"]
                new_b = tensors[f"base_model.model.{name}.lora_B.weight"]
                if new_a.shape != a.shape or new_b.shape != b.shape:
                    raise EngineError(f"checkpoint tensor shapes for {name} do not fit this base model")
                with torch.no_grad():
                    a.copy_(new_a)
                    b.copy_(new_b)
            slot.steps = int(config.get("twinkle_steps", 0))
            if optimizer:
                opt_path = directory / OPTIMIZER_STATE
                if not opt_path.is_file():
                    raise EngineError("this checkpoint has no optimizer state; load it without the optimizer")
                slot.optimizer = torch.optim.AdamW(slot.parameters(), lr=1e-4)
                # read on the CPU: load_state_dict moves the moments to the adapter's device and keeps
                # ``step`` on the CPU, as a fresh AdamW holds it
                slot.optimizer.load_state_dict(torch.load(opt_path, weights_only=True, map_location="cpu"))
        except KeyError as exc:
            self.free_slot(slot_id)
            raise EngineError(f"checkpoint is missing tensor {exc}") from None
        except Exception:
            self.free_slot(slot_id)
            raise
        return slot_id

    # -- sampling ------------------------------------------------------------------------
    def prompt_topk_logprobs(self, slot_id: int | None, prompt: Sequence[int], k: int) -> tuple[Any, Any]:
        """The ``k`` most likely tokens and their log-probabilities at every prompt position (one prefill).

        Returns:
            ``(token_ids, logprobs)``: int32 and float32 arrays of shape ``(len(prompt), k)``; row ``i``
            is the distribution that predicts prompt token ``i``; row 0 (nothing precedes it) is filled
            with Tinker's sentinel (token 0, log-probability -99999).

        Raises:
            EngineError: bad prompt or ``k``.
        """
        import numpy as np
        import torch

        if slot_id is not None:
            self.slot(slot_id)
        prompt = [int(t) for t in prompt]
        if not prompt or min(prompt) < 0 or max(prompt) >= self.vocab_size or len(prompt) > self.max_length:
            raise EngineError(f"the prompt must be 1 to {self.max_length} token ids in [0, {self.vocab_size})")
        if not 1 <= k <= self.vocab_size:
            raise EngineError(f"top-k must be between 1 and {self.vocab_size}")
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        self._router.groups = [(slot_id, 1)] if slot_id is not None else []
        try:
            with torch.no_grad():
                logits = self.model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                top = torch.topk(torch.log_softmax(logits, dim=-1), k, dim=-1)
                top_lps, top_ids = top.values.cpu().numpy(), top.indices.cpu().numpy()
        finally:
            self._router.groups = []
        token_ids = np.zeros((len(prompt), k), dtype=np.int32)
        logprobs = np.full((len(prompt), k), -99999.0, dtype=np.float32)
        token_ids[1:] = top_ids
        logprobs[1:] = top_lps
        return token_ids, logprobs

    def sample(self, slot_id: int | None, prompt: Sequence[int], **params: Any) -> Any:
        """Sample completions of ``prompt`` with a slot's adapter (or the base), in one go.

        Takes :meth:`start_sample`'s parameters; the scheduler runs long requests through
        :meth:`start_sample` in slices instead (the same tokens for the same seed).

        Returns:
            ``([(tokens, logprobs, stop_reason), ...], prompt_logprobs or None)``; the first
            prompt logprob is NaN (nothing precedes it).

        Raises:
            EngineError: bad prompt or parameters.
        """
        gen = self.start_sample(slot_id, prompt, **params)
        gen.step(None)
        return gen.result()

    def start_sample(
        self,
        slot_id: int | None,
        prompt: Sequence[int],
        *,
        num_samples: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_k: int = -1,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        prompt_logprobs: bool = False,
    ) -> Any:
        """A resumable :class:`~twinkle_server.sampling.Generation` of ``num_samples`` completions of ``prompt``
        with a slot's adapter (or the base); ``gen.step(budget_s)`` runs it in slices.

        Logprobs are the model's own (temperature 1) log-probabilities of the sampled tokens,
        so they match what training computes. ``stop_token_ids=None`` stops at EOS. ``seed``
        seeds a generator on the engine's device (one seed draws the same tokens again on the
        same device; the CPU and CUDA draw different streams). A slot freed between two slices
        fails the next one (``EngineError``).

        Raises:
            EngineError: bad prompt or parameters.
        """
        from contextlib import contextmanager

        from twinkle_server.sampling import Generation

        slot = self.slot(slot_id) if slot_id is not None else None
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise EngineError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise EngineError(f"prompt token ids must be in [0, {self.vocab_size})")
        if not 1 <= num_samples <= 64:
            raise EngineError("num_samples must be between 1 and 64")
        if max_tokens < 1 or len(prompt) + max_tokens > self.max_length:
            raise EngineError(
                f"max_tokens={max_tokens} with a {len(prompt)}-token prompt exceeds the model's "
                f"{self.max_length} positions (or is below 1)"
            )
        if temperature < 0 or not 0 < top_p <= 1:
            raise EngineError("temperature must be >= 0 and top_p in (0, 1]")

        @contextmanager
        def adapter() -> Any:
            if slot is not None and self.slots.get(slot.id) is not slot:
                raise EngineError(
                    "the sampler's adapter was unloaded while this request was sampling (its run was unloaded or "
                    "the pool needed the slot); send the request again"
                )
            self._router.groups = [(slot.id, num_samples)] if slot is not None else []
            try:
                yield
            finally:
                self._router.groups = []

        return Generation(
            self.model,
            prompt,
            activate=adapter,
            eos_token_ids=sorted(self.eos_token_ids),
            tokenizer=self.tokenizer,
            device=self.device,
            num_samples=num_samples,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
            stop_strings=stop_strings,
            prompt_logprobs=prompt_logprobs,
        )
