"""lora_linear, Triton backend: the frozen base GEMM with the low-rank expand beside it.

Forward:   h = drop(x) A^T [T, R]: cuBLAS without dropout (a skinny GEMM it runs at bandwidth); with dropout the
           Triton shrink kernel of _triton_dropout, which regenerates the mask from a seed while it reads x;
           y = x W^T + b + h (s B)^T by _triton_gemm.gemm_sum: by default (`epilogue`) the expand written by the
           Triton gemm2 first, then the cuBLAS base GEMM adds into it (beta = 1); see there for the other paths.
Saved:     x (the caller's tensor), h [T, R] and, with dropout, the seed of the draw (int64 [1] on the device;
           the mask is regenerated in backward, never kept): O(T*R) beyond x.
Backward:  dS = dY (s B) [T, R];  dB = s dY^T h (cuBLAS);
           without dropout: dA = dS^T x (cuBLAS), dX = dY W + dS A (gemm_sum, as the forward);
           with dropout: dA = dS^T drop(x) from one Triton pass over x, dX = drop'(dS A) written by one Triton
           pass (the mask regenerated from the seed), then dY W added by cuBLAS (_triton_dropout.input_grad).
The dropout mask is Triton's Philox draw, not the torch backend's: see _triton_dropout for why and what differs.
A torch.library custom op with a fake implementation and registered autograd (torch.compile fullgraph works).
Reference: medcare_kernels.reference.lora_linear.
"""

from __future__ import annotations

import torch

from . import _triton_dropout
from ._triton_gemm import gemm_sum


# ---------------------------------------------------------------------------------------------- launchers
def lora_fwd(x, weight, bias, lora_a, lora_b, scaling, seed, dropout):
    """x [T, Din]; weight [Dout, Din]; bias [Dout] | None; lora_a [R, Din]; lora_b [Dout, R] (all in x's dtype);
    seed: the dropout draw's seed (int64 [1] on x's device) | None -> (y [T, Dout], h [T, R])."""
    h = _triton_dropout.shrink(x, lora_a, seed, dropout)
    b_scaled = lora_b * scaling                                        # [Dout, R], tiny
    return gemm_sum([(x, weight)], h, b_scaled, bias), h


def lora_bwd(dy, x, h, weight, lora_a, lora_b, scaling, seed, dropout):
    """-> (dx [T, Din], d_lora_a [R, Din], d_lora_b [Dout, R])."""
    ds = dy @ (lora_b * scaling)                                       # [T, R]
    d_lb = (dy.t() @ h).mul_(scaling)                                  # [Dout, R]
    if seed is not None:
        d_a = _triton_dropout.wgrad(ds, x, seed, dropout)         # [R, Din]
        return _triton_dropout.input_grad([(dy, weight.t())], ds, lora_a, seed, dropout), d_a, d_lb
    return gemm_sum([(dy, weight.t())], ds, lora_a.t()), ds.t() @ x, d_lb


# ---------------------------------------------------------------------------------------------- custom op + autograd
@torch.library.custom_op("medcare::lora_triton_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
            lora_b: torch.Tensor, scaling: float, seed: torch.Tensor | None, dropout: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return lora_fwd(x, weight, bias, lora_a, lora_b, scaling, seed, dropout)


@_fwd_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, seed, dropout):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


@torch.library.custom_op("medcare::lora_triton_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
            lora_b: torch.Tensor, scaling: float, seed: torch.Tensor | None, dropout: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return lora_bwd(dy, x, h, weight, lora_a, lora_b, scaling, seed, dropout)


@_bwd_op.register_fake
def _(dy, x, h, weight, lora_a, lora_b, scaling, seed, dropout):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, seed, dropout = inputs
    ctx.save_for_backward(x, output[1], weight, lora_a, lora_b, seed)
    ctx.scaling, ctx.dropout, ctx.has_bias = scaling, dropout, bias is not None


def _backward(ctx, dy, _dh):
    x, h, weight, lora_a, lora_b, seed = ctx.saved_tensors
    dx, d_a, d_lb = _bwd_op(dy.contiguous(), x, h, weight, lora_a, lora_b, ctx.scaling, seed, ctx.dropout)
    need = ctx.needs_input_grad
    d_w = dy.t() @ x if need[1] else None      # the base weight is frozen in training; supported for completeness
    d_b = dy.sum(0) if (need[2] and ctx.has_bias) else None
    return dx, d_w, d_b, d_a, d_lb, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- functional
def lora_linear(x, weight, bias, lora_a, lora_b, *, scaling, dropout=0.0):
    """y [..., Dout]; see medcare_kernels.lora_linear."""
    dt = x.dtype
    x2, seed = _triton_dropout.flat_input(x, dropout)
    y, _ = _fwd_op(x2, weight.to(dt), None if bias is None else bias.to(dt), lora_a.to(dt).contiguous(),
                   lora_b.to(dt).contiguous(), float(scaling), seed, float(dropout))
    return y.view(*x.shape[:-1], y.shape[-1])
