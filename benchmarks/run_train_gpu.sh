#!/usr/bin/env bash
# One-shot GPU run for the TransformersModel fast path: install the carried wheels, run the
# gpu-marked tests, then benchmarks/train_throughput.py with the arguments given.
#
# Machine: Python with torch (CUDA), transformers and peft installed, no network. Carry the
# ignored folder .whl/ (liger_kernel for the Liger baseline; pluggy / pydantic in case the
# machine lacks them).
#
#   bash benchmarks/run_train_gpu.sh tests                       # gpu tests only
#   bash benchmarks/run_train_gpu.sh bench --rows 0.5b-lora --configs liger,ours
#   bash benchmarks/run_train_gpu.sh all --rows 0.5b-lora,0.5b-full --profile
#   bash benchmarks/run_train_gpu.sh kernels                     # benchmarks/ce_kernel.py only
#   bash benchmarks/run_train_gpu.sh layer --shape 7b            # benchmarks/lora_layer.py only
#   bash benchmarks/run_train_gpu.sh gemm                        # benchmarks/gemm_shapes.py only
#   bash benchmarks/run_train_gpu.sh head                        # benchmarks/lm_head.py only
#   bash benchmarks/run_train_gpu.sh overhead --row 7b-lora      # benchmarks/step_overhead.py only
#   bash benchmarks/run_train_gpu.sh attention                   # benchmarks/varlen_attention.py only
#   bash benchmarks/run_train_gpu.sh merge --sweep               # benchmarks/lora_merge.py only
#   bash benchmarks/run_train_gpu.sh fp8                         # benchmarks/fp8_headroom.py only
#
# Logs and tables go to $OUT (default ./train-gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/train-gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
PHASE="${1:-all}"
shift || true
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/twinkle_core/src:$PWD/plugins/twinkle-rewards/src:${PYTHONPATH:-}"

{
  "$PY" -c "import sys, torch, transformers, peft; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(0), 'transformers', transformers.__version__, 'peft', peft.__version__)"
  for dep in pluggy pydantic liger_kernel; do
    if ! "$PY" -c "import $dep" 2>/dev/null; then
      "$PY" -m pip install -q --no-index --find-links .whl "${dep//_/-}" || echo "could not install $dep"
    fi
  done
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e ./twinkle_core \
    || echo "editable install failed; using PYTHONPATH"
} >"$OUT/install.log" 2>&1
tail -3 "$OUT/install.log"

if [[ "$PHASE" == tests || "$PHASE" == all ]]; then
  # gpu-marked tests, plus the Triton kernel tests (they run on the GPU when there is one)
  "$PY" -m pytest -q -rs -p no:cacheprovider tests/core/fastpath/test_triton_ce.py tests/core/fastpath/test_triton_lora.py tests/core/fastpath/test_lora_mlp.py tests/core/fastpath/test_varlen_attention.py -m "gpu or not gpu" \
    2>&1 | tee "$OUT/gpu-tests.log" | tail -3
  "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests/core 2>&1 | tee -a "$OUT/gpu-tests.log" | tail -15
fi
if [[ "$PHASE" == kernels || "$PHASE" == all ]]; then
  "$PY" benchmarks/ce_kernel.py 2>&1 | tee "$OUT/ce-kernel.md" | tail -20
fi
if [[ "$PHASE" == gemm ]]; then
  "$PY" benchmarks/gemm_shapes.py "$@" 2>&1 | tee "$OUT/gemm-shapes.md" | tail -60
fi
if [[ "$PHASE" == head ]]; then
  "$PY" benchmarks/lm_head.py "$@" 2>&1 | tee "$OUT/lm-head.md" | tail -30
fi
if [[ "$PHASE" == overhead ]]; then
  "$PY" benchmarks/step_overhead.py "$@" 2>&1 | tee -a "$OUT/step-overhead.md" | tail -20
fi
if [[ "$PHASE" == attention ]]; then
  "$PY" benchmarks/varlen_attention.py "$@" 2>&1 | tee "$OUT/varlen-attention.md" | grep -v Warning | tail -20
fi
if [[ "$PHASE" == merge ]]; then
  "$PY" benchmarks/lora_merge.py "$@" 2>&1 | tee "$OUT/lora-merge.md" | tail -40
fi
if [[ "$PHASE" == fp8 ]]; then
  "$PY" benchmarks/fp8_headroom.py "$@" 2>&1 | tee "$OUT/fp8-headroom.md" | tail -20
fi
if [[ "$PHASE" == layer ]]; then
  "$PY" benchmarks/lora_layer.py "$@" 2>&1 | tee "$OUT/lora-layer.md" | tail -20
fi
if [[ "$PHASE" == bench || "$PHASE" == all ]]; then
  "$PY" benchmarks/train_throughput.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^\[" | tail -60
fi
