"""The LM head and its loss, forward + backward, frozen head: chunk sizes against the two-GEMM floor.

    python benchmarks/lm_head.py                        # Qwen2.5-7B head, 4 x 2048 tokens
    python benchmarks/lm_head.py --shape 0.5b --tokens 16384 --rows 512,2048

A LoRA step never trains the head, but it still pays for it: the logits GEMM
(``[tokens, H] x [H, V]``), the cross-entropy, and the hidden-state gradient GEMM
(``[tokens, V] x [V, H]``). :func:`twinkle.patch.fused_linear_ce.linear_cross_entropy` runs them
chunk by chunk so that no ``[tokens, V]`` float32 logits exist; a chunk of ``R`` rows makes the
second GEMM ``R x H`` outputs over a reduction of ``V``: with few rows it has fewer output tiles
than the GPU has SMs. This prints, in one process on the same inputs:

* ``floor``: the two GEMMs over all tokens at once, nothing else (bf16 ``[tokens, V]`` logits
  in memory): what any implementation pays;
* ``gemms@R``: the same two GEMMs chunk by chunk, ``R`` rows each, nothing else;
* ``ours@R``: ``linear_cross_entropy(..., chunk_rows=R)`` forward + backward (the default rows
  are marked);
* ``liger``: liger-kernel's fused linear cross-entropy, when it imports;
* ``plain``: ``F.cross_entropy(logits.float())`` on full logits (what the plain path runs).

Times are CUDA-event milliseconds per forward + backward over ``--iters`` back-to-back runs,
TFLOP/s over the two GEMMs' ``4 * tokens * V * H`` FLOPs, and the peak memory above the inputs.
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys

from model_shapes import QWEN25_05B, QWEN25_7B

SHAPES = {"7b": QWEN25_7B, "0.5b": QWEN25_05B}


def timed(iters: int, fn) -> tuple[float, float]:
    """(ms per call, peak GiB above what was allocated before) of ``fn()`` after two warm-up calls."""
    import torch

    fn()
    fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, (torch.cuda.max_memory_allocated() - before) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rows", default="512,1024,2048,4096", help="chunk rows to try")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-plain", action="store_true", help="skip the full-logits float32 baseline")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("lm_head.py needs a CUDA GPU")
    from twinkle.patch import fused_linear_ce
    from twinkle.patch.fused_linear_ce import linear_cross_entropy

    shape = SHAPES[args.shape]
    t, h_size, vocab = args.tokens, shape["hidden_size"], shape["vocab_size"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(vocab, h_size, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    hidden = torch.randn(t, h_size, device="cuda", dtype=torch.bfloat16, generator=gen)
    hidden.requires_grad_(True)
    labels = torch.randint(0, vocab, (t,), device="cuda", generator=gen)
    flop = 4.0 * t * vocab * h_size
    default_rows = fused_linear_ce._chunk_rows(t, vocab, None)

    def floor() -> None:
        logits = hidden.detach() @ weight.t()
        logits @ weight

    def chunked_gemms(rows: int):
        buf = torch.empty(rows, vocab, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(t, h_size, device="cuda", dtype=torch.bfloat16)

        def run() -> None:
            for s in range(0, t, rows):
                torch.mm(hidden.detach()[s : s + rows], weight.t(), out=buf)
                torch.mm(buf, weight, out=out[s : s + rows])

        return run

    def ours(rows: int):
        def run() -> None:
            loss = linear_cross_entropy(hidden, weight, labels, chunk_rows=rows, num_labels=t)
            loss.backward()
            hidden.grad = None

        return run

    def plain() -> None:
        logits = hidden @ weight.t()
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        loss.backward()
        hidden.grad = None

    runs = {"floor": floor}
    rows_list = [int(r) for r in args.rows.split(",")]
    for rows in rows_list:
        runs[f"gemms@{rows}"] = chunked_gemms(rows)
    for rows in rows_list:
        runs[f"ours@{rows}" + (" (default)" if rows == default_rows else "")] = ours(rows)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def liger() -> None:
            liger_loss(weight, hidden, labels).backward()
            hidden.grad = None

        runs["liger"] = liger
    except ImportError:
        print("(liger-kernel not installed: no liger row)")
    if not args.no_plain:
        runs["plain"] = plain

    ref = float(linear_cross_entropy(hidden.detach(), weight, labels, chunk_rows=t))
    print(
        f"{args.shape} head, {t} tokens, vocab {vocab}, hidden {h_size}, {torch.cuda.get_device_name(0)}, "
        f"torch {torch.__version__}; loss {ref / t:.4f} per token\n"
    )
    print("| run | ms (fwd+bwd) | TFLOP/s (2 GEMMs) | vs floor | peak GiB above inputs |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for name, fn in runs.items():
        ms, peak = timed(args.iters, fn)
        base = base or ms
        print(f"| {name} | {ms:.2f} | {flop / ms / 1e9:.0f} | {base / ms:.2f}x | {peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
