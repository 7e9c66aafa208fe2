"""Build script: the pure-Python package always, the compiled `medcare_kernels._C` extension when it can.

Decisions, in order (each prints exactly one `medcare:` line):
  1. MEDCARE_SKIP_EXT=1                  -> pure-Python package (Triton and torch backends only).
  2. torch not importable                -> pure-Python package. This is what an isolated `pip install .` sees,
                                            because torch is kept out of build-system.requires on purpose;
                                            build the extension with `pip install --no-build-isolation .`.
  3. no compiled op sources in csrc/     -> pure-Python package.
  4. torch with CUDA and a CUDA toolkit  -> CUDAExtension (sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise).
  5. otherwise (CPU torch)               -> CppExtension with the CPU implementations only.
A failing extension build never breaks the install: it warns and installs the pure-Python package.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _say(msg: str) -> None:
    print(f"medcare: {msg}", file=sys.stderr)


def _op_sources() -> tuple[list[str], list[str]]:
    """C++ sources (ops.cpp holds only the schemas) and CUDA sources, relative to the repo root."""
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    return cpp, cu


def _extensions():
    """Return (ext_modules, cmdclass); the reason for building nothing is printed, never raised."""
    if os.environ.get("MEDCARE_SKIP_EXT", "0") == "1":
        _say("MEDCARE_SKIP_EXT=1, building the pure-Python package (no C++/CUDA extension)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable in the build environment, building the pure-Python package "
             "(no C++/CUDA extension); use `pip install --no-build-isolation .` to build it")
        return [], {}
    cpp, cu = _op_sources()
    impl_cpp = [p for p in cpp if os.path.basename(p) != "ops.cpp"]
    if not impl_cpp and not cu:
        _say(f"csrc/ has no compiled ops yet, building the pure-Python package (torch {torch.__version__})")
        return [], {}
    use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and bool(cu)
    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 1))))
    # No -std flag: torch's cpp_extension picks the standard its headers need (C++17 or C++20 by version).
    flags = {"cxx": ["-O3"]}
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        # No --use_fast_math: the router's softmax must round like torch's expf, or top-k ties flip.
        flags["nvcc"] = ["-O3", "-lineinfo"]
        ext = cpp_extension.CUDAExtension("medcare_kernels._C", cpp + cu, extra_compile_args=flags,
                                          define_macros=[("MEDCARE_WITH_CUDA", "1")])
        _say(f"building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        ext = cpp_extension.CppExtension("medcare_kernels._C", cpp, extra_compile_args=flags)
        _say(f"building the CPU-only C++ extension (torch {torch.__version__} has no CUDA)")
    return [ext], {"build_ext": _tolerant_build_ext(cpp_extension.BuildExtension)}


def _tolerant_build_ext(base):
    class TolerantBuildExt(base):
        """An extension that fails to compile leaves a working pure-Python install behind, with a warning."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure must not break the install
                _say(f"WARNING: the C++/CUDA extension failed to build ({exc}); installed the pure-Python package")

    return TolerantBuildExt


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
