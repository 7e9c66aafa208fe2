#!/usr/bin/env bash
# The GPU machine's run (device tool): install offline against its torch (building the CUDA extension), run
# the GPU tests and the benchmarks, and leave logs and results under $OUT (results as one tarball, since the
# tool brings back few files). Usage: bash scripts/gpu_check.sh [tests|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/medcare-gpu}"
RES="$OUT/results"
mkdir -p "$RES"
what="${1:-all}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
start=$SECONDS
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
echo "install: $((SECONDS - start)) s"; grep -h "medcare:" "$OUT/install.log" | tail -3
python3 -c "import torch, triton, medcare_kernels as mk; print('torch', torch.__version__, 'triton', triton.__version__, mk.available_backends())"
if [[ "$what" == tests || "$what" == all ]]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider --maxfail=30 -m gpu tests \
    >"$OUT/gpu_tests.log" 2>&1; tail -25 "$OUT/gpu_tests.log"
fi
if [[ "$what" == bench || "$what" == all ]]; then
  timeout "${GEMM_TIMEOUT:-150}" python3 benchmarks/bench_triton_gemm.py --output "$RES" >"$OUT/bench_triton_gemm.log" 2>&1
  tail -4 "$OUT/bench_triton_gemm.log"
  timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/run_all.py --device cuda --time-budget "${BENCH_BUDGET:-170}" \
    --output "$RES" >"$OUT/run_all.log" 2>&1; tail -30 "$OUT/run_all.log"
fi
tar czf "$OUT/results.tgz" -C "$RES" . && echo "results: $(tar tzf "$OUT/results.tgz" | wc -l) files"
