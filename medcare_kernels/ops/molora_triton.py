"""molora_linear, Triton backend: routed LoRA experts + shared LoRA fused around the frozen base GEMM.

Forward (T tokens, Rt = E*R + Rs, all in the compute dtype unless marked fp32):
    _shrink_route_fwd   one pass over x: h = drop(x) lora_a^T [T, Rt] and the router logits x Wr^T (fp32, IEEE),
                        then in the epilogue softmax -> top-K (ties to the lower index) -> renormalise, and the
                        gated activation S = h * g, g = s * [gates repeated R | 1 for the shared block].
    base + expand       y = x W^T + b + S lora_b^T: one Triton GEMM with S/lora_b as a second K segment
                        (_triton_gemm.gemm2), or cuBLAS base + in-place addmm where that measures faster.
No [T, E, Dout] tensor, no token permutation, no host synchronisation (CUDA-graph and torch.compile friendly:
the op is a torch.library custom op with a fake implementation and a registered autograd).

Saved for backward: x (the caller's tensor), h [T, Rt], probs [T, E] fp32, indices [T, K]: O(T*(E*R+Rs))
beyond x, as the torch backend. With dropout > 0 the dropped input comes from reference.dropout_keep_mask (the
same draw as the torch backend) and autograd keeps its mask; the MoLoRA recipe uses no dropout.

Backward:
    dS = dY lora_b                      cuBLAS skinny GEMM (one read of dY)
    _gate_route_bwd                     per token block: dh = dS * g; d_gate_e = s <dS_e, h_e> (R-length dots,
                                        no cached expert outputs); softmax-top-K backward -> d_logits (fp32);
                                        S = h * g again for dB; [dh | d_logits] side by side for dX.
    dB = dY^T S                         cuBLAS
    dX = dY W + [dh | dl] [lora_a; Wr]  one Triton GEMM with a second K segment, or cuBLAS + in-place addmm
    _wgrad_x                            one pass over x: d lora_a = dh^T drop(x) and d Wr = dl^T x (fp32),
                                        split over T into fp32 partials summed afterwards (deterministic).
Reference: medcare_kernels.reference.molora_linear.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import dropout_keep_mask, router_dtype
from ._common import grad_like
from ._triton_gemm import INTERPRET, dot_flags, gemm2, mma, use_fused_gemm

# ---------------------------------------------------------------------------------------------- tile configs
# Token blocks of 64 keep the [BLOCK_T, Rt_pad] fp32 accumulator (Rt = 160 -> 256 columns) in registers.
BLOCK_T = 16 if INTERPRET else 64
BLOCK_D = 32 if INTERPRET else 64
WGRAD_BLOCK_D = 32 if INTERPRET else 64


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _gate_columns(gates, cols_r, cols_e, ER, R: tl.constexpr, scaling, ACC: tl.constexpr):
    """[BT, E_PAD] fp32 gates -> [BT, RT_PAD] column scales s*gate(c // R), s on the shared columns, exactly
    (a one-hot product in IEEE fp32: each output is one gate times 1)."""
    onehot = ((cols_r[None, :] // R) == cols_e[:, None]) & (cols_r[None, :] < ER)
    g = tl.dot(gates, onehot.to(ACC), input_precision="ieee")
    return tl.where(cols_r[None, :] >= ER, 1.0, g) * scaling


@triton.jit
def _shrink_route_fwd(x_ptr, xd_ptr, a_ptr, rw_ptr, rb_ptr, h_ptr, s_ptr, probs_ptr, idx_ptr,
                      T, DIN, RT, E, ER, s_xt, s_xdt, s_at, s_rwt, scaling,
                      R: tl.constexpr, K: tl.constexpr, HAS_RB: tl.constexpr, HAS_DROP: tl.constexpr,
                      IEEE: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_D: tl.constexpr,
                      RT_PAD: tl.constexpr, E_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    r_ok = rows < T
    cols_r = tl.arange(0, RT_PAD)
    cols_e = tl.arange(0, E_PAD)
    acc_h = tl.zeros((BLOCK_T, RT_PAD), dtype=ACC)
    acc_l = tl.zeros((BLOCK_T, E_PAD), dtype=ACC)
    for d0 in range(0, DIN, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < DIN
        x = tl.load(x_ptr + rows[:, None] * s_xt + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        if HAS_DROP:
            xd = tl.load(xd_ptr + rows[:, None] * s_xdt + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            xd = x
        a = tl.load(a_ptr + cols_r[:, None] * s_at + d[None, :], mask=(cols_r < RT)[:, None] & d_ok[None, :],
                    other=0.0)
        acc_h = mma(xd, tl.trans(a.to(xd.dtype)), acc_h, IEEE, UPCAST)
        rw = tl.load(rw_ptr + cols_e[:, None] * s_rwt + d[None, :], mask=(cols_e < E)[:, None] & d_ok[None, :],
                     other=0.0)
        # Router in fp32 from the exact upcast of x: bf16 logits could overflow or flip the top-K.
        acc_l = tl.dot(x.to(ACC), tl.trans(rw.to(ACC)), acc_l, input_precision="ieee")
    e_ok = cols_e < E
    if HAS_RB:
        acc_l += tl.load(rb_ptr + cols_e, mask=e_ok, other=0.0).to(ACC)[None, :]
    logits = tl.where(e_ok[None, :], acc_l, float("-inf"))
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
    g = _gate_columns(gates, cols_r, cols_e, ER, R, scaling, ACC)
    h = acc_h.to(h_ptr.dtype.element_ty)
    out_mask = r_ok[:, None] & (cols_r < RT)[None, :]
    tl.store(h_ptr + rows[:, None] * RT + cols_r[None, :], h, mask=out_mask)
    tl.store(s_ptr + rows[:, None] * RT + cols_r[None, :], (h.to(ACC) * g).to(s_ptr.dtype.element_ty),
             mask=out_mask)


@triton.jit
def _gate_route_bwd(ds_ptr, h_ptr, probs_ptr, idx_ptr, dhl_ptr, s_ptr, dl_ptr,
                    T, RT, E, ER, s_dst, s_dhlt, scaling,
                    R: tl.constexpr, K: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                    RT_PAD: tl.constexpr, E_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    r_ok = rows < T
    cols_r = tl.arange(0, RT_PAD)
    cols_e = tl.arange(0, E_PAD)
    e_ok = cols_e < E
    rt_mask = r_ok[:, None] & (cols_r < RT)[None, :]
    ds = tl.load(ds_ptr + rows[:, None] * s_dst + cols_r[None, :], mask=rt_mask, other=0.0).to(ACC)
    h = tl.load(h_ptr + rows[:, None] * RT + cols_r[None, :], mask=rt_mask, other=0.0).to(ACC)
    p = tl.load(probs_ptr + rows[:, None] * E + cols_e[None, :], mask=r_ok[:, None] & e_ok[None, :], other=0.0)
    sel = tl.zeros((BLOCK_T, E_PAD), dtype=tl.int1)
    for j in tl.static_range(K):
        pick = tl.load(idx_ptr + rows * K + j, mask=r_ok, other=E_PAD)
        sel = sel | (cols_e[None, :] == pick[:, None])
    p_sel = tl.where(sel, p, 0.0)
    z = tl.sum(p_sel, axis=1)[:, None]
    z = tl.where(z > 0.0, z, 1.0)  # padding rows of the block
    w = p_sel / z
    g = _gate_columns(w, cols_r, cols_e, ER, R, scaling, ACC)
    # d gate_e = s * <dS_e, h_e>: the R columns of expert e summed by a one-hot product (IEEE fp32).
    onehot_t = ((cols_r[:, None] // R) == cols_e[None, :]) & (cols_r[:, None] < ER)
    d_w = tl.dot(ds * h, onehot_t.to(ACC), input_precision="ieee") * scaling
    d_w = tl.where(sel, d_w, 0.0)
    dp = tl.where(sel, (d_w - tl.sum(d_w * w, axis=1)[:, None]) / z, 0.0)
    dl = p * (dp - tl.sum(dp * p, axis=1)[:, None])
    tl.store(dl_ptr + rows[:, None] * E + cols_e[None, :], dl, mask=r_ok[:, None] & e_ok[None, :])
    dh = (ds * g).to(dhl_ptr.dtype.element_ty)
    tl.store(dhl_ptr + rows[:, None] * s_dhlt + cols_r[None, :], dh, mask=rt_mask)
    # d_logits in the compute dtype beside dh: [dh | dl] [lora_a; Wr] is then one GEMM for dX.
    tl.store(dhl_ptr + rows[:, None] * s_dhlt + RT + cols_e[None, :], dl.to(dhl_ptr.dtype.element_ty),
             mask=r_ok[:, None] & e_ok[None, :])
    s = (h.to(s_ptr.dtype.element_ty).to(ACC) * g).to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + rows[:, None] * RT + cols_r[None, :], s, mask=rt_mask)


@triton.jit
def _wgrad_x(dh_ptr, dl_ptr, x_ptr, xd_ptr, da_ptr, drw_ptr, T, DIN, RT, E, s_dht, s_xt, s_xdt, T_PER_SPLIT,
             HAS_DROP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
             BLOCK_D: tl.constexpr, RT_PAD: tl.constexpr, E_PAD: tl.constexpr):
    # Program (d block, split): partial sums over its token range into fp32 partials [SPLIT, RT|E, DIN].
    pid_d, split = tl.program_id(0), tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < DIN
    cols_r = tl.arange(0, RT_PAD)
    cols_e = tl.arange(0, E_PAD)
    acc_a = tl.zeros((RT_PAD, BLOCK_D), dtype=ACC)
    acc_r = tl.zeros((E_PAD, BLOCK_D), dtype=ACC)
    t_start = split * T_PER_SPLIT
    t_end = tl.minimum(t_start + T_PER_SPLIT, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < t_end
        x = tl.load(x_ptr + t[:, None] * s_xt + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        if HAS_DROP:
            xd = tl.load(xd_ptr + t[:, None] * s_xdt + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            xd = x
        dh = tl.load(dh_ptr + t[None, :] * s_dht + cols_r[:, None], mask=t_ok[None, :] & (cols_r < RT)[:, None],
                     other=0.0)
        acc_a = mma(dh.to(xd.dtype), xd, acc_a, IEEE, UPCAST)
        dl = tl.load(dl_ptr + t[None, :] * E + cols_e[:, None], mask=t_ok[None, :] & (cols_e < E)[:, None],
                     other=0.0)
        acc_r = tl.dot(dl, x.to(ACC), acc_r, input_precision="ieee")
    base_a = da_ptr + split * RT * DIN
    tl.store(base_a + cols_r[:, None] * DIN + d[None, :], acc_a, mask=(cols_r < RT)[:, None] & d_ok[None, :])
    base_r = drw_ptr + split * E * DIN
    tl.store(base_r + cols_e[:, None] * DIN + d[None, :], acc_r, mask=(cols_e < E)[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------- launchers
def molora_fwd(x, xd, weight, bias, router_weight, router_bias, lora_a, lora_b, top_k, expert_rank, scaling):
    """x [T, Din]; xd [T, Din] | None (dropped adapter input); weight [Dout, Din]; bias [Dout] | None;
    router_weight [E, Din]; router_bias [E] | None; lora_a [Rt, Din]; lora_b [Dout, Rt] (all but the router in
    x's dtype) -> (y [T, Dout], h [T, Rt], probs [T, E] fp32, indices [T, K] int64)."""
    t, din = x.shape
    e, rt = router_weight.shape[0], lora_a.shape[0]
    h = torch.empty(t, rt, dtype=x.dtype, device=x.device)
    s = torch.empty_like(h)
    probs = torch.empty(t, e, dtype=router_dtype(x.dtype), device=x.device)
    indices = torch.empty(t, top_k, dtype=torch.int64, device=x.device)
    if t > 0:
        xd_ = x if xd is None else xd
        _shrink_route_fwd[(triton.cdiv(t, BLOCK_T),)](
            x, xd_, lora_a, router_weight, router_bias if router_bias is not None else router_weight, h, s, probs,
            indices, t, din, rt, e, e * expert_rank, x.stride(0), xd_.stride(0), lora_a.stride(0),
            router_weight.stride(0), scaling, R=expert_rank, K=top_k, HAS_RB=router_bias is not None,
            HAS_DROP=xd is not None, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, **dot_flags(x.dtype),
            RT_PAD=_pad(rt), E_PAD=_pad(e))
    if use_fused_gemm(x.device):
        y = gemm2(x, weight, s, lora_b, bias)
    else:
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        y.addmm_(s, lora_b.t())
    return y, h, probs, indices


def molora_bwd(dy, x, xd, h, probs, indices, weight, router_weight, lora_a, lora_b, expert_rank, scaling):
    """dy [T, Dout] and the saved tensors -> (dx [T, Din] (without the adapter part when xd is given),
    dxd [T, Din] | empty, d_router_weight [E, Din] fp32, d_router_bias [E] fp32, d_lora_a [Rt, Din],
    d_lora_b [Dout, Rt]); d lora_a/lora_b in the compute dtype."""
    t, din = x.shape
    e, rt, k = router_weight.shape[0], lora_a.shape[0], indices.shape[1]
    dev, dt = x.device, x.dtype
    ds = dy @ lora_b                                                         # [T, Rt]
    dhl = torch.empty(t, rt + e, dtype=dt, device=dev)                      # [dh | d_logits]
    s = torch.empty(t, rt, dtype=dt, device=dev)
    dl = torch.empty(t, e, dtype=router_dtype(dt), device=dev)
    if t > 0:
        _gate_route_bwd[(triton.cdiv(t, BLOCK_T),)](
            ds, h, probs, indices, dhl, s, dl, t, rt, e, e * expert_rank, ds.stride(0), dhl.stride(0), scaling,
            R=expert_rank, K=k, ACC=dot_flags(dt)["ACC"], BLOCK_T=BLOCK_T, RT_PAD=_pad(rt), E_PAD=_pad(e))
    d_lb = dy.t() @ s                                                        # [Dout, Rt]
    dh = dhl[:, :rt]
    d_a, d_rw = _weight_grads(dh, dl, x, xd)
    a_ext = torch.cat([lora_a, router_weight.to(dt)])                       # [Rt + E, Din], small
    if xd is None:
        if use_fused_gemm(dev):
            dx = gemm2(dy, weight.t(), dhl, a_ext.t())
        else:
            dx = torch.mm(dy, weight).addmm_(dhl, a_ext)
        dxd = dx.new_empty(0)
    else:  # dropout: the adapter part of the input gradient goes through the mask, the rest does not
        dx = torch.mm(dy, weight).addmm_(dhl[:, rt:], a_ext[rt:])
        dxd = dh @ lora_a
    return dx, dxd, d_rw, dl.sum(0), d_a, d_lb


def _weight_grads(dh, dl, x, xd):
    """(d lora_a [Rt, Din] in x's dtype, d router_weight [E, Din] fp32) in one pass over x."""
    t, din = x.shape
    rt, e = dh.shape[1], dl.shape[1]
    if t == 0:
        return x.new_zeros(rt, din), torch.zeros(e, din, dtype=router_dtype(x.dtype), device=x.device)
    n_d = triton.cdiv(din, WGRAD_BLOCK_D)
    sms = 4 if INTERPRET else torch.cuda.get_device_properties(x.device).multi_processor_count
    # Enough splits over T to fill the machine twice over; each split covers whole BLOCK_T tiles.
    n_split = max(1, min(triton.cdiv(t, 4 * BLOCK_T), triton.cdiv(2 * sms, n_d)))
    per = triton.cdiv(triton.cdiv(t, n_split), BLOCK_T) * BLOCK_T
    n_split = triton.cdiv(t, per)
    acc = router_dtype(x.dtype)
    da = torch.empty(n_split, rt, din, dtype=acc, device=x.device)
    drw = torch.empty(n_split, e, din, dtype=acc, device=x.device)
    xd_ = x if xd is None else xd
    _wgrad_x[(n_d, n_split)](dh, dl, x, xd_, da, drw, t, din, rt, e, dh.stride(0), x.stride(0), xd_.stride(0), per,
                             HAS_DROP=xd is not None, BLOCK_T=BLOCK_T, BLOCK_D=WGRAD_BLOCK_D, **dot_flags(x.dtype),
                             RT_PAD=_pad(rt), E_PAD=_pad(e))
    return da.sum(0).to(x.dtype), drw.sum(0)


# ---------------------------------------------------------------------------------------------- custom op + autograd
@torch.library.custom_op("medcare::molora_triton_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, xd: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
            router_weight: torch.Tensor, router_bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
            top_k: int, expert_rank: int, scaling: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return molora_fwd(x, xd, weight, bias, router_weight, router_bias, lora_a, lora_b, top_k, expert_rank, scaling)


@_fwd_op.register_fake
def _(x, xd, weight, bias, router_weight, router_bias, lora_a, lora_b, top_k, expert_rank, scaling):
    t = x.shape[0]
    return (x.new_empty(t, weight.shape[0]), x.new_empty(t, lora_a.shape[0]),
            x.new_empty(t, router_weight.shape[0], dtype=router_dtype(x.dtype)),
            x.new_empty(t, top_k, dtype=torch.int64))


@torch.library.custom_op("medcare::molora_triton_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, xd: torch.Tensor | None, h: torch.Tensor, probs: torch.Tensor,
            indices: torch.Tensor, weight: torch.Tensor, router_weight: torch.Tensor, lora_a: torch.Tensor,
            lora_b: torch.Tensor, expert_rank: int, scaling: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return molora_bwd(dy, x, xd, h, probs, indices, weight, router_weight, lora_a, lora_b, expert_rank, scaling)


@_bwd_op.register_fake
def _(dy, x, xd, h, probs, indices, weight, router_weight, lora_a, lora_b, expert_rank, scaling):
    e = router_weight.shape[0]
    return (torch.empty_like(x), x.new_empty(x.shape if xd is not None else (0,)),
            x.new_empty(e, x.shape[1], dtype=router_dtype(x.dtype)), x.new_empty(e, dtype=router_dtype(x.dtype)),
            torch.empty_like(lora_a), torch.empty_like(lora_b))


def _setup_context(ctx, inputs, output):
    x, xd, weight, bias, router_weight, router_bias, lora_a, lora_b, top_k, expert_rank, scaling = inputs
    _, h, probs, indices = output
    ctx.save_for_backward(x, xd, h, probs, indices, weight, router_weight, lora_a, lora_b)
    ctx.expert_rank, ctx.scaling = expert_rank, scaling
    ctx.has_bias = bias is not None
    ctx.rb_dtype = None if router_bias is None else router_bias.dtype


def _backward(ctx, dy, _dh, _dprobs, _didx):
    x, xd, h, probs, indices, weight, router_weight, lora_a, lora_b = ctx.saved_tensors
    dx, dxd, d_rw, d_rb, d_a, d_lb = _bwd_op(dy.contiguous(), x, xd, h, probs, indices, weight, router_weight,
                                             lora_a, lora_b, ctx.expert_rank, ctx.scaling)
    need = ctx.needs_input_grad
    d_w = dy.t() @ x if need[2] else None      # the base weight is frozen in training; supported for completeness
    d_b = dy.sum(0) if (need[3] and ctx.has_bias) else None
    return (dx, dxd if xd is not None else None, d_w, d_b, grad_like(d_rw, router_weight),
            None if ctx.rb_dtype is None else d_rb.to(ctx.rb_dtype), d_a, d_lb, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- functional
def molora_linear(x, weight, bias, router_weight, router_bias, lora_a, lora_b, *, num_experts, top_k, expert_rank,
                  scaling, dropout=0.0):
    """(y [..., Dout], indices [..., K]); see medcare_kernels.molora_linear."""
    del num_experts  # router_weight.shape[0]; validated by the public API
    dt = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    xd = None
    if dropout > 0.0:
        xd = x2 * dropout_keep_mask(x2, dropout).to(dt) / (1.0 - dropout)
    y, _, _, indices = _fwd_op(x2, xd, weight.to(dt), None if bias is None else bias.to(dt),
                               router_weight.contiguous(), router_bias, lora_a.to(dt).contiguous(),
                               lora_b.to(dt).contiguous(), int(top_k),
                               int(expert_rank), float(scaling))
    return y.view(*x.shape[:-1], y.shape[-1]), indices.view(*x.shape[:-1], top_k)
