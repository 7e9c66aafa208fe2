"""Backend selection: `use_backend(name)` and the MEDCARE_KERNELS_BACKEND environment variable.

Backends:  torch  - plain PyTorch autograd Functions (medcare_kernels/ops/*_torch.py); runs everywhere.
           triton - fused Triton kernels (CUDA tensors; CPU only under TRITON_INTERPRET=1).
           ext    - the compiled csrc extension medcare_kernels._C (CUDA impls plus CPU impls).
           auto   - per op and device, the fastest backend that is available, else torch.
An explicitly requested backend that is not available raises BackendUnavailableError; `auto` never does.
The context manager wins over the environment variable; both are read at call time.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

BACKENDS = ("auto", "torch", "triton", "ext")
ENV_VAR = "MEDCARE_KERNELS_BACKEND"
# Preference of `auto`, per device type, fastest first; torch is always the last resort.
AUTO_ORDER = {"cuda": ("ext", "triton", "torch"), "cpu": ("torch",)}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend is not built, cannot run this op, or not on this device."""


_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("medcare_kernels_backend", default=None)
_registry: dict[str, dict[str, Callable]] = {name: {} for name in BACKENDS if name != "auto"}
_devices: dict[str, tuple[str, ...]] = {"torch": ("cpu", "cuda", "mps", "xpu"), "triton": ("cuda",),
                                        "ext": ("cpu", "cuda")}
_unavailable: dict[str, str] = {}


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def register(backend: str, op: str, fn: Callable) -> None:
    """Make `fn` the implementation of `op` in `backend` (called at import by the backend modules)."""
    _registry[backend][op] = fn
    _unavailable.pop(backend, None)


def mark_unavailable(backend: str, reason: str) -> None:
    """Record why a backend cannot be used, for the error an explicit request gets."""
    if not _registry[backend]:
        _unavailable[backend] = reason


def current_backend() -> str:
    """The requested backend name: use_backend(...) if active, else $MEDCARE_KERNELS_BACKEND, else auto."""
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"${ENV_VAR}")


def available_backends() -> dict[str, str]:
    """Each backend's status: 'available (ops...)' or the reason it is not."""
    status = {}
    for name, ops in _registry.items():
        status[name] = f"available ({', '.join(sorted(ops))})" if ops else _unavailable.get(name, "not built")
    return status


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed medcare_kernels calls on backend `name` (auto | torch | triton | ext)."""
    _check_name(name, "use_backend(name)")
    if name != "auto" and not _registry[name]:
        raise BackendUnavailableError(f"medcare_kernels backend {name!r} is not available: "
                                      f"{_unavailable.get(name, 'not built')}")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def resolved_backend(op: str, device: torch.device) -> str:
    """The backend name `op` runs on for tensors on `device` under the current choice (what `auto` picks);
    raises BackendUnavailableError where a call would."""
    if torch.compiler.is_compiling():
        return _resolve_name_constant(op, device.type)
    return _resolve_name(op, device)


def _runs_on(backend: str, device: torch.device) -> bool:
    if device.type == "cpu" and backend == "triton":
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return device.type in _devices[backend]


def resolve(op: str, device: torch.device) -> Callable:
    """The implementation of `op` for tensors on `device` under the current backend choice."""
    if torch.compiler.is_compiling():
        # The choice (a context variable and the environment) is read once when the graph is traced, as a
        # constant, so a model calling the ops compiles with fullgraph=True; use_backend inside a compiled
        # region therefore applies at the next recompilation, not mid-graph.
        return _registry[_resolve_name_constant(op, device.type)][op]
    return _registry[_resolve_name(op, device)][op]


@torch.compiler.assume_constant_result
def _resolve_name_constant(op: str, device_type: str) -> str:
    return _resolve_name(op, torch.device(device_type))


def _resolve_name(op: str, device: torch.device) -> str:
    name = current_backend()
    if name == "auto":
        for cand in AUTO_ORDER.get(device.type, ("torch",)):
            if op in _registry[cand] and _runs_on(cand, device):
                return cand
        return "torch"
    impls = _registry[name]
    if not impls:
        raise BackendUnavailableError(f"medcare_kernels backend {name!r} was requested but is not available: "
                                      f"{_unavailable.get(name, 'not built')}")
    if op not in impls:
        raise BackendUnavailableError(f"medcare_kernels backend {name!r} has no {op} (it implements "
                                      f"{', '.join(sorted(impls))}); use 'auto' or 'torch' for {op}")
    if not _runs_on(name, device):
        raise BackendUnavailableError(f"medcare_kernels backend {name!r} cannot run on {device.type} tensors "
                                      f"(it runs on {', '.join(_devices[name])})")
    return name
