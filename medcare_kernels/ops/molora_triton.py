"""molora_linear, Triton backend: routed LoRA experts + shared LoRA around the frozen cuBLAS base GEMM.

What is fused, and why: the big GEMMs go to cuBLAS, which runs the base GEMM faster than a Triton GEMM does
(so the "expand as an extra K slab" GEMM is not the default, see _triton_gemm); the skinny expand rides on the
base GEMM's output through _triton_gemm.gemm_sum (default `epilogue`: the Triton gemm2 writes S lora_b^T, then
cuBLAS adds x W^T into it with beta = 1, reading it in its epilogue). The shrink GEMM is cuBLAS's too: Triton's
FMA-based fp32 dots lose to it. Triton does what cuBLAS cannot: the fp32 router on the exact (upcast) bf16
activations with the softmax -> top-K -> renormalise epilogue and the gating, in one pass over x, and the
routing backward, element-wise over [T, E*R+Rs]. (The H100 numbers behind these choices:
benchmarks/results/nvidia-h100-80gb-hbm3/NOTES.md.)

Forward (T tokens, Rt = E*R + Rs):
    h = drop(x) lora_a^T                 cuBLAS [T, Rt] (with dropout: _triton_dropout.shrink, mask in-kernel)
    _route_expand_kernel                          one pass over x: logits = x Wr^T + br in fp32 (3xTF32 tensor-core dots
                                         on the exactly-upcast bf16/fp16 x, IEEE fp32 for fp32 x), softmax, top-K
                                         (ties to the lower index), renormalise; and S = h * g with
                                         g = s * [gates repeated R | 1 for the shared block]   [T, Rt]
    y = x W^T + b + S lora_b^T           _triton_gemm.gemm_sum (MEDCARE_TRITON_GEMM: epilogue | add | cublas | fused)
No [T, E, Dout] tensor, no token permutation, no host synchronisation (CUDA-graph and torch.compile friendly:
the op is a torch.library custom op with a fake implementation and a registered autograd).

Saved for backward: x (the caller's tensor), h [T, Rt], probs [T, E] fp32, indices [T, K]: O(T*(E*R+Rs))
beyond x, as the torch backend. With dropout > 0 the adapters' mask is regenerated from a per-call seed by the
kernels that read drop(x) (_triton_dropout: shrink, wgrad, lowrank_dx), so no [T, Din] mask is ever written.

Backward:
    dS = dY lora_b                       cuBLAS [T, Rt]
    _route_bwd_kernel                      element-wise per token block: dh = dS * g; d gate_e = s <dS_e, h_e>
                                         (R-length dots, no cached expert outputs); softmax-top-K backward ->
                                         d_logits (fp32); S = h * g again for dB
    dB = dY^T S;  dA = dh^T drop(x)      cuBLAS (with dropout, dA: _triton_dropout.wgrad)
    dX = dY W + [dh | dl] [lora_a; Wr]   gemm_sum, as the forward (K = Rt + E); with dropout the dh part goes
                                         through the mask: _triton_dropout.input_grad (one Triton pass writes
                                         drop'(dh A) + dl Wr, then cuBLAS adds dY W)
    router_wgrad                         d Wr = dl^T x in fp32 from one pass over x, split over T into fp32
                                         partials summed afterwards (deterministic, no atomics): the dropout
                                         dA's kernel (_triton_dropout._wgrad_kernel) without the mask
Reference: medcare_kernels.reference.molora_linear.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import router_dtype
from . import _triton_dropout
from ._common import grad_like
from ._triton_gemm import INTERPRET, WGRAD_BLOCK_T, gemm_sum, load_rows, pad, tl_acc, token_splits

# ---------------------------------------------------------------------------------------------- tile configs
# Tokens per program of the routing kernels: their tiles are [tokens, E_PAD] and [tokens, E, R], small enough
# for 64 rows (fewer for large E*R: _block_t); the router's pass over x takes BLOCK_D columns a step.
BLOCK_T = 16 if INTERPRET else 64
BLOCK_D = 32 if INTERPRET else 128
WGRAD_BLOCK_D = 32 if INTERPRET else 128  # Din per router-wgrad program (fewer for many experts: _wgrad_block_d)


def _block_t(num_experts: int, expert_rank: int) -> int:
    """Tokens per routing program: BLOCK_T, fewer when the [tokens, E, R] expert tile would not fit in
    registers (E=8, R=16 keeps 64; E=64, R=16 gets 16)."""
    return max(16 if not INTERPRET else 4, min(BLOCK_T, 16384 // (pad(num_experts) * pad(expert_rank))))


def _router_precision(dtype: torch.dtype) -> str:
    """fp32 router dots: IEEE where x is fp32/fp64 (or interpreted); 3xTF32 on tensor cores for bf16/fp16 x,
    whose upcast is exact in TF32, so only the router weight's split costs accuracy (~2^-22 relative)."""
    return "ieee" if (INTERPRET or dtype in (torch.float32, torch.float64)) else "tf32x3"


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _route_expand_kernel(x_ptr, rw_ptr, rb_ptr, h_ptr, s_ptr, probs_ptr, idx_ptr,
                         T, DIN, E, ER, RS, s_xt, s_rwt, s_ht, s_st, scaling,
                         R: tl.constexpr, K: tl.constexpr, HAS_RB: tl.constexpr, PREC: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, E_PAD: tl.constexpr,
                         R_PAD: tl.constexpr, RS_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    r_ok = rows < T
    cols_e = tl.arange(0, E_PAD)
    e_ok = cols_e < E
    acc = tl.zeros((BLOCK_T, E_PAD), dtype=ACC)
    for d0 in range(0, DIN, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < DIN
        x = load_rows(x_ptr, rows, d, s_xt, r_ok, d_ok)
        rw = tl.load(rw_ptr + cols_e[:, None] * s_rwt + d[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)
        # Router in fp32 from the exact upcast of x: bf16 logits could overflow or flip the top-K.
        acc = tl.dot(x.to(ACC), tl.trans(rw.to(ACC)), acc, input_precision=PREC)
    if HAS_RB:
        acc += tl.load(rb_ptr + cols_e, mask=e_ok, other=0.0).to(ACC)[None, :]
    logits = tl.where(e_ok[None, :], acc, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    tl.store(probs_ptr + rows[:, None] * E + cols_e[None, :], p, mask=r_ok[:, None] & e_ok[None, :])
    # Top-K by K rounds of argmax; the lowest index wins a tie, as the reference's stable sort.
    work = tl.where(e_ok[None, :], p, -1.0)
    chosen = tl.zeros((BLOCK_T, E_PAD), dtype=ACC)
    for j in tl.static_range(K):
        best = tl.max(work, axis=1)
        pick = tl.min(tl.where(work == best[:, None], cols_e[None, :], E_PAD), axis=1)
        tl.store(idx_ptr + rows * K + j, pick.to(tl.int64), mask=r_ok)
        hit = cols_e[None, :] == pick[:, None]
        chosen = tl.where(hit, p, chosen)
        work = tl.where(hit, -2.0, work)
    gates = chosen / tl.sum(chosen, axis=1)[:, None]
    _scale_adapters(h_ptr, s_ptr, rows, r_ok, gates, E, ER, RS, s_ht, s_st, scaling, R, ACC, E_PAD, R_PAD, RS_PAD)


@triton.jit
def _scale_adapters(h_ptr, out_ptr, rows, r_ok, gates, E, ER, RS, s_ht, s_ot, scaling, R: tl.constexpr,
                    ACC: tl.constexpr, E_PAD: tl.constexpr, R_PAD: tl.constexpr, RS_PAD: tl.constexpr):
    """out = h * s * [gate_e on expert e's R columns | 1 on the shared columns], for one token block; the
    expert block is addressed as [BLOCK_T, E, R] so each gate broadcasts over its R columns, no gather.
    Row strides: h may be a column slice of a wider shrink output (molora_gate_up's [h_gate | h_up])."""
    ce = tl.arange(0, E_PAD)
    cr = tl.arange(0, R_PAD)
    col = ce[None, :, None] * R + cr[None, None, :]
    m = r_ok[:, None, None] & (ce < E)[None, :, None] & (cr < R)[None, None, :]
    h = tl.load(h_ptr + rows[:, None, None] * s_ht + col, mask=m, other=0.0).to(ACC)
    tl.store(out_ptr + rows[:, None, None] * s_ot + col, (h * (gates * scaling)[:, :, None]).to(
        out_ptr.dtype.element_ty), mask=m)
    cs = tl.arange(0, RS_PAD)
    m_s = r_ok[:, None] & (cs < RS)[None, :]
    h_s = tl.load(h_ptr + rows[:, None] * s_ht + ER + cs[None, :], mask=m_s, other=0.0).to(ACC)
    tl.store(out_ptr + rows[:, None] * s_ot + ER + cs[None, :], (h_s * scaling).to(out_ptr.dtype.element_ty),
             mask=m_s)


@triton.jit
def _route_bwd_kernel(ds_ptr, h_ptr, probs_ptr, idx_ptr, dhl_ptr, s_ptr, dl_ptr,
                      T, E, ER, RS, s_dst, s_ht, s_st, s_dhlt, s_dlt, dl_col, scaling,
                      R: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                      E_PAD: tl.constexpr, R_PAD: tl.constexpr, RS_PAD: tl.constexpr):
    # Row strides for every [T, *] operand and the column of d_logits inside dhl: molora_gate_up runs this once
    # per projection on column slices of shared buffers ([h_gate | h_up], [dh_gate | dh_up | dl_gate | dl_up]).
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    r_ok = rows < T
    ce = tl.arange(0, E_PAD)
    cr = tl.arange(0, R_PAD)
    e_ok = ce < E
    p = tl.load(probs_ptr + rows[:, None] * E + ce[None, :], mask=r_ok[:, None] & e_ok[None, :], other=0.0)
    sel = tl.zeros((BLOCK_T, E_PAD), dtype=tl.int1)
    for j in tl.static_range(K):
        pick = tl.load(idx_ptr + rows * K + j, mask=r_ok, other=E_PAD)
        sel = sel | (ce[None, :] == pick[:, None])
    p_sel = tl.where(sel, p, 0.0)
    z = tl.sum(p_sel, axis=1)[:, None]
    z = tl.where(z > 0.0, z, 1.0)  # padding rows of the block
    w = p_sel / z
    # Expert block as [BLOCK_T, E, R]: d gate_e = s <dS_e, h_e> is a sum over the last axis.
    col = ce[None, :, None] * R + cr[None, None, :]
    r3 = rows[:, None, None]
    m = r_ok[:, None, None] & e_ok[None, :, None] & (cr < R)[None, None, :]
    ds = tl.load(ds_ptr + r3 * s_dst + col, mask=m, other=0.0).to(ACC)
    h = tl.load(h_ptr + r3 * s_ht + col, mask=m, other=0.0).to(ACC)
    d_w = tl.where(sel, tl.sum(ds * h, axis=2) * scaling, 0.0)
    dp = tl.where(sel, (d_w - tl.sum(d_w * w, axis=1)[:, None]) / z, 0.0)
    dl = p * (dp - tl.sum(dp * p, axis=1)[:, None])
    tl.store(dl_ptr + rows[:, None] * s_dlt + ce[None, :], dl, mask=r_ok[:, None] & e_ok[None, :])
    g = (w * scaling)[:, :, None]
    tl.store(dhl_ptr + r3 * s_dhlt + col, (ds * g).to(dhl_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + r3 * s_st + col, (h * g).to(s_ptr.dtype.element_ty), mask=m)
    cs = tl.arange(0, RS_PAD)
    r2, c2 = rows[:, None], ER + cs[None, :]
    m_s = r_ok[:, None] & (cs < RS)[None, :]
    ds_s = tl.load(ds_ptr + r2 * s_dst + c2, mask=m_s, other=0.0).to(ACC)
    h_s = tl.load(h_ptr + r2 * s_ht + c2, mask=m_s, other=0.0).to(ACC)
    tl.store(dhl_ptr + r2 * s_dhlt + c2, (ds_s * scaling).to(dhl_ptr.dtype.element_ty), mask=m_s)
    tl.store(s_ptr + r2 * s_st + c2, (h_s * scaling).to(s_ptr.dtype.element_ty), mask=m_s)
    # d_logits in the compute dtype beside dh: [dh | dl] [lora_a; Wr] is then one GEMM for dX.
    tl.store(dhl_ptr + r2 * s_dhlt + dl_col + ce[None, :], dl.to(dhl_ptr.dtype.element_ty),
             mask=r_ok[:, None] & e_ok[None, :])


# ---------------------------------------------------------------------------------------------- launchers
def molora_fwd(x, weight, bias, router_weight, router_bias, lora_a, lora_b, top_k, expert_rank, scaling, seed,
               dropout):
    """x [T, Din]; weight [Dout, Din]; bias [Dout] | None; router_weight [E, Din]; router_bias [E] | None;
    lora_a [Rt, Din]; lora_b [Dout, Rt] (all but the router in x's dtype); seed: the adapters' dropout seed
    (int64 [1] on x's device) | None -> (y [T, Dout], h [T, Rt], probs [T, E] fp32, indices [T, K] int64)."""
    h = _triton_dropout.shrink(x, lora_a, seed, dropout)                    # [T, Rt]: the adapters see drop(x)
    y, probs, indices = route_expand(x, h, weight, bias, router_weight, router_bias, lora_b, top_k, expert_rank,
                                     scaling)
    return y, h, probs, indices


def route_expand(x, h, weight, bias, router_weight, router_bias, lora_b, top_k, expert_rank, scaling):
    """The router pass over x, the gating S = h * g and y = x W^T + b + S lora_b^T, for a shrink output
    h [T, Rt] computed by the caller (any row stride: molora_gate_up passes column slices of one GEMM's
    output) -> (y [T, Dout], probs [T, E] fp32, indices [T, K] int64)."""
    t, din = x.shape
    e, rt = router_weight.shape[0], h.shape[1]
    er = e * expert_rank
    s = torch.empty(t, rt, dtype=h.dtype, device=x.device)
    probs = torch.empty(t, e, dtype=router_dtype(x.dtype), device=x.device)
    indices = torch.empty(t, top_k, dtype=torch.int64, device=x.device)
    if t > 0:
        bt = _block_t(e, expert_rank)
        _route_expand_kernel[(triton.cdiv(t, bt),)](
            x, router_weight, router_bias if router_bias is not None else router_weight, h, s, probs, indices,
            t, din, e, er, rt - er, x.stride(0), router_weight.stride(0), h.stride(0), s.stride(0), scaling,
            R=expert_rank, K=top_k, HAS_RB=router_bias is not None, PREC=_router_precision(x.dtype),
            ACC=tl_acc(x.dtype), BLOCK_T=bt, BLOCK_D=BLOCK_D, E_PAD=pad(e), R_PAD=pad(expert_rank),
            RS_PAD=pad(rt - er))
    return gemm_sum([(x, weight)], s, lora_b, bias), probs, indices


def molora_bwd(dy, x, h, probs, indices, weight, router_weight, lora_a, lora_b, expert_rank, scaling, seed,
               dropout):
    """dy [T, Dout] and the saved tensors -> (dx [T, Din], d_router_weight [E, Din] fp32, d_router_bias [E]
    fp32, d_lora_a [Rt, Din], d_lora_b [Dout, Rt]); d lora_a/lora_b in the compute dtype."""
    t = x.shape[0]
    e, rt = router_weight.shape[0], lora_a.shape[0]
    dev, dt = x.device, x.dtype
    dhl = torch.empty(t, rt + e, dtype=dt, device=dev)                      # [dh | d_logits]
    dl = torch.empty(t, e, dtype=router_dtype(dt), device=dev)
    d_lb = route_bwd(dy, h, probs, indices, lora_b, dhl, rt, dl, expert_rank, scaling)
    dh = dhl[:, :rt]
    d_a = _triton_dropout.wgrad(dh, x, seed, dropout)                       # [Rt, Din] = dh^T drop(x)
    d_rw = router_wgrad(dl, x)                                              # the router sees x
    a_ext = torch.cat([lora_a, router_weight.to(dt)])                       # [Rt + E, Din], small
    if seed is None:
        dx = gemm_sum([(dy, weight.t())], dhl, a_ext.t())
    else:  # dropout: the adapter part of the input gradient goes through the mask, the router part does not
        dx = _triton_dropout.input_grad([(dy, weight.t())], dh, lora_a, seed, dropout, dhl[:, rt:], a_ext[rt:])
    return dx, d_rw, dl.sum(0), d_a, d_lb


def route_bwd(dy, h, probs, indices, lora_b, dhl, dl_col, dl, expert_rank, scaling):
    """dS = dY lora_b, then the routing backward: writes dh = dS * g into dhl[:, :Rt], d_logits (compute dtype)
    into dhl[:, dl_col:dl_col + E] and, in the router dtype, into dl [T, E]; returns d lora_b = dY^T S [Dout, Rt].
    h, dhl and dl may be column slices of wider buffers (any row stride, unit column stride)."""
    t, rt = h.shape
    e, k = probs.shape[1], indices.shape[1]
    er = e * expert_rank
    ds = dy @ lora_b                                                         # [T, Rt]
    s = torch.empty(t, rt, dtype=dhl.dtype, device=dhl.device)
    if t > 0:
        bt = _block_t(e, expert_rank)
        _route_bwd_kernel[(triton.cdiv(t, bt),)](
            ds, h, probs, indices, dhl, s, dl, t, e, er, rt - er, ds.stride(0), h.stride(0), s.stride(0),
            dhl.stride(0), dl.stride(0), dl_col, scaling, R=expert_rank, K=k, ACC=tl_acc(dhl.dtype), BLOCK_T=bt,
            E_PAD=pad(e), R_PAD=pad(expert_rank), RS_PAD=pad(rt - er))
    return dy.t() @ s                                                        # [Dout, Rt]


def _wgrad_block_d(e_pad: int) -> int:
    """Din per router-wgrad program: WGRAD_BLOCK_D, fewer when the [E, Din] fp32 accumulator tile would not fit
    in registers (up to E=64 keeps 128; molora_gate_up's 2E=128 rows of two routers get 64)."""
    return max(16, min(WGRAD_BLOCK_D, 8192 // e_pad))


def router_wgrad(dl, x):
    """d router_weight [E, Din] = dl^T x in the router dtype, from one pass over x. dl [T, E] contiguous; E may
    be several routers' experts side by side (molora_gate_up: [dl_gate | dl_up], one pass for both routers)."""
    t, din = x.shape
    e = dl.shape[1]
    if t == 0:
        return torch.zeros(e, din, dtype=dl.dtype, device=x.device)
    block_d = _wgrad_block_d(pad(e))
    n_d = triton.cdiv(din, block_d)
    n_split, per = token_splits(t, n_d, WGRAD_BLOCK_T, x.device)
    part = torch.empty(n_split, e, din, dtype=dl.dtype, device=x.device)
    # _triton_dropout's weight-gradient kernel without the mask (its seed pointer is then never read: x stands in).
    _triton_dropout._wgrad_kernel[(n_d, n_split)](
        dl, x, part, x, t, din, e, x.stride(0), dl.stride(0), part.stride(0), per, 0.0, 1.0, DROPOUT=False,
        PREC=_router_precision(x.dtype), IEEE=False, UPCAST=False, ACC=tl_acc(x.dtype), BLOCK_T=WGRAD_BLOCK_T,
        BLOCK_D=block_d, C_PAD=pad(e))
    return part.sum(0)


# ---------------------------------------------------------------------------------------------- custom op + autograd
@torch.library.custom_op("medcare::molora_triton_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, router_weight: torch.Tensor,
            router_bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor, top_k: int, expert_rank: int,
            scaling: float, seed: torch.Tensor | None, dropout: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return molora_fwd(x, weight, bias, router_weight, router_bias, lora_a, lora_b, top_k, expert_rank, scaling,
                      seed, dropout)


@_fwd_op.register_fake
def _(x, weight, bias, router_weight, router_bias, lora_a, lora_b, top_k, expert_rank, scaling, seed, dropout):
    t = x.shape[0]
    return (x.new_empty(t, weight.shape[0]), x.new_empty(t, lora_a.shape[0]),
            x.new_empty(t, router_weight.shape[0], dtype=router_dtype(x.dtype)),
            x.new_empty(t, top_k, dtype=torch.int64))


@torch.library.custom_op("medcare::molora_triton_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, probs: torch.Tensor, indices: torch.Tensor,
            weight: torch.Tensor, router_weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
            expert_rank: int, scaling: float, seed: torch.Tensor | None, dropout: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return molora_bwd(dy, x, h, probs, indices, weight, router_weight, lora_a, lora_b, expert_rank, scaling,
                      seed, dropout)


@_bwd_op.register_fake
def _(dy, x, h, probs, indices, weight, router_weight, lora_a, lora_b, expert_rank, scaling, seed, dropout):
    e, rdt = router_weight.shape[0], router_dtype(x.dtype)
    return (torch.empty_like(x), x.new_empty(e, x.shape[1], dtype=rdt), x.new_empty(e, dtype=rdt),
            torch.empty_like(lora_a), torch.empty_like(lora_b))


def _setup_context(ctx, inputs, output):
    x, weight, bias, router_weight, router_bias, lora_a, lora_b, top_k, expert_rank, scaling, state, dropout = inputs
    _, h, probs, indices = output
    ctx.save_for_backward(x, h, probs, indices, weight, router_weight, lora_a, lora_b, state)
    ctx.expert_rank, ctx.scaling, ctx.dropout = expert_rank, scaling, dropout
    ctx.has_bias = bias is not None
    ctx.rb_dtype = None if router_bias is None else router_bias.dtype


def _backward(ctx, dy, _dh, _dprobs, _didx):
    x, h, probs, indices, weight, router_weight, lora_a, lora_b, state = ctx.saved_tensors
    dx, d_rw, d_rb, d_a, d_lb = _bwd_op(dy.contiguous(), x, h, probs, indices, weight, router_weight, lora_a, lora_b,
                                        ctx.expert_rank, ctx.scaling, state, ctx.dropout)
    need = ctx.needs_input_grad
    d_w = dy.t() @ x if need[1] else None      # the base weight is frozen in training; supported for completeness
    d_b = dy.sum(0) if (need[2] and ctx.has_bias) else None
    return (dx, d_w, d_b, grad_like(d_rw, router_weight), None if ctx.rb_dtype is None else d_rb.to(ctx.rb_dtype),
            d_a, d_lb, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- functional
def molora_linear(x, weight, bias, router_weight, router_bias, lora_a, lora_b, *, num_experts, top_k, expert_rank,
                  scaling, dropout=0.0):
    """(y [..., Dout], indices [..., K]); see medcare_kernels.molora_linear."""
    del num_experts  # router_weight.shape[0]; validated by the public API
    dt = x.dtype
    x2, state = _triton_dropout.flat_input(x, dropout)
    y, _, _, indices = _fwd_op(x2, weight.to(dt), None if bias is None else bias.to(dt), router_weight.contiguous(),
                               router_bias, lora_a.to(dt).contiguous(), lora_b.to(dt).contiguous(), int(top_k),
                               int(expert_rank), float(scaling), state, float(dropout))
    return y.view(*x.shape[:-1], y.shape[-1]), indices.view(*x.shape[:-1], top_k)
