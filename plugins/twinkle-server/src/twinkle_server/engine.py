"""The service's one training engine: every tenant is a named adapter of one core ``TransformersModel``.

The server builds one :class:`~twinkle.model.TransformersModel` on its base model at start
(bf16 on CUDA, fp32 on the CPU; the base is frozen and never trained). Every Tinker training
run, every sampler checkpoint and weight snapshot, and every twinkle-API model object is a
named LoRA adapter of that model, so the process holds one set of base weights and trains
through one code path: core's.

* ``forward_backward`` of several runs is one padding-free packed pass
  (:func:`twinkle.model.multi_adapter.forward_backward_multi`): the frozen base runs once for
  every row, each run's token segment gets its own adapter's low-rank update (segmented LoRA),
  and each run's loss is core's :class:`~twinkle.loss.tinker.TinkerLoss` on its segment. A
  Tinker datum's ``target_tokens`` are unshifted (``target_tokens[i]`` follows
  ``model_input[i]``): the row becomes ``input_ids = tokens + [last target]`` with
  ``labels = [-100] + targets`` so that core's shifted labels are exactly the targets, and the
  appended token is never trained (it only sees earlier tokens: causal attention).
* ``optim_step`` steps the adapter's core optimizer (AdamW, one per adapter) with the request's
  hyperparameters written into its param groups; a run whose gradients are not finite skips the
  step. Tinker's losses are sums and its gradients add up over ``forward_backward`` calls, so
  the accumulation window's normalizer is 1.
* checkpoints are core's (``save`` / ``load_adapter_weights`` / the optimizer state dict), in
  the peft layout; sampling runs the same model with the adapter active
  (:mod:`twinkle_server.sampling`).

* adapters are paged (:class:`twinkle.model.paging.AdapterPool`): at most ``device_slots`` sit on
  the device; a pass makes its adapters resident, paging the least recently used idle ones out
  to (pinned) host memory, exactly. ``max_adapters`` live adapters and ``host_bytes`` of host
  memory bound them all (a create that does not fit is :class:`AdapterPoolFull`); with a
  ``spill_dir``, an idle adapter can be parked (:meth:`LoRAEngine.park`): written to a file,
  holding no memory, and read back exactly when it is next used.

Not thread-safe: the server drives the engine from its one worker thread.

Example::

    engine = LoRAEngine(tiny_model_dir(), max_adapters=4, max_rank=16, device="cpu")
    slot = engine.create_slot(rank=8)
    [result] = engine.forward_backward([BatchJob(slot, [Datum([1, 2, 3], {"target_tokens": [2, 3, 4]})])])
    engine.optim_step(slot, learning_rate=1e-3)
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from twinkle_server.adapter_pool import AdapterPoolFull
from twinkle_server.engine_checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS, OPTIMIZER_STATE, SlotCheckpoints
from twinkle_server.sampling import EngineSampling
from twinkle_server.tinker_rows import (
    BatchJob,
    Datum,
    EngineError,
    JobResult,
    check_adam_params,
    datum_outputs,
    job_rows,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "OPTIMIZER_STATE",
    "AdapterPoolFull",
    "BatchJob",
    "Datum",
    "EngineError",
    "JobResult",
    "LoRAEngine",
    "Slot",
    "check_adam_params",
    "resolve_device",
]

#: Short module names per Tinker LoRA switch.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "unembed": ("lm_head",),
}
ALL_TARGETS = tuple(name for group in TARGET_GROUPS.values() for name in group)
#: the engine's own rank-1 adapter (B = 0: the base itself). peft cannot drop a model's last adapter,
#: so this one stays while tenants come and go; it is never trained and never in a pass.
IDLE_ADAPTER = "engine_idle"


@dataclass
class Slot:
    """One Tinker adapter on the shared model: its name there, LoRA shape and core training state.

    ``params`` maps each adapted module (Hugging Face name) to its ``(lora_A, lora_B)`` weights.
    """

    id: int
    adapter: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    params: dict[str, tuple[Any, Any]]
    state: Any

    def parameters(self) -> list[Any]:
        """The trainable tensors in the order the adapter's optimizer holds them."""
        return list(self.state.params)

    @property
    def optimizer(self) -> Any:
        """The adapter's core optimizer (AdamW)."""
        return self.state.optimizer

    @property
    def steps(self) -> int:
        """Optimizer steps taken."""
        return self.state.global_step


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


def _locked(method: Any) -> Any:
    """Run ``method`` under the engine's lock (servers in one process may share an engine: tests do)."""

    @functools.wraps(method)
    def run(self: LoRAEngine, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return run


class LoRAEngine(SlotCheckpoints, EngineSampling):
    """The shared base model (one core ``TransformersModel``) and the Tinker adapters on it.

    Args:
        model_dir: a local Hugging Face model directory. Without weight files the model is
            built from its ``config.json`` with weights seeded by ``seed`` (deterministic, so
            adapters saved before a restart fit the same base after it).
        max_adapters: Tinker adapters (training runs, loaded samplers, snapshots) at a time.
        max_rank: the largest LoRA rank accepted.
        seed: seed of the random base weights (only used without weight files).
        device: ``"auto"`` (default: CUDA when available, else the CPU), ``"cpu"``, ``"cuda"``
            or ``"cuda:N"``. The base is bf16 on CUDA and fp32 on the CPU.

    Raises:
        EngineError: ``model_dir`` is not a model directory, or ``device`` is unknown or absent.

    Example::

        engine = LoRAEngine(tiny_model_dir(), max_adapters=4, device="cuda")
        engine.core.add_adapter_to_model("tenant_a", LoraConfig(r=8))  # a twinkle-API tenant
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_adapters: int = 8,
        max_rank: int = 64,
        seed: int = 0,
        device: Any = "auto",
        device_slots: int | None = None,
        host_bytes: int | None = None,
        spill_dir: str | Path | None = None,
    ) -> None:
        from peft import LoraConfig
        from transformers import AutoTokenizer
        from twinkle.launcher.http import build_locally
        from twinkle.model.transformers_model import TransformersModel

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise EngineError(f"{self.model_dir} has no config.json; pass a local Hugging Face model directory")
        target = resolve_device(device)
        self._device = target
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        with build_locally():  # a server-side object, whatever mode a client in this process set up
            self.core = TransformersModel(
                model_id=str(self.model_dir),
                torch_dtype="bfloat16" if target.type == "cuda" else "float32",
                device=target,
                seed=seed,
            )
        hf_model = self.core.model
        for p in hf_model.parameters():
            p.requires_grad_(False)
        #: the base weights by their Hugging Face names, tied ones under each name (peft keeps these tensors).
        self.base_parameters: dict[str, Any] = dict(hf_model.named_parameters(remove_duplicate=False))
        self.core.add_adapter_to_model(IDLE_ADAPTER, LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"]))
        for p in self.core.state_of(IDLE_ADAPTER).params:
            p.requires_grad_(False)
        self.config = self.core.model_config()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        text = self.config.get_text_config()  # the config itself, or a vision-language model's text part
        self.vocab_size = int(text.vocab_size)
        self.max_length = int(getattr(text, "max_position_embeddings", 4096))
        eos = text.eos_token_id if text.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        self.pad_token_id = int(text.pad_token_id or 0)
        self.slots: dict[int, Slot] = {}
        #: held by every engine operation, and by the twinkle API's calls on :attr:`core`.
        self.lock = threading.RLock()
        self._names = itertools.count()
        from twinkle.model.paging import AdapterPool

        #: every tenant adapter (Tinker runs, samplers, snapshots, twinkle objects' adapters): at most
        #: ``device_slots`` on the device, the others paged to (pinned) host memory, idle ones parked
        #: to ``spill_dir``; ``max_adapters`` live ones and ``host_bytes`` of host memory at most.
        self.pool = AdapterPool(
            self.core,
            slots=min(device_slots or max_adapters, max_adapters),
            host_bytes_budget=host_bytes if host_bytes is not None else 1 << 62,
            max_live=max_adapters,
            spill_dir=spill_dir,
        )
        self._param_bytes = self.core.state_of(IDLE_ADAPTER).params[0].element_size()

    @property
    def device(self) -> Any:
        """The ``torch.device`` of the base weights, the adapters and their optimizer state."""
        return self._device

    @property
    def model(self) -> Any:
        """The transformers model under the adapters (its architecture is what clients are told)."""
        return self.core._hf_model()

    def trainable_base_weights(self) -> list[str]:
        """Names of base weights that would receive gradients (empty when the base is frozen, as it must be)."""
        return [name for name, param in self.base_parameters.items() if param.requires_grad]

    @_locked
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
        """How many more adapters fit in the pool (parked ones hold no place)."""
        cap = self.pool.capacity()
        return self.max_adapters - cap["resident"] - cap["paged"]

    # -- the adapter pool ------------------------------------------------------------------
    @property
    def can_park(self) -> bool:
        """Whether idle adapters can be parked (a spill directory is set)."""
        return self.pool.can_unload

    def adapter_bytes(self, rank: int, targets: Sequence[str]) -> int:
        """Host bytes an adapter of ``rank`` on ``targets`` reserves (weights, gradients, AdamW moments)."""
        from twinkle.model.paging import estimate_lora_bytes

        return estimate_lora_bytes(self.core, rank, list(targets), dtype_bytes=self._param_bytes)

    def check_admit(self, rank: int, targets: Sequence[str] | None, *, pending: int = 0) -> None:
        """Raise :class:`AdapterPoolFull` unless one more adapter fits (``pending`` creations in flight counted).

        Raises:
            AdapterPoolFull: ``max_adapters`` live adapters, or no room in the host-memory budget.
        """
        from twinkle.model.paging import PoolFull

        targets = list(targets) if targets else list(ALL_TARGETS)
        nbytes = self.adapter_bytes(rank, targets)
        try:
            self.pool.check_admit(nbytes=nbytes, pending=pending, pending_bytes=pending * nbytes)
        except PoolFull as exc:
            raise AdapterPoolFull.of(exc) from None

    def capacity(self) -> dict[str, int]:
        """The pool's figures (:meth:`twinkle.model.paging.AdapterPool.capacity`)."""
        return self.pool.capacity()

    def adopt(self, name: str) -> None:
        """Put an adapter just added to :attr:`core` (a twinkle object's) under the pool.

        Raises:
            AdapterPoolFull: no room for it (the caller removes it again).
        """
        from twinkle.model.paging import PoolFull

        with self.lock:
            try:
                self.pool.add(name)
            except PoolFull as exc:
                raise AdapterPoolFull.of(exc) from None

    def owns(self, name: str) -> bool:
        """Whether the pool manages this adapter."""
        return name in self.pool

    def disown(self, name: str) -> None:
        """Take an adapter out of the pool (before it leaves :attr:`core`)."""
        with self.lock:
            self.pool.remove(name)

    @contextlib.contextmanager
    def using(self, names: Sequence[str]) -> Iterator[None]:
        """Hold the engine's lock with these adapters on the device (paged in or reloaded as needed).

        Raises:
            EngineError: more adapters than device slots, or no room to reload a parked one.
        """
        from twinkle.model.paging import PoolError, PoolFull

        with self.lock:
            wanted = [n for n in names if n in self.pool]
            try:
                context = self.pool.use(wanted)
                context.__enter__()
            except PoolFull as exc:
                raise AdapterPoolFull.of(exc) from None
            except PoolError as exc:
                raise EngineError(str(exc)) from None
            try:
                yield
            finally:
                context.__exit__(None, None, None)

    def park(self, slot_id: int) -> bool:
        """Unload an idle slot's adapter to the spill directory (exactly restored on its next use)."""
        slot = self.slots.get(slot_id)
        return slot is not None and self.park_adapter(slot.adapter)

    def park_adapter(self, name: str) -> bool:
        """Unload an idle adapter to the spill directory; False when it is in use or not pooled."""
        with self.lock:
            return self.can_park and self.pool.unload(name)

    @_locked
    def create_slot(
        self, rank: int, *, alpha: float | None = None, targets: Sequence[str] = ALL_TARGETS, seed: int | None = None
    ) -> int:
        """Add a fresh adapter to the shared model (``A`` random, ``B`` zero, so it starts as the base model).

        Args:
            rank: LoRA rank (1..max_rank).
            alpha: scaling numerator (update = B A x * alpha / rank); default 32.
            targets: short module names to adapt (``q_proj``, ..., ``lm_head``).
            seed: seeds ``A``'s initialisation (drawn on the CPU: the same on every device).

        Returns:
            The slot id.

        Raises:
            EngineError: the pool is full, the rank is out of range or a target is unknown.
        """
        import math

        import torch
        from peft import LoraConfig
        from twinkle.processor.base import PaddingFreeProcessor

        from twinkle_server.policy import check_adapter_options

        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.max_rank:
            raise EngineError(f"LoRA rank {rank!r} is out of range; this server accepts ranks 1..{self.max_rank}")
        unknown = sorted(set(targets) - set(ALL_TARGETS))
        if unknown or not targets:
            raise EngineError(
                f"unknown LoRA target modules {unknown or list(targets)}; choose from {list(ALL_TARGETS)}"
            )
        self.check_admit(rank, list(targets))
        slot_id = next(i for i in range(self.max_adapters + len(self.slots) + 1) if i not in self.slots)
        name = f"tinker{next(self._names)}"
        fields = {
            "r": rank,
            "lora_alpha": float(alpha if alpha is not None else 32.0),
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": sorted(set(targets)),
        }
        check_adapter_options(fields, {}, max_rank=self.max_rank)  # the same allow-list as twinkle-API tenants
        self.core.add_adapter_to_model(name, LoraConfig(**fields))
        try:
            self.pool.add(name)  # reserves its host block; pages the least recently used one out if needed
        except Exception:
            self.core.remove_adapter(name)
            raise
        state = self.core.state_of(name)
        # a Tinker run trains with nothing inherited from the adapter added before it
        state.template = None
        state.processor = PaddingFreeProcessor(pad_token_id=self.pad_token_id)
        state.train_metrics, state.eval_metrics = [], []
        params: dict[str, tuple[Any, Any]] = {}
        marker = f".{name}.weight"
        for full, param in self.core.model.named_parameters():
            if not full.endswith(marker):
                continue
            module, kind = full[: -len(marker)].rsplit(".", 1)
            module = module.replace("base_model.model.", "", 1)
            pair = params.setdefault(module, [None, None])  # type: ignore[arg-type]
            pair[0 if kind == "lora_A" else 1] = param
        gen = torch.Generator().manual_seed(seed if seed is not None else slot_id * 7919 + 17)
        with torch.no_grad():
            for module in sorted(params):
                a, b = params[module]
                bound = 1.0 / math.sqrt(a.shape[1])
                a.copy_((torch.rand(a.shape, generator=gen) * 2 - 1) * bound)
                b.zero_()
        self.core.set_optimizer("AdamW", adapter_name=name, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        self.slots[slot_id] = Slot(
            slot_id,
            name,
            rank,
            fields["lora_alpha"],
            tuple(fields["target_modules"]),
            {k: (v[0], v[1]) for k, v in sorted(params.items())},
            state,
        )
        return slot_id

    @_locked
    def free_slot(self, slot_id: int) -> None:
        """Remove a slot's adapter from the shared model (no error when already free)."""
        slot = self.slots.pop(slot_id, None)
        if slot is not None:
            self.pool.remove(slot.adapter)
            self.core.remove_adapter(slot.adapter)

    def slot(self, slot_id: int) -> Slot:
        """The slot with this id."""
        try:
            return self.slots[slot_id]
        except KeyError:
            raise EngineError(f"adapter slot {slot_id} is not loaded") from None

    @contextlib.contextmanager
    def adapter_active(self, slot_id: int | None) -> Iterator[Any]:
        """The shared model (eval mode, no gradients) with a slot's adapter active, or the bare base for None.

        Yields the (peft-wrapped) torch module to run, for :mod:`twinkle_server.sampling`.
        """
        import torch

        core = self.core
        names = [self.slot(slot_id).adapter] if slot_id is not None else []
        with self.using(names):  # the adapter on the device while it samples
            was_training = core.model.training
            core.model.eval()
            try:
                with torch.no_grad():
                    if slot_id is None:
                        with core.adapters_disabled():
                            yield core.model
                    else:
                        core._activate(core.state_of(names[0]))
                        yield core.model
            finally:
                core.model.train(was_training)

    # -- training --------------------------------------------------------------------
    @_locked
    def forward_backward(self, jobs: Sequence[BatchJob]) -> list[JobResult]:
        """Run several requests (of different slots) as one packed multi-adapter pass.

        A job with invalid input gets its error in its :class:`JobResult` and does not disturb
        the others. ``forward_only`` jobs run without gradients. Gradients accumulate in each
        slot until :meth:`optim_step`. Two jobs of one slot run in consecutive passes.

        Returns:
            One :class:`JobResult` per job, in order: per datum ``logprobs`` (and
            ``elementwise_loss`` for ``cross_entropy``), and the metric ``loss:sum``.
        """
        results = [JobResult() for _ in jobs]
        prepared: list[tuple[int, list[dict[str, Any]], list[int]]] = []
        for j, job in enumerate(jobs):
            try:
                self.slot(job.slot)
                rows, lengths = job_rows(job, vocab_size=self.vocab_size, max_length=self.max_length)
            except (EngineError, ValueError) as exc:
                results[j].error = exc
                continue
            prepared.append((j, rows, lengths))
        for forward_only in (False, True):
            pending = [p for p in prepared if jobs[p[0]].forward_only == forward_only]
            while pending:  # one pass holds each slot once, and at most as many slots as fit on the device
                taken: dict[int, tuple[int, list[dict[str, Any]], list[int]]] = {}
                for item in pending:
                    if len(taken) < self.pool.slots or jobs[item[0]].slot in taken:
                        taken.setdefault(jobs[item[0]].slot, item)
                pending = [p for p in pending if p not in taken.values()]
                self._pass(jobs, list(taken.values()), results, forward_only)
        return results

    def _pass(
        self,
        jobs: Sequence[BatchJob],
        prepared: list[tuple[int, list[dict[str, Any]], list[int]]],
        results: list[JobResult],
        forward_only: bool,
    ) -> None:
        """One packed pass over ``prepared`` (distinct slots, at most the device slots); fills their results."""
        try:
            context = self.using([self.slot(jobs[j].slot).adapter for j, _, _ in prepared])
            with context:
                self._resident_pass(jobs, prepared, results, forward_only)
        except AdapterPoolFull as exc:  # a parked adapter without room to come back: those jobs fail
            for j, _, _ in prepared:
                results[j].error = exc

    def _resident_pass(
        self,
        jobs: Sequence[BatchJob],
        prepared: list[tuple[int, list[dict[str, Any]], list[int]]],
        results: list[JobResult],
        forward_only: bool,
    ) -> None:
        """:meth:`_pass` with the adapters on the device."""
        import torch
        from twinkle.loss.tinker import TinkerLoss
        from twinkle.model.multi_adapter import forward_backward_multi, forward_loss_multi

        inputs: dict[str, list[dict[str, Any]]] = {}
        losses: dict[str, Any] = {}
        for j, rows, _ in prepared:
            job = jobs[j]
            name = self.slot(job.slot).adapter
            loss = TinkerLoss(job.loss_fn, normalize=False, **(job.loss_config or {}))
            loss.keep_token_logps = True
            self.core.state_of(name).loss = loss
            losses[name] = loss
            inputs[name] = rows
        if forward_only:
            sums = {name: out.loss for name, out in forward_loss_multi(self.core, inputs).items()}
        else:
            outs = forward_backward_multi(self.core, inputs)
            sums = {name: out["loss"] for name, out in outs.items()}
        # per-token logprobs of every job's targets: one device-to-host copy
        picked = []
        for j, _, _ in prepared:
            logp, mask, row_ids = losses[self.slot(jobs[j].slot).adapter].last_token_logps
            picked.append((logp[mask].float(), row_ids[mask]))
        flat = torch.cat([lp for lp, _ in picked]).cpu()
        flat_rows = torch.cat([r for _, r in picked]).cpu()
        offset = 0
        for (j, rows, lengths), (lp, _) in zip(prepared, picked):
            values = flat[offset : offset + lp.shape[0]].numpy()
            owners = flat_rows[offset : offset + lp.shape[0]].numpy()
            offset += lp.shape[0]
            per_datum = [values[owners == r] for r in range(len(lengths))]
            results[j].outputs = datum_outputs(jobs[j].loss_fn, rows, per_datum)
        for (j, _, _), name in zip(prepared, inputs):
            results[j].metrics = {"loss:sum": float(sums[name])}

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

    @_locked
    def optim_steps(self, requests: Sequence[tuple[int, dict[str, float]]]) -> list[dict[str, float] | Exception]:
        """Optimizer steps of several slots, each with its own core AdamW, state and hyperparameters.

        A slot whose gradients are not finite (a NaN or infinite loss) skips its step: its
        adapter and optimizer state stay as they were (``skipped_non_finite: 1``). The
        gradient norms are read in one host transfer.

        Args:
            requests: ``(slot id, hyperparameters)`` pairs (see :meth:`optim_step`); a slot at most once.

        Returns:
            Per request, in order: the metrics (``grad_norm`` before clipping, ``step``), or the
            :class:`EngineError` that request failed with (the others still step).
        """
        results: list[dict[str, float] | Exception] = [{} for _ in requests]
        size = self.pool.slots
        for start in range(0, len(requests), size):  # as many slots at a time as fit on the device
            part = list(requests[start : start + size])
            names = [self.slots[sid].adapter for sid, _ in part if sid in self.slots]
            try:
                with self.using(names):
                    results[start : start + size] = self._resident_optim_steps(part)
            except EngineError as exc:
                results[start : start + size] = [exc] * len(part)
        return results

    def _resident_optim_steps(
        self, requests: Sequence[tuple[int, dict[str, float]]]
    ) -> list[dict[str, float] | Exception]:
        """:meth:`optim_steps` of slots on the device."""
        import math

        import torch

        results: list[dict[str, float] | Exception] = [{} for _ in requests]
        checked: list[tuple[int, Slot, tuple[float, ...]]] = []
        for i, (slot_id, hyper) in enumerate(requests):
            try:
                checked.append((i, self.slot(slot_id), check_adam_params(hyper)))
            except EngineError as exc:
                results[i] = exc
        norms: dict[int, Any] = {}
        for i, slot, _ in checked:
            grads = [p.grad for p in slot.parameters() if p.grad is not None]
            if grads:
                norms[i] = torch.nn.utils.get_total_norm(grads, foreach=True).float()
        values = dict(zip(norms, torch.stack(list(norms.values())).cpu().tolist())) if norms else {}
        for i, slot, (lr, beta1, beta2, eps, weight_decay, clip) in checked:
            name, state = slot.adapter, slot.state
            norm = values.get(i, 0.0)
            if not math.isfinite(norm):
                self.core.zero_grad(adapter_name=name)
                results[i] = {"grad_norm": norm, "skipped_non_finite": 1.0, "step": float(state.global_step)}
                continue
            for group in state.optimizer.param_groups:
                group.update(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
            if i in norms and clip > 0:
                torch.nn.utils.clip_grads_with_norm_(slot.parameters(), clip, norms[i], foreach=True)
            # Tinker's losses are sums and gradients add up over forward_backward calls: normalizer 1
            state.window_tokens, state.grads_final = 1.0, False
            before = state.global_step
            self.core.step(adapter_name=name)  # the shared model may skip a non-finite loss's step itself
            self.core.zero_grad(adapter_name=name)
            state.last_grad_norm = norm
            results[i] = {"grad_norm": norm, "step": float(state.global_step)}
            if state.global_step == before:
                results[i]["skipped_non_finite"] = 1.0
        return results
