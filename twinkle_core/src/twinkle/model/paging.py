"""Adapter paging: many LoRA adapters on one model, a few of them on the device at a time.

One job: where an adapter's tensors live. An adapter of a
:class:`~twinkle.model.transformers_model.TransformersModel` is its LoRA parameters, their
gradients (mid accumulation window) and its optimizer state (AdamW's two moments, a fused
optimizer's step counters). :class:`AdapterPager` moves all of them out of the device into one
host block per adapter and back:

- **out**: the adapter's device tensors are concatenated per dtype on the device (one kernel)
  and copied into the adapter's host block in one ``non_blocking`` transfer per dtype; the
  parameters, gradients and optimizer-state entries then point at views of the host block, so
  the device memory is freed and nothing else changes (the ``Parameter`` objects, the
  optimizer's ``param_groups``, peft's modules, the :class:`AdapterState` all stay).
- **in**: one ``non_blocking`` transfer of the block into a device buffer, one multi-tensor
  copy into fresh device tensors, and the parameters, gradients and state point at them again.

The copies are exact, so training after out -> in continues bit for bit (test). Host blocks are
allocated once per adapter (:meth:`AdapterPager.reserve`) and reused for every page-out:
**pinned** memory when CUDA is available (page-locked with ``cudaHostRegister`` at the exact
size, so the budget is not rounded up to a power of two), plain CPU memory otherwise. Copies run
on the device's current stream, so a page-in queued after a page-out of the same adapter is
ordered behind it; only host *reads* of a paged adapter wait for its copy
(:meth:`AdapterPager.synchronize`).

**On a CPU model** the device already is host memory: paging moves nothing by default (it is
bookkeeping only: state, byte accounting and admission behave exactly as on a GPU), and
``AdapterPager(model, copy_on_cpu=True)`` performs the real copies into a separate host block
(tests use it to exercise the move logic).

:class:`AdapterPool` is the policy over the pager for a multi-tenant service: a bounded number of
resident **slots** on the device, a **host-memory budget** for every live adapter (each reserves
its host block when added, so paging out never allocates and never fails), least-recently-used
page-out of idle adapters when a pass needs slots, admission control at creation
(:meth:`AdapterPool.can_admit`), capacity figures (:meth:`AdapterPool.capacity`) and the
unloading of adapters idle past a TTL through a save callback, reloaded on next use through a
load callback (:meth:`AdapterPool.reap_idle`).

Not supported: FSDP-sharded adapters (DTensor parameters); paging raises.

Example::

    pool = AdapterPool(model, slots=8, host_bytes_budget=64 << 30)
    model.add_adapter_to_model("alice", LoraConfig(r=8, target_modules="all-linear"))
    pool.add("alice")
    with pool.use(["alice", "bob"]):        # resident for this pass, never paged meanwhile
        forward_backward_multi(model, {"alice": rows_a, "bob": rows_b})
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

__all__ = [
    "AdapterPager",
    "AdapterPool",
    "PoolError",
    "PoolFull",
    "estimate_lora_bytes",
    "lora_target_shapes",
]

#: Alignment of each dtype's section in a host block (bytes).
_ALIGN = 64
#: Bytes a live adapter reserves per parameter tensor beyond its data: a fused optimizer's step
#: count on the device, and the alignment of the block's sections.
_SLACK = 64
#: What a live adapter reserves per parameter byte by default: the parameter, its gradient and
#: two optimizer moments (AdamW).
DEFAULT_COPIES = 4


class PoolError(RuntimeError):
    """A request the adapter pool cannot serve as asked (e.g. a pass needing more slots than exist)."""


class PoolFull(PoolError):
    """No room for another adapter: the host-memory budget (or the slots) is used up.

    Attributes:
        retry_after: a hint, in seconds, for when to try again (idle adapters are unloaded after
            the pool's TTL; ``None`` when it has none).
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# ---------------------------------------------------------------------- host memory
class HostBlock:
    """A flat host byte buffer, page-locked when CUDA is available (exact size).

    Args:
        nbytes: size in bytes.
        pin: page-lock it (``cudaHostRegister``; falls back to torch's pinned allocator).
    """

    def __init__(self, nbytes: int, pin: bool) -> None:
        import torch

        self.nbytes = int(nbytes)
        self.pinned = False
        self._registered = False
        self.tensor = torch.empty(self.nbytes, dtype=torch.uint8)
        if pin and self.nbytes:
            try:
                rc = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.nbytes, 0)
                self._registered = int(getattr(rc, "value", rc)) == 0  # cudaSuccess
            except (AttributeError, RuntimeError, TypeError):
                self._registered = False
            if not self._registered:  # torch's caching host allocator (rounds up to a power of two)
                self.tensor = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
            self.pinned = True

    def free(self) -> None:
        """Unpin (when registered) and drop the buffer."""
        if self._registered:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self._registered = False
        self.tensor = None  # type: ignore[assignment]
        self.nbytes = 0

    def __del__(self) -> None:  # pragma: no cover - best effort when a pager is dropped without release
        try:
            if self._registered:
                self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# ---------------------------------------------------------------------- the pager
@functools.cache
def _itemsize_cached(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


@dataclass
class _Item:
    """One tensor of an adapter in its host block: where it sits and how to put it back."""

    kind: str  # "param" | "grad" | "optim"
    index: int  # parameter index in state.params
    key: str | None  # optimizer state key
    shape: tuple[int, ...]
    dtype: Any
    offset: int  # element offset in its dtype section
    host: bool = False  # kept on the host even while resident (AdamW's step counts); spill files only


@dataclass
class _Record:
    """An adapter's host block and, while paged, the manifest of what sits in it."""

    block: HostBlock | None = None
    reserved: int = 0  # bytes reserved (the block's size; a number only when paging moves nothing)
    paged: bool = False
    items: list[_Item] = field(default_factory=list)
    sections: dict[Any, tuple[int, int]] = field(default_factory=dict)  # dtype -> (byte offset, numel)
    event: Any = None  # CUDA event recorded after the page-out copies
    spilled: str | None = None  # the file holding the adapter's tensors while it is spilled


class AdapterPager:
    """Moves adapters' parameters, gradients and optimizer state between the device and host blocks.

    Args:
        model: a ``TransformersModel`` (anything with ``state_of(name)`` whose ``params`` and
            ``optimizer`` are torch objects, and a ``device``).
        copy_on_cpu: on a CPU model, really copy into separate host blocks (default: bookkeeping
            only, since the device memory is host memory already).

    Not thread-safe: call it where the model runs (:class:`AdapterPool` serializes its calls).
    """

    def __init__(self, model: Any, *, copy_on_cpu: bool = False) -> None:
        self.model = model
        self.copy_on_cpu = copy_on_cpu
        self._records: dict[str, _Record] = {}

    # -- facts --------------------------------------------------------------------------
    @property
    def device(self) -> Any:
        """The device the model's adapters live on."""
        return self.model.device

    @property
    def moves(self) -> bool:
        """Whether paging copies data (a CUDA model, or a CPU model with ``copy_on_cpu``)."""
        return self.device.type != "cpu" or self.copy_on_cpu

    @property
    def pins(self) -> bool:
        """Whether host blocks are page-locked (CUDA is available and the model is on it)."""
        import torch

        return self.device.type == "cuda" and torch.cuda.is_available()

    def is_paged(self, name: str) -> bool:
        """Whether the adapter is paged out (its tensors in its host block)."""
        record = self._records.get(name)
        return bool(record and record.paged)

    def reserved_bytes(self, name: str) -> int:
        """Bytes of the adapter's host block (0 before :meth:`reserve` / a page-out)."""
        record = self._records.get(name)
        return record.reserved if record else 0

    def host_block(self, name: str) -> Any:
        """The adapter's host block as a flat uint8 tensor (``None`` before one exists)."""
        record = self._records.get(name)
        return record.block.tensor if record and record.block is not None else None

    def adapter_bytes(self, name: str) -> int:
        """Bytes of the adapter's tensors now: parameters, present gradients and optimizer state."""
        return _layout(self._tensors(name))[1]

    # -- host blocks ----------------------------------------------------------------------
    def reserve(self, name: str, nbytes: int) -> None:
        """Allocate the adapter's host block of ``nbytes`` now (pinned on CUDA), or grow it.

        A page-out that needs more than the reserved bytes (an optimizer with more state than
        reserved for) grows the block then.
        """
        record = self._records.setdefault(name, _Record())
        if record.paged and self.moves:
            raise PoolError(f"reserve: adapter {name!r} is paged out; page it in first")
        nbytes = _aligned(nbytes)
        if record.reserved >= nbytes:
            return
        record.reserved = nbytes
        if not self.moves:  # bookkeeping only: no host memory beside the model's own
            return
        if record.block is not None:
            self._wait(record)
            record.block.free()
        record.block = HostBlock(nbytes, self.pins)

    def release(self, name: str) -> None:
        """Forget the adapter and free its host block (after it was removed from the model).

        Raises:
            PoolError: it is paged out (its tensors live in the block); page it in first.
        """
        record = self._records.get(name)
        if record is None:
            return
        if record.paged and self.moves:
            raise PoolError(f"release: adapter {name!r} is paged out; page it in (or materialize it) first")
        self._free(name)

    def _free(self, name: str) -> None:
        record = self._records.pop(name, None)
        if record is not None and record.block is not None:
            self._wait(record)
            record.block.free()
        if record is not None and record.spilled is not None:
            Path(record.spilled).unlink(missing_ok=True)

    # -- moving -----------------------------------------------------------------------------
    def _tensors(self, name: str, any_device: bool = False) -> list[tuple[_Item, Any]]:
        """The adapter's device tensors in a fixed order: parameters, gradients, optimizer state
        (``any_device``: also optimizer-state tensors kept on the host, such as AdamW's step counts)."""
        import torch

        state = self.model.state_of(name)
        out: list[tuple[_Item, Any]] = []

        def add(kind: str, index: int, key: str | None, tensor: Any) -> None:
            if type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
                raise PoolError(f"adapter {name!r}: paging does not support {type(tensor).__name__} tensors (FSDP)")
            out.append((_Item(kind, index, key, tuple(tensor.shape), tensor.dtype, 0), tensor))

        optimizer = state.optimizer
        for i, p in enumerate(state.params):
            add("param", i, None, p.data)
            if p.grad is not None:
                add("grad", i, None, p.grad)
        if optimizer is not None:
            for i, p in enumerate(state.params):
                for key, value in sorted(optimizer.state.get(p, {}).items()):
                    if torch.is_tensor(value) and (any_device or value.device == p.device) and value.numel() > 0:
                        add("optim", i, key, value)
        return out

    def page_out(self, name: str) -> int:
        """Copy the adapter to its host block and free its device memory; returns the bytes moved.

        Non-blocking on CUDA: returns once the copies are queued (host reads of the paged tensors
        wait through :meth:`synchronize`). No-op when already paged.
        """
        import torch

        record = self._records.setdefault(name, _Record())
        if record.paged:
            return 0
        if not self.moves:
            record.paged = True
            return 0
        tensors = self._tensors(name)
        sections, total = _layout(tensors)
        if record.block is None or record.block.nbytes < total:
            self.reserve(name, max(total, record.reserved))
        assert record.block is not None
        host = record.block.tensor
        items: list[_Item] = []
        with torch.no_grad():
            for dtype, (byte_offset, numel) in sections.items():
                group = [(item, t) for item, t in tensors if t.dtype == dtype]
                dest = host[byte_offset : byte_offset + numel * _itemsize(dtype)].view(dtype)
                offset = 0
                for item, t in group:
                    item.offset = offset
                    offset += t.numel()
                    items.append(item)
                if self.device.type == "cpu":  # straight into the block, no staging copy
                    chunks = [dest[item.offset : item.offset + t.numel()] for item, t in group]
                    torch._foreach_copy_(chunks, [t.reshape(-1) for _, t in group])
                    continue
                # one device-side concatenation, then one transfer per dtype
                flat = torch.cat([t.reshape(-1) for _, t in group]) if len(group) > 1 else group[0][1].reshape(-1)
                dest.copy_(flat, non_blocking=True)
        if self.device.type == "cuda":
            record.event = torch.cuda.Event()
            record.event.record(torch.cuda.current_stream(self.device))
        record.items, record.sections, record.paged = items, sections, True
        self._point_at(name, record, self._host_views(record))
        return total

    def page_in(self, name: str) -> int:
        """Copy the adapter back to fresh device memory; returns the bytes moved (no-op when resident)."""
        import torch

        record = self._records.get(name)
        if record is None or not record.paged:
            return 0
        if not self.moves:
            record.paged = False
            return 0
        assert record.block is not None
        device = self.device
        end = max(off + n * _itemsize(dtype) for dtype, (off, n) in record.sections.items())
        with torch.no_grad():
            if device.type == "cpu":  # the block itself is the source: copy straight into fresh tensors
                staged = record.block.tensor[:end]
            else:  # one transfer into a device buffer, then one multi-tensor copy out of it
                staged = torch.empty(end, dtype=torch.uint8, device=device)
                staged.copy_(record.block.tensor[:end], non_blocking=True)
            fresh: dict[int, Any] = {}
            for dtype, (byte_offset, numel) in record.sections.items():
                group = [(i, it) for i, it in enumerate(record.items) if it.dtype == dtype]
                source = staged[byte_offset : byte_offset + numel * _itemsize(dtype)].view(dtype)
                outs = [torch.empty(it.shape, dtype=dtype, device=device) for _, it in group]
                chunks = [source[it.offset : it.offset + out.numel()] for (_, it), out in zip(group, outs)]
                torch._foreach_copy_([out.view(-1) for out in outs], chunks)
                fresh.update({i: out for (i, _), out in zip(group, outs)})
        record.paged = False
        self._point_at(name, record, [fresh[i] for i in range(len(record.items))])
        record.items, record.sections = [], {}
        return end

    def spill(self, name: str, path: str | os.PathLike) -> int:
        """Write the adapter's tensors (parameters, gradients, optimizer state) to ``path`` and free
        both its device and its host memory; returns the bytes written.

        The adapter stays in the model (peft modules, :class:`AdapterState`, optimizer object):
        its tensors are replaced by one-element placeholders of the same shape, which must not be
        used until :meth:`unspill`. Works from any state (resident, paged, bookkeeping-only).
        """
        import torch

        record = self._records.setdefault(name, _Record())
        if record.spilled is not None:
            return 0
        if record.paged and self.moves:
            self._wait(record)
        tensors = self._tensors(name, any_device=True)
        if record.paged and self.moves:  # what is not in the block stays on the host when resident
            in_block = {(it.kind, it.index, it.key) for it in record.items}
            for item, _ in tensors:
                item.host = (item.kind, item.index, item.key) not in in_block
        else:
            for item, t in tensors:
                item.host = t.device.type != self.device.type
        items = [item for item, _ in tensors]
        nbytes = 0
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as out:
            for _, t in tensors:
                data = t.detach().reshape(-1).contiguous()
                raw = data.cpu().view(torch.uint8) if data.numel() else data.cpu().new_empty(0).view(torch.uint8)
                out.write(raw.numpy().tobytes())
                nbytes += raw.numel()
        os.replace(tmp, target)
        record.items = items
        self._point_at(name, record, [torch.empty((), dtype=it.dtype).expand(it.shape) for it in items])
        if record.block is not None:
            record.block.free()
            record.block = None
        record.paged, record.sections, record.event, record.reserved = False, {}, None, 0
        record.spilled = str(target)
        return nbytes

    def unspill(self, name: str) -> int:
        """Read a spilled adapter back onto the device (removing its file); returns the bytes read."""
        import torch

        record = self._records.get(name)
        if record is None or record.spilled is None:
            return 0
        path = Path(record.spilled)
        raw = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        tensors = []
        offset = 0
        for item in record.items:
            size = _numel(item.shape) * _itemsize(item.dtype)
            t = raw[offset : offset + size].view(item.dtype).reshape(item.shape).clone()
            tensors.append(t if item.host or self.device.type == "cpu" else t.to(self.device))
            offset += size
        self._point_at(name, record, tensors)
        record.items, record.spilled = [], None
        path.unlink(missing_ok=True)
        return offset

    def is_spilled(self, name: str) -> bool:
        """Whether the adapter's tensors are in a spill file (:meth:`spill`)."""
        record = self._records.get(name)
        return bool(record and record.spilled is not None)

    def materialize(self, name: str) -> None:
        """Give a paged adapter's tensors their own host storage (off the block), so they can be
        read and saved like any CPU tensors (safetensors refuses views of one buffer); the adapter
        stays paged and its block can be released."""
        record = self._records.get(name)
        if record is None or not record.paged or not self.moves:
            return
        self._wait(record)
        self._point_at(name, record, [view.clone() for view in self._host_views(record)])
        record.items, record.sections = [], {}
        record.paged = False  # it no longer lives in the block (nor on the device)

    def synchronize(self, name: str | None = None) -> None:
        """Wait for the page-out copies of ``name`` (default: every adapter) to land in host memory."""
        for key, record in self._records.items():
            if name is None or key == name:
                self._wait(record)

    @staticmethod
    def _wait(record: _Record) -> None:
        if record.event is not None:
            record.event.synchronize()
            record.event = None

    def _host_views(self, record: _Record) -> list[Any]:
        assert record.block is not None
        host = record.block.tensor
        views = []
        for item in record.items:
            byte_offset, numel = record.sections[item.dtype]
            section = host[byte_offset : byte_offset + numel * _itemsize(item.dtype)].view(item.dtype)
            count = _numel(item.shape)
            views.append(section[item.offset : item.offset + count].view(item.shape))
        return views

    def _point_at(self, name: str, record: _Record, tensors: Sequence[Any]) -> None:
        """Make the adapter's parameters, gradients and optimizer state the given tensors (manifest order)."""
        state = self.model.state_of(name)
        params = state.params
        grads: dict[int, Any] = {}
        for item, tensor in zip(record.items, tensors):
            if item.kind == "grad":
                grads[item.index] = tensor
        for i in grads:
            params[i].grad = None  # drop the old gradient before the data changes device
        for item, tensor in zip(record.items, tensors):
            if item.kind == "param":
                params[item.index].data = tensor
            elif item.kind == "optim":
                state.optimizer.state[params[item.index]][item.key] = tensor
        for i, grad in grads.items():
            params[i].grad = grad


def _itemsize(dtype: Any) -> int:
    return _itemsize_cached(dtype)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _aligned(n: int) -> int:
    return (int(n) + _ALIGN - 1) // _ALIGN * _ALIGN


def _layout(tensors: Sequence[tuple[_Item, Any]]) -> tuple[dict[Any, tuple[int, int]], int]:
    """Per dtype ``(byte offset, elements)`` of its section in a host block, and the block's bytes."""
    counts: dict[Any, int] = {}
    for _, t in tensors:
        counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    sections: dict[Any, tuple[int, int]] = {}
    offset = 0
    for dtype, numel in counts.items():
        sections[dtype] = (offset, numel)
        offset = _aligned(offset + numel * _itemsize(dtype))
    return sections, offset


# ---------------------------------------------------------------------- sizes
def lora_target_shapes(model: Any, targets: Any) -> list[tuple[int, int]]:
    """``(in_features, out_features)`` of every linear layer a LoRA with ``targets`` would wrap.

    Args:
        model: a ``TransformersModel`` or a torch module.
        targets: module name suffixes (``["q_proj", "v_proj"]``), or ``"all-linear"`` (every
            linear layer but the output head, as peft picks them).
    """
    import torch

    module = model
    if hasattr(model, "_hf_model"):
        module = model._hf_model()
    elif hasattr(model, "model") and not isinstance(model, torch.nn.Module):
        module = model.model
    wanted = None if targets == "all-linear" else {targets} if isinstance(targets, str) else set(targets)
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    shapes = []
    for name, layer in module.named_modules():
        if not isinstance(layer, torch.nn.Linear) or ".lora_" in name or name.startswith("lora_"):
            continue
        parts = name.split(".")
        leaf = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]  # peft-wrapped
        if wanted is None and layer is head:
            continue
        if wanted is None or leaf in wanted:
            shapes.append((layer.in_features, layer.out_features))
    return shapes


def estimate_lora_bytes(
    model: Any, rank: int, targets: Any, *, dtype_bytes: int = 4, copies: int = DEFAULT_COPIES
) -> int:
    """Host bytes a LoRA adapter of ``rank`` on ``targets`` reserves in an :class:`AdapterPool`.

    ``rank x (in + out)`` elements per wrapped linear layer, ``dtype_bytes`` each (peft keeps
    LoRA weights in float32 by default), times ``copies`` (parameter, gradient and AdamW's two
    moments: 4), plus 64 bytes per tensor (a fused AdamW's step counts, section alignment).
    """
    shapes = lora_target_shapes(model, targets)
    elements = sum(rank * (i + o) for i, o in shapes)
    return _aligned(elements * dtype_bytes * copies + _SLACK * 2 * len(shapes))


# ---------------------------------------------------------------------- the pool
RESIDENT, PAGED, UNLOADED = "resident", "paged", "unloaded"


@dataclass
class _Entry:
    state: str
    last_used: float
    reserved: int = 0
    pins: int = 0


class AdapterPool:
    """Bounded device slots plus a host-memory budget for the adapters of one model.

    Every live adapter (resident or paged) holds a host block of its size (reserved when added,
    counted against ``host_bytes_budget``), so paging one out never allocates and never fails:
    the number of live adapters is bounded by host memory, the number on the device by
    ``slots``. Unloaded adapters (idle past ``idle_ttl_s``, see :meth:`reap_idle`) hold nothing
    and are reloaded on use.

    Args:
        model: the ``TransformersModel`` whose named adapters the pool manages.
        slots: adapters resident on the device at most.
        host_bytes_budget: host bytes all live adapters' blocks may take together.
        idle_ttl_s: :meth:`reap_idle` unloads adapters unused for longer (``None``: never).
        save: ``save(name)`` persists an adapter before it is unloaded (weights, optimizer state,
            whatever its reload needs); it is called with the adapter readable (resident, or
            paged with its own host tensors).
        load: ``load(name)`` adds an unloaded adapter back to the model (with its optimizer
            state), called when it is next acquired.
        drop: ``drop(name)`` removes an adapter from the model after ``save`` (default:
            ``model.remove_adapter(name)``).
        spill_dir: without ``save``/``load``: unload by spilling the adapter's tensors to a file in
            this directory (:meth:`AdapterPager.spill`): the adapter stays in the model with its
            settings and optimizer object, holding no device or host memory, and is read back
            exactly on use. With neither, adapters are never unloaded.
        max_live: live (resident or paged) adapters at most, whatever their size (``None``: only
            the host budget bounds them).
        pager: the :class:`AdapterPager` (default: one on ``model``).
        clock: the time source of ``last_used`` and :meth:`reap_idle` (default ``time.monotonic``).

    Thread-safe: every method takes the pool's lock. The methods that move or remove adapters
    (``add``, ``acquire``, ``use``, ``reap_idle``, ``remove``) call into the model and must run
    where the model runs (a service's worker thread); ``capacity``, ``can_admit``, ``touch`` and
    ``status`` may be called from any thread.

    Raises:
        ValueError: ``slots < 1`` or a negative budget.
    """

    def __init__(
        self,
        model: Any,
        *,
        slots: int,
        host_bytes_budget: int,
        idle_ttl_s: float | None = None,
        save: Callable[[str], Any] | None = None,
        load: Callable[[str], Any] | None = None,
        drop: Callable[[str], Any] | None = None,
        spill_dir: str | os.PathLike | None = None,
        max_live: int | None = None,
        pager: AdapterPager | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < 1:
            raise ValueError(f"AdapterPool: slots must be >= 1, got {slots}")
        if host_bytes_budget < 0:
            raise ValueError(f"AdapterPool: host_bytes_budget must be >= 0, got {host_bytes_budget}")
        self.model = model
        self.slots = int(slots)
        self.host_bytes_budget = int(host_bytes_budget)
        self.idle_ttl_s = idle_ttl_s
        self._save = save
        self._load = load
        self._drop = drop or (lambda name: model.remove_adapter(name))
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.max_live = max_live
        if (save is None) != (load is None):
            raise ValueError("AdapterPool: give both save and load callbacks, or neither")
        self.pager = pager or AdapterPager(model)
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self.stats = {"page_outs": 0, "page_ins": 0, "unloads": 0, "reloads": 0, "bytes_out": 0, "bytes_in": 0}

    # -- figures ------------------------------------------------------------------------
    def _count(self, state: str) -> int:
        return sum(1 for e in self._entries.values() if e.state == state)

    @property
    def host_bytes_used(self) -> int:
        """Host bytes reserved by the live adapters."""
        with self._lock:
            return sum(e.reserved for e in self._entries.values() if e.state != UNLOADED)

    def capacity(self) -> dict[str, int]:
        """``{slots, resident, paged, unloaded, free, host_bytes_used, host_bytes_budget}``.

        ``free``: device slots not taken by a resident adapter; ``unloaded``: adapters saved
        away for idleness (reloaded on use, holding no memory).
        """
        with self._lock:
            return {
                "slots": self.slots,
                "resident": self._count(RESIDENT),
                "paged": self._count(PAGED),
                "unloaded": self._count(UNLOADED),
                "free": self.slots - self._count(RESIDENT),
                "host_bytes_used": self.host_bytes_used,
                "host_bytes_budget": self.host_bytes_budget,
            }

    def status(self, name: str) -> str | None:
        """``"resident"``, ``"paged"``, ``"unloaded"`` or ``None`` (not in the pool)."""
        with self._lock:
            entry = self._entries.get(name)
            return entry.state if entry else None

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    @property
    def names(self) -> list[str]:
        """Every adapter in the pool (unloaded ones included)."""
        with self._lock:
            return list(self._entries)

    # -- admission ------------------------------------------------------------------------
    def estimate(self, rank: int, targets: Any) -> int:
        """Host bytes an adapter of ``rank`` on ``targets`` would reserve (:func:`estimate_lora_bytes`)."""
        return estimate_lora_bytes(self.model, rank, targets)

    def can_admit(
        self, rank: int | None = None, targets: Any = "all-linear", *, nbytes: int | None = None, **pending: int
    ) -> bool:
        """Whether an adapter of ``rank`` on ``targets`` (or of ``nbytes``) can be added now (:meth:`check_admit`)."""
        try:
            self.check_admit(rank, targets, nbytes=nbytes, **pending)
        except PoolFull:
            return False
        return True

    def check_admit(
        self,
        rank: int | None = None,
        targets: Any = "all-linear",
        *,
        nbytes: int | None = None,
        pending: int = 0,
        pending_bytes: int = 0,
    ) -> int:
        """The bytes the adapter would reserve, or :class:`PoolFull` naming the limit it hits.

        Args:
            rank, targets: the adapter's LoRA rank and target modules (:meth:`estimate`), or
            nbytes: its bytes.
            pending, pending_bytes: admissions granted but not yet :meth:`add`-ed (a service's
                creations in flight), counted as live.

        Raises:
            PoolFull: ``max_live`` adapters are live, or the host budget cannot take the adapter
                (the message names the limit, what is used, what it needs, when idle adapters
                are unloaded).
        """
        if nbytes is None:
            if rank is None:
                raise ValueError("check_admit: give rank (and targets) or nbytes")
            nbytes = self.estimate(rank, targets)
        with self._lock:
            live = len(self._entries) - self._count(UNLOADED) + pending
            used = self.host_bytes_used + pending_bytes
            hint = (
                f"; adapters idle for {self.idle_ttl_s:.0f} s are unloaded, retry later"
                if self.idle_ttl_s
                else "; remove an adapter or retry later"
            )
            if self.max_live is not None and live + 1 > self.max_live:
                raise PoolFull(
                    f"adapter pool full: {live} live adapters, the pool's limit (max_live) is {self.max_live}{hint}",
                    retry_after=self._retry_after(),
                )
            if used + nbytes > self.host_bytes_budget:
                raise PoolFull(
                    f"adapter pool full: {live} live adapters hold {_mib(used)} of the {_mib(self.host_bytes_budget)} "
                    f"host-memory budget and this adapter needs {_mib(nbytes)}{hint}",
                    retry_after=self._retry_after(),
                )
        return nbytes

    def _retry_after(self) -> float | None:
        if not self.idle_ttl_s:
            return None
        now = self.clock()
        idle = [
            e.last_used + self.idle_ttl_s - now for e in self._entries.values() if e.state != UNLOADED and e.pins == 0
        ]
        return max(1.0, min(idle)) if idle else float(self.idle_ttl_s)

    # -- membership ------------------------------------------------------------------------
    def add(self, name: str, nbytes: int | None = None) -> None:
        """Take in an adapter just added to the model (resident), reserving its host block.

        Args:
            name: the adapter name.
            nbytes: bytes to reserve (default: its parameters x :data:`DEFAULT_COPIES`, room for
                gradients and AdamW's moments).

        Raises:
            PoolFull: the host budget cannot take it (the adapter stays in the model; remove it).
            PoolError: it is already in the pool.
        """
        with self._lock:
            if name in self._entries:
                raise PoolError(f"adapter {name!r} is already in the pool")
            if nbytes is None:
                params = self.model.state_of(name).params
                nbytes = sum(p.numel() * p.element_size() for p in params) * DEFAULT_COPIES + _SLACK * len(params)
            nbytes = _aligned(nbytes)
            self.check_admit(nbytes=nbytes)
            self._make_room(1, keep={name})
            self.pager.reserve(name, nbytes)
            self._entries[name] = _Entry(RESIDENT, self.clock(), self.pager.reserved_bytes(name))

    def remove(self, name: str) -> None:
        """Forget an adapter (after, or instead of, removing it from the model); frees its host block."""
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                return
            # a paged adapter's views keep their memory alive (unpinned) until the model drops them
            self.pager._free(name)

    def touch(self, name: str) -> None:
        """Record a use of the adapter (LRU order and idleness); no-op for unknown names."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                entry.last_used = self.clock()

    # -- residency ----------------------------------------------------------------------------
    def acquire(self, names: Sequence[str]) -> None:
        """Make the adapters of one pass resident (paging in, reloading unloaded ones) and touch them.

        Least-recently-used resident adapters that are not in ``names`` and not pinned by
        :meth:`use` are paged out to make room.

        Raises:
            PoolError: the pass needs more slots than the pool has, an adapter is not in the pool,
                or the slots are pinned by other passes.
            PoolFull: reloading an unloaded adapter does not fit in the host budget.
        """
        wanted = list(dict.fromkeys(names))
        with self._lock:
            if len(wanted) > self.slots:
                raise PoolError(
                    f"this pass needs {len(wanted)} adapters on the device but the pool has {self.slots} slots; "
                    f"split it into passes of at most {self.slots} adapters"
                )
            for name in wanted:
                if name not in self._entries:
                    raise PoolError(f"adapter {name!r} is not in the pool; add it first (pool.add)")
            keep = set(wanted)
            for name in wanted:
                entry = self._entries[name]
                if entry.state == RESIDENT:
                    continue
                if entry.state == UNLOADED:
                    self._reload(name, entry, keep)
                    continue
                self._make_room(1, keep=keep)
                moved = self.pager.page_in(name)
                entry.state = RESIDENT
                self.stats["page_ins"] += 1
                self.stats["bytes_in"] += moved
            now = self.clock()
            for name in wanted:
                self._entries[name].last_used = now

    @contextlib.contextmanager
    def use(self, names: Sequence[str]) -> Iterator[None]:
        """:meth:`acquire` the adapters and keep them resident (pinned) until the block ends.

        Example::

            with pool.use(["alice", "bob"]):
                forward_backward_multi(model, {"alice": rows_a, "bob": rows_b})
        """
        wanted = list(dict.fromkeys(names))
        with self._lock:
            self.acquire(wanted)
            for name in wanted:
                self._entries[name].pins += 1
        try:
            yield
        finally:
            with self._lock:
                now = self.clock()
                for name in wanted:
                    entry = self._entries.get(name)
                    if entry is not None:
                        entry.pins -= 1
                        entry.last_used = now

    def page_out(self, name: str) -> None:
        """Page an adapter out now (no-op unless resident and unpinned)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.state != RESIDENT or entry.pins:
                return
            self._page_out(name, entry)

    def _page_out(self, name: str, entry: _Entry) -> None:
        moved = self.pager.page_out(name)
        entry.reserved = max(entry.reserved, self.pager.reserved_bytes(name))
        entry.state = PAGED
        self.stats["page_outs"] += 1
        self.stats["bytes_out"] += moved

    def _make_room(self, count: int, keep: set[str]) -> None:
        """Page out least-recently-used idle resident adapters until ``count`` slots are free."""
        resident = [(e.last_used, n) for n, e in self._entries.items() if e.state == RESIDENT]
        need = len(resident) + count - self.slots
        if need <= 0:
            return
        victims = sorted((t, n) for t, n in resident if n not in keep and self._entries[n].pins == 0)
        if len(victims) < need:
            raise PoolError(
                f"no device slot free: all {self.slots} slots hold adapters of running passes; retry when they finish"
            )
        for _, name in victims[:need]:
            self._page_out(name, self._entries[name])

    def _reload(self, name: str, entry: _Entry, keep: set[str]) -> None:
        self.check_admit(nbytes=entry.reserved)
        self._make_room(1, keep=keep)
        if self.pager.is_spilled(name):
            self.stats["bytes_in"] += self.pager.unspill(name)
        elif self._load is not None:
            self._load(name)
        else:
            raise PoolError(f"adapter {name!r} was unloaded and this pool has no load callback")
        self.pager.reserve(name, entry.reserved)
        entry.state = RESIDENT
        entry.reserved = self.pager.reserved_bytes(name)
        self.stats["reloads"] += 1

    # -- idleness ---------------------------------------------------------------------------
    def idle(self, now: float | None = None) -> list[str]:
        """Adapters (not unloaded, not pinned) unused for longer than ``idle_ttl_s``, oldest first."""
        if not self.idle_ttl_s:
            return []
        with self._lock:
            now = self.clock() if now is None else now
            old = [
                (e.last_used, n)
                for n, e in self._entries.items()
                if e.state != UNLOADED and e.pins == 0 and now - e.last_used > self.idle_ttl_s
            ]
            return [n for _, n in sorted(old)]

    @property
    def can_unload(self) -> bool:
        """Whether the pool can unload adapters (save/load callbacks, or a spill directory)."""
        return self._save is not None or self.spill_dir is not None

    def unload(self, name: str) -> bool:
        """Unload one adapter now (idle or not, unless pinned by :meth:`use`): through ``save`` and
        ``drop``, or spilled to ``spill_dir``; its host block is freed and :meth:`acquire` reloads it.

        Returns:
            True when unloaded; False when it is pinned, already unloaded or not in the pool.

        Raises:
            PoolError: the pool has neither callbacks nor a spill directory.
            Exception: whatever ``save``/``drop`` raised (the adapter then stays loaded).
        """
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.state == UNLOADED or entry.pins:
                return False
            if not self.can_unload:
                raise PoolError("this pool has no save callback nor spill directory; adapters stay loaded")
            if self._save is None:
                assert self.spill_dir is not None
                self.stats["bytes_out"] += self.pager.spill(name, self.spill_dir / f"{_file_name(name)}.bin")
            else:
                if entry.state == PAGED:
                    self.pager.materialize(name)  # its own host tensors: readable and savable
                try:
                    self._save(name)
                    self._drop(name)
                except Exception:
                    if entry.state == PAGED:
                        self.pager.page_out(name)  # back into its block from the materialized tensors
                    raise
                self.pager._free(name)
            entry.state = UNLOADED
            self.stats["unloads"] += 1
            return True

    def reap_idle(self, now: float | None = None) -> list[str]:
        """Unload the adapters idle past ``idle_ttl_s`` (:meth:`unload`); returns their names.

        They stay in the pool as unloaded and :meth:`acquire` reloads them. An adapter whose
        ``save`` raises stays loaded (the first error propagates after the others were tried).

        Raises:
            PoolError: adapters are idle but the pool cannot unload (no callbacks, no spill directory).
        """
        with self._lock:
            names = self.idle(now)
            if names and not self.can_unload:
                raise PoolError("reap_idle: this pool has no save callback nor spill directory; idle adapters stay")
            unloaded: list[str] = []
            failure: BaseException | None = None
            for name in names:
                try:
                    if self.unload(name):
                        unloaded.append(name)
                except Exception as exc:  # noqa: BLE001 - keep it loaded, report after the others
                    failure = failure or exc
            if failure is not None:
                raise failure
            return unloaded


def _file_name(name: str) -> str:
    """A file-name-safe spelling of an adapter name (letters, digits, ``_``, ``-`` kept)."""
    safe = "".join(c if c.isalnum() or c in "_-" else f"%{ord(c):02x}" for c in name)
    return safe or "_"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
