"""Distributed set-up and reductions of model backends: device, DeviceMesh, DDP-style all-reduce, FSDP2.

One job: everything a backend does with ``torch.distributed``. :func:`setup_torchrun`
picks the device and checks the mesh against the torchrun world; :func:`all_reduce_floats`
and :func:`all_reduce_grads` are the reductions the token-normalized gradient accumulation
needs (over the default group, or a backend's data-parallel group); :func:`apply_fsdp`
shards a transformers model with FSDP2 ``fully_shard`` (each decoder layer, then the
root); :func:`broadcast_module` makes every rank start from rank 0's weights.

No torch import at module import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass
class Placement:
    """Where a backend runs: its device, its DeviceMesh, this process's rank and the world size."""

    device: Any
    device_mesh: Any
    rank: int
    world_size: int


def setup_torchrun(
    device_mesh: Any, device: Any, runtime: Any, *, owner: str, parallel_dims: Sequence[str] = ("dp", "fsdp")
) -> Placement:
    """The device and mesh of a backend launched by torchrun (or as one process); starts the process group.

    Args:
        device_mesh: the DeviceMesh asked for, or ``None`` (the runtime's global mesh, else all
            torchrun ranks as ``dp``).
        device: ``'cpu'``/``'cuda'``/``'cuda:1'``, or ``None`` (this rank's GPU if any, else CPU).
        runtime: the current runtime, or ``None``.
        owner: the backend's class name, for messages.
        parallel_dims: the mesh dimensions the backend supports; others must have size 1.

    Raises:
        MeshError: the mesh's size is not the number of processes, or it uses an unsupported dimension.
    """
    import torch
    import torch.distributed as dist

    from twinkle.launcher.local import torchrun_world
    from twinkle.mesh import DeviceMesh, MeshError

    rank, local_rank, world = torchrun_world()
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    mesh = device_mesh if device_mesh is not None else (runtime.global_device_mesh if runtime else None)
    if mesh is None:
        mesh = DeviceMesh.from_sizes(dp_size=world)
    if mesh.world_size != world:
        raise MeshError(
            f"{owner}: device_mesh {mesh.describe()} needs {mesh.world_size} processes but this run has "
            f"{world}; launch with `torchrun --nproc_per_node {mesh.world_size}`"
        )
    unsupported = [d for d in ("tp", "pp", "cp", "sp") if d not in parallel_dims and mesh.size(d) > 1]
    if unsupported:
        raise MeshError(
            f"{owner} supports dp and fsdp meshes; {mesh.describe()} uses {', '.join(unsupported)}. "
            f"Use MegatronModel (pip install twinkle-megatron) for tensor/pipeline/context parallelism."
        )
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Placement(device=device, device_mesh=mesh, rank=rank, world_size=world)


def all_reduce_floats(values: list[float], device: Any, group: Any = None) -> list[float]:
    """The element-wise sum of ``values`` over the ranks of ``group`` (default: all), in float64."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def all_reduce_grads(grads: list[Any], group: Any = None) -> None:
    """Sum gradients over the ranks of ``group`` in place, as one flat buffer (one collective)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def broadcast_module(module: Any) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    import torch.distributed as dist

    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def barrier(world_size: int) -> None:
    """Wait for every rank (a no-op in one process)."""
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def apply_fsdp(model: Any, base: Any, device_mesh: Any, device_type: str) -> None:
    """Shard ``model`` with FSDP2: each decoder layer of ``base`` (the transformers model), then the root.

    Raises:
        ValueError: no decoder layers found.
    """
    from torch.distributed.fsdp import fully_shard

    from twinkle.patch.model_walk import decoder_layers

    torch_mesh = device_mesh.to_torch(device_type)
    layers = decoder_layers(base)
    if not layers:
        raise ValueError(f"FSDP: could not find the decoder layers of {type(base).__name__}")
    for layer in layers:
        fully_shard(layer, mesh=torch_mesh)
    fully_shard(model, mesh=torch_mesh)
