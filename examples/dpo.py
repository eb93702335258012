"""DPO on CPU: a LoRA adapter on a tiny random-init Qwen2 learns to prefer the chosen answers.

The reference policy is the same model with the adapter disabled (no second copy): its
log-probabilities are computed once with ``forward_only(disable_adapters=True)``. Rows are
pairs interleaved as ``[chosen_0, rejected_0, chosen_1, rejected_1, ...]``. The printed
reward margin ``beta * [(log pi - log ref)(chosen) - (log pi - log ref)(rejected)]`` grows
from 0 as training proceeds.

    python examples/dpo.py
"""

from __future__ import annotations

import argparse
import json
import random

import twinkle
from twinkle import assets
from twinkle.model import TransformersModel


def load_pairs() -> list[dict]:
    """The bundled preference pairs: ``{"prompt", "chosen", "rejected"}``."""
    with open(assets.path("datasets/dpo_tiny.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_pairs(template, pairs: list[dict]) -> list[dict]:
    """Interleaved rows [chosen_0, rejected_0, ...], labels on the answers only."""
    rows = []
    for pair in pairs:
        for answer in (pair["chosen"], pair["rejected"]):
            messages = [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": answer}]
            rows.append(template.encode({"messages": messages}))
    return rows


def main(
    steps: int = 16,
    seed: int = 0,
    pairs_per_step: int = 6,
    beta: float = 0.1,
    eval_every: int = 4,
    verbose: bool = True,
) -> dict:
    """Run the example; returns ``{"margins": [margin over all pairs every eval_every steps], "accuracy", ...}``."""
    from peft import LoraConfig

    twinkle.initialize(mode="local", seed=seed)
    rng = random.Random(seed)
    model_dir = str(assets.path("tiny-qwen2"))
    model = TransformersModel(model_id=model_dir, seed=seed, device="cpu")
    model.set_template("Template", model_id=model_dir)
    model.add_adapter_to_model("default", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=1e-2)
    model.set_loss("DPOLoss", beta=beta, loss_type="sigmoid")
    template = model.state_of().template

    pairs = load_pairs()
    rows = encode_pairs(template, pairs)
    ref = model.forward_only(inputs=rows, disable_adapters=True)["logps"]  # the reference: adapter off
    rows = [dict(row, ref_logps=lp) for row, lp in zip(rows, ref)]

    def evaluate() -> tuple[float, float]:
        """Mean reward margin and preference accuracy over every pair (policy vs reference)."""
        logps = model.forward_only(inputs=rows)["logps"]
        deltas = []
        for k in range(len(pairs)):
            chosen = sum(logps[2 * k]) - sum(ref[2 * k])
            rejected = sum(logps[2 * k + 1]) - sum(ref[2 * k + 1])
            deltas.append(beta * (chosen - rejected))
        return sum(deltas) / len(deltas), sum(d > 0 for d in deltas) / len(deltas)

    margins: list[float] = []
    accuracy: list[float] = []
    for step in range(steps + 1):
        if step % eval_every == 0:
            margin, acc = evaluate()
            margins.append(margin)
            accuracy.append(acc)
            # to the run's trackers (metrics.jsonl; `twinkle plot --text RUN_DIR` summarizes it)
            twinkle.log_metrics({"reward_margin": margin, "accuracy": acc}, step=step, source="eval")
            if verbose:
                print(f"step {step:3d}  reward margin over all pairs {margin:+.4f}  accuracy {acc:.2f}")
        if step == steps:
            break
        chosen = rng.sample(range(len(pairs)), k=pairs_per_step)
        batch = [row for k in chosen for row in (rows[2 * k], rows[2 * k + 1])]  # pairs stay together
        out = model.forward_backward(inputs=batch)
        model.clip_grad_and_step(max_grad_norm=1.0)
        twinkle.log_metrics({"loss": out["loss"], "reward_margin": out["reward_margin"]}, step=step + 1, source="train")
        if verbose:
            print(f"step {step:3d}  loss {out['loss']:.4f}  batch margin {out['reward_margin']:+.4f}")
    twinkle.shutdown()
    summary = {"margins": margins, "accuracy": accuracy, "first": margins[0], "last": margins[-1]}
    if verbose:
        print(
            f"reward margin over all pairs: {summary['first']:+.4f} -> {summary['last']:+.4f}; "
            f"accuracy {accuracy[0]:.2f} -> {accuracy[-1]:.2f}"
        )
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed)
