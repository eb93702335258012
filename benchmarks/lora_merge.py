"""What building a merged LoRA weight costs: ``twinkle::lora_merge`` against ``addmm`` and a plain copy.

    python benchmarks/lora_merge.py                  # the 7B layer's merges
    python benchmarks/lora_merge.py --shape 0.5b
    python benchmarks/lora_merge.py --sweep          # tile shapes and warps of the kernel too

``MergedLoraForward`` and ``FusedLoraMLP`` build ``W + s (B @ A)`` for every LoRA projection once
per step (decision 0008). The merge is memory bound: it reads ``W`` and writes the merged weight,
so a copy of ``W`` (``out.copy_(W)``, the same bytes each way) is its floor. ``addmm(W, B, A,
alpha=s)`` is what PyTorch offers instead (it copies ``W`` into its output, then cuBLAS reads and
rewrites it). Per projection shape of the model (gate and up stacked, as ``FusedLoraMLP`` merges
them), times each with CUDA events over ``--iters`` calls and prints microseconds, the HBM
bandwidth it reaches (bytes of ``W`` read plus bytes written) and its ratio to the copy. Each
kernel configuration is checked against ``addmm`` (at most one bf16 rounding apart). Merges of a
few MB (``k / v``) are bound by the launch when called eagerly, as here; in the step they run
inside compiled layers.
"""

from __future__ import annotations

import argparse
import sys

from model_shapes import QWEN25_05B, QWEN25_7B

SHAPES = {"7b": QWEN25_7B, "0.5b": QWEN25_05B}
#: Tiles (rows x columns of ``W``) and warps tried by ``--sweep``.
SWEEP = (
    (128, 128, 8),
    (128, 128, 4),
    (64, 128, 4),
    (64, 64, 4),
    (64, 256, 4),
    (32, 256, 4),
    (32, 512, 4),
    (16, 256, 4),
)


def projections(shape: dict) -> list[tuple[str, int, int]]:
    """``(name, out, in)`` of each merge a decoder layer runs."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head = hidden // shape["num_attention_heads"]
    kv = head * shape["num_key_value_heads"]
    return [
        ("q / o", hidden, hidden),
        ("k / v", kv, hidden),
        ("[gate; up]", 2 * inter, hidden),
        ("down", hidden, inter),
    ]


def timed(fn, iters: int) -> float:
    """Microseconds per call of ``fn`` (CUDA events, after 5 warm-up calls)."""
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def measure(name: str, n_out: int, n_in: int, tiles: list, rank: int, iters: int, gen) -> None:
    """Print the rows of one projection shape: the copy, ``addmm`` and the kernel at each tiling."""
    import torch
    from twinkle.patch import triton_lora
    from twinkle.patch.kernel_config import kernel_settings

    w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n_out, rank, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.01
    a = torch.randn(rank, n_in, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = 4.0
    ref = torch.addmm(w, b, a, alpha=scale)
    out = torch.empty_like(w)
    moved = 2 * w.numel() * w.element_size()
    copy_us = timed(lambda: out.copy_(w), iters)

    def row(what: str, us: float, diff: str = "-") -> None:
        gbs = moved / us / 1e6
        print(f"| {name} | {n_out}x{n_in} | {what} | {us:.1f} | {gbs:.2f} | {us / copy_us:.2f}x | {diff} |", flush=True)

    row("copy of W (floor)", copy_us)
    row("addmm(W, B, A, alpha=s)", timed(lambda: torch.addmm(w, b, a, alpha=scale), iters))
    default = tiles[0]
    for block_o, block_i, warps in tiles:
        with kernel_settings(lora_merge_block_o=block_o, lora_merge_block_i=block_i, lora_merge_warps=warps):
            merged = triton_lora.lora_merge([w], [b], [a], [scale])
            # one bf16 rounding of values near |W| (about 4 here): at most 2^-5
            diff = (merged.float() - ref.float()).abs().max().item()
            us = timed(lambda: triton_lora.lora_merge([w], [b], [a], [scale]), iters)
        mark = " (default)" if (block_o, block_i, warps) == default else ""
        row(f"lora_merge {block_o}x{block_i}, {warps} warps{mark}", us, f"{diff:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="also time the kernel's other tile shapes")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("lora_merge.py needs a CUDA GPU")
    from twinkle.patch.kernel_config import kernel_config

    config = kernel_config()
    default = (config.lora_merge_block_o, config.lora_merge_block_i, config.lora_merge_warps)
    tiles = [default] + [t for t in SWEEP if t != default] if args.sweep else [default]
    gen = torch.Generator(device="cuda").manual_seed(0)
    device = torch.cuda.get_device_name(0)
    print(f"\n{args.shape} merges, LoRA r={args.rank}, bf16, {device}, torch {torch.__version__}\n")
    print("| projection | out x in | what | us | TB/s | vs copy | max diff vs addmm |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, n_out, n_in in projections(SHAPES[args.shape]):
        measure(name, n_out, n_in, tiles, args.rank, args.iters, gen)


if __name__ == "__main__":
    main()
