"""Loads the compiled extension medcare_kernels._C (csrc/), if it was built, and records why not otherwise.

Importing _C runs its TORCH_LIBRARY registrars, which define the `torch.ops.medcare.*` schemas and their
CPU/CUDA implementations. The Python side of each C++ op (register_fake, register_autograd and the `ext`
backend registration) lives here, next to the loading, once the op exists in csrc/.
"""

from __future__ import annotations

import importlib

from . import _backend

HAS_EXT = False
LOAD_ERROR: str | None = None

try:
    _C = importlib.import_module("medcare_kernels._C")
    HAS_EXT = True
except ImportError as exc:  # the pure-Python install: not an error, but say why when 'ext' is requested
    _C = None
    LOAD_ERROR = (f"the compiled extension medcare_kernels._C is not built ({exc}); "
                  f"rebuild with `pip install --no-build-isolation -e .` and check its `medcare:` build line")

if HAS_EXT:
    _backend.mark_unavailable("ext", "medcare_kernels._C is built but registers no ops in this version")
else:
    _backend.mark_unavailable("ext", LOAD_ERROR)
