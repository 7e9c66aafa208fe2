"""lora_linear, Triton backend: the frozen base GEMM with the low-rank expand as a second K segment.

Forward:   h = drop(x) A^T [T, R] (cuBLAS: a skinny GEMM it runs at bandwidth);
           y = x W^T + b + h (s B)^T in one Triton GEMM (_triton_gemm.gemm2): y is written once, never read back,
           or cuBLAS base + in-place addmm where that measures faster (use_fused_gemm).
Saved:     x (the caller's tensor), h [T, R]: O(T*R) beyond x. With dropout > 0 the dropped input comes from
           reference.dropout_keep_mask (the torch backend's draw) and autograd keeps its mask.
Backward:  dS = dY (s B) [T, R];  dB = s dY^T h;  dA = dS^T drop(x);
           dX = dY W + dS A as one Triton GEMM with dS/A as the second K segment (no dropout), else cuBLAS.
A torch.library custom op with a fake implementation and registered autograd (torch.compile fullgraph works).
Reference: medcare_kernels.reference.lora_linear.
"""

from __future__ import annotations

import torch

from ._triton_gemm import flat_inputs, gemm2, use_fused_gemm


# ---------------------------------------------------------------------------------------------- launchers
def lora_fwd(x, xd, weight, bias, lora_a, lora_b, scaling):
    """x [T, Din]; xd [T, Din] | None; weight [Dout, Din]; bias [Dout] | None; lora_a [R, Din]; lora_b [Dout, R]
    (all in x's dtype) -> (y [T, Dout], h [T, R])."""
    h = (x if xd is None else xd) @ lora_a.t()
    b_scaled = lora_b * scaling                                        # [Dout, R], tiny
    if use_fused_gemm(x.device):
        y = gemm2(x, weight, h, b_scaled, bias)
    else:
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        y.addmm_(h, b_scaled.t())
    return y, h


def lora_bwd(dy, x, xd, h, weight, lora_a, lora_b, scaling):
    """-> (dx [T, Din] (without the adapter part when xd is given), dxd [T, Din] | empty, d_lora_a [R, Din],
    d_lora_b [Dout, R])."""
    ds = dy @ (lora_b * scaling)                                       # [T, R]
    d_lb = (dy.t() @ h).mul_(scaling)                                  # [Dout, R]
    d_a = ds.t() @ (x if xd is None else xd)                           # [R, Din]
    if xd is None:
        dx = gemm2(dy, weight.t(), ds, lora_a.t()) if use_fused_gemm(x.device) else torch.mm(dy, weight).addmm_(
            ds, lora_a)
        return dx, dx.new_empty(0), d_a, d_lb
    return torch.mm(dy, weight), ds @ lora_a, d_a, d_lb


# ---------------------------------------------------------------------------------------------- custom op + autograd
@torch.library.custom_op("medcare::lora_triton_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, xd: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
            lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    return lora_fwd(x, xd, weight, bias, lora_a, lora_b, scaling)


@_fwd_op.register_fake
def _(x, xd, weight, bias, lora_a, lora_b, scaling):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


@torch.library.custom_op("medcare::lora_triton_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, xd: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor,
            lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return lora_bwd(dy, x, xd, h, weight, lora_a, lora_b, scaling)


@_bwd_op.register_fake
def _(dy, x, xd, h, weight, lora_a, lora_b, scaling):
    return (torch.empty_like(x), x.new_empty(x.shape if xd is not None else (0,)), torch.empty_like(lora_a),
            torch.empty_like(lora_b))


def _setup_context(ctx, inputs, output):
    x, xd, weight, bias, lora_a, lora_b, scaling = inputs
    ctx.save_for_backward(x, xd, output[1], weight, lora_a, lora_b)
    ctx.scaling, ctx.has_bias = scaling, bias is not None


def _backward(ctx, dy, _dh):
    x, xd, h, weight, lora_a, lora_b = ctx.saved_tensors
    dx, dxd, d_a, d_lb = _bwd_op(dy.contiguous(), x, xd, h, weight, lora_a, lora_b, ctx.scaling)
    need = ctx.needs_input_grad
    d_w = dy.t() @ x if need[2] else None      # the base weight is frozen in training; supported for completeness
    d_b = dy.sum(0) if (need[3] and ctx.has_bias) else None
    return dx, dxd if xd is not None else None, d_w, d_b, d_a, d_lb, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- functional
def lora_linear(x, weight, bias, lora_a, lora_b, *, scaling, dropout=0.0):
    """y [..., Dout]; see medcare_kernels.lora_linear."""
    dt = x.dtype
    x2, xd = flat_inputs(x, dropout)
    y, _ = _fwd_op(x2, xd, weight.to(dt), None if bias is None else bias.to(dt), lora_a.to(dt).contiguous(),
                   lora_b.to(dt).contiguous(), float(scaling))
    return y.view(*x.shape[:-1], y.shape[-1])
