"""Attention over one packed batch, each way of keeping it within sequences: forward + backward time and error.

    python benchmarks/varlen_attention.py                  # 7B and 0.5B attention shapes, on CUDA
    python benchmarks/varlen_attention.py --shape 0.5b --repeat 50

The batch is one step of ``train_throughput.py``'s packed rows (sequences of log-uniform random
length 32-2048, ``batch * 2048`` tokens), one decoder layer's attention (Qwen2.5 heads, GQA). Ways:

* ``block_mask``: sdpa over the whole row with the ``[T, T]`` block-diagonal causal mask (what
  transformers builds for packed rows on sdpa);
* ``per_sequence``: one sdpa call per sequence (``is_causal``; cuDNN or flash per call);
* ``varlen_flash``: ``twinkle.patch.varlen.packed_attention``, torch's ``varlen_attn`` (FA2);
* ``cudnn_ragged``: ``aten::_cudnn_attention_forward`` with cumulative lengths (cuDNN's ragged
  layout; the key and value heads repeated), and ``cudnn_ragged_gqa`` without repeating them;
* ``whole_rows``: for scale, sdpa on ``T / 2048`` whole causal rows of 2048 (more pairs, other math).

Each is checked against float32 per-sequence attention (relative error of the output and of the
q/k/v gradients) and timed with CUDA events (median of ``--repeat`` forward + backward passes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "twinkle_core" / "src"))

from model_shapes import QWEN25_05B, QWEN25_7B  # noqa: E402
from train_throughput import SEQ_LEN, packed_lengths  # noqa: E402

SHAPES = {"7b": (QWEN25_7B, 4), "0.5b": (QWEN25_05B, 8)}


def _ways(torch, lengths, heads, kv_heads):
    F = torch.nn.functional
    from twinkle.patch import varlen

    groups = heads // kv_heads
    total = sum(lengths)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]

    def block_mask(q, k, v, cu, max_len, scale):
        seq = torch.repeat_interleave(
            torch.arange(len(lengths), device=q.device), torch.tensor(lengths, device=q.device)
        )
        pos = torch.arange(total, device=q.device)
        mask = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=mask, scale=scale, enable_gqa=True,
        )  # fmt: skip
        return out[0].transpose(0, 1)

    def per_sequence(q, k, v, cu, max_len, scale):
        outs = []
        for a, b in zip(bounds, bounds[1:]):
            out = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                is_causal=True, scale=scale, enable_gqa=True,
            )  # fmt: skip
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs)

    def varlen_flash(q, k, v, cu, max_len, scale):
        return varlen.packed_attention(q, k, v, cu, max_len, scaling=scale)

    def cudnn_ragged(q, k, v, cu, max_len, scale, repeat=True):
        if repeat and groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu, cu, max_len, max_len, q.requires_grad, 0.0, True, False, scale=scale
        )[0]
        return out

    def cudnn_ragged_gqa(q, k, v, cu, max_len, scale):
        return cudnn_ragged(q, k, v, cu, max_len, scale, repeat=False)

    def whole_rows(q, k, v, cu, max_len, scale):
        rows = total // SEQ_LEN
        shape = (rows, SEQ_LEN)

        def view(t):
            return t[: rows * SEQ_LEN].reshape(*shape, t.shape[1], t.shape[2]).transpose(1, 2)

        out = F.scaled_dot_product_attention(view(q), view(k), view(v), is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(rows * SEQ_LEN, q.shape[1], q.shape[2])

    ways = {"block_mask": block_mask, "per_sequence": per_sequence}
    if torch.cuda.is_available():
        ways.update(
            varlen_flash=varlen_flash,
            cudnn_ragged=cudnn_ragged,
            cudnn_ragged_gqa=cudnn_ragged_gqa,
            whole_rows=whole_rows,
        )
    return ways, bounds


def run(shape_name: str, repeat: int, device: str) -> list[dict]:
    import torch

    shape, batch = SHAPES[shape_name]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    dim = shape["hidden_size"] // heads
    total = batch * SEQ_LEN if device == "cuda" else 512
    lengths = packed_lengths(batch * SEQ_LEN, 0) if device == "cuda" else [100, 37, 250, 125]
    ways, bounds = _ways(torch, lengths, heads, kv_heads)
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = [torch.randn(total, h, dim, generator=gen) for h in (heads, kv_heads, kv_heads)]
    grad = torch.randn(total, heads, dim, generator=gen)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    scale = dim**-0.5
    ref_in = [t.to(device).requires_grad_(True) for t in base]
    ref = ways["per_sequence"](*ref_in, cu, max(lengths), scale)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.to(device))
    ref = ref.detach()
    results = []
    for name, fn in ways.items():
        inputs = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in base]
        g = grad.to(device=device, dtype=dtype)
        row = {"shape": shape_name, "way": name, "tokens": total, "sequences": len(lengths)}
        try:
            out = fn(*inputs, cu, max(lengths), scale)
            grads = torch.autograd.grad(out, inputs, g)
            out = out.detach()
        except Exception as exc:  # a way this torch / GPU does not support
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            results.append(row)
            continue
        if name != "whole_rows":

            def rel(a, b):
                return float((a.float() - b.float()).norm() / b.float().norm())

            row["out_err"] = rel(out, ref)
            row["grad_err"] = max(rel(a, b) for a, b in zip(grads, ref_grads))
        times = []
        for _ in range(repeat):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.autograd.grad(fn(*inputs, cu, max(lengths), scale), inputs, g)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                torch.autograd.grad(fn(*inputs, cu, max(lengths), scale), inputs, g)
                times.append(1e3 * (time.perf_counter() - t0))
        row["ms"] = statistics.median(times)
        results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="7b,0.5b")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke run: small shapes)"
    print(f"# varlen_attention {time.strftime('%Y%m%d-%H%M%S')}\n\n{name}; torch {torch.__version__}\n")
    print("| shape | way | tokens | sequences | fwd+bwd ms | vs varlen_flash | output err | grad err |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape_name in args.shape.split(","):
        rows = run(shape_name, args.repeat, device)
        flash = next((r["ms"] for r in rows if r["way"] == "varlen_flash" and "ms" in r), None)
        for r in rows:
            if "error" in r:
                print(f"| {shape_name} | {r['way']} | {r['tokens']} | {r['sequences']} | {r['error']} | | | |")
                continue
            ratio = f"{flash / r['ms']:.2f}x" if flash else "-"
            errs = (f"{r['out_err']:.1e}", f"{r['grad_err']:.1e}") if "out_err" in r else ("-", "-")
            print(
                f"| {shape_name} | {r['way']} | {r['tokens']} | {r['sequences']} | {r['ms']:.3f} | {ratio} | "
                f"{errs[0]} | {errs[1]} |"
            )


if __name__ == "__main__":
    main()
