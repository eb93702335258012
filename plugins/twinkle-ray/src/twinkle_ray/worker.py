"""The Ray actor that hosts one rank of a component.

The launcher starts one :class:`RankWorker` actor per rank of a component's DeviceMesh,
sets the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``...) in it, initializes a *local* Twinkle runtime there (same groups, the
component's mesh, the same seed) and constructs the component. From then on the driver's
proxy calls :meth:`RankWorker.call` (and the ``iter_*`` methods for iterators).

This module imports no heavy library at import time: Ray loads it in every actor process.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Iterator

from twinkle.dispatch import collect_results, slice_for_data_rank


@dataclass(frozen=True)
class RemoteArgument:
    """An argument whose value lives in Ray's object store (a :class:`~twinkle_ray.RemoteResult`).

    The receiving actor fetches ``parts`` straight from the object store (no round trip
    through the driver), combines them with ``collect`` and, for ``slice_dp`` dispatch,
    keeps its data rank's slice.
    """

    parts: tuple[Any, ...]
    collect: str
    data_slice: tuple[int, int] | None = None

    def resolve(self) -> Any:
        import ray

        values = ray.get(list(self.parts)) if self.parts else []
        value = combine_parts(self.collect, values)
        if self.data_slice is not None:
            value = slice_for_data_rank(value, *self.data_slice)
        return value


def combine_parts(collect: str, parts: list[Any]) -> Any:
    """Combine the results of the ranks a collect mode needs (already chosen, in order)."""
    if collect == "none":
        return None
    return collect_results(collect, parts, leaders=list(range(len(parts))), last_pp=[0])


def _resolve(value: Any) -> Any:
    return value.resolve() if isinstance(value, RemoteArgument) else value


def resolve_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Replace top-level :class:`RemoteArgument` placeholders by their values."""
    return tuple(_resolve(a) for a in args), {k: _resolve(v) for k, v in kwargs.items()}


class RankWorker:
    """Hosts rank ``rank`` of component ``label`` in a Ray actor.

    Args:
        label: the component's display name (``"TransformersModel#1"``), for messages.
        rank: this actor's rank in the component's DeviceMesh.
    """

    def __init__(self, label: str, rank: int) -> None:
        self.label = label
        self.rank = rank
        self.component: Any = None
        self._iterators: dict[int, Iterator[Any]] = {}
        self._next_iterator_id = 0

    # -- placement ---------------------------------------------------------------
    def placement(self) -> dict[str, Any]:
        """Where this actor runs: node id and address, process id, accelerator ids Ray assigned."""
        import ray

        context = ray.get_runtime_context()
        accelerators = context.get_accelerator_ids()
        return {
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in accelerators.get("GPU", [])],
            "npu_ids": [str(g) for g in accelerators.get("NPU", [])],
        }

    def free_port(self) -> int:
        """A TCP port free on this node right now (rank 0 uses it as MASTER_PORT)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            return int(sock.getsockname()[1])

    # -- construction ------------------------------------------------------------
    def build(
        self,
        env: dict[str, str],
        cls: type,
        packed: tuple[tuple[Any, ...], dict[str, Any]],
        runtime_spec: dict[str, Any],
        dist_backend: str | None,
        dist_timeout_s: float,
    ) -> dict[str, Any]:
        """Set the torchrun environment, start a local runtime and construct the component.

        If the component did not initialize ``torch.distributed`` itself and the mesh has
        more than one rank, the default process group is initialized here (``dist_backend``).

        Returns:
            ``{"pid": ..., "process_group": bool}``.
        """
        os.environ.update(env)
        import twinkle

        twinkle.initialize(
            mode="local",
            groups=runtime_spec["groups"],
            global_device_mesh=runtime_spec["mesh"],
            nproc_per_node=runtime_spec.get("nproc_per_node"),
            seed=runtime_spec.get("seed"),
        )
        args, kwargs = resolve_arguments(*packed)
        self.component = cls(*args, **kwargs)
        process_group = False
        if dist_backend and int(env.get("WORLD_SIZE", "1")) > 1:
            import datetime

            import torch.distributed as dist

            if dist.is_available() and not dist.is_initialized():
                dist.init_process_group(backend=dist_backend, timeout=datetime.timedelta(seconds=dist_timeout_s))
            process_group = dist.is_available() and dist.is_initialized()
        return {"pid": os.getpid(), "process_group": process_group}

    # -- calls -------------------------------------------------------------------
    def call(self, name: str, packed: tuple[tuple[Any, ...], dict[str, Any]], want_result: bool) -> Any:
        """Run ``component.name(*args, **kwargs)``; return the result only if the driver needs it."""
        args, kwargs = resolve_arguments(*packed)
        result = getattr(self.component, name)(*args, **kwargs)
        return result if want_result else None

    def get_attribute(self, name: str) -> Any:
        """The value of a non-method attribute of the component."""
        return getattr(self.component, name)

    def iter_start(self, name: str, packed: tuple[tuple[Any, ...], dict[str, Any]]) -> int:
        """Call iterator method ``name`` (``__iter__`` included) and keep the iterator; returns its id."""
        args, kwargs = resolve_arguments(*packed)
        iterator = iter(getattr(self.component, name)(*args, **kwargs))
        self._next_iterator_id += 1
        self._iterators[self._next_iterator_id] = iterator
        return self._next_iterator_id

    def iter_next(self, iterator_id: int, want_result: bool) -> tuple[bool, Any]:
        """``(done, item)`` for the next item of an iterator (called with ``num_returns=2``)."""
        iterator = self._iterators.get(iterator_id)
        if iterator is None:
            return True, None
        try:
            item = next(iterator)
        except StopIteration:
            self._iterators.pop(iterator_id, None)
            return True, None
        return False, (item if want_result else None)

    def iter_close(self, iterator_id: int) -> None:
        """Forget an iterator (the driver stopped early or finished)."""
        iterator = self._iterators.pop(iterator_id, None)
        close = getattr(iterator, "close", None)
        if close is not None:
            close()

    def ping(self) -> int:
        """Health check: this actor's process id."""
        return os.getpid()

    def teardown(self) -> None:
        """Release the process group (before the actor is killed)."""
        self._iterators.clear()
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
