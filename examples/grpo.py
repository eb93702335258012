"""GRPO on CPU: a tiny random-init Qwen2 learns small additions ("2+3=") with a LoRA adapter.

The loop is the user's, top to bottom:

    sample (TorchSampler) -> reward (GSM8KAccuracyReward from twinkle-rewards) -> GRPOAdvantage
    -> reference log-probs (the same model with the adapter disabled) -> forward_backward with
    GRPOLoss (+ k3 KL) -> clip_grad_and_step -> LocalCheckpointEngine syncs the LoRA into the sampler.

Stage 1 is a short SFT warm-up of the *answer format* only: the targets are random digits,
so after it the policy answers with one digit (about 1 in 7 right by chance). Stage 2 is
GRPO on a LoRA adapter; the reference for the KL is the warm-up model (adapter disabled,
no second copy). The printed reward curve rises as the policy learns the sums.

    python examples/grpo.py            # about 15 s on 2 idle CPU cores
    python examples/grpo.py --steps 120
"""

from __future__ import annotations

import argparse
import random
import time

import twinkle.runtime

# First, before torch loads: this example needs twinkle-rewards (its reward); without it, stop in
# a second with the install command instead of after building the models.
twinkle.runtime.require_components({"reward": ["GSM8KAccuracyReward"]}, exit=__name__ == "__main__")

from twinkle import assets
from twinkle.advantage import GRPOAdvantage
from twinkle.checkpoint_engine import LocalCheckpointEngine
from twinkle.data_format import SamplingParams
from twinkle.data_format.sampling import build_input_feature
from twinkle.model import TransformersModel
from twinkle.progress import progress
from twinkle.reward import Reward
from twinkle.sampler import TorchSampler

MAX_OPERAND = 2  # a, b in 0..2: 9 problems, answers 0..4


def problems(tokenizer) -> list[dict]:
    """Every "a+b=" problem as a token prompt (InputFeature) whose user_data holds the answer."""
    return [
        {"input_ids": tokenizer.encode(f"{a}+{b}="), "user_data": {"answer": str(a + b)}}
        for a in range(MAX_OPERAND + 1)
        for b in range(MAX_OPERAND + 1)
    ]


def warmup_rows(tokenizer, rng: random.Random, n: int) -> list[dict]:
    """SFT rows teaching the format only (one digit, then EOS): the digit is random, not the sum."""
    rows = []
    for problem in rng.choices(problems(tokenizer), k=n):
        answer = tokenizer.encode(str(rng.randint(0, 2 * MAX_OPERAND))) + [tokenizer.eos_token_id]
        rows.append(build_input_feature(problem["input_ids"], answer))
    return rows


def main(
    steps: int = 60,
    seed: int = 0,
    group_size: int = 8,
    lr: float = 5e-3,
    beta: float = 0.3,
    verbose: bool = True,
    mode: str = "local",
    **mode_options,
) -> dict:
    """Run the example; returns ``{"rewards": [mean reward per step], "first", "last", ...}``.

    ``mode``/``mode_options`` go to ``twinkle.initialize`` (e.g. ``mode="http", base_url=..., api_key=...``).
    """
    from peft import LoraConfig
    from transformers import AutoTokenizer

    twinkle.initialize(mode=mode, seed=seed, **mode_options)
    rng = random.Random(seed)
    model_dir = str(assets.path("tiny-qwen2"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    # ---- stage 1: format warm-up (full parameters) ----------------------------------------
    model = TransformersModel(model_id=model_dir, seed=seed, device="cpu")
    model.set_optimizer("AdamW", lr=3e-3)
    for _ in range(30):
        model.forward_backward(inputs=warmup_rows(tokenizer, rng, 32))
        model.clip_grad_and_step()

    # ---- the sampler gets the warmed-up base weights, then both get the LoRA adapter ----------
    sampler = TorchSampler(model_id=model_dir, seed=seed, device="cpu")
    engine = LocalCheckpointEngine()
    engine.sync(model, sampler)  # full weights
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    model.add_adapter_to_model("default", lora)
    model.set_optimizer("AdamW", lr=lr)
    model.set_loss("GRPOLoss", epsilon=0.2, beta=beta)
    engine.sync(model, sampler, adapter_name="default")  # LoRA tensors only (creates the adapter)

    reward_fn = twinkle.runtime.get_registry().resolve("reward", "GSM8KAccuracyReward")()
    assert isinstance(reward_fn, Reward)
    advantage_fn = GRPOAdvantage(scale="group")
    params = dict(max_tokens=2, temperature=1.0, num_samples=group_size)
    curve: list[float] = []
    sync_seconds: list[float] = []
    started = time.perf_counter()
    bar = progress(range(steps), desc="grpo", unit="step")  # rate and ETA on a terminal only
    for step in bar:
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
        # to the run's trackers (metrics.jsonl; `twinkle plot` draws the reward curve)
        rl_metrics = {"reward": curve[-1], "loss": out["loss"], "kl": out.get("kl", 0.0), "sync_s": sync_seconds[-1]}
        twinkle.log_metrics(rl_metrics, step=step + 1, source="rl")
        if verbose:
            kl = rl_metrics["kl"]
            bar.write(f"step {step:3d}  mean reward {curve[-1]:.3f}  loss {out['loss']:+.4f}  kl {kl:.4f}")
    elapsed = time.perf_counter() - started
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
            f"({elapsed:.0f}s of GRPO, LoRA sync {summary['sync_seconds_mean'] * 1000:.1f} ms/step)"
        )
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--beta", type=float, default=0.3)
    parser.add_argument("--base-url", help="run against `twinkle serve` at this URL (http mode)")
    parser.add_argument("--api-key", help="the tenant's API key (http mode)")
    args = parser.parse_args()
    remote = dict(mode="http", base_url=args.base_url, api_key=args.api_key) if args.base_url else {}
    main(steps=args.steps, seed=args.seed, lr=args.lr, beta=args.beta, **remote)
