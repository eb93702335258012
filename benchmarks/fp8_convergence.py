"""Does LoRA trained with ``Fp8FrozenGemms`` learn what bf16 LoRA learns? Both runs side by side.

    python benchmarks/fp8_convergence.py                           # Qwen2.5-0.5B shape, 300 steps
    python benchmarks/fp8_convergence.py --shape 7b --batch 4 --steps 150
    TWINKLE_BENCH_DEVICE=cpu python benchmarks/fp8_convergence.py --shape tiny --steps 20 --fp8-min-features 16

``Fp8FrozenGemms`` (decision 0016) runs LoRA's frozen base GEMMs in row-scaled e4m3: each product
is off by ~4e-2 relative instead of bf16's ~2e-3. Throughput says nothing about whether training
still works, so this script trains the same LoRA twice from the same random-init model, on the same
batches, in one process: once on the default (exact) fast path, once with ``Fp8FrozenGemms`` added.

The data must be learnable, or both losses just sit at ``ln(vocab)``: sequences from a seeded Markov
chain over 1024 token ids, each with four successors of probabilities 0.55 / 0.25 / 0.15 / 0.05
(the best possible loss is their entropy, ~1.1 nats). Held-out batches of the same chain are scored
every ``--eval-every`` steps with ``forward_only``.

At the end the FP8-trained adapter is saved, loaded into a fresh bf16 model and scored there too:
the question a user asks is whether an adapter trained in FP8 serves as well in bf16.

Prints the training loss of both runs at a few steps, the eval losses, the mean and largest
differences, and tokens/s; writes the table to ``--out`` as Markdown and every step's losses as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from model_shapes import QWEN25_05B, QWEN25_7B, TINY, qwen2_config

SHAPES = {"0.5b": QWEN25_05B, "7b": QWEN25_7B, "tiny": {**TINY, "vocab_size": 2048}}  # the chain takes 1024 ids
DEVICE = os.environ.get("TWINKLE_BENCH_DEVICE", "cuda")
STATES = 1024
SUCCESSOR_PROBS = (0.55, 0.25, 0.15, 0.05)
TRAIN_SEED, EVAL_SEED = 1, 2


class MarkovChain:
    """A seeded chain over ``STATES`` token ids spread over the vocabulary, four successors each."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        import torch

        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randperm(vocab, generator=gen)[:STATES]
        self.successors = torch.randint(0, STATES, (STATES, len(SUCCESSOR_PROBS)), generator=gen)
        self.probs = torch.tensor(SUCCESSOR_PROBS)

    @property
    def entropy(self) -> float:
        """The loss of a model that knows the chain (nats per token)."""
        return -sum(p * math.log(p) for p in SUCCESSOR_PROBS)

    def batch(self, rows: int, length: int, seed: int) -> dict:
        import torch

        gen = torch.Generator().manual_seed(seed)
        state = torch.randint(0, STATES, (rows,), generator=gen)
        picks = torch.multinomial(self.probs, rows * length, replacement=True, generator=gen).view(rows, length)
        tokens = [state]
        for t in range(1, length):
            state = self.successors[state, picks[:, t]]
            tokens.append(state)
        ids = self.ids[torch.stack(tokens, 1)]
        return {"input_ids": ids, "labels": ids.clone()}


def build(shape: dict, fp8: bool, rank: int, lr: float):
    import torch
    from peft import LoraConfig
    from transformers import Qwen2Config
    from twinkle.model.transformers_model import TransformersModel

    fields = {k: v for k, v in qwen2_config(shape).items() if k != "model_type"}
    config = Qwen2Config(**fields, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = TransformersModel(
            config=config,
            torch_dtype="bfloat16",
            device=DEVICE,
            seed=0,
            enabled_patches=["Fp8FrozenGemms"] if fp8 else None,
        )
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    model.add_adapter_to_model("default", lora)
    model.set_optimizer("AdamW", lr=lr)
    return model


def evaluate(model, batches: list[dict]) -> float:
    losses = [float(model.forward_only(inputs=b)["loss"]) for b in batches]
    return sum(losses) / len(losses)


def train(name: str, model, args, chain: MarkovChain, eval_batches: list[dict]) -> dict:
    import torch

    fast_path = model.fast_path_patches
    if name == "fp8" and "Fp8FrozenGemms" not in fast_path:
        sys.exit(
            f"Fp8FrozenGemms took no layer on {DEVICE} (patches: {fast_path}): it needs sm89+ CUDA or a CPU "
            "_scaled_mm with row-wise scales, and layers of --fp8-min-features or more"
        )
    print(f"[{name}] fast path: {fast_path}", file=sys.stderr, flush=True)
    losses, evals, seconds = [], {}, 0.0
    for step in range(1, args.steps + 1):
        batch = chain.batch(args.batch, args.seq, seed=TRAIN_SEED * 1_000_003 + step)
        start = time.perf_counter()
        out = model.forward_backward(inputs=batch)
        model.clip_grad_and_step(max_grad_norm=1.0)
        loss = float(out["loss"])
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        if step > 3:  # compile and warm-up
            seconds += time.perf_counter() - start
        losses.append(loss)
        if step % args.eval_every == 0 or step == args.steps:
            evals[step] = evaluate(model, eval_batches)
            print(f"[{name}] step {step}: loss {loss:.4f}, eval {evals[step]:.4f}", file=sys.stderr, flush=True)
    timed = max(args.steps - 3, 1)
    return {"losses": losses, "evals": evals, "tokens_per_s": timed * args.batch * args.seq / max(seconds, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument(
        "--fp8-min-features", type=int, default=None, help="Fp8FrozenGemms.min_features (default: the patch's, 1024)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    import torch
    from twinkle.patch.fp8 import Fp8FrozenGemms

    if args.fp8_min_features is not None:
        Fp8FrozenGemms.min_features = args.fp8_min_features
    args.fp8_min_features = Fp8FrozenGemms().features_needed()

    shape = SHAPES[args.shape]
    chain = MarkovChain(shape["vocab_size"])
    eval_batches = [chain.batch(args.batch, args.seq, seed=EVAL_SEED * 1_000_003 + i) for i in range(args.eval_batches)]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("bf16", "fp8"):
            model = build(shape, name == "fp8", args.rank, args.lr)
            runs[name] = train(name, model, args, chain, eval_batches)
            if name == "fp8":
                model.save(Path(tmp) / "fp8-adapter", save_optimizer=False, save_tokenizer=False)
            del model
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        served = build(shape, False, args.rank, args.lr)
        served.load(Path(tmp) / "fp8-adapter")
        fp8_in_bf16 = evaluate(served, eval_batches)

    print(table(args, chain, runs, fp8_in_bf16, torch))


def table(args, chain: MarkovChain, runs: dict, fp8_in_bf16: float, torch) -> str:
    bf16, fp8 = runs["bf16"], runs["fp8"]
    device = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU"
    lines = [
        f"# fp8_convergence {time.strftime('%Y%m%d-%H%M%S')}",
        "",
        f"{device}; torch {torch.__version__}; Qwen2.5-{args.shape} shape, random init; LoRA r={args.rank} on all "
        f"linear layers, AdamW lr {args.lr}, clip 1.0; FP8 on layers of {args.fp8_min_features}+ features; "
        f"{args.steps} steps of {args.batch} x {args.seq} tokens from a Markov chain (best possible loss "
        f"{chain.entropy:.3f}); eval on {args.eval_batches} held-out batches",
        "",
        "| step | bf16 train loss | fp8 train loss | fp8 - bf16 |",
        "|---:|---:|---:|---:|",
    ]
    marks = sorted({1, 10, 25, *range(50, args.steps + 1, 50), args.steps} & set(range(1, args.steps + 1)))
    for step in marks:
        a, b = bf16["losses"][step - 1], fp8["losses"][step - 1]
        lines.append(f"| {step} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    diffs = [abs(a - b) for a, b in zip(bf16["losses"], fp8["losses"])]
    tail = diffs[-min(50, len(diffs)) :]
    largest = sorted(range(len(diffs)), key=diffs.__getitem__)[-5:][::-1]
    lines += [
        "",
        f"train loss |fp8 - bf16|: mean {sum(diffs) / len(diffs):.4f}, largest {max(diffs):.4f}, "
        f"mean over the last {len(tail)} steps {sum(tail) / len(tail):.4f}",
        "",
        "largest differences (step: bf16 / fp8): "
        + "; ".join(f"{i + 1}: {bf16['losses'][i]:.4f} / {fp8['losses'][i]:.4f}" for i in largest),
        "",
        "| eval after step | bf16 | fp8 | fp8 - bf16 |",
        "|---:|---:|---:|---:|",
    ]
    for step, a in bf16["evals"].items():
        b = fp8["evals"][step]
        lines.append(f"| {step} | {a:.4f} | {b:.4f} | {b - a:+.4f} ({(b - a) / a:+.2%}) |")
    final = bf16["evals"][args.steps]
    lines += [
        "",
        f"FP8-trained adapter loaded into a bf16 model: eval {fp8_in_bf16:.4f} "
        f"(bf16-trained {final:.4f}, {(fp8_in_bf16 - final) / final:+.2%})",
        "",
        f"tokens/s after 3 warm-up steps (eval excluded): bf16 {bf16['tokens_per_s']:.0f}, fp8 "
        f"{fp8['tokens_per_s']:.0f} ({fp8['tokens_per_s'] / bf16['tokens_per_s']:.2f}x)",
    ]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"fp8_convergence-{time.strftime('%Y%m%d-%H%M%S')}-{args.shape}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), **runs, "fp8_in_bf16": fp8_in_bf16}))
    return text


if __name__ == "__main__":
    main()
