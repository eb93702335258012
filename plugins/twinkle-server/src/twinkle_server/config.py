"""Settings of one ``twinkle serve`` process."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


def tiny_model_dir() -> Path:
    """The bundled tiny Qwen2 model directory (config and tokenizer; weights are seeded)."""
    import twinkle

    return Path(twinkle.__file__).resolve().parent / "assets" / "tiny-qwen2"


@dataclass
class ServerConfig:
    """What the server hosts and how much each tenant may use.

    Args:
        state_dir: SQLite database and checkpoints live here (survives restarts).
        model_dir: local Hugging Face model directory of the base model (default: bundled tiny model).
        model_name: the base-model name clients use (``base_model=`` in the tinker SDK).
        max_adapters: live LoRA adapters at most (training runs, loaded sampler adapters, snapshots
            and twinkle objects' adapters), on the device or paged to host memory.
        device_slots: adapters resident on the device at once (default: ``min(max_adapters, 8)``);
            the others are paged to (pinned) host memory and back on use
            (:class:`twinkle.model.adapter_pool.AdapterPool`).
        adapter_host_bytes: host memory all live adapters may take together (each reserves room for
            its weights, gradients and AdamW state when created); default: a quarter of the
            machine's memory. A create that does not fit is a 503 with ``Retry-After``.
        max_rank: largest LoRA rank accepted.
        seed: seed of the base weights when ``model_dir`` has no weight files.
        device: where the Tinker engine keeps the base model and the adapters: ``"auto"``
            (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. The twinkle
            API's model goes to the same device and shares the engine's base weights.
        max_body_bytes: largest request body accepted (413 above).
        max_tokens_per_request: default per-tenant limit of tokens in one request (413 above).
        max_adapters_per_tenant: default per-tenant limit of loaded training runs (403 above).
        requests_per_minute: default per-tenant rate of compute requests (429 above).
        long_poll_s: how long ``retrieve_future`` waits before answering "try again".
        max_batch_rows: datums per batched multi-LoRA pass.
        batch_window_s: the longest a ``forward_backward`` pass waits for tenants that are
            between two training steps to join it (also capped at half the recent pass time).
        max_private_models_per_tenant: http-mode models per tenant that may train full parameters
            (each gets a private copy of the base model; 0 allows LoRA on the shared base only).
        stats_file: when set, the scheduler's pass statistics (tenants per pass, wait times) are
            written here as JSON when the server stops (benchmarks read it).
        seq_window: a training request may be at most this many ``seq_id``s ahead of its run's
            next one (400 above): out-of-order requests hold their bodies until their turn.
        seq_wait_s: a request waiting for an earlier ``seq_id`` fails after this many seconds.
        run_idle_s: a training run (or twinkle object) no request touched for this long is
            unloaded: its adapter and optimizer state are written to ``state_dir/parked`` and
            leave device and host memory, it stops counting against the tenant's quota, and its
            next request reloads it transparently (exactly); 0 keeps runs loaded until unloaded.
        future_ttl_s: finished futures (and their results) are deleted this long after creation.
        max_result_bytes: a result larger than this is not stored; its future fails with a
            message (save a checkpoint instead of fetching large state).
        api_docs: serve the OpenAPI schema at ``/openapi.json`` (behind an API key); off by
            default. The HTML docs pages (``/docs``, ``/redoc``) are never served.
        sample_slice_s: seconds of decoding a sampling request runs per turn on the worker; a
            longer request resumes in later turns, with other tenants' work between them, so a
            small training step waits behind at most one slice (0: run requests whole).
        external_weights: the format of ``save_weights_external``: ``"adapter"`` (the PEFT adapter,
            what Tinker exports) or ``"merged"`` (a full Hugging Face model, base plus adapter).
        sampler: what serves Tinker sampling: ``"torch"`` (the engine's own KV-cache generation on
            the training model, sliced by the scheduler), ``"vllm"`` (twinkle-vllm's ``VLLMSampler``
            over the same base model directory, holding its own copy of the base; each tenant's
            adapter is pushed into it after it changes; see :mod:`twinkle_server.vllm_sampling`) or
            ``"auto"`` (vllm when twinkle-vllm imports, else torch).
        vllm_max_loras: with the vLLM sampler: adapters in one vLLM batch (vLLM's ``max_loras``).
        vllm_engine_args: with the vLLM sampler: more ``vllm.LLM`` arguments
            (``gpu_memory_utilization``, default 0.3 of a GPU since training shares the device;
            ``kv_cache_memory_bytes``, default 1 GiB on the CPU; ``max_model_len``, ``max_num_seqs`` ...).
        control_requests_per_minute: per-tenant rate of every other authenticated request
            (sessions, lists, ``retrieve_future``...), at least ``requests_per_minute``; 429
            with ``Retry-After`` above.

    Example::

        ServerConfig(state_dir="/var/lib/twinkle", max_adapters=256, device_slots=16, max_rank=32, device="cuda")
    """

    state_dir: Path
    model_dir: Path = field(default_factory=tiny_model_dir)
    model_name: str = "twinkle/tiny-qwen2"
    max_adapters: int = 64
    device_slots: int | None = None
    adapter_host_bytes: int | None = None
    max_rank: int = 64
    seed: int = 0
    device: str = "auto"
    max_body_bytes: int = 32 * 1024 * 1024
    max_tokens_per_request: int = 1_000_000
    max_adapters_per_tenant: int = 4
    requests_per_minute: int = 6000
    long_poll_s: float = 10.0
    max_batch_rows: int = 256
    batch_window_s: float = 0.25
    max_private_models_per_tenant: int = 1
    stats_file: Path | None = None
    api_docs: bool = False
    run_idle_s: float = 3600.0
    future_ttl_s: float = 3600.0
    max_result_bytes: int = 16 * 1024 * 1024
    seq_window: int = 128
    seq_wait_s: float = 600.0
    control_requests_per_minute: int = 6000
    sample_slice_s: float = 0.5
    external_weights: str = "adapter"
    sampler: str = "torch"
    vllm_max_loras: int = 4
    vllm_engine_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        self.model_dir = Path(self.model_dir)
        if self.sampler not in ("torch", "vllm", "auto"):
            raise ValueError(f"sampler must be 'torch', 'vllm' or 'auto', not {self.sampler!r}")

    @property
    def resident_slots(self) -> int:
        """Adapters on the device at once (``device_slots``, default ``min(max_adapters, 8)``)."""
        return max(1, self.device_slots if self.device_slots is not None else min(self.max_adapters, 8))

    @property
    def host_budget_bytes(self) -> int:
        """The host-memory budget of live adapters (``adapter_host_bytes``, default a quarter of RAM)."""
        if self.adapter_host_bytes is not None:
            return int(self.adapter_host_bytes)
        import os

        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 16 << 30
        return int(total // 4)

    @property
    def parked_dir(self) -> Path:
        """Where idle adapters' tensors are written while unloaded (emptied at start)."""
        return self.state_dir / "parked"

    @property
    def database(self) -> Path:
        """The SQLite file."""
        return self.state_dir / "state.sqlite"

    @property
    def checkpoint_root(self) -> Path:
        """Where checkpoints are written."""
        return self.state_dir / "checkpoints"
