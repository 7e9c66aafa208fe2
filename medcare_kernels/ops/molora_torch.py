"""molora_linear, torch backend: frozen base + routed LoRA experts + shared LoRA in the dense-masked form.

Forward (T tokens, Rt = E*R + Rs):
    logits = x Wr^T + br (fp32) -> probs, indices, gates          route_topk_fwd
    h      = drop(x) lora_a^T                                       [T, Rt], compute dtype
    S      = h * g,  g = s * [gates repeated R | 1 (Rs)]            [T, Rt]
    y      = x W^T + b;  y += S lora_b^T                            in place: no second [T, Dout] tensor
Never a [T, E, Dout] tensor: each expert's contribution is folded into the rank dimension of one GEMM.

Saved for backward: x (the caller's tensor, no copy), h [T, Rt], probs [T, E] fp32, indices [T, K], and
the RNG state of the dropout draw (the mask is redrawn, not saved): O(T*(E*R+Rs)) beyond x.

Backward:
    dS  = dY lora_b                  [T, Rt]      one pass over dY for dS ...
    dB  = dY^T S                     [Dout, Rt]   ... and dB (S recomputed from h and the gates)
    dh  = dS * g
    dg  = s * <dS_e, h_e>            [T, E]       R-length dot per (token, expert): no cached expert outputs
    dl  = route_topk_bwd(dg)         [T, E]
    dA  = dh^T drop(x);  dWr = dl^T x;  dbr = sum_t dl
    dx  = dY W + drop'(dh lora_a) + dl Wr
Reference: medcare_kernels.reference.molora_linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import router_dtype
from ._common import (
    adapter_input_grad,
    apply_keep,
    base_linear,
    cast,
    draw_keep,
    expand_gates,
    grad_like,
    redraw_keep,
)
from .routing_torch import gates_from, route_topk_bwd, route_topk_fwd


def molora_linear_fwd(x, weight, bias, router_weight, router_bias, lora_a, lora_b, keep, *, top_k,
                      expert_rank, scaling, dropout):
    """x [..., Din] -> (y [..., Dout], h [T, Rt], probs [T, E], indices [T, K]); weights in x's dtype.
    y is a fresh tensor, not a view, so callers may modify it in place as they would F.linear's output."""
    x2 = x.reshape(-1, x.shape[-1])
    rdt = router_dtype(x2.dtype)
    probs, indices, gates = route_topk_fwd(F.linear(x2.to(rdt), router_weight.to(rdt), cast(router_bias, rdt)),
                                           top_k)
    h = F.linear(apply_keep(x2, keep, dropout), lora_a)
    g = expand_gates(gates, expert_rank, lora_a.shape[0] - gates.shape[-1] * expert_rank, scaling)
    y, y2 = base_linear(x, weight, bias)
    y2.addmm_((h.to(rdt) * g).to(x2.dtype), lora_b.t())
    return y, h, probs, indices


def molora_linear_bwd(dy2, x2, h, probs, indices, weight, router_weight, lora_a, lora_b, keep, needs, *,
                      expert_rank, scaling, dropout):
    """Gradients for (x2, weight, bias, router_weight, router_bias, lora_a, lora_b); None where not needed."""
    need_x, need_w, need_b, need_rw, need_rb, need_a, need_lb = needs
    rdt = router_dtype(x2.dtype)
    num_experts = probs.shape[-1]
    g = expand_gates(gates_from(probs, indices), expert_rank, lora_a.shape[0] - num_experts * expert_rank, scaling)
    ds = dy2 @ lora_b                                                     # [T, Rt]
    d_lb = dy2.t() @ (h.to(rdt) * g).to(dy2.dtype) if need_lb else None   # [Dout, Rt]
    dh = (ds.to(rdt) * g).to(dy2.dtype)
    d_logits = None
    if need_x or need_rw or need_rb:
        er = num_experts * expert_rank
        d_gates = (ds[:, :er].to(rdt) * h[:, :er].to(rdt)).view(x2.shape[0], num_experts, expert_rank).sum(-1) * scaling
        d_logits = route_topk_bwd(d_gates, probs, indices)               # [T, E] fp32
    d_a = dh.t() @ apply_keep(x2, keep, dropout) if need_a else None      # [Rt, Din]
    d_rw = d_logits.t() @ x2.to(rdt) if need_rw else None                # [E, Din] fp32
    d_rb = d_logits.sum(0) if need_rb else None
    d_w = dy2.t() @ x2 if need_w else None
    d_b = dy2.sum(0) if need_b else None
    dx = None
    if need_x:
        dx = adapter_input_grad(dy2, weight, dh, lora_a, keep, dropout)
        dx += (d_logits @ router_weight.to(rdt)).to(dx.dtype)
    return dx, d_w, d_b, d_rw, d_rb, d_a, d_lb


class MoLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, router_weight, router_bias, lora_a, lora_b, top_k, expert_rank, scaling,
                dropout):
        dt = x.dtype
        keep, state = draw_keep(x, dropout)
        y, h, probs, indices = molora_linear_fwd(
            x, weight.to(dt), cast(bias, dt), router_weight, router_bias, lora_a.to(dt), lora_b.to(dt), keep,
            top_k=top_k, expert_rank=expert_rank, scaling=scaling, dropout=dropout)
        ctx.save_for_backward(x, h, probs, indices, weight, bias, router_weight, router_bias, lora_a, lora_b)
        ctx.rng_state, ctx.expert_rank, ctx.scaling, ctx.dropout = state, expert_rank, scaling, dropout
        ctx.mark_non_differentiable(indices)
        return y, indices.view(*x.shape[:-1], top_k)

    @staticmethod
    def backward(ctx, dy, _d_indices):
        x, h, probs, indices, weight, bias, router_weight, router_bias, lora_a, lora_b = ctx.saved_tensors
        dt = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        keep = redraw_keep(x, ctx.dropout, ctx.rng_state)
        grads = molora_linear_bwd(
            dy.reshape(-1, dy.shape[-1]).to(dt), x2, h, probs, indices, weight.to(dt), router_weight,
            lora_a.to(dt), lora_b.to(dt), keep, ctx.needs_input_grad[:7], expert_rank=ctx.expert_rank,
            scaling=ctx.scaling, dropout=ctx.dropout)
        dx, d_w, d_b, d_rw, d_rb, d_a, d_lb = grads
        dx = None if dx is None else dx.view(x.shape)
        return (dx, grad_like(d_w, weight), grad_like(d_b, bias), grad_like(d_rw, router_weight),
                grad_like(d_rb, router_bias), grad_like(d_a, lora_a), grad_like(d_lb, lora_b),
                None, None, None, None)


def molora_linear(x, weight, bias, router_weight, router_bias, lora_a, lora_b, *, num_experts, top_k, expert_rank,
                  scaling, dropout=0.0):
    """(y [..., Dout], indices [..., K]): the routing decision comes back for usage statistics, at no cost."""
    del num_experts  # router_weight.shape[0]; validated by the public API
    return MoLoRALinearFunction.apply(x, weight, bias, router_weight, router_bias, lora_a, lora_b, top_k,
                                      expert_rank, float(scaling), float(dropout))
