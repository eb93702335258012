"""Entry point of twinkle-vllm: registers its components with Twinkle (lazy targets, nothing heavy imported)."""

from __future__ import annotations

import twinkle


@twinkle.hookimpl
def twinkle_register_components(register) -> None:  # noqa: ANN001
    register("sampler", "VLLMSampler", "twinkle_vllm.sampler:VLLMSampler", doc="batched sampling on vLLM")
    register(
        "checkpoint_engine",
        "VLLMCheckpointEngine",
        "twinkle_vllm.checkpoint_engine:VLLMCheckpointEngine",
        doc="weight sync into a VLLMSampler in the same process (colocated)",
    )
    register(
        "checkpoint_engine",
        "DistributedCheckpointEngine",
        "twinkle_vllm.distributed:DistributedCheckpointEngine",
        doc="bucketed weight broadcast from a trainer process to sampler processes (gloo / nccl)",
    )
    register(
        "checkpoint_engine",
        "ObjectStoreCheckpointEngine",
        "twinkle_vllm.object_store:ObjectStoreCheckpointEngine",
        doc="ray mode: model actors -> sampler actors through Ray's object store, not the driver",
    )
    register(
        "metric",
        "LogprobConsistency",
        "twinkle_vllm.consistency:LogprobConsistency",
        doc="sampler vs trainer log-prob difference of sampled tokens",
    )
