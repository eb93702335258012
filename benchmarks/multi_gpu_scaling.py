"""FSDP2 / DDP scaling of TransformersModel on several GPUs (issue 11).

    # one configuration, N processes (one per GPU):
    torchrun --nproc_per_node 2 benchmarks/multi_gpu_scaling.py --layout fsdp --kind full
    # the whole table (1 GPU, then every GPU count up to --max-gpus), logs under --out:
    python benchmarks/multi_gpu_scaling.py --table --max-gpus 2

Random-init Qwen2.5-7B-shaped model built from a config on the GPU (no downloads),
random 2048-token sequences, bf16 weights, AdamW, sdpa. ``--kind lora``: LoRA r=8 on all
linear layers; ``--kind full``: every parameter, with activation checkpointing. Each rank
gets ``--micro-batch`` sequences per step (the global batch grows with the GPU count, as in
weak scaling). Prints tokens/s per GPU, MFU and peak memory; ``--table`` adds the scaling
efficiency against one GPU (tokens/s per GPU at N GPUs / tokens/s on 1 GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from model_shapes import PEAK_TFLOPS, QWEN25_7B, flops_per_token, qwen2_config

SEQ_LEN = 2048
SMALL = dict(
    QWEN25_7B,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
)


def worker(args: argparse.Namespace) -> None:
    import torch
    import twinkle
    from twinkle import DeviceMesh
    from twinkle.launcher.local import torchrun_world
    from twinkle.model import TransformersModel

    rank, local_rank, world = torchrun_world()
    cuda = torch.cuda.is_available()  # CPU (gloo) only to check the harness with --small
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    mesh = DeviceMesh.from_sizes(fsdp_size=world) if args.layout == "fsdp" else DeviceMesh.from_sizes(dp_size=world)
    twinkle.initialize(mode="local", global_device_mesh=mesh, seed=0)
    shape = SMALL if args.small else QWEN25_7B
    lora = args.kind == "lora"
    with torch.device(device):  # random init directly on the GPU
        model = TransformersModel(config=qwen2_config(shape), torch_dtype="bfloat16", gradient_checkpointing=not lora)
    n_params = sum(p.numel() for p in model.model.parameters())
    if lora:
        from peft import LoraConfig

        model.add_adapter_to_model("default", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=1e-5)
    generator = torch.Generator().manual_seed(1234 + rank)

    def batch() -> list[dict]:
        ids = torch.randint(0, shape["vocab_size"], (args.micro_batch, SEQ_LEN), generator=generator).tolist()
        return [{"input_ids": row, "labels": row} for row in ids]

    times = []
    for step in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        model.forward_backward(inputs=batch())
        model.clip_grad_and_step(max_grad_norm=1.0)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    tokens_per_gpu = args.micro_batch * SEQ_LEN / step_s
    result = {
        "layout": args.layout,
        "kind": args.kind,
        "gpus": world,
        "micro_batch": args.micro_batch,
        "step_s": step_s,
        "tokens_per_s_per_gpu": tokens_per_gpu,
        "mfu": tokens_per_gpu * flops_per_token(shape, lora, SEQ_LEN, n_params) / (PEAK_TFLOPS * 1e12),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "params_b": n_params / 1e9,
    }
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    twinkle.shutdown()


def table(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu_counts = [1] + [n for n in (2, 4, 8) if n <= args.max_gpus]
    results = []
    for kind, micro_batch in (("lora", args.lora_micro_batch), ("full", args.full_micro_batch)):
        for gpus in gpu_counts:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(gpus),
                __file__,
                "--layout",
                args.layout,
                "--kind",
                kind,
                "--micro-batch",
                str(micro_batch),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ] + (["--small"] if args.small else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{kind} on {gpus} GPU(s) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", flush=True)
                continue
            results.append(json.loads(lines[-1][len("RESULT ") :]))
            print(lines[-1], flush=True)
    base = {r["kind"]: r["tokens_per_s_per_gpu"] for r in results if r["gpus"] == 1}
    lines = [
        "| layout | kind | GPUs | micro-batch/GPU | tokens/s/GPU | MFU | peak GiB | scaling eff. vs 1 GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        eff = r["tokens_per_s_per_gpu"] / base[r["kind"]] if r["kind"] in base else float("nan")
        r["scaling_efficiency"] = eff
        lines.append(
            f"| {r['layout']} | {r['kind']} | {r['gpus']} | {r['micro_batch']} | "
            f"{r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.1%} | {r['peak_gib']:.1f} | {eff:.1%} |"
        )
    text = "\n".join(lines)
    print(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"multi_gpu_scaling-{stamp}.md").write_text(text + "\n")
    (out / f"multi_gpu_scaling-{stamp}.json").write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="run 1..max-gpus for LoRA and full, print the table")
    parser.add_argument("--max-gpus", type=int, default=8)
    parser.add_argument("--layout", choices=("fsdp", "dp"), default="fsdp")
    parser.add_argument("--kind", choices=("lora", "full"), default="lora")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--lora-micro-batch", type=int, default=4)
    parser.add_argument("--full-micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="a small model, to check the harness")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    if args.table:
        table(args)
    else:
        worker(args)


if __name__ == "__main__":
    main()
