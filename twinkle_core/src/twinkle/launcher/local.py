"""Local mode: one process (``python train.py``) or one process per rank (``torchrun``)."""

from __future__ import annotations

import os
from typing import Any

from twinkle.launcher.base import Launcher
from twinkle.mesh import MeshError


def torchrun_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment, or (0, 0, 1)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


class LocalLauncher(Launcher):
    """Components are built in this process; the DeviceMesh maps onto torchrun's ranks.

    Options: none. ``remote_group`` must name a declared group (or be omitted).
    """

    mode = "local"

    def start(self) -> None:
        _, _, world = torchrun_world()
        mesh = self.runtime.global_device_mesh
        if mesh is not None and mesh.world_size != world:
            hint = (
                f"launch with `torchrun --nproc_per_node {mesh.world_size} train.py`"
                if world == 1
                else f"use a mesh of {world} ranks"
            )
            raise MeshError(
                f"global_device_mesh {mesh.describe()} needs {mesh.world_size} processes but this local run has "
                f"{world}; {hint}, or use mode='ray'."
            )

    def create(self, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        group = kwargs.get("remote_group")
        if group is not None and self.runtime.groups and group not in self.runtime.groups:
            raise MeshError(
                f"{cls.__name__}(remote_group={group!r}): no DeviceGroup has that name; "
                f"declared groups: {', '.join(self.runtime.groups)}"
            )
        return None
