"""One chunk of the fused linear cross-entropy: Twinkle's Triton kernel against the compiled and eager chunk.

    python benchmarks/ce_kernel.py                      # Qwen2.5 vocabulary, 512 and 1024 rows, bf16
    python benchmarks/ce_kernel.py --rows 512 --configs 4096x8,8192x16

Times the part of :func:`twinkle.patch.fused_linear_ce.linear_cross_entropy` that runs between
the chunk's two matmuls: from ``[rows, vocab]`` bf16 logits to the loss, the argmax and the
gradient written in place. ``eager`` is the chunk function as PyTorch ops, ``inductor`` the same
function compiled by torch.compile (what the fast path used before the kernel), ``triton BxW``
the kernel of :mod:`twinkle.patch.triton_ce` with B vocabulary columns per iteration and W warps.
Each configuration checks its loss against the eager one, then runs in the same process on the
same logits. Prints a Markdown table (time per chunk, effective bandwidth over one read and one
write of the logits, speed-up over inductor); needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import os
import time

VOCAB = 151936


def bench(fn, logits, labels, reps: int) -> float:
    import torch

    work = logits.clone()
    fn(work, labels)  # warm-up / compile
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        work.copy_(logits)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(work, labels)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="512,1024")
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--configs", default="2048x8,4096x8,4096x16,8192x16")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("ce_kernel.py needs a CUDA GPU")
    from twinkle.patch import triton_ce
    from twinkle.patch.fused_linear_ce import _ce_chunk
    from twinkle.patch.kernel_config import kernel_settings

    compiled = torch.compile(_ce_chunk, dynamic=False)
    device = torch.cuda.get_device_name(0)
    lines = [
        f"{device}; torch {torch.__version__}; vocab {args.vocab}; bf16 logits; median of {args.reps}",
        "",
        "| rows | implementation | us per chunk | GB/s (1 read + 1 write) | vs inductor | loss rel. err |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for rows in [int(r) for r in args.rows.split(",")]:
        gen = torch.Generator(device="cuda").manual_seed(0)
        logits = (3 * torch.randn(rows, args.vocab, device="cuda", generator=gen)).to(torch.bfloat16)
        labels = torch.randint(0, args.vocab, (rows,), device="cuda", generator=gen)
        labels[::7] = -100
        ref_loss = float(_ce_chunk(logits.clone(), labels, 0.0)[0])
        loss_buf = torch.empty(rows, device="cuda")
        pred_buf = torch.empty(rows, dtype=torch.long, device="cuda")
        impls = {"eager": lambda w, y: _ce_chunk(w, y, 0.0), "inductor": lambda w, y: compiled(w, y, 0.0)}
        for cfg in args.configs.split(","):
            block, warps = (int(v) for v in cfg.split("x"))

            def run(w, y, block=block, warps=warps, bufs=(loss_buf, pred_buf)):
                with kernel_settings(ce_block=block, ce_warps=warps):
                    triton_ce.ce_chunk_(w, y, 0.0, *bufs)
                return bufs[0].sum(), bufs[1]

            impls[f"triton {cfg}"] = run
        results = {}
        for name, fn in impls.items():
            loss = float(fn(logits.clone(), labels)[0])
            results[name] = (bench(fn, logits, labels, args.reps), abs(loss - ref_loss) / abs(ref_loss))
        base = results["inductor"][0]
        nbytes = 2 * logits.numel() * logits.element_size()
        for name, (sec, err) in results.items():
            lines.append(
                f"| {rows} | {name} | {sec * 1e6:.0f} | {nbytes / sec / 1e9:.0f} | {base / sec:.2f}x | {err:.1e} |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
