"""PPO with a critic on CPU: the small-additions task of examples/grpo.py, advantages from GAE.

The loop is the user's, top to bottom:

    sample (TorchSampler) -> reward (GSM8KAccuracyReward) -> the critic's values of every
    completion token (adapter "critic": one LM-head row read as the value, ValueLoss)
    -> GAE (twinkle.advantage.gae) -> PPOLoss on the policy adapter with per-token advantages
    -> ValueLoss on the critic adapter with the GAE returns -> the policy's LoRA synced to the sampler.

The policy and the critic are two LoRA adapters of one base model (the format warm-up of
examples/grpo.py). No group baseline: the critic is the baseline, so fewer samples per prompt do.

    python examples/ppo_critic.py      # seed 0: mean reward 0.236 -> 0.319 (first vs last 8 steps of 40),
                                       # the critic's value mse 8.95 -> 0.23
"""

from __future__ import annotations

import argparse
import random
import time

import twinkle
from twinkle import assets
from twinkle.advantage.gae import gae, whiten
from twinkle.checkpoint_engine import LocalCheckpointEngine
from twinkle.data_format import SamplingParams
from twinkle.data_format.sampling import build_input_feature
from twinkle.model import TransformersModel
from twinkle.sampler import TorchSampler

MAX_OPERAND = 2  # a, b in 0..2: 9 problems, answers 0..4
VALUE_TOKEN = "V"  # the LM-head row the critic reads as its value


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


def per_token(row: dict, values: list[float]) -> list[float]:
    """Completion-token values as a list aligned with the row's labels (0.0 on the prompt)."""
    out = [0.0] * len(row["input_ids"])
    positions = [j for j, label in enumerate(row["labels"]) if label != -100]
    for j, v in zip(positions, values):
        out[j] = v
    return out


def main(
    steps: int = 40, seed: int = 0, group_size: int = 4, lr: float = 5e-3, lam: float = 0.95, verbose: bool = True
) -> dict:
    """Run the example; returns the mean reward per step and the critic's value error per step."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    twinkle.initialize(mode="local", seed=seed)
    rng = random.Random(seed)
    model_dir = str(assets.path("tiny-qwen2"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    value_token_id = tokenizer.convert_tokens_to_ids(VALUE_TOKEN)

    # ---- format warm-up (full parameters); the sampler gets these base weights ----------------------
    model = TransformersModel(model_id=model_dir, seed=seed, device="cpu")
    model.set_optimizer("AdamW", lr=3e-3)
    for _ in range(30):
        model.forward_backward(inputs=warmup_rows(tokenizer, rng, 32))
        model.clip_grad_and_step()
    sampler = TorchSampler(model_id=model_dir, seed=seed, device="cpu")
    engine = LocalCheckpointEngine()
    engine.sync(model, sampler)

    # ---- the critic and the policy: two adapters of the warmed-up base ------------------------------
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    model.add_adapter_to_model("critic", lora)
    model.set_optimizer("AdamW", lr=1e-2)
    model.set_loss("ValueLoss", value_token_id=value_token_id, clip_range=0.2)
    model.add_adapter_to_model("default", lora)
    model.set_optimizer("AdamW", lr=lr)
    model.set_loss("PPOLoss", epsilon=0.2)
    engine.sync(model, sampler, adapter_name="default")

    reward_fn = twinkle.runtime.get_registry().resolve("reward", "GSM8KAccuracyReward")()
    params = dict(max_tokens=2, temperature=1.0, num_samples=group_size)
    curve: list[float] = []
    value_error: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        responses = sampler.sample(
            problems(tokenizer), SamplingParams(**params, seed=seed * 100_000 + step), adapter_name="default"
        )
        sequences = [seq for response in responses for seq in response.sequences]
        rewards = reward_fn([seq.trajectory for seq in sequences])
        rows = [seq.input_feature for seq in sequences]
        # the critic's value of the state before each completion token: logits[position - 1, value token]
        logits = model.forward_only(inputs=rows, adapter_name="critic", return_logits=True)["logits"]
        advantages, returns, old_values = [], [], []
        for i, (row, reward) in enumerate(zip(rows, rewards)):
            positions = [j for j, label in enumerate(row["labels"]) if label != -100]
            values = [float(logits[i, j - 1, value_token_id]) for j in positions]
            token_rewards = [0.0] * (len(positions) - 1) + [reward]  # the reward comes at the end
            adv, ret = gae(token_rewards, values, gamma=1.0, lam=lam)
            advantages.append(adv)
            returns.append(ret)
            old_values.append(values)
        advantages = whiten(advantages)
        policy_rows = [dict(row, advantages=per_token(row, a)) for row, a in zip(rows, advantages)]
        out = model.forward_backward(inputs=policy_rows, adapter_name="default")
        model.clip_grad_and_step(max_grad_norm=1.0, adapter_name="default")
        critic_rows = [
            dict(row, returns=per_token(row, r), old_values=per_token(row, v))
            for row, r, v in zip(rows, returns, old_values)
        ]
        critic = model.forward_backward(inputs=critic_rows, adapter_name="critic")
        model.clip_grad_and_step(max_grad_norm=1.0, adapter_name="critic")
        engine.sync(model, sampler, adapter_name="default")
        curve.append(sum(rewards) / len(rewards))
        value_error.append(critic["value_mse"])
        if verbose:
            print(
                f"step {step:3d}  mean reward {curve[-1]:.3f}  policy loss {out['loss']:+.4f}  "
                f"value mse {value_error[-1]:.4f}"
            )
    elapsed = time.perf_counter() - started
    twinkle.shutdown()
    window = max(1, steps // 5)
    summary = {
        "rewards": curve,
        "value_mse": value_error,
        "first": sum(curve[:window]) / window,
        "last": sum(curve[-window:]) / window,
        "first_value_mse": sum(value_error[:window]) / window,
        "last_value_mse": sum(value_error[-window:]) / window,
        "seconds": elapsed,
    }
    if verbose:
        print(
            f"mean reward: first {window} steps {summary['first']:.3f} -> last {window} steps {summary['last']:.3f}; "
            f"value mse {summary['first_value_mse']:.3f} -> {summary['last_value_mse']:.3f} ({elapsed:.0f}s)"
        )
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed, lr=args.lr)
