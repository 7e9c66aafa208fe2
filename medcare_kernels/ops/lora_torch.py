"""lora_linear, torch backend: frozen base + one packed LoRA (several adapters concatenated along the rank).

Forward:   h = drop(x) A^T [T, R];  y = x W^T + b;  y += s * h B^T   (in place)
Saved:     x (no copy), h [T, R] and the dropout RNG state (the mask is redrawn): O(T*R) beyond x.
Backward:  dS = s * dY B;  dB = s * dY^T h;  dA = dS^T drop(x);  dx = dY W + drop'(dS A)
Reference: medcare_kernels.reference.lora_linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import adapter_input_grad, apply_keep, base_linear, cast, draw_keep, grad_like, redraw_keep


def lora_linear_fwd(x, weight, bias, lora_a, lora_b, keep, *, scaling, dropout):
    """x [..., Din] -> (y [..., Dout], h [T, R]); weights already in x's dtype. y is a fresh tensor (not a
    view), so callers may modify it in place as they would F.linear's output."""
    x2 = x.reshape(-1, x.shape[-1])
    h = F.linear(apply_keep(x2, keep, dropout), lora_a)
    y, y2 = base_linear(x, weight, bias)
    y2.addmm_(h, lora_b.t(), alpha=scaling)
    return y, h


def lora_linear_bwd(dy2, x2, h, weight, lora_a, lora_b, keep, needs, *, scaling, dropout):
    """Gradients for (x2, weight, bias, lora_a, lora_b); None where not needed."""
    need_x, need_w, need_b, need_a, need_lb = needs
    ds = (dy2 @ lora_b) * scaling if (need_x or need_a) else None     # [T, R]
    d_lb = (dy2.t() @ h) * scaling if need_lb else None                # [Dout, R]
    d_a = ds.t() @ apply_keep(x2, keep, dropout) if need_a else None   # [R, Din]
    d_w = dy2.t() @ x2 if need_w else None
    d_b = dy2.sum(0) if need_b else None
    dx = adapter_input_grad(dy2, weight, ds, lora_a, keep, dropout) if need_x else None
    return dx, d_w, d_b, d_a, d_lb


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout):
        dt = x.dtype
        keep, state = draw_keep(x, dropout)
        y, h = lora_linear_fwd(x, weight.to(dt), cast(bias, dt), lora_a.to(dt), lora_b.to(dt), keep,
                               scaling=scaling, dropout=dropout)
        ctx.save_for_backward(x, h, weight, bias, lora_a, lora_b)
        ctx.rng_state, ctx.scaling, ctx.dropout = state, scaling, dropout
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, weight, bias, lora_a, lora_b = ctx.saved_tensors
        dt = x.dtype
        keep = redraw_keep(x, ctx.dropout, ctx.rng_state)
        dx, d_w, d_b, d_a, d_lb = lora_linear_bwd(
            dy.reshape(-1, dy.shape[-1]).to(dt), x.reshape(-1, x.shape[-1]), h, weight.to(dt), lora_a.to(dt),
            lora_b.to(dt), keep, ctx.needs_input_grad[:5], scaling=ctx.scaling, dropout=ctx.dropout)
        dx = None if dx is None else dx.view(x.shape)
        return (dx, grad_like(d_w, weight), grad_like(d_b, bias), grad_like(d_a, lora_a), grad_like(d_lb, lora_b),
                None, None)


def lora_linear(x, weight, bias, lora_a, lora_b, *, scaling, dropout=0.0):
    return LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, float(scaling), float(dropout))
