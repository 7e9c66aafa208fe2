#!/usr/bin/env bash
# The GPU machine's run (device tool), in order of value, each step time-boxed: install with the CUDA
# extension (verbose log), GPU tests with short tracebacks, the GEMM-path table (bench_triton_gemm.py: which
# path _triton_gemm.DEFAULT_GEMM should be), every benchmark suite, then a per-kernel profile of one MoLoRA
# projection. Logs and a results tarball under $OUT (the tool brings back few files).
#   bash scripts/gpu_check.sh                    # all steps (over 600 s: use the three calls below)
#   bash scripts/gpu_check.sh tests              # install + GPU tests only; also: gemm, bench, losshead, profile
# Three device calls, each under the 600 s limit: `... tests` (380 s box: every GEMM path autotunes gemm2 per
# shape and dtype on first use, compiles dominate), `... gemm`,
# then `RUN_ALL_BUDGET=240 bash scripts/gpu_check.sh bench losshead profile` (every case of every suite, plus the GPU
# busy-time pass). Each call reinstalls; the extension's build objects are kept between calls.
set -uo pipefail
STEPS="${*:-tests gemm bench losshead profile}"
want() { [[ " $STEPS " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=16 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT="${OUT:-/tmp/medcare-gpu}"; RES="$OUT/results"; mkdir -p "$RES"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; which nvcc; nvcc --version | tail -1
t0=$SECONDS
timeout 200 python3 -m pip install -v --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1
echo "install rc=$? in $((SECONDS - t0)) s"
grep -E "medcare:|error|Error|FAILED" "$OUT/install.log" | grep -v "^ *warning" | head -25
python3 -c "import medcare_kernels as mk; print('ext:', mk.available_backends()['ext'])"
if want tests; then
t0=$SECONDS
timeout 380 python3 -m pytest -q -p no:cacheprovider -m gpu -rfE --tb=short --timeout=120 --durations=15 \
  tests/medcare_kernels/test_ext.py tests/medcare_kernels/test_triton_gpu.py tests/medcare_kernels/test_route_topk.py \
  tests/medcare_kernels/test_orth_penalty.py tests/medcare_kernels/test_molora_gate_up.py tests/benchmarks \
  tests/medcare >"$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$? in $((SECONDS - t0)) s"; grep -E "^(FAILED|ERROR)|passed|failed|^E  " "$OUT/gpu_tests.log" | head -40
fi
if want gemm; then
t0=$SECONDS
timeout 360 python3 benchmarks/bench_triton_gemm.py --output "$RES" >"$OUT/triton_gemm.log" 2>&1
echo "bench_triton_gemm rc=$? in $((SECONDS - t0)) s"; cat "$OUT/triton_gemm.log" | tail -8
fi
if want bench; then
t0=$SECONDS
BUDGET="${RUN_ALL_BUDGET:-150}"   # seconds after which run_all starts no new case; the hard box is 110 s more
timeout $((BUDGET + 110)) python3 benchmarks/run_all.py --device cuda --time-budget "$BUDGET" --output "$RES" \
  >"$OUT/run_all.log" 2>&1
echo "run_all rc=$? in $((SECONDS - t0)) s"; grep -E "agreement|skipped|run_all|Error" "$OUT/run_all.log" | tail -30
fi
if want losshead; then  # the chunked loss head vs the model's own, stage-1 step at the 0.5B, 1.5B and 7B shapes
t0=$SECONDS
timeout 240 python3 benchmarks/bench_loss_head.py --device cuda --steps 5 --output "$RES" >"$OUT/loss_head.log" 2>&1
echo "bench_loss_head rc=$? in $((SECONDS - t0)) s"; grep -E "^\|" "$OUT/loss_head.log" | tail -8
fi
if want profile; then
for shape in gate down; do
  timeout 60 python3 benchmarks/profile_molora.py --shape "$shape" >"$RES/profile_molora_$shape.txt" 2>&1
  echo "profile $shape rc=$?"; head -25 "$RES/profile_molora_$shape.txt"
done
fi
tar czf "$OUT/results.tgz" -C "$RES" . && echo "results: $(tar tzf "$OUT/results.tgz" | wc -l) files"
