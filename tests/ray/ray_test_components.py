"""Small real components used by the launcher tests (imported by the Ray actors by module name).

``TinyRegressor`` is a real torch model trained with DDP over gloo when it runs on several
ranks, initializing ``torch.distributed`` from the torchrun environment itself, as code
written for torchrun does.
"""

from __future__ import annotations

import os
import time
from typing import Any

import twinkle
from twinkle.component import Component
from twinkle.dispatch import remote


class TinyRegressor(Component):
    """A linear regressor; ``forward_backward`` takes a list of ``(x, y)`` rows."""

    def __init__(self, in_features: int = 4, lr: float = 0.1, remote_group: str | None = None, device_mesh=None):
        import torch
        import torch.distributed as dist

        twinkle.get_runtime().seed_torch()
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")
        self.model = torch.nn.Linear(in_features, 1)
        self.module = self.model
        if self.world_size > 1:
            self.module = torch.nn.parallel.DistributedDataParallel(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)

    @remote(dispatch="slice_dp", collect="mean")
    def forward_backward(self, inputs: list[tuple[list[float], float]]) -> float:
        import torch

        x = torch.tensor([row[0] for row in inputs], dtype=torch.float32)
        y = torch.tensor([[row[1]] for row in inputs], dtype=torch.float32)
        loss = torch.nn.functional.mse_loss(self.module(x), y)
        loss.backward()
        return float(loss.detach())

    @remote(dispatch="all", collect="none")
    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()

    @remote(dispatch="all", collect="all")
    def weights(self) -> list[float]:
        return [float(v) for p in self.model.parameters() for v in p.detach().flatten()]

    @remote(dispatch="slice_dp", collect="flatten")
    def echo(self, inputs: list[Any]) -> list[Any]:
        return list(inputs)

    @remote(dispatch="all", collect="all")
    def environment(self) -> dict[str, Any]:
        import torch.distributed as dist

        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        env = {k: os.environ.get(k) for k in keys}
        env["dist_world_size"] = dist.get_world_size() if dist.is_initialized() else 1
        env["dist_backend"] = dist.get_backend() if dist.is_initialized() else None
        env["pid"] = os.getpid()
        return env

    @remote(dispatch="all", collect="all")
    def all_reduce_rank(self) -> float:
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(os.environ["RANK"]) + 1.0])
        dist.all_reduce(t)
        return float(t)

    @remote(dispatch="all", collect="first")
    def fail(self, on_rank: int | None = None, how: str = "raise") -> str:
        """Fail on ``on_rank`` (every rank when None); the other ranks wait in a barrier."""
        import torch.distributed as dist

        rank = int(os.environ.get("RANK", "0"))
        if on_rank is None or rank == on_rank:
            if how == "exit":
                os._exit(3)
            raise ValueError(f"bad batch on rank {rank}")
        dist.barrier()
        return "ok"

    def weight_count(self) -> int:
        """Unmarked public method: runs on every rank, rank 0's result."""
        return sum(p.numel() for p in self.model.parameters())


class TinyLoader(Component):
    """Batches of ``batch_size`` rows of a list; an iterator that lives where the component lives."""

    def __init__(self, rows: list[Any], batch_size: int, remote_group: str | None = None, device_mesh=None):
        self.rows = list(rows)
        self.batch_size = batch_size
        self.pid = os.getpid()

    @remote(dispatch="first", iterator=True)
    def __iter__(self):
        for start in range(0, len(self.rows), self.batch_size):
            yield self.rows[start : start + self.batch_size]

    @remote(dispatch="first")
    def __len__(self) -> int:
        return (len(self.rows) + self.batch_size - 1) // self.batch_size

    @remote(dispatch="first")
    def where(self) -> int:
        return os.getpid()


class Sleeper(Component):
    """A torch-free component whose method takes as long as asked."""

    def __init__(self, remote_group: str | None = None, device_mesh=None):
        self.started = time.time()

    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def fail(self, on_rank: int, how: str = "raise", others_wait_s: float = 120.0) -> str:
        """Fail on ``on_rank``; the other ranks stay busy, as if blocked in a collective."""
        rank = int(os.environ.get("RANK", "0"))
        if rank == on_rank:
            if how == "exit":
                os._exit(3)
            raise ValueError(f"bad batch on rank {rank}")
        time.sleep(others_wait_s)
        return "ok"


class BrokenInit(Component):
    """Its constructor raises, to test that construction errors reach the driver."""

    def __init__(self, remote_group: str | None = None, device_mesh=None):
        raise ValueError("BrokenInit cannot be built: the config is missing 'hidden_size'")


def make_rows(n: int, in_features: int = 4, seed: int = 0) -> list[tuple[list[float], float]]:
    """``n`` deterministic regression rows ``(x, y)``."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        x = [rng.uniform(-1, 1) for _ in range(in_features)]
        rows.append((x, sum((i + 1) * v for i, v in enumerate(x)) + 0.5))
    return rows


class DeviceProbe(Component):
    """Reports which device each rank uses and all-reduces on it (the GPU/nccl path)."""

    def __init__(self, remote_group: str | None = None, device_mesh=None):
        import torch

        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(self.device)

    @remote(dispatch="all", collect="all")
    def probe(self) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        t = torch.ones(1, device=self.device) * (int(os.environ["RANK"]) + 1)
        dist.all_reduce(t)
        return {
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "local_rank": os.environ.get("LOCAL_RANK"),
            "device": str(getattr(torch.cuda.get_device_properties(self.device), "uuid", self.device)),
            "sum": float(t.item()),
            "backend": str(dist.get_backend()),
        }
