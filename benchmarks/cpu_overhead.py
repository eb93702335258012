"""CPU overhead of Twinkle's training loop against a plain transformers + peft loop.

Same tiny model (the bundled tiny-qwen2 config, seeded random weights), same encoded
data (the bundled self-cognition set, Twinkle's Template), same batches, LoRA r=8 on all
linear layers, AdamW, grad clipping at 1.0; both loops run side by side in one process,
in alternating rounds, and the table reports the median steps/s of each.

    python benchmarks/cpu_overhead.py                 # defaults: batch 8, 5 rounds x 20 steps
    python benchmarks/cpu_overhead.py --threads 2 --rounds 7

Goal: Twinkle >= 0.85x the plain loop.
"""

from __future__ import annotations

import argparse
import statistics
import time


def encoded_batches(model_dir: str, batch_size: int, count: int) -> list[list[dict]]:
    from twinkle import assets
    from twinkle.dataset import Dataset, DatasetMeta
    from twinkle.preprocessor import SelfCognitionProcessor

    dataset = Dataset(
        dataset_meta=DatasetMeta(
            str(assets.path("datasets/self_cognition.jsonl")), data_slice=range(batch_size * count)
        )
    )
    dataset.set_template("Template", model_id=model_dir)
    dataset.map(SelfCognitionProcessor("twinkle大模型", "ModelScope社区"))
    dataset.encode()
    rows = [dict(dataset[i]) for i in range(batch_size * count)]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


class PlainLoop:
    """What a user writes without Twinkle: pad, model(labels=...), backward, clip, step."""

    def __init__(self, model_dir: str, lora: dict, lr: float, seed: int) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_dir)
        config._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_config(config)
        self.model = get_peft_model(base, LoraConfig(**lora))
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)

    def step(self, rows: list[dict]) -> float:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
        loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


class TwinkleLoop:
    """The seed's loop: forward_backward + clip_grad_and_step."""

    def __init__(self, model_dir: str, lora: dict, lr: float, seed: int, patches: list | None) -> None:
        import logging

        from peft import LoraConfig
        from twinkle.model.transformers_model import TransformersModel

        logging.getLogger("twinkle.model").setLevel(logging.ERROR)
        self.model = TransformersModel(model_id=model_dir, seed=seed, device="cpu", patches=patches)
        self.model.add_adapter_to_model("default", LoraConfig(**lora))
        self.model.set_optimizer("AdamW", lr=lr)

    def step(self, rows: list[dict]) -> float:
        out = self.model.forward_backward(inputs=rows)
        self.model.clip_grad_and_step(max_grad_norm=1.0)
        return out.loss


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="steps per round and loop")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1 is steadiest on a shared box)"
    )
    args = parser.parse_args(argv)

    import torch
    from twinkle import assets

    torch.set_num_threads(args.threads)
    model_dir = str(assets.path("tiny-qwen2"))
    lora = dict(r=8, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    batches = encoded_batches(model_dir, args.batch_size, args.steps)
    loops = {
        "plain transformers+peft": PlainLoop(model_dir, lora, 1e-4, 0),
        "twinkle (default patches)": TwinkleLoop(model_dir, lora, 1e-4, 0, None),
        "twinkle (no patches)": TwinkleLoop(model_dir, lora, 1e-4, 0, []),
    }
    for loop in loops.values():  # warm-up: allocator, first-call overheads
        for rows in batches[:3]:
            loop.step(rows)
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, loop in loops.items():
            started = time.perf_counter()
            for rows in batches:
                loop.step(rows)
            rates[name].append(len(batches) / (time.perf_counter() - started))
    baseline = statistics.median(rates["plain transformers+peft"])
    tokens = sum(len(r["input_ids"]) for b in batches for r in b) / len(batches)
    print(
        f"\nCPU overhead: tiny-qwen2 (hidden 128, 4 layers), LoRA r=8 all-linear, AdamW, batch {args.batch_size} "
        f"(~{tokens:.0f} tokens/step), {args.rounds} rounds x {args.steps} steps, {args.threads} thread(s)\n"
    )
    print(f"| {'loop':<28} | {'steps/s (median)':>16} | {'min':>7} | {'max':>7} | {'ratio vs plain':>14} |")
    print(f"|{'-' * 30}|{'-' * 18}|{'-' * 9}|{'-' * 9}|{'-' * 16}|")
    result = {}
    for name, values in rates.items():
        median = statistics.median(values)
        result[name] = median / baseline
        low, high = min(values), max(values)
        print(f"| {name:<28} | {median:>16.2f} | {low:>7.2f} | {high:>7.2f} | {median / baseline:>13.2f}x |")
    print("\ngoal: twinkle >= 0.85x plain")
    return result


if __name__ == "__main__":
    main()
