"""What FP8 would buy a LoRA step: a decoder layer's frozen-weight GEMMs in bf16 against FP8.

    python benchmarks/fp8_headroom.py                 # Qwen2.5-7B shapes, 4 x 2048 tokens
    python benchmarks/fp8_headroom.py --shape 0.5b --tokens 16384

A LoRA step spends most of its time in the base GEMMs of each layer: the forward ``x @ W^T`` and
the input gradient ``g @ W`` of every projection (the frozen ``W`` needs no weight gradient).
These run at the board's power cap in bf16 (decision 0011). FP8 GEMMs do the same FLOPs for less
energy, but they are not exact, so twinkle does not switch them on by default. This script measures
how much they would save before anyone builds them:

* ``bf16``: ``torch.mm`` on bf16 operands, as the step runs them now.
* ``fp8 row-wise``: ``torch._scaled_mm`` on e4m3 operands with one scale per row of the activation
  or gradient and one per output channel of the weight. The operands are quantized beforehand.
* ``fp8 row-wise + quantize``: the same plus quantizing each activation and gradient on the way in.
  That pass is compiled by inductor; one pass serves q/k/v and one gate/up. The weights are frozen,
  so they are quantized once and never in the step.
* ``fp8 tensor-wise``: one scale per tensor (cuBLAS), operands quantized beforehand.

Each mode runs the layer's whole GEMM sequence back to back for ``--seconds``, so the power cap
applies to all of them alike, and ``bf16`` runs again at the end to show any drift. The script also
prints the relative error of one ``[gate; up]`` product against float32, for bf16 and FP8 row-wise,
and what the modes would make of a step of ``--step-ms`` with ``--layers`` layers.
"""

from __future__ import annotations

import argparse
import sys
import time

from model_shapes import QWEN25_05B, QWEN25_7B

SHAPES = {"7b": QWEN25_7B, "0.5b": QWEN25_05B}
E4M3_MAX = 448.0


def gemms(shape: dict) -> list[tuple[str, int, int, str]]:
    """``(name, in, out, input)`` of the layer's frozen projections; ``input`` names what they share."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    return [
        ("q", h, h, "norm1"),
        ("k", h, kv, "norm1"),
        ("v", h, kv, "norm1"),
        ("o", h, h, "attn"),
        ("gate_up", h, 2 * i, "norm2"),
        ("down", i, h, "h"),
    ]


def quantize_rows(t):
    """e4m3 values and float32 ``[rows, 1]`` scales, one per row (the row's max maps to 448)."""
    import torch

    amax = t.abs().amax(-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


def quantize_tensor(t):
    import torch

    scale = (t.abs().max().float().clamp(min=1e-12) / E4M3_MAX).reshape(())
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


class Layer:
    """One layer's operands, in every form the modes need."""

    def __init__(self, shape: dict, tokens: int, gen) -> None:
        import torch

        def rand(*size, std=1.0):
            return (torch.randn(*size, device="cuda", generator=gen) * std).to(torch.bfloat16)

        self.specs = gemms(shape)
        self.inputs = {name: rand(tokens, n_in) for _, n_in, _, name in self.specs}
        self.weights = {name: rand(n_out, n_in, std=0.02) for name, n_in, n_out, _ in self.specs}
        self.grads = {name: rand(tokens, n_out, std=1e-3) for name, _, n_out, _ in self.specs}
        rows = torch.compile(quantize_rows, dynamic=False)
        self.quantize = rows
        # activations and gradients, per row; weights per output channel (forward: rows of W) and
        # per input channel (input gradient: rows of W^T, kept transposed so _scaled_mm gets a
        # column-major second operand)
        self.q_inputs = {k: rows(v) for k, v in self.inputs.items()}
        self.q_grads = {k: rows(v) for k, v in self.grads.items()}
        self.q_weights = {}
        self.q_weights_t = {}
        for name, w in self.weights.items():
            wq, ws = quantize_rows(w)
            self.q_weights[name] = (wq, ws.reshape(1, -1))
            wtq, wts = quantize_rows(w.t().contiguous())
            self.q_weights_t[name] = (wtq, wts.reshape(1, -1))
        self.t_inputs = {k: quantize_tensor(v) for k, v in self.inputs.items()}
        self.t_grads = {k: quantize_tensor(v) for k, v in self.grads.items()}
        self.t_weights = {k: quantize_tensor(v) for k, v in self.weights.items()}
        self.t_weights_t = {k: quantize_tensor(v.t().contiguous()) for k, v in self.weights.items()}

    def bf16(self) -> None:
        import torch

        for name, _, _, src in self.specs:
            torch.mm(self.inputs[src], self.weights[name].t())
        for name, _, _, _ in self.specs:
            torch.mm(self.grads[name], self.weights[name])

    def fp8_rows(self, quantize: bool = False) -> None:
        import torch

        bf16 = torch.bfloat16
        q_inputs = {k: self.quantize(v) for k, v in self.inputs.items()} if quantize else self.q_inputs
        for name, _, _, src in self.specs:
            (xq, xs), (wq, ws) = q_inputs[src], self.q_weights[name]
            torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=bf16)
        for name, _, _, _ in self.specs:
            gq, gs = self.quantize(self.grads[name]) if quantize else self.q_grads[name]
            wtq, wts = self.q_weights_t[name]
            torch._scaled_mm(gq, wtq.t(), scale_a=gs, scale_b=wts, out_dtype=bf16)

    def fp8_quantized(self) -> None:
        self.fp8_rows(quantize=True)

    def fp8_tensor(self) -> None:
        import torch

        bf16 = torch.bfloat16
        for name, _, _, src in self.specs:
            (xq, xs), (wq, ws) = self.t_inputs[src], self.t_weights[name]
            torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=bf16)
        for name, _, _, _ in self.specs:
            (gq, gs), (wtq, wts) = self.t_grads[name], self.t_weights_t[name]
            torch._scaled_mm(gq, wtq.t(), scale_a=gs, scale_b=wts, out_dtype=bf16)


def sustained(fn, seconds: float) -> float:
    """Milliseconds per call of ``fn``, called back to back for about ``seconds``."""
    import torch

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - start
    iters = max(3, int(seconds / max(once, 1e-4)))
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / iters


def errors(layer: Layer) -> tuple[float, float]:
    """Relative errors of the ``[gate; up]`` forward product in bf16 and FP8 row-wise, against float32."""
    import torch

    x, w = layer.inputs["norm2"], layer.weights["gate_up"]
    ref = x.float() @ w.float().t()
    (xq, xs), (wq, ws) = layer.q_inputs["norm2"], layer.q_weights["gate_up"]
    fp8 = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16).float()
    bf16 = (x @ w.t()).float()
    return ((bf16 - ref).norm() / ref.norm()).item(), ((fp8 - ref).norm() / ref.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--tokens", type=int, default=4 * 2048)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--step-ms", type=float, default=441.0, help="the measured step to project from")
    parser.add_argument("--layers", type=int, default=None, help="default: the model's")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("fp8_headroom.py needs a CUDA GPU")
    shape = SHAPES[args.shape]
    layers = args.layers or shape["num_hidden_layers"]
    layer = Layer(shape, args.tokens, torch.Generator(device="cuda").manual_seed(0))
    flops = sum(2 * 2 * args.tokens * n_in * n_out for _, n_in, n_out, _ in layer.specs)
    modes = [
        ("bf16", layer.bf16),
        ("fp8 row-wise", layer.fp8_rows),
        ("fp8 row-wise + quantize", layer.fp8_quantized),
        ("fp8 tensor-wise", layer.fp8_tensor),
        ("bf16, again", layer.bf16),
    ]
    times = [(name, sustained(fn, args.seconds)) for name, fn in modes]
    bf16_ms = times[0][1]
    err_bf16, err_fp8 = errors(layer)
    device = torch.cuda.get_device_name(0)
    print(f"\n{args.shape} layer GEMMs (forward + input gradient), {args.tokens} tokens, {device}")
    tflop = flops / 1e12
    print(f"torch {torch.__version__}; each mode back to back for {args.seconds:.0f} s; {tflop:.2f} TFLOP a layer\n")
    print(f"| mode | ms / layer | TFLOP/s | vs bf16 | {layers} layers | step of {args.step_ms:.0f} ms would be |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ms in times:
        step = args.step_ms - layers * (bf16_ms - ms)
        tflops = flops / ms / 1e9
        print(f"| {name} | {ms:.3f} | {tflops:.0f} | {bf16_ms / ms:.2f}x | {layers * ms:.1f} ms | {step:.0f} ms |")
    print(f"\nrelative error of [gate; up] against float32: bf16 {err_bf16:.2e}, fp8 row-wise {err_fp8:.2e}")


if __name__ == "__main__":
    main()
