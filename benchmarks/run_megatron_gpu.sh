#!/usr/bin/env bash
# One-shot GPU run for twinkle-megatron (issue 10): install the carried wheels, run the
# gpu-marked megatron tests and the MegatronModel vs TransformersModel benchmark.
#
# Machine: Python 3.12 with torch, transformers and peft already installed (no network).
# Carry the ignored folder .whl/ (it holds megatron_core-0.16.1-cp312-...whl and, in case
# the machine lacks them, twinkle-core's small dependencies pluggy / pydantic wheels).
#
#   bash benchmarks/run_megatron_gpu.sh tests          # install + gpu tests (a few minutes)
#   bash benchmarks/run_megatron_gpu.sh bench-small    # Qwen2.5-0.5B shape, LoRA and full
#   bash benchmarks/run_megatron_gpu.sh bench-7b-lora  # Qwen2.5-7B shape, LoRA
#   bash benchmarks/run_megatron_gpu.sh bench-7b-full  # Qwen2.5-7B shape, full
#   bash benchmarks/run_megatron_gpu.sh all            # everything (longer than one 10-minute call)
#
# Logs and tables go to $OUT (default ./megatron-gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/megatron-gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
PHASE="${1:-all}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# the sources work without installing them too (core falls back to its built-in registrations)
export PYTHONPATH="$PWD/twinkle_core/src:$PWD/plugins/twinkle-megatron/src:${PYTHONPATH:-}"

install() {
  {
    echo "== python / torch / cuda"
    "$PY" -c "import sys, torch, transformers, peft; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('transformers', transformers.__version__, 'peft', peft.__version__)"
    for dep in pluggy pydantic; do
      if ! "$PY" -c "import $dep" 2>/dev/null; then
        echo "== installing $dep from .whl"
        "$PY" -m pip install --no-index --find-links .whl "$dep"
      fi
    done
    echo "== megatron-core wheel"
    "$PY" -m pip install --no-index --no-deps .whl/megatron_core-0.16.*-cp312-*.whl
    echo "== twinkle-core and twinkle-megatron (editable, no deps)"
    "$PY" -m pip install --no-index --no-deps --no-build-isolation -e ./twinkle_core -e ./plugins/twinkle-megatron \
      || echo "editable install failed (no setuptools?); using PYTHONPATH=$PYTHONPATH"
    "$PY" -c "import megatron.core, twinkle_megatron.model; print('megatron-core', megatron.core.__version__)"
  } 2>&1 | tee "$OUT/install.log"
}

tests() {
  timeout 420 "$PY" -m pytest tests/megatron/test_gpu.py -v -s -p no:cacheprovider -m gpu 2>&1 | tee "$OUT/gpu_tests.log"
}

bench_small() {
  timeout 420 "$PY" benchmarks/megatron_vs_transformers.py --shapes 0.5b --modes lora,full --steps 10 --warmup 3 \
    --json "$OUT/bench_0.5b.json" 2>&1 | tee "$OUT/bench_0.5b.log"
}

bench_7b() {  # $1: lora or full (each fits one 10-minute call: 15 GB checkpoint written once, loaded twice)
  timeout 570 "$PY" benchmarks/megatron_vs_transformers.py --shapes 7b --modes "$1" --steps 5 --warmup 2 \
    --json "$OUT/bench_7b_$1.json" 2>&1 | tee "$OUT/bench_7b_$1.log"
}

case "$PHASE" in
  install) install ;;
  tests) install >/dev/null; tests ;;
  bench-small) install >/dev/null; bench_small ;;
  bench-7b-lora) install >/dev/null; bench_7b lora ;;
  bench-7b-full) install >/dev/null; bench_7b full ;;
  all) install; tests; bench_small; bench_7b lora; bench_7b full ;;
  *) echo "unknown phase $PHASE (install | tests | bench-small | bench-7b-lora | bench-7b-full | all)"; exit 2 ;;
esac
