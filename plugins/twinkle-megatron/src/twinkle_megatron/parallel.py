"""Twinkle's DeviceMesh -> megatron-core's parallel state (``initialize_model_parallel``).

Mapping: ``tp`` -> tensor model parallel, ``ep`` -> expert model parallel, and
``dp x fsdp`` -> megatron's data parallel (megatron-core replicates or shards the
optimizer over it; Twinkle's FSDP2 dimension has no separate meaning here). ``pp``
(pipeline) and ``cp`` (context) map onto megatron's sizes of the same name but are refused
for now with a clear error: MegatronModel does not drive pipeline schedules yet, and
context parallel attention needs Transformer Engine. ``sp`` (Ulysses-style sequence
parallel) has no megatron-core counterpart and is refused; megatron's own sequence
parallelism rides on ``tp``.

The default process group is created when missing: from the torchrun environment
(``WORLD_SIZE``/``RANK``/``MASTER_ADDR``) when present, else a single-process group on a
free loopback port. gloo on CPU, nccl on CUDA.

Example::

    state = init_megatron_parallel(DeviceMesh.from_sizes(tp_size=2), device_type="cpu")
    state.tp, state.dp  # (2, 1) under `torchrun --nproc_per_node 2`
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from twinkle.mesh import DeviceMesh, MeshError


@dataclass(frozen=True)
class ParallelSizes:
    """The megatron parallel sizes in force, and this process's rank."""

    tp: int
    pp: int
    cp: int
    ep: int
    dp: int
    rank: int
    world_size: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(device_type: str) -> None:
    """Create torch.distributed's default group if there is none (torchrun env or one process)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        return
    if device_type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)


def init_megatron_parallel(mesh: DeviceMesh | None, device_type: str) -> ParallelSizes:
    """Initialize (or re-initialize) megatron's parallel state for ``mesh``.

    Args:
        mesh: the component's DeviceMesh; ``None`` means data parallel over every rank.
        device_type: ``"cpu"`` or ``"cuda"``.

    Returns:
        The :class:`ParallelSizes` in force.

    Raises:
        MeshError: the mesh does not fit the number of processes, or uses ``sp``, ``pp`` or
            ``cp`` (see the module docstring).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ensure_process_group(device_type)
    world = dist.get_world_size()
    mesh = mesh or DeviceMesh.from_sizes(world_size=world)
    if mesh.sp > 1:
        raise MeshError(
            f"MegatronModel: {mesh.describe()} sets sp_size={mesh.sp}; megatron-core has no Ulysses sequence "
            f"parallelism. Use tp_size (megatron's sequence parallelism follows tensor parallelism)"
        )
    if mesh.pp > 1:
        raise MeshError(
            f"MegatronModel: pp_size={mesh.pp}; pipeline parallelism is not available in MegatronModel yet (and "
            f"megatron-core's pipeline schedules need CUDA). Use pp_size=1 with tp_size/ep_size/dp_size"
        )
    if mesh.cp > 1:
        raise MeshError(
            f"MegatronModel: cp_size={mesh.cp}; context parallelism needs Transformer Engine's attention, which "
            f"MegatronModel's local layer spec does not use. Use cp_size=1"
        )
    if mesh.world_size != world:
        raise MeshError(
            f"MegatronModel: {mesh.describe()} needs {mesh.world_size} processes but torch.distributed has {world}; "
            f"launch with `torchrun --nproc_per_node {mesh.world_size}` or change the mesh"
        )
    sizes = ParallelSizes(
        tp=mesh.tp,
        pp=mesh.pp,
        cp=mesh.cp,
        ep=mesh.ep,
        dp=mesh.dp * mesh.fsdp,
        rank=dist.get_rank(),
        world_size=world,
    )
    if ps.model_parallel_is_initialized():
        current = (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_context_parallel_world_size(),
            ps.get_expert_model_parallel_world_size(),
        )
        if current == (sizes.tp, sizes.pp, sizes.cp, sizes.ep):
            return sizes
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tp,
        pipeline_model_parallel_size=sizes.pp,
        context_parallel_size=sizes.cp,
        expert_model_parallel_size=sizes.ep,
    )
    return sizes


def tp_group() -> Any:
    """megatron's tensor-parallel process group."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()
