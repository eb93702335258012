"""How long paging one LoRA adapter with its AdamW state out of the device and back takes.

    python benchmarks/adapter_paging.py                       # 7B shape, r=8 all-linear, CUDA
    python benchmarks/adapter_paging.py --shape tiny --device cpu --threads 1
    python benchmarks/adapter_paging.py --shape 7b --device cpu --threads 1 --repeats 3   # the harness on a CPU

Builds only the adapter (no base model): the LoRA ``A``/``B`` parameters of every linear layer of
the shape (Qwen2.5-7B: 28 layers, hidden 3584, intermediate 18944, 28 query / 4 key-value heads of
128; q, k, v, o, gate, up, down), in float32 (peft's default) and in bfloat16 (what the service's
CUDA fast path casts LoRA weights to), one AdamW step taken so the optimizer holds its two moments
(fused AdamW on CUDA, as the fast path builds it: its step counters live on the device too).
Then :class:`twinkle.model.paging.AdapterPager` pages it out (into its pinned host block,
reserved beforehand as ``twinkle.model.adapter_pool.AdapterPool`` does at admission) and in, each timed to completion
(``synchronize``), for two cases:

* ``idle``: parameters + AdamW state (between steps: the gradients were dropped at ``zero_grad``);
* ``mid-window``: parameters + gradients + AdamW state (paged between forward_backward and step).

On a CPU device the pager copies into a separate host block (``copy_on_cpu=True``), so the
harness runs the same code; the figures that matter are CUDA's (target: round trip <= 50 ms for
the 7B adapter, issue 30). Every round trip is checked bit-exact. Prints a Markdown table;
``--out`` also writes it to a file (``benchmarks/results/adapter_paging-<stamp>.md``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import QWEN25_05B, QWEN25_7B, TINY  # noqa: E402

SHAPES = {"7b": QWEN25_7B, "0.5b": QWEN25_05B, "tiny": TINY}
TARGET_MS = 50.0


def lora_shapes(shape: dict) -> list[tuple[int, int]]:
    """``(in, out)`` of the 7 linear layers of every decoder layer of a Qwen2 shape."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = shape.get("head_dim", hidden // shape["num_attention_heads"])
    q, kv = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    attention = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden)]
    per_layer = attention + [(hidden, inter), (hidden, inter), (inter, hidden)]
    return per_layer * shape["num_hidden_layers"]


class AdapterOnly:
    """The part of a ``TransformersModel`` the pager touches: ``device`` and ``state_of(name)``."""

    def __init__(self, shape: dict, rank: int, device, fused: bool, dtype) -> None:
        import torch

        self.device = torch.device(device)
        gen = torch.Generator(device="cpu").manual_seed(0)
        params = []
        for fan_in, fan_out in lora_shapes(shape):
            for size in ((rank, fan_in), (fan_out, rank)):
                t = torch.randn(size, generator=gen).to(self.device, dtype)
                params.append(torch.nn.Parameter(t))
        kwargs = {"fused": True} if fused else {"foreach": True}
        optimizer = torch.optim.AdamW(params, lr=1e-4, **kwargs)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        self.state = SimpleNamespace(name="tenant", params=params, optimizer=optimizer)

    def state_of(self, name: str):
        return self.state

    def set_grads(self, present: bool) -> None:
        import torch

        for p in self.state.params:
            p.grad = torch.full_like(p, 0.5) if present else None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _checksum(model: AdapterOnly) -> list:
    import torch

    out = [p.detach().clone() for p in model.state.params]
    out += [p.grad.clone() for p in model.state.params if p.grad is not None]
    for p in model.state.params:
        out += [v.clone() for _, v in sorted(model.state.optimizer.state[p].items()) if torch.is_tensor(v)]
    return out


def measure(model: AdapterOnly, grads: bool, repeats: int, warmup: int, label: str) -> dict:
    import torch
    from twinkle.model.paging import AdapterPager

    model.set_grads(grads)
    pager = AdapterPager(model, copy_on_cpu=True)
    nbytes = pager.adapter_bytes("tenant")
    start = time.perf_counter()
    pager.reserve("tenant", nbytes)  # what AdapterPool.add does at admission (pinned on CUDA)
    reserve_ms = (time.perf_counter() - start) * 1e3
    before = _checksum(model)
    outs, ins = [], []
    for i in range(warmup + repeats):
        _sync(model.device)
        start = time.perf_counter()
        pager.page_out("tenant")
        pager.synchronize("tenant")
        mid = time.perf_counter()
        pager.page_in("tenant")
        _sync(model.device)
        end = time.perf_counter()
        if i >= warmup:
            outs.append((mid - start) * 1e3)
            ins.append((end - mid) * 1e3)
    after = _checksum(model)
    exact = len(before) == len(after) and all(torch.equal(x, y) for x, y in zip(before, after))
    out_ms, in_ms = statistics.median(outs), statistics.median(ins)
    return {
        "case": f"{label}, {'mid-window' if grads else 'idle'}",
        "bytes": nbytes,
        "pinned": bool(pager.host_block("tenant") is not None and pager.pins),
        "reserve_ms": reserve_ms,
        "out_ms": out_ms,
        "in_ms": in_ms,
        "round_ms": out_ms + in_ms,
        "gbps": 2 * nbytes / ((out_ms + in_ms) / 1e3) / 1e9,
        "exact": exact,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="adapter dtypes to time (peft keeps float32; the service's CUDA fast path casts LoRA to bfloat16)",
    )
    parser.add_argument(
        "--fused",
        choices=["auto", "on", "off"],
        default="auto",
        help="fused AdamW, step counters on the device (auto: on CUDA, as the fast path builds it)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (a loaded CPU machine: 1)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fused = args.fused == "on" or (args.fused == "auto" and device.type == "cuda")
    rows = []
    params = 0
    for dtype_name in args.dtypes.split(","):
        model = AdapterOnly(SHAPES[args.shape], args.rank, device, fused, getattr(torch, dtype_name.strip()))
        params = sum(p.numel() for p in model.state.params)
        rows += [measure(model, grads, args.repeats, args.warmup, dtype_name.strip()) for grads in (False, True)]
        del model
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"# adapter paging: {args.shape} shape, LoRA r={args.rank} all-linear, {params / 1e6:.2f}M parameters, "
        f"AdamW{' fused' if fused else ''}; device {name}, torch {torch.__version__}; median of {args.repeats}",
        "",
        "| case | bytes | pinned | reserve ms (once) | out ms | in ms | round trip ms | GB/s | exact | <= 50 ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ok = "yes" if r["round_ms"] <= TARGET_MS else "no"
        lines.append(
            f"| {r['case']} | {r['bytes'] / 2**20:.1f} MiB | {'yes' if r['pinned'] else 'no'} | {r['reserve_ms']:.1f} "
            f"| {r['out_ms']:.2f} | {r['in_ms']:.2f} | {r['round_ms']:.2f} | {r['gbps']:.1f} | {r['exact']} | {ok} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
