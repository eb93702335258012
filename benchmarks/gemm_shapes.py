"""The base GEMMs of a decoder layer, one by one: how close cuBLAS gets to the practical ceiling.

    python benchmarks/gemm_shapes.py                 # Qwen2.5-7B shapes, 4 x 2048 tokens
    python benchmarks/gemm_shapes.py --shape 0.5b --tokens 16384

For every projection of a layer, the forward product ``x @ W^T`` and the input gradient
``g @ W`` (what a LoRA step runs for frozen weights), timed with CUDA events over ``--iters``
back-to-back calls, in TFLOP/s. Then the same projections grouped the way a fused layer would run
them (q/k/v as one ``[q+2kv, hidden]`` weight, gate/up as one ``[2 * intermediate, hidden]``
weight), against the separate calls plus the sum of their input gradients. Then the whole layer's
GEMM sequence run back to back for ``--sustain`` seconds: if the per-second figure falls, the
clock (power) sets the ceiling, not the kernels. Each table is also run with
``torch.backends.cuda.preferred_blas_library("cublaslt")``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from model_shapes import QWEN25_05B, QWEN25_7B

SHAPES = {"7b": QWEN25_7B, "0.5b": QWEN25_05B}


def projections(shape: dict) -> dict[str, tuple[int, int]]:
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    return {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i)}


def timed(iters: int, fn, *args) -> float:
    """Milliseconds per call of ``fn(*args)`` (after two warm-up calls)."""
    import torch

    fn(*args)
    fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def separate_forward(x, weights) -> None:
    import torch

    for w in weights:
        torch.nn.functional.linear(x, w)


def separate_input_grad(grads, weights):
    import torch

    acc = torch.mm(grads[0], weights[0])
    for g, w in zip(grads[1:], weights[1:]):
        acc = acc + torch.mm(g, w)
    return acc


def clocks() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--sustain", type=float, default=4.0)
    parser.add_argument("--libs", default="default,cublaslt")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("gemm_shapes.py needs a CUDA GPU")
    dev, bf16, t = "cuda", torch.bfloat16, args.tokens
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*size):
        return torch.randn(*size, device=dev, dtype=bf16, generator=gen) * 0.02

    proj = projections(SHAPES[args.shape])
    weights = {name: rand(out, inp) for name, (out, inp) in proj.items()}
    x = {name: rand(t, inp) for name, (out, inp) in proj.items()}
    g = {name: rand(t, out) for name, (out, inp) in proj.items()}
    print(f"{args.shape} projections, {t} tokens, {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"clocks before (SM MHz, W, C): {clocks()}\n")

    for lib in args.libs.split(","):
        torch.backends.cuda.preferred_blas_library("cublaslt" if lib == "cublaslt" else "cublas")
        print(f"### BLAS: {lib}\n")
        print("| projection | M x N x K | forward ms | TFLOP/s | input-grad ms | TFLOP/s |")
        print("|---|---|---|---|---|---|")
        total_flop = total_ms = 0.0
        for name, (out, inp) in proj.items():
            w, xi, gi = weights[name], x[name], g[name]
            flop = 2.0 * t * out * inp
            fwd = timed(args.iters, torch.nn.functional.linear, xi, w)
            bwd = timed(args.iters, torch.mm, gi, w)
            total_flop += 2 * flop
            total_ms += fwd + bwd
            rates = f"{fwd:.3f} | {flop / fwd / 1e9:.0f} | {bwd:.3f} | {flop / bwd / 1e9:.0f}"
            print(f"| {name} | {t}x{out}x{inp} | {rates} |")
        print(f"| all | | | | {total_ms:.3f} ms | {total_flop / total_ms / 1e9:.0f} |\n")

        print("| group | separate ms (fwd / bwd incl. sum) | grouped ms (fwd / bwd) | grouped / separate |")
        print("|---|---|---|---|")
        for group in (("q", "k", "v"), ("gate", "up")):
            ws = [weights[n] for n in group]
            xs = x[group[0]]
            gs = [g[n] for n in group]
            wcat = torch.cat(ws)
            gcat = torch.cat(gs, dim=1)

            sf = timed(args.iters, separate_forward, xs, ws)
            sb = timed(args.iters, separate_input_grad, gs, ws)
            gf = timed(args.iters, torch.nn.functional.linear, xs, wcat)
            gb = timed(args.iters, torch.mm, gcat, wcat)
            print(f"| {'/'.join(group)} | {sf:.3f} / {sb:.3f} | {gf:.3f} / {gb:.3f} | {(gf + gb) / (sf + sb):.3f} |")
        print()

    torch.backends.cuda.preferred_blas_library("cublas")
    print(f"### The layer's GEMMs back to back for {args.sustain:.0f} s (default BLAS)\n")
    print("| second | TFLOP/s | clocks (SM MHz, W, C) |")
    print("|---|---|---|")
    layer_flop = sum(4.0 * t * out * inp for out, inp in proj.values())
    began = time.perf_counter()
    second = 0
    while time.perf_counter() - began < args.sustain:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n = 0
        start.record()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            for name in proj:
                torch.nn.functional.linear(x[name], weights[name])
                torch.mm(g[name], weights[name])
            n += 1
            if n % 8 == 0:
                torch.cuda.synchronize()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end)
        second += 1
        print(f"| {second} | {layer_flop * n / ms / 1e9:.0f} | {clocks()} |")


if __name__ == "__main__":
    main()
