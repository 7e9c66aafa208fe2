"""molora_gate_up, Triton backend: the gate and up MoLoRA projections of a SwiGLU MLP, which read the same x.

Two molora_linear calls each read x [T, Din] three times in forward (shrink GEMM, router pass, base GEMM) and
twice in backward (dA GEMM, router wgrad), and each writes its own dX, which autograd then sums. This op shares
what the common input allows, with the Triton kernels of molora_triton.py (imported, not copied; they take row
strides, so they run on column slices of shared buffers):

Forward (Rt_g, Rt_u = E*R + Rs of each projection):
    h = drop(x) [A_g; A_u]^T             ONE cuBLAS shrink [T, Rt_g + Rt_u]: one read of x instead of two
    route_expand per projection          _route_expand_kernel on x with that projection's router and h's column slice,
                                         then y = x W^T + b + S B^T (the base GEMMs have different W: two;
                                         _triton_gemm.gemm_sum)
Backward:
    route_bwd per projection             dS = dY B (cuBLAS), _route_bwd_kernel writes into one buffer
                                         dhl = [dh_g | dh_u | dl_g | dl_u] (compute dtype) and dl = [dl_g | dl_u]
                                         [T, 2E] in fp32; dB = dY^T S
    dA = [dh_g | dh_u]^T drop(x)         ONE GEMM for both lora_a: one read of x instead of two
    router_wgrad on [dl_g | dl_u]        ONE fp32 pass over x for both routers (2E rows)
    dX = dY_g W_g + dY_u W_u + dhl [A_g; A_u; Wr_g; Wr_u]     ONE dX by gemm_sum: the low-rank term once for
                                         all adapters and routers of both projections (default `epilogue`:
                                         written first, then both base GEMMs add into it by cuBLAS, beta = 1;
                                         `fused`: the two base terms as one two-segment GEMM)
Saved for backward: x (the caller's tensor), h [T, Rt_g + Rt_u], probs [T, E] fp32 and indices [T, K] of each
projection: the same O(T*(E*R+Rs)) as two molora_linear calls, x once. Dropout (reference.molora_gate_up): ONE
draw of the adapters' input mask, shared by both projections, regenerated from the call's seed by the kernels
that read drop(x) (_triton_dropout; no [T, Din] mask is ever written).

What it saves: three reads of x (shrink, dA, router wgrad), and dX written once and updated in place instead
of two dX's (each written, then read and written by its low-rank addmm) summed by autograd; bench_molora's
mlp-block provider medcare-triton-gateup times it (the estimate from bytes: NOTES.md of the H100 results).
Still two router passes over x: the router kernel's softmax/top-K epilogue works on one router's E columns.
Reference: medcare_kernels.reference.molora_gate_up.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..reference import router_dtype
from . import _triton_dropout
from ._common import grad_like
from ._triton_gemm import gemm_sum
from .molora_triton import route_bwd, route_expand, router_wgrad


# ---------------------------------------------------------------------------------------------- launchers
class Projection(NamedTuple):
    """One projection's operands as the launchers take them (all but the router in x's dtype)."""

    weight: torch.Tensor               # [Dout, Din]
    bias: torch.Tensor | None          # [Dout]
    router_weight: torch.Tensor        # [E, Din]
    router_bias: torch.Tensor | None   # [E]
    lora_a: torch.Tensor               # [Rt, Din]
    lora_b: torch.Tensor               # [Dout, Rt]


class Routed(NamedTuple):
    """One projection's tensors for backward: its routing (from the forward) and its operands."""

    probs: torch.Tensor                # [T, E] fp32
    indices: torch.Tensor              # [T, K] int64
    weight: torch.Tensor               # [Dout, Din]
    router_weight: torch.Tensor        # [E, Din]
    lora_a: torch.Tensor               # [Rt, Din]
    lora_b: torch.Tensor               # [Dout, Rt]


def gate_up_fwd(x, gate: Projection, up: Projection, *, top_k, expert_rank, scaling, seed, dropout):
    """x [T, Din]; seed: the dropout seed (int64 [1]) | None -> (y_g [T, Dout_g], y_u [T, Dout_u],
    h [T, Rt_g + Rt_u], probs_g, probs_u [T, E] fp32, idx_g, idx_u [T, K])."""
    rt_g = gate.lora_a.shape[0]
    h = _triton_dropout.shrink(x, torch.cat([gate.lora_a, up.lora_a]), seed, dropout)  # one read of x, one draw
    y_g, probs_g, idx_g = route_expand(x, h[:, :rt_g], gate.weight, gate.bias, gate.router_weight, gate.router_bias,
                                       gate.lora_b, top_k, expert_rank, scaling)
    y_u, probs_u, idx_u = route_expand(x, h[:, rt_g:], up.weight, up.bias, up.router_weight, up.router_bias,
                                       up.lora_b, top_k, expert_rank, scaling)
    return y_g, y_u, h, probs_g, probs_u, idx_g, idx_u


def gate_up_bwd(dy_g, dy_u, x, h, gate: Routed, up: Routed, *, expert_rank, scaling, seed, dropout):
    """dy_g [T, Dout_g], dy_u [T, Dout_u], x, h and each projection's Routed -> (dx [T, Din], d_router_weight
    [2E, Din] and d_router_bias [2E] fp32 (gate's rows first), d_lora_a [Rt_g + Rt_u, Din] (gate's rows first),
    d_lb_g [Dout_g, Rt_g], d_lb_u [Dout_u, Rt_u]); the adapters' gradients in the compute dtype."""
    t = x.shape[0]
    e, rt_g, rt_u = gate.router_weight.shape[0], gate.lora_a.shape[0], up.lora_a.shape[0]
    rt = rt_g + rt_u
    dev, dt = x.device, x.dtype
    # [dh_g | dh_u | dl_g | dl_u]: dh of both is one slice for the dA GEMM, and the whole buffer one K slab for dX.
    dhl = torch.empty(t, rt + 2 * e, dtype=dt, device=dev)
    dl = torch.empty(t, 2 * e, dtype=router_dtype(dt), device=dev)    # [dl_g | dl_u]: one router-wgrad pass
    d_lb_g = route_bwd(dy_g, h[:, :rt_g], gate.probs, gate.indices, gate.lora_b, dhl, rt, dl[:, :e], expert_rank,
                       scaling)
    d_lb_u = route_bwd(dy_u, h[:, rt_g:], up.probs, up.indices, up.lora_b, dhl[:, rt_g:], rt_u + e, dl[:, e:],
                       expert_rank, scaling)
    dh = dhl[:, :rt]
    d_a = _triton_dropout.wgrad(dh, x, seed, dropout)                    # [Rt_g + Rt_u, Din]
    d_rw = router_wgrad(dl, x)                                           # [2E, Din]
    a_ext = torch.cat([gate.lora_a, up.lora_a, gate.router_weight.to(dt), up.router_weight.to(dt)])  # [Rt + 2E, Din]
    bases = [(dy_g, gate.weight.t()), (dy_u, up.weight.t())]
    if seed is None:
        dx = gemm_sum(bases, dhl, a_ext.t())
    else:  # dropout: the adapters' part of the input gradient goes through the mask, the routers' part does not
        dx = _triton_dropout.input_grad(bases, dh, a_ext[:rt], seed, dropout, dhl[:, rt:], a_ext[rt:])
    return dx, d_rw, dl.sum(0), d_a, d_lb_g, d_lb_u


# ---------------------------------------------------------------------------------------------- custom op + autograd
@torch.library.custom_op("medcare::molora_gate_up_triton_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, w_g: torch.Tensor, b_g: torch.Tensor | None, rw_g: torch.Tensor, rb_g: torch.Tensor | None,
            a_g: torch.Tensor, lb_g: torch.Tensor, w_u: torch.Tensor, b_u: torch.Tensor | None, rw_u: torch.Tensor,
            rb_u: torch.Tensor | None, a_u: torch.Tensor, lb_u: torch.Tensor, top_k: int, expert_rank: int,
            scaling: float, seed: torch.Tensor | None, dropout: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor]:
    return gate_up_fwd(x, Projection(w_g, b_g, rw_g, rb_g, a_g, lb_g), Projection(w_u, b_u, rw_u, rb_u, a_u, lb_u),
                       top_k=top_k, expert_rank=expert_rank, scaling=scaling, seed=seed, dropout=dropout)


@_fwd_op.register_fake
def _(x, w_g, b_g, rw_g, rb_g, a_g, lb_g, w_u, b_u, rw_u, rb_u, a_u, lb_u, top_k, expert_rank, scaling, seed,
      dropout):
    t, e, rdt = x.shape[0], rw_g.shape[0], router_dtype(x.dtype)
    return (x.new_empty(t, w_g.shape[0]), x.new_empty(t, w_u.shape[0]), x.new_empty(t, a_g.shape[0] + a_u.shape[0]),
            x.new_empty(t, e, dtype=rdt), x.new_empty(t, e, dtype=rdt),
            x.new_empty(t, top_k, dtype=torch.int64), x.new_empty(t, top_k, dtype=torch.int64))


@torch.library.custom_op("medcare::molora_gate_up_triton_bwd", mutates_args=())
def _bwd_op(dy_g: torch.Tensor, dy_u: torch.Tensor, x: torch.Tensor, h: torch.Tensor, probs_g: torch.Tensor,
            probs_u: torch.Tensor, idx_g: torch.Tensor, idx_u: torch.Tensor, w_g: torch.Tensor, w_u: torch.Tensor,
            rw_g: torch.Tensor, rw_u: torch.Tensor, a_g: torch.Tensor, a_u: torch.Tensor, lb_g: torch.Tensor,
            lb_u: torch.Tensor, expert_rank: int, scaling: float, seed: torch.Tensor | None, dropout: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gate_up_bwd(dy_g, dy_u, x, h, Routed(probs_g, idx_g, w_g, rw_g, a_g, lb_g),
                       Routed(probs_u, idx_u, w_u, rw_u, a_u, lb_u), expert_rank=expert_rank, scaling=scaling,
                       seed=seed, dropout=dropout)


@_bwd_op.register_fake
def _(dy_g, dy_u, x, h, probs_g, probs_u, idx_g, idx_u, w_g, w_u, rw_g, rw_u, a_g, a_u, lb_g, lb_u, expert_rank,
      scaling, seed, dropout):
    e, rdt = rw_g.shape[0], router_dtype(x.dtype)
    return (torch.empty_like(x), x.new_empty(2 * e, x.shape[1], dtype=rdt), x.new_empty(2 * e, dtype=rdt),
            x.new_empty(a_g.shape[0] + a_u.shape[0], x.shape[1]), torch.empty_like(lb_g), torch.empty_like(lb_u))


# _fwd_op's flat arguments (a custom op's schema takes no tuples): x, the gate's six, the up's six, then the scalars.
_GATE, _UP, _SCALARS = slice(1, 7), slice(7, 13), slice(13, None)


def _setup_context(ctx, inputs, output):
    x, gate, up = inputs[0], Projection(*inputs[_GATE]), Projection(*inputs[_UP])
    _top_k, expert_rank, scaling, state, dropout = inputs[_SCALARS]
    w_g, b_g, rw_g, rb_g, a_g, lb_g = gate
    w_u, b_u, rw_u, rb_u, a_u, lb_u = up
    _, _, h, probs_g, probs_u, idx_g, idx_u = output
    ctx.save_for_backward(x, h, probs_g, probs_u, idx_g, idx_u, w_g, w_u, rw_g, rw_u, a_g, a_u, lb_g, lb_u, state)
    ctx.expert_rank, ctx.scaling, ctx.dropout = expert_rank, scaling, dropout
    ctx.has_bias = (b_g is not None, b_u is not None)
    ctx.rb_dtype = tuple(None if rb is None else rb.dtype for rb in (rb_g, rb_u))


def _backward(ctx, dy_g, dy_u, _dh, _dpg, _dpu, _dig, _diu):
    x, h, probs_g, probs_u, idx_g, idx_u, w_g, w_u, rw_g, rw_u, a_g, a_u, lb_g, lb_u, state = ctx.saved_tensors
    dx, d_rw, d_rb, d_a, d_lb_g, d_lb_u = _bwd_op(
        dy_g.contiguous(), dy_u.contiguous(), x, h, probs_g, probs_u, idx_g, idx_u, w_g, w_u, rw_g, rw_u, a_g, a_u,
        lb_g, lb_u, ctx.expert_rank, ctx.scaling, state, ctx.dropout)
    e, rt_g = rw_g.shape[0], a_g.shape[0]
    gate = _projection_grads(ctx, 0, dy_g, x, rw_g, d_rw[:e], d_rb[:e], d_a[:rt_g], d_lb_g)
    up = _projection_grads(ctx, 1, dy_u, x, rw_u, d_rw[e:], d_rb[e:], d_a[rt_g:], d_lb_u)
    return (dx, *gate, *up, None, None, None, None, None)


def _projection_grads(ctx, i, dy, x, rw, d_rw, d_rb, d_a, d_lb):
    """Gradients of projection i's (weight, bias, router_weight, router_bias, lora_a, lora_b); 0 gate, 1 up."""
    need = ctx.needs_input_grad[1 + 6 * i:7 + 6 * i]
    rb_dtype = ctx.rb_dtype[i]
    d_w = dy.t() @ x if need[0] else None      # the base weights are frozen in training; supported for completeness
    d_b = dy.sum(0) if (need[1] and ctx.has_bias[i]) else None
    return d_w, d_b, grad_like(d_rw, rw), None if rb_dtype is None else d_rb.to(rb_dtype), d_a, d_lb


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- functional
def _operands(p, dt):
    """A projection's (weight, bias, router_weight, router_bias, lora_a, lora_b) as the op takes them: the GEMM
    operands in the compute dtype (parameters may be stored wider), the router in its own (fp32) dtype."""
    w, b, rw, rb, a, lb = p
    return (w.to(dt), None if b is None else b.to(dt), rw.contiguous(), rb, a.to(dt).contiguous(),
            lb.to(dt).contiguous())


def molora_gate_up(x, gate, up, *, num_experts, top_k, expert_rank, scaling, dropout=0.0):
    """(y_gate [..., Dout_g], y_up [..., Dout_u], indices_gate [..., K], indices_up [..., K]);
    see medcare_kernels.molora_gate_up."""
    del num_experts  # router_weight.shape[0]; validated by the public API
    x2, state = _triton_dropout.flat_input(x, dropout)
    y_g, y_u, _, _, _, idx_g, idx_u = _fwd_op(x2, *_operands(gate, x.dtype), *_operands(up, x.dtype), int(top_k),
                                              int(expert_rank), float(scaling), state, float(dropout))
    lead = x.shape[:-1]
    return (y_g.view(*lead, y_g.shape[-1]), y_u.view(*lead, y_u.shape[-1]), idx_g.view(*lead, top_k),
            idx_u.view(*lead, top_k))
