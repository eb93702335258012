"""DeviceGroup (which resources a component runs on) and DeviceMesh (how it is parallel).

A :class:`DeviceGroup` names a set of ranks (processes/devices) of one device type. A
:class:`DeviceMesh` arranges a component's ranks on named dimensions; its sizes multiply to
the number of ranks. Rank layout follows Megatron: ``tp`` varies fastest, then ``sp``,
``cp``, ``fsdp``, ``dp`` and ``pp`` slowest. ``ep`` (expert parallel) does not multiply the
world size: expert groups are carved out of the ``dp x fsdp x cp`` ranks, so ``ep_size`` must
divide that product.

Data parallel ranks are the ``dp x fsdp`` coordinates: ranks that differ only in
``tp``/``sp``/``cp``/``pp`` consume the same slice of a batch.

Example::

    mesh = DeviceMesh.from_sizes(fsdp_size=4, dp_size=2)
    mesh.world_size        # 8
    mesh.data_world_size   # 8
    mesh.data_rank(5)      # 5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

#: Mesh dimensions, slowest-varying first.
MESH_DIMS: tuple[str, ...] = ("pp", "dp", "fsdp", "cp", "sp", "tp")
DATA_DIMS: tuple[str, ...] = ("dp", "fsdp")
DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "npu")


class MeshError(ValueError):
    """A DeviceGroup or DeviceMesh that cannot work, with the reason and the fix."""


@dataclass(frozen=True)
class DeviceGroup:
    """A named set of ranks of one device type that components can be placed on.

    Args:
        name: how components refer to it (``remote_group='default'``).
        ranks: a count (``8`` means ranks 0..7) or an explicit list of device indices.
        device_type: ``'cpu'``, ``'cuda'`` or ``'npu'``.
        gpus_per_worker: devices each worker process holds (1 for most trainers).
        options: launcher-specific settings (e.g. Ray resources), passed through.

    Example::

        DeviceGroup(name='default', ranks=8, device_type='cuda')
    """

    name: str
    ranks: int | Sequence[int] = 1
    device_type: str = "cuda"
    gpus_per_worker: int = 1
    options: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise MeshError(f"DeviceGroup name must be a non-empty string, got {self.name!r}")
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, (int, list, tuple, range)):
            raise MeshError(
                f"DeviceGroup {self.name!r}: ranks must be a count or a list of indices, got {self.ranks!r}"
            )
        if isinstance(self.ranks, int):
            if self.ranks < 1:
                raise MeshError(f"DeviceGroup {self.name!r}: ranks={self.ranks}; it needs at least one rank")
            object.__setattr__(self, "ranks", tuple(range(self.ranks)))
        else:
            ranks = tuple(self.ranks)
            if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks):
                raise MeshError(f"DeviceGroup {self.name!r}: ranks must be non-negative integers, got {list(ranks)}")
            if len(set(ranks)) != len(ranks):
                raise MeshError(f"DeviceGroup {self.name!r}: ranks {list(ranks)} repeat an index")
            object.__setattr__(self, "ranks", ranks)
        if self.device_type not in DEVICE_TYPES:
            raise MeshError(
                f"DeviceGroup {self.name!r}: device_type={self.device_type!r} is not one of {', '.join(DEVICE_TYPES)}"
            )
        if self.gpus_per_worker < 1:
            raise MeshError(f"DeviceGroup {self.name!r}: gpus_per_worker must be >= 1, got {self.gpus_per_worker}")

    @property
    def world_size(self) -> int:
        return len(self.ranks)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DeviceMesh:
    """Sizes of each parallel dimension; see the module docstring for the layout.

    Build it with :meth:`from_sizes`.
    """

    pp: int = 1
    dp: int = 1
    fsdp: int = 1
    cp: int = 1
    sp: int = 1
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for dim in (*MESH_DIMS, "ep"):
            value = getattr(self, dim)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MeshError(f"DeviceMesh {dim}_size must be a positive integer, got {value!r}")
        carved = self.dp * self.fsdp * self.cp
        if carved % self.ep:
            raise MeshError(
                f"DeviceMesh ep_size={self.ep} must divide dp_size*fsdp_size*cp_size={carved}: expert-parallel "
                f"groups are carved out of the data-parallel ranks"
            )

    @classmethod
    def from_sizes(
        cls,
        *,
        dp_size: int | None = None,
        fsdp_size: int = 1,
        tp_size: int = 1,
        pp_size: int = 1,
        cp_size: int = 1,
        ep_size: int = 1,
        sp_size: int = 1,
        world_size: int | None = None,
    ) -> DeviceMesh:
        """A mesh from per-dimension sizes.

        Args:
            dp_size: data-parallel replicas (DDP). ``None``: whatever ``world_size`` leaves,
                or 1.
            fsdp_size: fully sharded data-parallel ranks (FSDP2).
            tp_size, pp_size, cp_size, sp_size: tensor, pipeline, context and sequence
                parallel sizes.
            ep_size: expert-parallel size, carved out of ``dp*fsdp*cp``.
            world_size: if given, the sizes must multiply to it.

        Raises:
            MeshError: a size is not a positive integer, the product does not match
                ``world_size``, or ``ep_size`` does not divide the data ranks.

        Example::

            DeviceMesh.from_sizes(pp_size=2, tp_size=2, dp_size=2).world_size  # 8
        """
        others = fsdp_size * tp_size * pp_size * cp_size * sp_size
        for label, value in (
            ("fsdp_size", fsdp_size),
            ("tp_size", tp_size),
            ("pp_size", pp_size),
            ("cp_size", cp_size),
            ("sp_size", sp_size),
            ("ep_size", ep_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MeshError(f"DeviceMesh.from_sizes: {label} must be a positive integer, got {value!r}")
        if dp_size is None:
            if world_size is None:
                dp_size = 1
            elif world_size % others:
                raise MeshError(
                    f"DeviceMesh.from_sizes: world_size={world_size} is not divisible by "
                    f"fsdp*tp*pp*cp*sp={others}; pick sizes whose product divides the number of ranks"
                )
            else:
                dp_size = world_size // others
        mesh = cls(pp=pp_size, dp=dp_size, fsdp=fsdp_size, cp=cp_size, sp=sp_size, tp=tp_size, ep=ep_size)
        if world_size is not None and mesh.world_size != world_size:
            raise MeshError(
                f"DeviceMesh.from_sizes: {mesh.describe()} uses {mesh.world_size} ranks but world_size={world_size}; "
                f"the sizes must multiply to the number of ranks"
            )
        return mesh

    # -- shape -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, dim) for dim in MESH_DIMS)

    @property
    def world_size(self) -> int:
        return math.prod(self.shape)

    @property
    def data_world_size(self) -> int:
        """How many distinct slices a global batch is split into."""
        return self.dp * self.fsdp

    def size(self, dim: str) -> int:
        if dim not in (*MESH_DIMS, "ep"):
            raise MeshError(f"unknown mesh dimension {dim!r}; dimensions: {', '.join((*MESH_DIMS, 'ep'))}")
        return getattr(self, dim)

    def describe(self) -> str:
        parts = [f"{dim}={getattr(self, dim)}" for dim in (*MESH_DIMS, "ep") if getattr(self, dim) > 1]
        return "DeviceMesh(" + (", ".join(parts) or "single rank") + ")"

    # -- rank queries ------------------------------------------------------------
    def _check_rank(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise MeshError(f"rank {rank} is outside {self.describe()} with {self.world_size} ranks")
        return rank

    def coordinates(self, rank: int) -> dict[str, int]:
        """Per-dimension index of ``rank``: ``{'pp': 0, 'dp': 1, ...}``."""
        rest = self._check_rank(rank)
        coords: dict[str, int] = {}
        for dim in reversed(MESH_DIMS):
            size = getattr(self, dim)
            coords[dim] = rest % size
            rest //= size
        return {dim: coords[dim] for dim in MESH_DIMS}

    def rank_of(self, **coords: int) -> int:
        """The rank at the given coordinates (missing dimensions are 0)."""
        unknown = set(coords) - set(MESH_DIMS)
        if unknown:
            raise MeshError(f"unknown mesh dimension(s) {sorted(unknown)}; dimensions: {', '.join(MESH_DIMS)}")
        rank = 0
        for dim in MESH_DIMS:
            size = getattr(self, dim)
            index = coords.get(dim, 0)
            if not 0 <= index < size:
                raise MeshError(f"{dim} index {index} is outside size {size}")
            rank = rank * size + index
        return rank

    def data_rank(self, rank: int) -> int:
        """Which slice of the batch ``rank`` consumes (0..data_world_size-1)."""
        c = self.coordinates(rank)
        return c["dp"] * self.fsdp + c["fsdp"]

    def group_ranks(self, dim: str, rank: int) -> list[int]:
        """The ranks that differ from ``rank`` only along ``dim`` (its process group)."""
        c = self.coordinates(rank)
        return [self.rank_of(**{**c, dim: i}) for i in range(self.size(dim))]

    def is_last_pp_stage(self, rank: int) -> bool:
        return self.coordinates(rank)["pp"] == self.pp - 1

    def is_data_leader(self, rank: int) -> bool:
        """True for the one rank per data slice that reports results (tp=sp=cp=0, last pp stage)."""
        c = self.coordinates(rank)
        return c["tp"] == 0 and c["sp"] == 0 and c["cp"] == 0 and c["pp"] == self.pp - 1

    # -- torch -------------------------------------------------------------------
    def to_torch(self, device_type: str = "cpu") -> Any:
        """A ``torch.distributed.device_mesh.DeviceMesh`` over the dimensions larger than 1.

        Needs an initialized default process group whose world size equals ours.
        """
        from torch.distributed.device_mesh import init_device_mesh

        dims = [dim for dim in MESH_DIMS if getattr(self, dim) > 1] or ["dp"]
        shape = tuple(getattr(self, dim) for dim in dims)
        return init_device_mesh(device_type, shape, mesh_dim_names=tuple(dims))
