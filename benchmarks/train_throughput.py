"""Training throughput on one GPU: Twinkle's fast path against plain HF+PEFT and plain + Liger.

    python benchmarks/train_throughput.py                       # every row, every configuration
    python benchmarks/train_throughput.py --rows 0.5b-lora --configs liger,ours --steps 5
    python benchmarks/train_throughput.py --profile             # also one profiled step of ours/liger
    python benchmarks/train_throughput.py --rows 0.5b-lora-packed --configs liger,liger_packed,ours,ours_masked

Random-init Qwen2.5-shaped models built from a config (no downloads), batches of random
2048-token sequences, LoRA r=8 on all linear layers (peft), AdamW, sdpa attention, no
activation checkpointing. Each (row, configuration) runs in its own process (Liger patches
transformers' classes globally; compiled code and the allocator stay separate):

* ``plain``: transformers + peft as documented (fp32 adapters, peft's default), the model's
  own loss (``labels=``), ``torch.optim.AdamW`` defaults, ``clip_grad_norm_``.
* ``plain_bf16``: the same with bf16 adapters (``autocast_adapter_dtype=False``); LoRA rows.
* ``liger``: ``plain_bf16`` plus Liger kernels (fused linear cross-entropy, RMSNorm, SwiGLU,
  RoPE) applied before the model is built: the best stack a user can assemble today.
* ``ours``: ``TransformersModel`` with its default fast path (``twinkle.patch.fastpath``),
  driven by ``forward_backward`` / ``clip_grad_and_step``.
* diagnosis variants of ours: ``ours_eager`` without ``CompileDecoderLayers``; ``ours_liger``
  that plus the optional ``LigerKernels`` patch; ``ours_cudagraphs`` with the layers compiled in
  ``reduce-overhead`` mode (CUDA graphs); ``ours_lce2g`` / ``ours_lce256`` / ``ours_lce128`` with
  2 GiB / 256 / 128 MiB loss chunks (the default is 512 MiB); ``ours_inductor_ce`` with the loss
  chunk compiled by inductor instead of the Triton kernel; ``ours_wgrad512m`` / ``ours_wgrad4g``
  with 512 MiB / 4 GiB loss chunks when the LM head trains; ``ours_swiglu_saved`` without
  ``RecomputeSwiGLU`` (the MLP's ``act(gate) * up`` saved for backward instead of recomputed).
* ``ours_fp8``: ours plus the opt-in ``Fp8FrozenGemms`` (not exact: LoRA's frozen GEMMs in FP8, on
  layers of 1024+ features); ``ours_fp8_all`` the same on every layer of 16+ features.

Packed rows (``--rows 0.5b-lora-packed,7b-lora-packed``, not in the default run): each step is the
same ``batch * 2048`` tokens, in sequences of random lengths (log-uniform 32-2048, 26-47 of them
per 16k tokens). ``liger`` takes them right-padded (``[n, longest]`` with an attention mask, what
transformers' default collator gives), ``liger_packed`` as one row with restarting
``position_ids`` (``DataCollatorWithFlattening``; transformers builds a block-diagonal mask for
sdpa), ``ours`` packed by ``PaddingFreeProcessor`` (the ``VarlenAttention`` patch),
``ours_masked`` packed without that patch, ``ours_padded`` padded. Tokens/s count real tokens
only, and MFU counts each sequence's own attention (``12*L*H*len`` per token).

``--memory`` adds, per configuration, what is allocated at the peak of one step (grouped by the
code that allocated it), from ``torch.cuda.memory``'s allocation history.

Prints tokens/s, MFU (``c*N + 12*L*H*S`` FLOPs per token, c = 6 for full training and 4 for
LoRA, N = matmul parameters including the LM head, against 989 TFLOP/s bf16 dense), peak
allocated memory, and ratios against ``liger`` and ``plain``; writes a Markdown and a JSON
log to ``--out`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from model_shapes import PEAK_TFLOPS, QWEN25_05B, QWEN25_7B, TINY, flops_per_token, qwen2_config

SEQ_LEN = 2048
#: row name -> (model shape, LoRA?, micro-batch size)
ROWS = {
    "0.5b-lora": (QWEN25_05B, True, 8),
    "0.5b-full": (QWEN25_05B, False, 8),
    "7b-lora": (QWEN25_7B, True, 4),
}
#: Packed rows: each step is ``batch * 2048`` tokens of sequences of random lengths (log-uniform,
#: 32-2048, seeded), the same sequences for every configuration; not part of the default run.
PACKED_ROWS = {
    "0.5b-lora-packed": (QWEN25_05B, True, 8),
    "7b-lora-packed": (QWEN25_7B, True, 4),
}
#: Rows for checking the harness itself on any device (not part of the default run).
SMOKE_ROWS = {"tiny-lora": (TINY, True, 2), "tiny-full": (TINY, False, 2), "tiny-lora-packed": (TINY, True, 2)}
ALL_ROWS = {**ROWS, **PACKED_ROWS, **SMOKE_ROWS}
MIN_PACKED_LEN = 32
DEVICE = os.environ.get("TWINKLE_BENCH_DEVICE", "cuda")
CONFIGS = (
    "plain",
    "plain_bf16",
    "liger",
    "liger_packed",
    "ours",
    "ours_masked",
    "ours_padded",
    "ours_eager",
    "ours_liger",
    "ours_cudagraphs",
    "ours_lce2g",
    "ours_lce256",
    "ours_lce128",
    "ours_inductor_ce",
    "ours_wgrad512m",
    "ours_wgrad4g",
    "ours_swiglu_saved",
    "ours_tunableop",
    "ours_cublaslt",
    "ours_fp8",
    "ours_fp8_all",
)
#: Variants of ours for diagnosis: which patches they switch off / add.
OURS_VARIANTS = {
    "ours": ((), (), {}),
    "ours_masked": (("VarlenAttention",), (), {}),
    "ours_padded": ((), (), {}),
    "ours_eager": (("CompileDecoderLayers",), (), {}),
    "ours_liger": (("CompileDecoderLayers",), ("LigerKernels",), {}),
    "ours_cudagraphs": ((), (), {"TWINKLE_COMPILE_MODE": "reduce-overhead"}),
    "ours_lce2g": ((), (), {"TWINKLE_LCE_CHUNK_BYTES": str(2 << 30)}),
    "ours_lce256": ((), (), {"TWINKLE_LCE_CHUNK_BYTES": str(256 << 20)}),
    "ours_lce128": ((), (), {"TWINKLE_LCE_CHUNK_BYTES": str(128 << 20)}),
    "ours_inductor_ce": ((), (), {"TWINKLE_LCE_KERNEL": "inductor"}),
    "ours_wgrad512m": ((), (), {"TWINKLE_LCE_WEIGHT_GRAD_CHUNK_BYTES": str(512 << 20)}),
    "ours_wgrad4g": ((), (), {"TWINKLE_LCE_WEIGHT_GRAD_CHUNK_BYTES": str(4 << 30)}),
    "ours_swiglu_saved": (("RecomputeSwiGLU",), (), {}),
    "ours_tunableop": ((), (), {"PYTORCH_TUNABLEOP_ENABLED": "1", "PYTORCH_TUNABLEOP_TUNING": "1"}),
    "ours_cublaslt": ((), (), {"TORCH_BLAS_PREFER_CUBLASLT": "1"}),
    "ours_fp8": ((), ("Fp8FrozenGemms",), {}),  # not exact: LoRA's frozen base GEMMs in FP8
    "ours_fp8_all": ((), ("Fp8FrozenGemms",), {"TWINKLE_FP8_MIN_FEATURES": "16"}),  # small layers too
}
DEFAULT_CONFIGS = ("plain", "liger", "ours")
#: Configurations that only make sense on packed rows (sequences of different lengths).
PACKED_ONLY_CONFIGS = ("liger_packed", "ours_masked", "ours_padded")


# ---------------------------------------------------------------------- shared helpers
def qwen_config(shape: dict) -> object:
    """The ``Qwen2Config`` of ``shape`` (sdpa attention)."""
    from transformers import Qwen2Config

    fields = {k: v for k, v in qwen2_config(shape).items() if k != "model_type"}
    return Qwen2Config(**fields, attn_implementation="sdpa")


def random_batch(batch_size: int, vocab: int, step: int) -> object:
    import torch

    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (batch_size, SEQ_LEN), generator=gen)


def packed_lengths(total: int, step: int) -> list[int]:
    """Sequence lengths of one packed step: log-uniform in [32, 2048], summing to ``total`` exactly."""
    import math
    import random

    rng = random.Random(2000 + step)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(math.exp(rng.uniform(math.log(MIN_PACKED_LEN), math.log(SEQ_LEN)))))
    lengths[-1] -= sum(lengths) - total
    if lengths[-1] < MIN_PACKED_LEN:  # fold a short tail into its neighbour (still at most 2048 + 32)
        tail = lengths.pop()
        lengths[-1] += tail
    return lengths


def packed_sequences(total: int, vocab: int, step: int) -> list[object]:
    """One step of a packed row: random token sequences (int64 CPU tensors) of :func:`packed_lengths`."""
    import torch

    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in packed_lengths(total, step)]


def packed_batch(config_name: str, seqs: list, device: str) -> dict:
    """The step's batch as each configuration takes it, built before the timing (as a data loader would).

    ``liger`` (and ``plain*``): the sequences right-padded into a ``[n, longest]`` batch with an
    attention mask, pads ignored by the loss: what transformers' default collator gives.
    ``liger_packed``: one ``[1, T]`` row with ``position_ids`` restarting at each sequence and the
    first label of each sequence ignored (transformers' ``DataCollatorWithFlattening``); with sdpa,
    transformers builds the block-diagonal mask from ``position_ids``. ``ours*``: the rows packed by
    ``PaddingFreeProcessor`` (``ours_padded``: padded by the default ``InputProcessor``).
    """
    import torch

    if config_name.startswith("ours"):
        from twinkle.processor.base import InputProcessor

        rows = [{"input_ids": s.tolist()} for s in seqs]
        return InputProcessor(padding_free=config_name != "ours_padded")(rows, device=device)
    if config_name == "liger_packed":
        ids = torch.cat(seqs)[None]
        pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        labels = ids.clone()
        labels[pos == 0] = -100
        return {"input_ids": ids.to(device), "position_ids": pos.to(device), "labels": labels.to(device)}
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def lora_config() -> object:
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


# ---------------------------------------------------------------------- one configuration
def build_plain(config_name: str, shape: dict, lora: bool) -> tuple:
    """(step_fn, trainable params) for plain / plain_bf16 / liger."""
    import torch
    from transformers import AutoModelForCausalLM

    if config_name in ("liger", "liger_packed"):
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(qwen_config(shape), dtype=torch.bfloat16, attn_implementation="sdpa")
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(), autocast_adapter_dtype=(config_name == "plain"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step(batch: dict) -> float:
        out = model(**batch, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.item()

    return step, params


def build_ours(config_name: str, shape: dict, lora: bool) -> tuple:
    import torch
    from twinkle.model.transformers_model import TransformersModel
    from twinkle.patch.fastpath import resolve_patches
    from twinkle.patch.kernel_config import reset_kernel_config

    disabled, added, env = OURS_VARIANTS[config_name]
    os.environ.update(env)
    reset_kernel_config()  # the kernel knobs of this variant's environment (TWINKLE_LCE_CHUNK_BYTES, ...)
    if env.get("PYTORCH_TUNABLEOP_ENABLED") == "1":  # GEMM algorithms timed per shape during warm-up
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
    if env.get("TORCH_BLAS_PREFER_CUBLASLT") == "1":
        torch.backends.cuda.preferred_blas_library("cublaslt")
    patches = [p for p in resolve_patches(None, disabled)] + list(added)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = TransformersModel(
            config=qwen_config(shape), torch_dtype="bfloat16", device=DEVICE, seed=0, patches=patches
        )
    if lora:
        model.add_adapter_to_model("default", lora_config())
    model.set_optimizer("AdamW", lr=1e-5)
    print(f"[ours] fast path: {model.fast_path_patches}", file=sys.stderr, flush=True)

    def step(batch: dict) -> float:
        out = model.forward_backward(inputs=batch)
        model.clip_grad_and_step(max_grad_norm=1.0)
        return float(out["loss"])

    return step, model.state_of().params


def _family(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "sdpa", "attention", "_attn", "dot_do_o", "convert_dq")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "matmul", "splitk")):
        return "matmul (cuBLAS)"
    if any(k in low for k in ("adam", "multi_tensor", "foreach", "lpnorm")):
        return "optimizer + grad clip"
    if low.startswith("triton") or "liger" in low or low.startswith("_"):
        return "triton (inductor/liger)"
    if "memcpy" in low or "memset" in low:
        return "memcpy/memset"
    return "other elementwise/reduce"


def profile_step(step, ids, path: Path | None) -> dict:
    """One profiled step: GPU time by kernel family, the top kernels, and the GPU's idle gaps."""
    import gzip

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(ids)
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    cpu_ops = [e for e in events if e.device_type == DeviceType.CPU]
    families: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for k in kernels:
        ms = (k.time_range.end - k.time_range.start) / 1e3
        families[_family(k.name)] = families.get(_family(k.name), 0.0) + ms
        by_name[k.name] = by_name.get(k.name, 0.0) + ms
    # idle gaps between kernels (union of kernel intervals), with the CPU ops running then
    spans = sorted((k.time_range.start, k.time_range.end) for k in kernels)
    gaps = []
    cur_end = spans[0][1] if spans else 0
    for start, end in spans[1:]:
        if start > cur_end:
            gaps.append((start - cur_end, cur_end, start))
        cur_end = max(cur_end, end)
    first, last = (spans[0][0], cur_end) if spans else (0, 0)
    idle_ms = sum(g[0] for g in gaps) / 1e3
    described = []
    for length, start, end in sorted(gaps, reverse=True)[:12]:
        mid = (start + end) / 2
        active = [e for e in cpu_ops if e.time_range.start <= mid <= e.time_range.end]
        active.sort(key=lambda e: e.time_range.end - e.time_range.start)
        names = [e.name for e in active if not e.name.startswith("cuda")][:3]
        described.append((round(length / 1e3, 2), " < ".join(n[:60] for n in names)))
    if path is not None:
        path.write_text(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))
        with gzip.open(str(path) + ".trace.json.gz", "wt") as fh:
            prof.export_chrome_trace("/tmp/_trace.json")
            fh.write(Path("/tmp/_trace.json").read_text())
    return {
        "wall_ms": wall_ms,
        "gpu_busy_ms": sum(families.values()),
        "gpu_span_ms": (last - first) / 1e3,
        "gpu_idle_ms": idle_ms,
        "families_ms": families,
        "top_kernels_ms": [(name[:90], ms) for name, ms in sorted(by_name.items(), key=lambda kv: -kv[1])[:12]],
        "largest_gaps_ms": described,
    }


def _site(frames: list[dict]) -> str:
    """Where an allocation comes from: the first frames outside torch's Python (inductor's generated code counts)."""
    picked = []
    for frame in frames:
        name = frame.get("filename", "")
        if "/torch/" in name and "torchinductor" not in name:
            continue
        if name.startswith("??") or not name:
            continue
        picked.append(f"{Path(name).name}:{frame.get('line')}:{frame.get('name')}")
        if len(picked) == 2:
            break
    return " < ".join(picked) or "(torch internals)"


def memory_at_peak(step, ids, top: int = 14) -> dict:
    """Replay one step's allocation history: the peak and what is alive then, grouped by allocation site."""
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=500_000)
    try:
        step(ids)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live: dict[int, tuple[int, str]] = {}
    current = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for trace in snap["device_traces"]:
        for event in trace:
            action = event["action"]
            if action == "alloc":
                live[event["addr"]] = (event["size"], _site(event.get("frames", [])))
                current += event["size"]
                if current > peak:
                    peak, at_peak = current, dict(live)
            elif action == "free_completed" and event["addr"] in live:
                current -= live.pop(event["addr"])[0]
    groups: dict[str, int] = {}
    for size, site in at_peak.values():
        groups[site] = groups.get(site, 0) + size
    return {
        "before_step_gib": before / 2**30,
        "step_peak_extra_gib": peak / 2**30,
        "peak_gib": (before + peak) / 2**30,
        "top_sites_mib": [(site, size / 2**20) for site, size in sorted(groups.items(), key=lambda kv: -kv[1])[:top]],
    }


def worker(row: str, config_name: str, steps: int, warmup: int, profile_dir: str | None, memory: bool = False) -> dict:
    import torch

    shape, lora, batch_size = ALL_ROWS[row]
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    if config_name.startswith("ours"):
        step, params = build_ours(config_name, shape, lora)
    else:
        if config_name == "plain_bf16" and not lora:
            raise SystemExit("plain_bf16 only applies to LoRA rows")
        step, params = build_plain(config_name, shape, lora)
    build_s = time.perf_counter() - t_build
    packed = row.endswith("-packed")
    if packed:
        steps_seqs = [packed_sequences(batch_size * SEQ_LEN, shape["vocab_size"], s) for s in range(4)]
        batches = [packed_batch(config_name, seqs, DEVICE) for seqs in steps_seqs]
        # attention FLOPs of the sequences as they are (12 L H len per token of a len-long sequence)
        pairs = statistics.fmean(sum(len(x) ** 2 for x in seqs) for seqs in steps_seqs)
        step_flops = (
            flops_per_token(shape, lora, 0) * batch_size * SEQ_LEN
            + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * pairs
        )
    else:
        batches = []
        for s in range(4):
            ids = random_batch(batch_size, shape["vocab_size"], s).to(DEVICE)
            batches.append({"input_ids": ids, "labels": ids})
        step_flops = flops_per_token(shape, lora, SEQ_LEN) * batch_size * SEQ_LEN
    t_warm = time.perf_counter()
    losses = []
    for s in range(warmup):
        losses.append(step(batches[s % len(batches)]))
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t_warm
    t0 = time.perf_counter()
    marks = [t0]
    for s in range(steps):
        losses.append(step(batches[s % len(batches)]))  # each step reads its loss: the host waits there
        marks.append(time.perf_counter())
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    marks[-1] = t0 + elapsed
    step_times = sorted(1e3 * (b - a) for a, b in zip(marks, marks[1:]))
    tokens = steps * batch_size * SEQ_LEN
    tok_s = tokens / elapsed
    result = {
        "row": row,
        "config": config_name,
        "tokens_per_s": tok_s,
        "step_ms": 1e3 * elapsed / steps,
        # one slow step (a host hiccup) moves the mean: the spread says whether one did
        "step_ms_median": statistics.median(step_times),
        "step_ms_min": step_times[0],
        "step_ms_max": step_times[-1],
        "mfu": step_flops * steps / elapsed / (PEAK_TFLOPS * 1e12),
        "sequences_per_step": statistics.fmean(len(s) for s in steps_seqs) if packed else batch_size,
        "padded_tokens_per_step": int(batches[0]["input_ids"].numel()),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
        "build_s": build_s,
        "warmup_s": warmup_s,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "trainable_params": sum(p.numel() for p in params),
        "trainable_dtype": str(params[0].dtype),
    }
    if profile_dir and cuda:
        path = Path(profile_dir) / f"profile-{row}-{config_name}.txt"
        result["profile"] = profile_step(step, batches[0], path)
    if memory and cuda:
        result["memory"] = memory_at_peak(step, batches[0])
    return result


# ---------------------------------------------------------------------- driver
def run_worker(args: argparse.Namespace, row: str, config_name: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--rows",
        row,
        "--configs",
        config_name,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    if args.profile and config_name in ("ours", "liger", "ours_eager", "ours_fp8"):
        cmd += ["--profile-dir", str(args.out)]
    if args.memory:
        cmd += ["--memory"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["process_s"] = time.perf_counter() - started
            return result
    tail = (proc.stderr or proc.stdout)[-3000:]
    return {"row": row, "config": config_name, "error": f"exit {proc.returncode}: {tail}"}


def format_table(results: list[dict]) -> str:
    by_key = {(r["row"], r["config"]): r for r in results}
    lines = [
        "| row | config | tokens/s | step ms | step ms min / median / max | MFU | peak GiB | vs liger "
        "| vs liger_packed | vs plain | first step s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['config']} | ERROR | | | | | | | | |")
            continue
        ratio = []
        for base in ("liger", "liger_packed", "plain"):
            b = by_key.get((r["row"], base))
            ok = b is not None and "error" not in b
            ratio.append(f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if ok else "-")
        spread = "-"
        if "step_ms_median" in r:
            spread = f"{r['step_ms_min']:.0f} / {r['step_ms_median']:.0f} / {r['step_ms_max']:.0f}"
        lines.append(
            f"| {r['row']} | {r['config']} | {r['tokens_per_s'] / 1e3:.1f}k | {r['step_ms']:.0f} | {spread} | "
            f"{100 * r['mfu']:.1f}% | {r['peak_mem_gib']:.2f} | {' | '.join(ratio)} | {r['warmup_s']:.1f} |"
        )
    return "\n".join(lines)


def format_profiles(results: list[dict]) -> str:
    out = []
    for r in results:
        prof = r.get("profile")
        if not prof:
            continue
        out.append(
            f"\n### profile of one step: {r['row']} / {r['config']} (wall {prof['wall_ms']:.1f} ms with the "
            f"profiler; GPU kernels {prof['gpu_busy_ms']:.1f} ms; GPU idle between kernels "
            f"{prof.get('gpu_idle_ms', 0):.1f} ms; untimed step {r['step_ms']:.1f} ms)"
        )
        for fam, ms in sorted(prof["families_ms"].items(), key=lambda kv: -kv[1]):
            out.append(f"- {fam}: {ms:.1f} ms")
        out.append("top kernels (ms): " + "; ".join(f"{n} {ms:.1f}" for n, ms in prof["top_kernels_ms"][:8]))
        gaps = prof.get("largest_gaps_ms") or []
        out.append("largest GPU idle gaps (ms, CPU ops then): " + "; ".join(f"{ms} [{ops}]" for ms, ops in gaps[:8]))
    for r in results:
        mem = r.get("memory")
        if not mem:
            continue
        out.append(
            f"\n### memory at the peak of one step: {r['row']} / {r['config']} ({mem['before_step_gib']:.2f} GiB "
            f"allocated before the step + {mem['step_peak_extra_gib']:.2f} GiB = {mem['peak_gib']:.2f} GiB)"
        )
        out.extend(f"- {mib:.0f} MiB: {site}" for site, mib in mem["top_sites_mib"])
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="one profiled step of ours, ours_fp8 and liger per row")
    parser.add_argument("--memory", action="store_true", help="what is allocated at the peak of one step")
    parser.add_argument("--profile-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    configs = [c for c in args.configs.split(",") if c]
    for name in rows:
        if name not in ALL_ROWS:
            parser.error(f"unknown row {name!r}; choose from {', '.join([*ROWS, *PACKED_ROWS])}")
    for name in configs:
        if name not in CONFIGS:
            parser.error(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
    if args.worker:
        result = worker(rows[0], configs[0], args.steps, args.warmup, args.profile_dir, args.memory)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_throughput.py needs a CUDA GPU (it measures the GPU fast path)")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for row in rows:
        for config_name in configs:
            if config_name == "plain_bf16" and not ALL_ROWS[row][1]:
                continue
            if config_name in PACKED_ONLY_CONFIGS and not row.endswith("-packed"):
                continue
            result = run_worker(args, row, config_name)
            results.append(result)
            brief = result.get("error", "")[-400:] or (
                f"{result['tokens_per_s'] / 1e3:.1f}k tok/s, {100 * result['mfu']:.1f}% MFU, "
                f"{result['peak_mem_gib']:.2f} GiB, loss {result['first_loss']:.3f}->{result['last_loss']:.3f}, "
                f"process {result['process_s']:.0f}s"
            )
            print(f"[{row} / {config_name}] {brief}", flush=True)
    device = torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE
    stamp = time.strftime("%Y%m%d-%H%M%S")
    header = (
        f"# train_throughput {stamp}\n\n{device}; torch {torch.__version__}; {args.steps} timed steps after "
        f"{args.warmup} warm-up steps; seq {SEQ_LEN}; MFU against {PEAK_TFLOPS:.0f} TFLOP/s\n\n"
    )
    report = header + format_table(results) + "\n" + format_profiles(results) + "\n"
    print("\n" + report)
    (args.out / f"train_throughput-{stamp}.md").write_text(report)
    env = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "argv": sys.argv}
    (args.out / f"train_throughput-{stamp}.json").write_text(json.dumps({"env": env, "results": results}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
