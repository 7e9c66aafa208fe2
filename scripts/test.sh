#!/usr/bin/env bash
# The test command of the README, and of CI (.ci/run): set up, then run the whole test suite.
# On a machine without CUDA, Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it) and
# tests marked `gpu` are skipped; on the GPU machine the same command runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
bash scripts/setup.sh
exec "$PY" -m pytest -q --timeout=900 "$@" tests
