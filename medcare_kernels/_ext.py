"""Loads the compiled extension medcare_kernels._C (csrc/), if it was built, records why not otherwise, and
wires its ops into the `ext` backend.

Importing _C runs its TORCH_LIBRARY registrars, which define the `torch.ops.medcare.*` schemas (csrc/ops.cpp)
and their CPU and CUDA implementations. This module adds the Python side of each op, in the pattern of
pytorch/extension-cpp: `register_fake` (shapes for torch.compile / meta tensors) and `register_autograd`.

    route_topk(logits, K) -> (gates, indices, stats)      backward: route_topk_backward(d_gates, logits, indices,
                                                                     stats), stats = per-token (max, sum of exp)
    orth_penalty(a_base, a_orth) -> (loss, signs)         backward: orth_penalty_backward(grad, signs, ...), one
                                                                     launch writing every gradient on CUDA

Two autograd routes per op, on purpose, sharing one backward function each (_route_grad, _orth_grads): the
registered autograd serves direct callers of torch.ops.medcare.* (and torch.library.opcheck); the `ext` backend
calls the ops inside plain autograd.Functions (_RouteTopK, _OrthPenalty) instead, because the registered
route's per-call Python work (pytree over the tensor lists: 168 tensors for a 7B model's penalty) is larger than
the kernels' device time. torch.compile traces either. The
orth_penalty backward returns each side's gradients flat, in one allocation (one allocator call, not 168), which
the Python side views per parameter.

Limits of the CUDA kernels: E <= 64 experts, top_k <= 8, adapter ranks <= 64 (the CPU implementations have
none). Beyond them `auto` runs the torch backend and an explicit `ext` raises BackendUnavailableError.
float64 runs natively (fp64 accumulation); pairs of mixed dtypes are cast to one accumulation dtype first
(gradients still reach each parameter in its own dtype through the cast).
"""

from __future__ import annotations

import importlib

import torch

from . import _backend
from .ops import orth_penalty_torch, routing_torch
from .ops._common import accum_dtype
from .reference import router_dtype

HAS_EXT = False
LOAD_ERROR: str | None = None
# The CUDA kernels' limits (csrc/common.h: kMaxExperts, kMaxTopK, kMaxOrthRank).
MAX_EXPERTS, MAX_TOP_K, MAX_ORTH_RANK = 64, 8, 64
_OPS = ("route_topk", "route_topk_backward", "orth_penalty", "orth_penalty_backward")

try:
    _C = importlib.import_module("medcare_kernels._C")
    HAS_EXT = True
except ImportError as exc:  # the pure-Python install: not an error, but say why when 'ext' is requested
    _C = None
    LOAD_ERROR = (f"the compiled extension medcare_kernels._C is not built ({exc}); "
                  f"rebuild with `pip install --no-build-isolation -e .` and check its `medcare:` build line")

if HAS_EXT and not all(hasattr(torch.ops.medcare, op) for op in _OPS):
    HAS_EXT = False
    LOAD_ERROR = ("medcare_kernels._C is built from older sources and lacks some of the ops "
                  f"{', '.join(_OPS)}; rebuild with `pip install --no-build-isolation -e .`")


def _register_fakes() -> None:
    """Output shapes and dtypes without running anything (torch.compile, meta and fake tensors)."""

    @torch.library.register_fake("medcare::route_topk")
    def _route_topk_fake(logits, top_k):
        acc, lead = router_dtype(logits.dtype), logits.shape[:-1]
        return (logits.new_empty(logits.shape, dtype=acc), logits.new_empty((*lead, top_k), dtype=torch.int64),
                logits.new_empty((*lead, 2), dtype=acc))

    @torch.library.register_fake("medcare::route_topk_backward")
    def _route_topk_backward_fake(d_gates, logits, indices, stats):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("medcare::orth_penalty")
    def _orth_penalty_fake(a_base, a_orth):
        acc = router_dtype(a_base[0].dtype)
        n_signs = sum(a.shape[0] * b.shape[0] for a, b in zip(a_base, a_orth, strict=True))
        return a_base[0].new_empty((), dtype=acc), a_base[0].new_empty((n_signs,), dtype=acc)

    @torch.library.register_fake("medcare::orth_penalty_backward")
    def _orth_penalty_backward_fake(grad, signs, a_base, a_orth, need_base, need_orth):
        def flat(tensors, needed):
            return tensors[0].new_empty((sum(t.numel() for t in tensors) if needed else 0,))

        return flat(a_base, need_base), flat(a_orth, need_orth)


def _per_parameter(flat: torch.Tensor, params) -> list[torch.Tensor]:
    """A side's flat gradient (orth_penalty_backward) as one view per parameter, in one C++ call. Autograd adopts
    each view as that parameter's .grad without a copy (one allocation for the side, not one per parameter).
    Traced (torch.compile, opcheck's dynamic shapes), where the C++ helper cannot take symbolic sizes: split."""
    if torch.compiler.is_compiling() or type(flat) is not torch.Tensor:  # fake/functional tensors while tracing
        return [p.view(t.shape) for p, t in zip(flat.split([t.numel() for t in params]), params, strict=True)]
    return list(torch._utils._unflatten_dense_tensors(flat, params))


def _route_grad(d_gates, logits, indices, stats):
    """d logits from d gates: the one backward of both autograd routes (the op's registered one, _RouteTopK)."""
    return torch.ops.medcare.route_topk_backward(d_gates.to(stats.dtype).contiguous(), logits, indices, stats)


def _orth_grads(grad, saved, n: int, want_base, want_orth):
    """(d a_base, d a_orth) as lists with None where a parameter needs no gradient: the one backward of both
    autograd routes. saved = (*a_base, *a_orth, signs)."""
    need_base, need_orth = any(want_base), any(want_orth)
    if grad is None or not (need_base or need_orth):
        return [None] * n, [None] * n
    a_base, a_orth = list(saved[:n]), list(saved[n:2 * n])
    d_base, d_orth = torch.ops.medcare.orth_penalty_backward(grad, saved[-1], a_base, a_orth, need_base, need_orth)

    def side(flat, params, want, needed):
        if not needed:
            return [None] * n
        return [g if w else None for g, w in zip(_per_parameter(flat, params), want, strict=True)]

    return side(d_base, a_base, want_base, need_base), side(d_orth, a_orth, want_orth, need_orth)


def _route_topk_setup(ctx, inputs, output):
    logits, _ = inputs
    _, indices, stats = output
    ctx.save_for_backward(logits, indices, stats)
    ctx.mark_non_differentiable(indices, stats)


def _route_topk_backward(ctx, d_gates, _d_indices, _d_stats):
    return (None if d_gates is None else _route_grad(d_gates, *ctx.saved_tensors)), None


def _orth_penalty_setup(ctx, inputs, output):
    a_base, a_orth = inputs
    _, signs = output
    ctx.n_pairs = len(a_base)
    ctx.save_for_backward(*a_base, *a_orth, signs)  # the parameters themselves and r1 x r2 signs per pair
    ctx.mark_non_differentiable(signs)


def _orth_penalty_backward(ctx, grad, _d_signs):
    # List inputs take lists of gradients, None where a tensor needs none.
    return _orth_grads(grad, ctx.saved_tensors, ctx.n_pairs, ctx.needs_input_grad[0], ctx.needs_input_grad[1])


class _RouteTopK(torch.autograd.Function):
    """The ext backend's eager path: the ops' own registered autograd (above) serves callers of
    torch.ops.medcare.* directly; the backend calls the op inside a plain autograd.Function, which skips that
    wrapper's per-call Python work (at microseconds of kernel time, host work is what a call costs)."""

    @staticmethod
    def forward(ctx, logits, top_k):
        gates, indices, stats = torch.ops.medcare.route_topk(logits, top_k)
        ctx.save_for_backward(logits, indices, stats)
        ctx.mark_non_differentiable(indices)
        return gates, indices

    @staticmethod
    def backward(ctx, d_gates, _d_indices):
        return _route_grad(d_gates, *ctx.saved_tensors), None


class _OrthPenalty(torch.autograd.Function):
    """As _RouteTopK, and more so: the registered autograd of an op with tensor-list arguments flattens and
    rebuilds both lists (168 tensors for a 7B model) through pytree on every call; here the parameters travel
    as varargs, so autograd sees each one directly."""

    @staticmethod
    def forward(ctx, n_pairs, *tensors):
        loss, signs = torch.ops.medcare.orth_penalty(list(tensors[:n_pairs]), list(tensors[n_pairs:]))
        ctx.n_pairs = n_pairs
        ctx.save_for_backward(*tensors, signs)
        return loss

    @staticmethod
    def backward(ctx, grad):
        n, wants = ctx.n_pairs, ctx.needs_input_grad[1:]
        d_base, d_orth = _orth_grads(grad, ctx.saved_tensors, n, wants[:n], wants[n:])
        return (None, *d_base, *d_orth)


def _no_second_order(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"medcare::{op} has no derivative: second-order gradients of the medcare ops are not "
                           f"supported (use the torch backend)")

    return backward


def _beyond_kernel_limits(op: str, why: str):
    """Under `auto` the torch backend takes over; an explicit `ext` request says why it cannot."""
    if _backend.current_backend() == "ext":
        raise _backend.BackendUnavailableError(f"medcare_kernels backend 'ext' cannot run {op} on CUDA: {why}; "
                                               f"use 'auto' or 'torch'")


def route_topk(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ext backend's route_topk: torch.ops.medcare.route_topk, its stats output kept for backward only."""
    if logits.is_cuda and (logits.shape[-1] > MAX_EXPERTS or top_k > MAX_TOP_K):
        _beyond_kernel_limits("route_topk", f"E = {logits.shape[-1]} (max {MAX_EXPERTS}), top_k = {top_k} "
                                            f"(max {MAX_TOP_K})")
        return routing_torch.route_topk(logits, top_k)
    return _RouteTopK.apply(logits, top_k)


def orth_penalty(a_base: list[torch.Tensor], a_orth: list[torch.Tensor]) -> torch.Tensor:
    """The ext backend's orth_penalty: every pair in one op call (one launch each way on CUDA)."""
    first = a_base[0].dtype
    if any(t.dtype != first for t in a_base) or any(t.dtype != first for t in a_orth):
        acc = accum_dtype((*a_base, *a_orth))
        a_base, a_orth = [t.to(acc) for t in a_base], [t.to(acc) for t in a_orth]
    if a_base[0].is_cuda:
        rank = max(max(t.shape[0] for t in a_base), max(t.shape[0] for t in a_orth))
        if rank > MAX_ORTH_RANK:
            _beyond_kernel_limits("orth_penalty", f"rank {rank} > {MAX_ORTH_RANK}")
            return orth_penalty_torch.orth_penalty(a_base, a_orth)
    return _OrthPenalty.apply(len(a_base), *a_base, *a_orth)


if HAS_EXT:
    _register_fakes()
    torch.library.register_autograd("medcare::route_topk", _route_topk_backward, setup_context=_route_topk_setup)
    torch.library.register_autograd("medcare::orth_penalty", _orth_penalty_backward,
                                    setup_context=_orth_penalty_setup)
    # The backward ops (called by both autograd routes) have no derivative: a double backward raises, never
    # a silently missing second-order term.
    for _op in ("route_topk_backward", "orth_penalty_backward"):
        torch.library.register_autograd(f"medcare::{_op}", _no_second_order(_op))
    _backend.register("ext", "route_topk", route_topk)
    _backend.register("ext", "orth_penalty", orth_penalty)
else:
    _backend.mark_unavailable("ext", LOAD_ERROR)
