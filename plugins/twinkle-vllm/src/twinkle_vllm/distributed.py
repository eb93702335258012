"""DistributedCheckpointEngine: weight sync from a trainer process to sampler processes over torch.distributed.

The trainer and the sampler(s) live in different processes (different Ray actors, or a
training job and a rollout server). They meet on a private process group of their own,
``1 + number of sampler ranks`` members, built from a TCP store and independent of any
process group the trainer already uses (torchrun's, FSDP's):

* rank 0 is the trainer's first rank (the sender); ranks ``1..world_size-1`` are samplers;
* the sender broadcasts a manifest (names, dtypes, shapes, bucket plan, LoRA config), then
  the tensors packed into byte buckets of at most ``bucket_bytes`` each (few large messages
  instead of one per tensor);
* each receiver unpacks a bucket into views and streams them into
  :meth:`~twinkle.sampler.base.Sampler.update_weights` while the next bucket is on the wire;
* finally every receiver reports success or failure in one all-reduce, so the sender's
  ``sync`` raises when a sampler could not load the weights instead of training on.

Both sides call the same method with what they hold locally::

    # trainer process                               # sampler process
    engine = DistributedCheckpointEngine(            engine = DistributedCheckpointEngine(
        "tcp://10.0.0.1:29612", rank=0,                  "tcp://10.0.0.1:29612", rank=1,
        world_size=2)                                    world_size=2)
    engine.sync(model, None, adapter_name="default") engine.sync(None, sampler)

The backend is ``gloo`` on CPU and ``nccl`` when CUDA is available (buckets then travel on
the GPU).
"""

from __future__ import annotations

import pickle
import time
from datetime import timedelta
from typing import Any, Iterator
from urllib.parse import urlparse

from twinkle.checkpoint_engine.base import CheckpointEngine, model_weights


class CheckpointSyncError(RuntimeError):
    """A sampler rank failed to load the weights the trainer sent (its error is in the sampler's log)."""


class DistributedCheckpointEngine(CheckpointEngine):
    """Bucketed broadcast of full weights or LoRA tensors from trainer rank 0 to sampler ranks.

    Args:
        init_method: ``tcp://host:port`` where rank 0 listens (a free port on the trainer's host).
        rank: 0 on the trainer, ``1..world_size-1`` on the samplers.
        world_size: 1 + the number of sampler ranks.
        bucket_bytes: largest bucket sent in one message (default 64 MiB).
        backend: ``"gloo"`` or ``"nccl"``; default: ``nccl`` when CUDA is available, else ``gloo``.
        timeout_s: how long to wait for the other side (connecting and each message).
        trainer_rank: this trainer process's rank in its own training job; ranks other than 0
            take part in gathering the state dict (FSDP) but send nothing. Default: the rank of
            torch.distributed's default group when it is initialized, else 0.

    Metrics returned by :meth:`sync` (and kept in :attr:`history`): ``sync_seconds``,
    ``sync_tensors``, ``sync_bytes``, ``sync_buckets``, and on the sender
    ``sync_gather_seconds`` (reading the state dict).

    Raises (from :meth:`sync`):
        ValueError: both or neither of ``model`` and ``sampler`` given, or a sampler rank given a model.
        CheckpointSyncError: (sender) a sampler rank failed to load the weights.

    Example::

        engine = DistributedCheckpointEngine("tcp://127.0.0.1:29612", rank=0, world_size=2)
        metrics = engine.sync(model, None, adapter_name="default")
    """

    def __init__(
        self,
        init_method: str,
        *,
        rank: int,
        world_size: int = 2,
        bucket_bytes: int = 64 << 20,
        backend: str | None = None,
        timeout_s: float = 600.0,
        trainer_rank: int | None = None,
    ) -> None:
        parsed = urlparse(init_method)
        if parsed.scheme != "tcp" or not parsed.hostname or not parsed.port:
            raise ValueError(f"init_method={init_method!r}: use 'tcp://host:port' (rank 0 listens there)")
        if world_size < 2:
            raise ValueError(f"world_size={world_size}: need the trainer plus at least one sampler rank (>= 2)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside 0..{world_size - 1}")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        if backend not in (None, "gloo", "nccl"):
            raise ValueError(f"backend={backend!r}: use 'gloo', 'nccl' or None (automatic)")
        self.host, self.port = parsed.hostname, parsed.port
        self.rank = rank
        self.world_size = world_size
        self.bucket_bytes = bucket_bytes
        self.backend = backend
        self.timeout = timedelta(seconds=timeout_s)
        self.trainer_rank = trainer_rank
        self.history: list[dict[str, float]] = []
        self._group: Any = None
        self._store: Any = None
        self._device: Any = None

    # ------------------------------------------------------------------ group
    def connect(self) -> None:
        """Join the private process group (done by the first :meth:`sync`; blocks until every rank joins)."""
        if self._group is not None:
            return
        import torch
        import torch.distributed as dist

        backend = self.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        store = dist.TCPStore(self.host, self.port, self.world_size, self.rank == 0, timeout=self.timeout)
        prefixed = dist.PrefixStore("twinkle-checkpoint-engine", store)
        if backend == "nccl":
            self._device = torch.device("cuda", torch.cuda.current_device())
            self._group = dist.ProcessGroupNCCL(prefixed, self.rank, self.world_size)
        else:
            self._device = torch.device("cpu")
            self._group = dist.ProcessGroupGloo(prefixed, self.rank, self.world_size, self.timeout)
        self._store = store
        self.backend = backend

    def close(self) -> None:
        """Leave the process group (a later :meth:`sync` joins again)."""
        self._group = None
        self._store = None

    def _broadcast(self, tensor: Any) -> None:
        self._group.broadcast(tensor, 0).wait()

    # ------------------------------------------------------------------ sync
    def sync(self, model: Any, sampler: Any, adapter_name: str | None = None) -> dict[str, float]:
        """Send ``model``'s weights (trainer, rank 0) or receive them into ``sampler`` (sampler ranks).

        Args:
            model: the trained model on the trainer side; ``None`` on a sampler rank.
            sampler: the local sampler on a sampler rank; ``None`` on the trainer side.
            adapter_name: (trainer side) sync this adapter's LoRA tensors; ``None`` = full weights.
                The receiving side learns it from the manifest.

        Returns:
            Metrics (see the class docstring).
        """
        if (model is None) == (sampler is None):
            raise ValueError(
                "DistributedCheckpointEngine.sync: give the model on the trainer (sync(model, None)) and the "
                "sampler on a sampler rank (sync(None, sampler)); for both in one process use VLLMCheckpointEngine"
            )
        if model is not None:
            if self.rank != 0:
                raise ValueError(f"rank {self.rank} is a sampler rank; the trainer side is rank 0")
            return self._send(model, adapter_name)
        if self.rank == 0:
            raise ValueError("rank 0 is the trainer side; a sampler joins with rank >= 1")
        return self._receive(sampler)

    def _own_trainer_rank(self) -> int:
        if self.trainer_rank is not None:
            return self.trainer_rank
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _send(self, model: Any, adapter_name: str | None) -> dict[str, float]:
        import torch

        start = time.perf_counter()
        weights, peft_config = model_weights(model, adapter_name)  # collective under FSDP: every trainer rank calls it
        gathered = time.perf_counter()
        if self._own_trainer_rank() != 0:
            return {"sync_seconds": gathered - start, "sync_tensors": 0.0, "sync_bytes": 0.0, "sync_buckets": 0.0}
        self.connect()
        names = list(weights)
        tensors = [weights[n].detach().contiguous() for n in names]
        buckets = _plan_buckets([t.numel() * t.element_size() for t in tensors], self.bucket_bytes)
        config = None
        if peft_config is not None:
            from twinkle_vllm.lora import lora_config_dict

            config = lora_config_dict(peft_config)
        manifest = {
            "adapter_name": adapter_name,
            "peft_config": config,
            "tensors": [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in zip(names, tensors)],
            "buckets": buckets,
        }
        payload = torch.frombuffer(bytearray(pickle.dumps(manifest)), dtype=torch.uint8)
        self._broadcast(torch.tensor([payload.numel()], dtype=torch.int64, device=self._device))
        self._broadcast(payload.to(self._device))
        total = 0
        for bucket in buckets:
            flat = torch.cat([tensors[i].reshape(-1).view(torch.uint8) for i in bucket]).to(self._device)
            total += flat.numel()
            self._broadcast(flat)
        status = torch.zeros(1, dtype=torch.int64, device=self._device)
        self._group.allreduce([status]).wait()
        if int(status.item()):
            raise CheckpointSyncError(
                f"{int(status.item())} sampler rank(s) failed to load the weights; see the sampler's log for the error"
            )
        metrics = {
            "sync_seconds": time.perf_counter() - start,
            "sync_gather_seconds": gathered - start,
            "sync_tensors": float(len(tensors)),
            "sync_bytes": float(total),
            "sync_buckets": float(len(buckets)),
        }
        self.history.append(metrics)
        return metrics

    def _receive(self, sampler: Any) -> dict[str, float]:
        import torch

        if not callable(getattr(sampler, "update_weights", None)):
            raise TypeError(f"{type(sampler).__name__} has no update_weights(); it is not a Sampler")
        self.connect()
        start = time.perf_counter()
        size = torch.zeros(1, dtype=torch.int64, device=self._device)
        self._broadcast(size)
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=self._device)
        self._broadcast(payload)
        manifest = pickle.loads(payload.cpu().numpy().tobytes())
        stream = self._unpack(manifest)
        failed = 0
        error: BaseException | None = None
        try:
            loaded = sampler.update_weights(
                stream, adapter_name=manifest["adapter_name"], peft_config=manifest["peft_config"]
            )
        except Exception as exc:  # keep the collective in step, then re-raise below
            failed, error, loaded = 1, exc, 0
        for _ in stream:  # drain what the sampler did not consume, so the sender is not left waiting
            pass
        status = torch.tensor([failed], dtype=torch.int64, device=self._device)
        self._group.allreduce([status]).wait()
        if error is not None:
            raise error
        nbytes = sum(_nbytes(dtype, shape) for _, dtype, shape in manifest["tensors"])
        metrics = {
            "sync_seconds": time.perf_counter() - start,
            "sync_tensors": float(loaded if isinstance(loaded, int) else len(manifest["tensors"])),
            "sync_bytes": float(nbytes),
            "sync_buckets": float(len(manifest["buckets"])),
        }
        self.history.append(metrics)
        return metrics

    def _unpack(self, manifest: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        """Receive the buckets one by one and yield ``(name, tensor)`` views into each (CPU tensors)."""
        import torch

        specs = manifest["tensors"]
        for bucket in manifest["buckets"]:
            sizes = [_nbytes(specs[i][1], specs[i][2]) for i in bucket]
            flat = torch.empty(sum(sizes), dtype=torch.uint8, device=self._device)
            self._broadcast(flat)
            flat = flat.cpu()
            offset = 0
            for i, nbytes in zip(bucket, sizes):
                name, dtype, shape = specs[i]
                yield name, flat[offset : offset + nbytes].view(getattr(torch, dtype)).reshape(shape)
                offset += nbytes


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    import torch

    count = 1
    for dim in shape:
        count *= int(dim)
    return count * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _plan_buckets(sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Group tensor indices in order into buckets of at most ``bucket_bytes`` (a larger tensor goes alone)."""
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i, size in enumerate(sizes):
        if current and filled + size > bucket_bytes:
            buckets.append(current)
            current, filled = [], 0
        current.append(i)
        filled += size
    if current:
        buckets.append(current)
    return buckets
