#!/usr/bin/env bash
# The GPU machine's run (device tool): install offline against its torch, run the GPU tests and the kernel
# benchmarks, and leave logs and results under $OUT. Usage: bash scripts/gpu_check.sh [tests|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/medcare-gpu}"
mkdir -p "$OUT"
what="${1:-all}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
grep -h "medcare:" "$OUT/install.log" | tail -3
python3 -c "import torch, triton, medcare_kernels as mk; print('torch', torch.__version__, 'triton', triton.__version__, mk.available_backends())"
if [[ "$what" == tests || "$what" == all ]]; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider --maxfail=20 -m gpu tests/medcare_kernels \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [[ "$what" == bench || "$what" == all ]]; then
  timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_triton_gemm.py --output "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -20
fi
