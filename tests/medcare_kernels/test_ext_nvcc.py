"""Compile checks of the CUDA side on machines without a GPU: every csrc/*.cu for the H100 (sm_90) with nvcc
alone, and the whole extension with its CUDA bindings through CMakeLists.txt (the route that compiles and
links against a CPU-only torch).

The .cu files include only CUDA headers, so this needs the CUDA toolkit but neither a GPU nor a
CUDA build of torch; it catches kernel compile errors in CI, where the extension itself is built CPU-only.
Skipped where nvcc (or cmake and ninja) are not installed.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")
ROOT = CSRC.parent


def test_every_op_family_has_a_cuda_source():
    assert {p.stem for p in CU_FILES} >= {"route_topk_cuda", "orth_penalty_cuda"}


@pytest.mark.slow  # nvcc, a few seconds a file
@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
@pytest.mark.parametrize("source", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cu_compiles_for_sm90(source, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", "-gencode", "arch=compute_90,code=sm_90", "-Werror", "all-warnings",
           f"-I{CSRC}", "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / f"{source.stem}.o").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None or not shutil.which("cmake") or not shutil.which("ninja"),
                    reason="needs nvcc, cmake and ninja")
def test_cmake_builds_and_links_the_cuda_extension(tmp_path):
    """The CUDA bindings (TORCH_LIBRARY_IMPL(medcare, CUDA)) compile and link, and the library loads here."""
    import torch.utils

    build = tmp_path / "build"
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja", "-DMEDCARE_WITH_CUDA=ON",
                 f"-DCMAKE_CUDA_COMPILER={NVCC}", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 f"-DPython3_EXECUTABLE={sys.executable}"]
    for cmd in (configure, ["cmake", "--build", str(build)]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    lib = build / "_C.so"
    # Loading it registers a second copy of the schemas, so look at it in a fresh interpreter.
    probe = ("import importlib.util, torch; s = importlib.util.spec_from_file_location('medcare_kernels._C', "
             f"{str(lib)!r}); s.loader.exec_module(importlib.util.module_from_spec(s)); "
             "print(all('CUDA: registered' in torch._C._dispatch_dump(f'medcare::{op}') for op in "
             "('route_topk', 'route_topk_backward', 'orth_penalty', 'orth_penalty_backward')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stdout + done.stderr
