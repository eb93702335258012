"""What LoRA costs inside a decoder layer: forward + backward of compiled Qwen2 layers, per layer.

    python benchmarks/lora_layer.py                    # 7B-shaped layers, 4 x 2048 tokens
    python benchmarks/lora_layer.py --shape 0.5b --batch 8

Builds a Qwen2 decoder of ``--layers`` layers at the model's width (random weights, small
vocabulary: the LM head is not what is measured), and times ``decoder(inputs_embeds)`` plus its
backward with CUDA events, in one process, for:

* ``frozen``: no adapters; the base model frozen and only the input needing a gradient. The
  floor: what the layer costs without LoRA (the same patches otherwise).
* ``lora``: LoRA r=8 on all linear layers, the default fast path (``MergedLoraForward``, weight kept,
  its Triton ``grad B`` pass, ``FusedLoraMLP``).
* ``lora_nomlp``: the same without ``FusedLoraMLP`` (each MLP projection its own merged GEMM).
* ``lora_addmm``: the merged weights through ``addmm`` (``MergedLoraForward(merge_kernel=False)``)
  instead of the one-pass ``twinkle::lora_merge``.
* ``lora_torchswiglu``: ``FusedLoraMLP(backward_kernel=False)`` (the SwiGLU backward as pointwise
  torch ops, which inductor compiles into two kernels, instead of ``twinkle::swiglu_backward``).
* ``lora_mlpkernels``: ``FusedLoraMLP(swiglu_kernels=True)`` (the SwiGLU and its LoRA products in
  two Triton kernels).
* ``lora_nokernel``: the same with ``MergedLoraForward(grad_kernel=False)`` (cuBLAS for ``grad B`` and
  the ``B`` gradients instead of one Triton pass over the output gradient).
* ``lora_grouped``: the same plus ``GroupedLoraProjections`` (q/k/v computed together: one pass over
  their input for the low-rank work, a GEMM each); ``lora_grouped_stacked`` with ``stack=True`` (one
  GEMM on the stacked merged weights).
* ``lora_unmerged``: the same without ``MergedLoraForward`` (the rank-r product beside the base GEMM).
* ``lora_rebuild``: ``MergedLoraForward(keep_merged=False)`` (the merged weight rebuilt in backward).
* ``lora_peft``: without ``FusedLoraLinear`` (peft's own LoRA forward, bf16 adapters).
* any variant with ``_autotune`` appended: its layers compiled with
  ``mode="max-autotune-no-cudagraphs"`` (inductor times Triton GEMM templates, which can take the
  LoRA add as an epilogue, against cuBLAS for every matmul shape; minutes of compile).
* any variant with ``:NAME=VALUE`` settings appended (``lora:swiglu_block_t=64:swiglu_warps=4``):
  those fields of :func:`twinkle.patch.kernel_config.kernel_config` for that variant (tile sweeps).

``--profile`` adds, per variant, the CUDA kernels of one profiled forward + backward.

Prints ms per layer and the LoRA overhead over the floor: the part of a 7B LoRA step that any
LoRA-specific kernel work can win back (docs/decisions/0007-stacked-lora-measured.md).
"""

from __future__ import annotations

import argparse
import sys

from model_shapes import QWEN25_05B, QWEN25_7B, qwen2_config

SHAPES = {"7b": QWEN25_7B, "0.5b": QWEN25_05B}


def build(shape: dict, layers: int, variant: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config
    from twinkle.patch.fastpath import apply_patches, decoder_of, resolve_patches

    fields = {k: v for k, v in qwen2_config(shape).items() if k != "model_type"}
    fields.update(num_hidden_layers=layers, vocab_size=1024)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            Qwen2Config(**fields), dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    autotune = variant.endswith("_autotune")
    variant = variant.removesuffix("_autotune")
    if variant == "frozen":
        model.requires_grad_(False)
    else:
        config = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(model, config)
    disabled = ["FusedLinearCrossEntropy", "ActivationCheckpointing"]
    if variant == "lora_peft":
        disabled.append("FusedLoraLinear")
    if variant == "lora_unmerged":
        disabled.append("MergedLoraForward")
    if variant == "lora_nomlp":
        disabled.append("FusedLoraMLP")
    patches = resolve_patches(None, disabled)
    if variant.startswith("lora_grouped"):
        patches = resolve_patches([*(p.name for p in patches), "GroupedLoraProjections"])
    for patch in patches:
        if autotune and patch.name == "CompileDecoderLayers":
            patch.mode = "max-autotune-no-cudagraphs"
        if variant == "lora_rebuild" and patch.name == "MergedLoraForward":
            patch.keep_merged = False
        if variant == "lora_nokernel" and patch.name == "MergedLoraForward":
            patch.grad_kernel = False
        if variant == "lora_addmm" and patch.name == "MergedLoraForward":
            patch.merge_kernel = False
        if variant == "lora_grouped_stacked" and patch.name == "GroupedLoraProjections":
            patch.stack = True
        if variant == "lora_mlpkernels" and patch.name == "FusedLoraMLP":
            patch.swiglu_kernels = True
        if variant == "lora_torchswiglu" and patch.name == "FusedLoraMLP":
            patch.backward_kernel = False
    applied = apply_patches(model, patches)
    model.train()
    return decoder_of(model), applied


def time_variant(
    shape: dict, layers: int, batch: int, seq: int, variant: str, iters: int, profile: bool = False
) -> tuple[float, float, list]:
    from twinkle.patch.kernel_config import kernel_settings

    variant, *settings = variant.split(":")
    changes = {name.lower(): int(value) for name, value in (setting.split("=") for setting in settings)}
    with kernel_settings(**changes):
        return _time(shape, layers, batch, seq, variant, iters, profile)


def _time(shape: dict, layers: int, batch: int, seq: int, variant: str, iters: int, profile: bool):
    import torch

    decoder, applied = build(shape, layers, variant)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, seq, shape["hidden_size"], device="cuda", dtype=torch.bfloat16, generator=gen)
    x.requires_grad_(True)
    grad = torch.randn_like(x)

    def step() -> None:
        out = decoder(inputs_embeds=x, use_cache=False).last_hidden_state
        out.backward(grad)
        x.grad = None
        for p in decoder.parameters():
            p.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        with profiler(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(f"\n### {variant}: CUDA kernels of one forward + backward ({layers} layers)\n")
        print("```")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
        print("```")
    return start.elapsed_time(end) / iters / layers, peak, applied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--variants", default="frozen,lora,lora_nomlp,lora_unmerged,lora_peft")
    parser.add_argument("--profile", action="store_true", help="print each variant's kernels of one step")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("lora_layer.py needs a CUDA GPU")
    shape = SHAPES[args.shape]
    rows = []
    for variant in args.variants.split(","):
        ms, peak, applied = time_variant(shape, args.layers, args.batch, args.seq, variant, args.iters, args.profile)
        rows.append((variant, ms, peak))
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        print(f"[{variant}] {ms:.3f} ms/layer; patches {applied}", file=sys.stderr, flush=True)
    times = {variant: ms for variant, ms, _ in rows}
    floor = times.get("frozen")
    base = times.get("lora")
    device = torch.cuda.get_device_name(0)
    print(f"\n{args.shape} layers, {args.batch}x{args.seq} tokens, {device}, torch {torch.__version__}\n")
    print(f"| variant | ms / layer (fwd+bwd) | LoRA overhead over frozen | vs lora | peak GiB ({args.layers} layers) |")
    print("|---|---|---|---|---|")
    for variant, ms, peak in rows:
        over = f"{ms - floor:+.3f} ms ({(ms / floor - 1) * 100:+.1f}%)" if floor else "-"
        ratio = f"{base / ms:.3f}x" if base else "-"
        print(f"| {variant} | {ms:.3f} | {over} | {ratio} | {peak:.2f} |")


if __name__ == "__main__":
    main()
