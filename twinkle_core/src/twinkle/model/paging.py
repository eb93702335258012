"""Adapter paging: where one adapter's tensors live, on the device or in a host block.

One job: moving an adapter's tensors. An adapter of a
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

The policy over the pager for a multi-tenant service (slots, LRU page-out, a host-memory
budget, admission, idle unloading) is :class:`twinkle.model.adapter_pool.AdapterPool`; its names
(``AdapterPool``, ``PoolFull``, ``estimate_lora_bytes``, ``lora_target_shapes``) are also
importable from here, the path documented before the two jobs were split.

Not supported: FSDP-sharded adapters (DTensor parameters); paging raises.

Example::

    pager = AdapterPager(model)
    pager.reserve("alice", nbytes)          # the host block, allocated (pinned) once
    pager.page_out("alice")                 # device memory freed, tensors now views of the block
    pager.page_in("alice")                  # back on the device, bit for bit
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "AdapterPager",
    "HostBlock",
    "PoolError",
    "aligned_bytes",
]

#: Alignment of each dtype's section in a host block (bytes).
_ALIGN = 64

#: Names that moved to :mod:`twinkle.model.adapter_pool`, still importable from here.
_POOL_NAMES = ("AdapterPool", "PoolFull", "estimate_lora_bytes", "lora_target_shapes", "DEFAULT_COPIES")


def __getattr__(name: str) -> Any:
    """The pool's names, resolved lazily (``twinkle.model.adapter_pool`` imports this module)."""
    if name in _POOL_NAMES:
        from twinkle.model import adapter_pool

        return getattr(adapter_pool, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class PoolError(RuntimeError):
    """A request the pager or the adapter pool cannot serve as asked (e.g. a pass needing more slots than exist)."""


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
        nbytes = aligned_bytes(nbytes)
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
        self.discard(name)

    def discard(self, name: str) -> None:
        """Forget the adapter and free its host block (and spill file) whatever its state.

        A paged adapter's tensors are views of the block, which keep its memory alive (unpinned)
        until the model drops them; :meth:`release` refuses that case, the pool's ``remove`` wants it.
        """
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


def aligned_bytes(n: int) -> int:
    """``n`` bytes rounded up to the alignment of a host block's sections (64)."""
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
        offset = aligned_bytes(offset + numel * _itemsize(dtype))
    return sections, offset
