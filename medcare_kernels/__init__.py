"""medcare_kernels: the fused MoLoRA / LoRA / routing / orthogonality ops behind medcare (tensors in, tensors out).

    molora_linear(x, weight, bias, router_weight, router_bias, lora_a, lora_b, *,
                  num_experts, top_k, expert_rank, scaling, dropout=0.0) -> y
    molora_gate_up(x, gate, up, *, num_experts, top_k, expert_rank, scaling, dropout=0.0)
                                                -> (y_gate, y_up): an MLP's gate and up MoLoRA projections of one x
    lora_linear(x, weight, bias, lora_a, lora_b, *, scaling, dropout=0.0) -> y
    route_topk(logits, top_k) -> (gates [..., E] fp32, indices [..., K])
    orth_penalty(a_base, a_orth) -> scalar
    linear_cross_entropy(x, weight, bias, labels, *, ignore_index=-100, reduction="mean", chunk_size=None)
                                                -> scalar: an LM head's loss, logits only one chunk of rows at a time
    reference               the same functions in plain PyTorch: the math
    use_backend(name)       auto | torch | triton | ext (also $MEDCARE_KERNELS_BACKEND)
    resolved_backend(op, device)  the backend a call of op on device would run on now

The math is in `medcare_kernels.reference`; the packed layout and shapes in docs/design.md.
Bad arguments raise ValueError naming the argument. Under torch.autocast the GEMMs run in the autocast
dtype (router math stays fp32); gradients come back in each parameter's own dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _backend, _ext, _validate, reference
from ._backend import BackendUnavailableError, available_backends, current_backend, resolved_backend, use_backend
from ._ext import HAS_EXT
from .ops import (
    linear_cross_entropy_torch,
    lora_torch,
    molora_gate_up_torch,
    molora_torch,
    orth_penalty_torch,
    routing_torch,
)

__all__ = ["molora_linear", "molora_gate_up", "lora_linear", "route_topk", "orth_penalty", "linear_cross_entropy",
           "reference", "use_backend",
           "current_backend", "resolved_backend", "available_backends", "BackendUnavailableError", "HAS_EXT"]
__version__ = "0.1.0"

_backend.register("torch", "molora_linear", molora_torch.molora_linear)
_backend.register("torch", "molora_gate_up", molora_gate_up_torch.molora_gate_up)
_backend.register("torch", "lora_linear", lora_torch.lora_linear)
_backend.register("torch", "route_topk", routing_torch.route_topk)
_backend.register("torch", "orth_penalty", orth_penalty_torch.orth_penalty)
_backend.register("torch", "linear_cross_entropy", linear_cross_entropy_torch.linear_cross_entropy)
try:  # Triton ships for Linux x86-64/aarch64; elsewhere the torch (and ext) backends remain
    from .ops import lora_triton, molora_gate_up_triton, molora_triton
except ImportError as exc:
    _backend.mark_unavailable("triton", f"Triton is not importable here ({exc})")
else:
    _backend.register("triton", "molora_linear", molora_triton.molora_linear)
    _backend.register("triton", "molora_gate_up", molora_gate_up_triton.molora_gate_up)
    _backend.register("triton", "lora_linear", lora_triton.lora_linear)
del _ext  # imported for its side effect: registering (or explaining the absence of) the ext backend


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Like F.linear under torch.autocast: the GEMMs take the autocast dtype; the ops then run with
    autocast off so nothing inside is cast twice."""
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return x.to(torch.get_autocast_dtype(dev))
    return x


def molora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, router_weight: torch.Tensor,
                  router_bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor, *, num_experts: int,
                  top_k: int, expert_rank: int, scaling: float, dropout: float = 0.0,
                  return_indices: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T + b + s * sum_{j<K} w_j B_{I_j} A_{I_j} drop(x) + s * Bs As drop(x), routed by softmax top-K.

    Shapes: x [..., Din]; weight [Dout, Din]; bias [Dout] | None; router_weight [E, Din];
    router_bias [E] | None; lora_a [E*R + Rs, Din] (experts in order, shared last); lora_b [Dout, E*R + Rs].
    Returns y [..., Dout] in x's dtype (the autocast dtype under autocast); with return_indices=True,
    (y, indices [..., K] int64), the experts each token was routed to (for usage statistics; no extra work).
    """
    _validate.check_molora_linear(x, weight, bias, router_weight, router_bias, lora_a, lora_b, num_experts,
                                  top_k, expert_rank, scaling, dropout)
    x = _autocast_input(x)
    impl = _backend.resolve("molora_linear", x.device)
    with torch.autocast(x.device.type, enabled=False):
        y, indices = impl(x, weight, bias, router_weight, router_bias, lora_a, lora_b, num_experts=num_experts,
                          top_k=top_k, expert_rank=expert_rank, scaling=scaling, dropout=dropout)
    return (y, indices) if return_indices else y


def molora_gate_up(x: torch.Tensor, gate: Sequence[torch.Tensor | None], up: Sequence[torch.Tensor | None], *,
                   num_experts: int, top_k: int, expert_rank: int, scaling: float, dropout: float = 0.0,
                   return_indices: bool = False):
    """The gate and up projections of a SwiGLU MLP, which read the same x: (y_gate, y_up), equal to
    (molora_linear(x, *gate, ...), molora_linear(x, *up, ...)) with one exception, dropout: ONE draw of the
    adapters' input mask is shared by all adapters of both projections (reference.molora_gate_up).

    gate, up: each (weight, bias, router_weight, router_bias, lora_a, lora_b) with molora_linear's shapes, the
    same E, K, R and scaling (Dout and the shared rank may differ). Returns (y_gate [..., Dout_g], y_up
    [..., Dout_u]); with return_indices=True, ((y_gate, y_up), (indices_gate, indices_up)), each [..., K].
    On the triton backend one shrink GEMM, one dA GEMM, one router-wgrad pass over x and one low-rank update of
    dX serve both projections (ops/molora_gate_up_triton.py); the torch backend is two molora_linear calls.
    """
    _validate.check_molora_gate_up(x, gate, up, num_experts, top_k, expert_rank, scaling, dropout)
    x = _autocast_input(x)
    impl = _backend.resolve("molora_gate_up", x.device)
    with torch.autocast(x.device.type, enabled=False):
        y_gate, y_up, idx_gate, idx_up = impl(x, tuple(gate), tuple(up), num_experts=num_experts, top_k=top_k,
                                              expert_rank=expert_rank, scaling=scaling, dropout=dropout)
    return ((y_gate, y_up), (idx_gate, idx_up)) if return_indices else (y_gate, y_up)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, *, scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """y = x W^T + b + s * B A drop(x).

    Shapes: x [..., Din]; weight [Dout, Din]; bias [Dout] | None; lora_a [R, Din]; lora_b [Dout, R]
    (several adapters with the same scaling pack along R). Returns y [..., Dout].
    """
    _validate.check_lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout)
    x = _autocast_input(x)
    impl = _backend.resolve("lora_linear", x.device)
    with torch.autocast(x.device.type, enabled=False):
        return impl(x, weight, bias, lora_a, lora_b, scaling=scaling, dropout=dropout)


def route_topk(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (fp32) -> top-K (ties to the lower index) -> renormalise.

    Shapes: logits [..., E] -> gates [..., E] fp32 (zero where unselected, differentiable into logits),
    indices [..., K] int64.
    """
    _validate.check_route_topk(logits, top_k)
    return _backend.resolve("route_topk", logits.device)(logits, top_k)


def orth_penalty(a_base: Sequence[torch.Tensor], a_orth: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i sum_jk |A_base_i A_orth_i^T|_jk over all pairs, fp32 accumulation, as a scalar tensor.

    Shapes: a_base[i] [R1_i, Din_i], a_orth[i] [R2_i, Din_i]; pairs may differ in Din and ranks.
    """
    _validate.check_orth_penalty(a_base, a_orth)
    impl = _backend.resolve("orth_penalty", a_base[0].device)
    with torch.autocast(a_base[0].device.type, enabled=False):  # fp32 accumulation even inside an autocast forward
        return impl(list(a_base), list(a_orth))


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, *,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int | None = None
                         ) -> torch.Tensor:
    """Cross-entropy of the logits x W^T + b against labels, computed only at rows whose label is not
    ignore_index, a chunk of rows at a time (each chunk's gradient formed in forward, while its logits exist):
    never the logits of all rows at once.

    Shapes: x [..., Din]; weight [V, Din]; bias [V] | None; labels [...] int64 (x's leading dims; no shift is
    applied: pair each row with its own target). Returns a float32 scalar (float64 for float64 x): the sum,
    or the mean over labelled rows (NaN when none is labelled, as torch's). chunk_size: rows per chunk
    (default: as many as keep one chunk's float32 logits in 256 MiB). The logits are x's dtype, upcast to
    float32 like the plain head's (reference.linear_cross_entropy).
    """
    _validate.check_linear_cross_entropy(x, weight, bias, labels, ignore_index, reduction, chunk_size)
    x = _autocast_input(x)
    impl = _backend.resolve("linear_cross_entropy", x.device)
    with torch.autocast(x.device.type, enabled=False):
        return impl(x, weight, bias, labels, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size)
