"""Model FLOPs utilization for ``calculate_metric``'s ``mfu``, where the accelerator's peak is known.

``mfu = tokens/s per device * FLOPs per token / peak FLOP/s``, with the parameter FLOPs of a
training step per token: ``6 N`` for full training (forward 2N, backward 4N) and ``4 N`` for LoRA
(the frozen weights get no gradient; the adapters' own FLOPs are negligible), N the base model's
parameters without the input embedding (a lookup, not a matmul; kept when the LM head shares
it). Attention's ``12 L H S`` per token is left out, so on long sequences this is a lower
bound (``benchmarks/train_throughput.py`` counts it).

The peak: ``TWINKLE_PEAK_TFLOPS`` (dense bf16 TFLOP/s of one device), else the datasheet value
of a recognized CUDA device (H100/H200/H800 989, A100/A800 312, L40S 362, B200 2250); on CPU
and unknown devices there is no ``mfu``.
"""

from __future__ import annotations

import os
from typing import Any

#: Dense bf16 datasheet TFLOP/s by CUDA device name fragment (SXM parts).
PEAK_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "B200": 2250.0,
}


def peak_flops(device: Any) -> float | None:
    """FLOP/s of one device: ``TWINKLE_PEAK_TFLOPS``, a recognized CUDA device's datasheet value, or None."""
    env = os.environ.get("TWINKLE_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for fragment, tflops in PEAK_TFLOPS.items():
        if fragment in name:
            return tflops * 1e12
    return None


def flops_per_token(model: Any, lora: bool) -> float:
    """``4 N`` (LoRA) or ``6 N`` (full): N the parameters outside LoRA layers, less the input
    embedding unless the LM head shares it (then the matrix is the head's matmul, counted once)."""
    skip: set[int] = set()
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embedding is not None and (head is None or head.weight is not embedding.weight):
        skip = {id(p) for p in embedding.parameters()}
    n = sum(p.numel() for name, p in model.named_parameters() if id(p) not in skip and ".lora_" not in name)
    return (4.0 if lora else 6.0) * n


def mfu(model: Any, lora: bool, tokens_per_s: float, world_size: int, device: Any) -> float | None:
    """The MFU of ``tokens_per_s`` (over all ranks) on ``world_size`` devices like ``device``, or None."""
    peak = peak_flops(device)
    if peak is None or tokens_per_s <= 0:
        return None
    try:
        flops = flops_per_token(model, lora)
    except (AttributeError, TypeError, RuntimeError):  # a backend whose model is not a transformers module
        return None
    return tokens_per_s / max(1, world_size) * flops / peak
