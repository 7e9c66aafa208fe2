"""Dropout on the adapters' input, fused into the skinny kernels that read it (the Triton backend's ops).

The mask is never stored: every kernel that needs drop(x) regenerates the bits it reads from one seed per call.
keep[t, d] = U >= p, with U lane d % 4 of Philox4x32-10(seed, counter = t * ceil(Din / 4) + d // 4) mapped to
[0, 1): one Philox evaluation serves four columns (a call per element cost ~100 instructions, more than reading
x), and the 64-bit counter is split into two 32-bit words by hand, so every Triton version draws the same bits.

    shrink(x, A)        h = drop(x) A^T                [T, R]    one pass over x
    wgrad(dS, x)        dA = dS^T drop(x)              [R, Din]  one pass over x; fp32 partials per token split,
                                                                 summed afterwards (deterministic, no atomics)
    lowrank_dx(dS, A)   drop'(dS A) (+ dl Wr)          [T, Din]  one write of dX (the `epilogue` GEMM path: the
                                                                 base input gradient is added by cuBLAS after),
                                                                 or added in place into a given dX (other paths)

Why: the torch-RNG draw (reference.dropout_keep_mask) writes and reads a [T, Din] fp32 uniform tensor, a bool
mask and a dropped copy of x, in the forward and again in the backward, and the masked input gradient costs
three more [T, Din] passes (about 1.3 GB per projection at T=8192, Din=4096 in bf16). Here the extra traffic
is the one read of x in each of shrink and wgrad and one read-modify-write of dX. drop(x) is scaled by
1/(1-p) in fp32, after the dot (the reference rounds x/(1-p) to x's dtype first).
Launch shapes: 8 warps for shrink and wgrad (at 4 the Philox state spilled registers on sm_90), Din blocks
sized by dtype (`_block_d`), shrink and wgrad ranks over 64 in chunks of 64 (R_CHUNK; the dX kernel loops over
the rank, so it makes one pass for any rank), 32-token wgrad tiles for fp32.
tests/medcare_kernels/test_triton_sm90.py builds them for sm_90a with Triton's ptxas on CPU: no spills.

Every Triton op of medcare_kernels (lora_linear, molora_linear, molora_gate_up) drops this way. The draw is
not the torch backend's (Philox in Triton vs torch's generator), so the two backends drop different
elements under one torch seed; `keep_mask` materialises this one for tests. The seed is drawn on x's device by
torch's generator (`draw_seed`) and read by the kernels from device memory: torch.manual_seed reproduces it,
nothing synchronises, and a CUDA graph replays a fresh draw each time instead of freezing one seed in a kernel
argument. Under torch.compile with inductor, the seed comes from inductor's RNG (aot_eager draws as eager does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import router_dtype
from ._triton_gemm import (
    INTERPRET,
    WGRAD_BLOCK_T,
    add_bases_,
    dot_flags,
    gemm_path,
    gemm_sum,
    load_rows,
    mma,
    pad,
    split_range,
    token_splits,
)

# Token rows per program of shrink and the dX kernel (their [tokens, R_PAD] / [tokens, BLOCK_D] fp32 accumulators
# sit beside the Philox state in registers; test_triton_sm90.py checks these launch shapes build without spills),
# and Din columns per program of the dX kernel. Small under the interpreter (it runs every program in Python).
BLOCK_T = 16 if INTERPRET else 32
DX_BLOCK_D = 32 if INTERPRET else 128


# Adapter rows per shrink/wgrad launch: their [tokens, R] / [R, Din] accumulators spill registers on sm_90 when
# wider (test_triton_sm90.py), so ranks over 64 (MoLoRA's Rt = E*R + Rs = 160, molora_gate_up's 320) run in
# chunks of 64, each reading x once more. The dX kernel's accumulator does not grow with the rank: no chunks.
R_CHUNK = 64


def _block_d(dtype: torch.dtype) -> int:
    """Din columns per step of shrink and wgrad (R_PAD <= 64): 128 for 16-bit inputs, 64 for fp32 (shared memory
    and registers)."""
    if INTERPRET:
        return 32
    return 64 if dtype in (torch.float32, torch.float64) else 128


def _chunks(r: int) -> list[tuple[int, int]]:
    return [(c, min(c + R_CHUNK, r)) for c in range(0, r, R_CHUNK)]


def draw_seed(device: torch.device) -> torch.Tensor:
    """One call's dropout seed: an int64 [1] tensor on `device`, from torch's generator of that device."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


@triton.jit
def _keep(seed, rows, d0, DIN, p, BLOCK_D: tl.constexpr):
    """The keep bits of rows x [d0, d0 + BLOCK_D) (d0 a multiple of 4): Philox counter t * ceil(DIN / 4) + d // 4,
    64-bit, split into its low and high words; lane d % 4 of the four outputs."""
    g = d0 // 4 + tl.arange(0, BLOCK_D // 4)
    ctr = rows[:, None].to(tl.int64) * ((DIN + 3) // 4) + g[None, :]
    zero = tl.zeros_like(ctr).to(tl.uint32)
    r0, r1, r2, r3 = tl.random.philox(seed, ctr.to(tl.uint32), (ctr >> 32).to(tl.uint32), zero, zero)
    # join(join(r0, r2), join(r1, r3))[..., i, j] = r_{2i+j}: flattened, column 4g + l gets lane l.
    lanes = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (rows.shape[0], BLOCK_D))
    return tl.random.uint_to_uniform_float(lanes) >= p


# ---------------------------------------------------------------------------------------------- kernels
# Row offsets into x / dX are 64-bit: T * Din passes 2^31 at e.g. 196k tokens of an 11008-wide input.
@triton.jit
def _keep_mask_kernel(out_ptr, seed_ptr, T, DIN, p, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d0 = tl.program_id(1) * BLOCK_D
    cols = d0 + tl.arange(0, BLOCK_D)
    keep = _keep(tl.load(seed_ptr), rows, d0, DIN, p, BLOCK_D)
    ok = (rows < T)[:, None] & (cols < DIN)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * DIN + cols[None, :], keep.to(tl.int8), mask=ok)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, seed_ptr, T, DIN, R, s_xt, s_ht, p, scale, IEEE: tl.constexpr,
                   UPCAST: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                   R_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    r = tl.arange(0, R_PAD)
    t_ok, r_ok = rows < T, r < R
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_T, R_PAD), dtype=ACC)
    for d0 in range(0, DIN, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < DIN
        x = load_rows(x_ptr, rows, d, s_xt, t_ok, d_ok)
        x = tl.where(_keep(seed, rows, d0, DIN, p, BLOCK_D), x, tl.zeros_like(x))
        a = tl.load(a_ptr + r[:, None] * DIN + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        acc = mma(x, tl.trans(a), acc, IEEE, UPCAST)
    tl.store(h_ptr + rows[:, None] * s_ht + r[None, :], (acc * scale).to(h_ptr.dtype.element_ty),
             mask=t_ok[:, None] & r_ok[None, :])


@triton.jit
def _wgrad_kernel(g_ptr, x_ptr, out_ptr, seed_ptr, T, DIN, C, s_xt, s_gt, s_split, T_PER_SPLIT, p, scale,
                  DROPOUT: tl.constexpr, PREC: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                  ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, C_PAD: tl.constexpr):
    # Program (Din block, token split): G^T x' over its tokens into fp32 partials [SPLIT, C, DIN]. Two launchers:
    # wgrad (DROPOUT: dA = dS^T drop(x), dots in x's dtype by mma) and molora_triton.router_wgrad (dWr = dl^T x,
    # fp32 dots at PREC on the exactly upcast x). G [T, C] has row stride s_gt.
    pid_d, split = tl.program_id(0), tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c = tl.arange(0, C_PAD)
    d_ok, c_ok = d < DIN, c < C
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((C_PAD, BLOCK_D), dtype=ACC)
    t_start, t_end = split_range(split, T_PER_SPLIT, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < t_end
        x = load_rows(x_ptr, t, d, s_xt, t_ok, d_ok)
        g_t = tl.load(g_ptr + t[None, :] * s_gt + c[:, None], mask=c_ok[:, None] & t_ok[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(_keep(seed, t, pid_d * BLOCK_D, DIN, p, BLOCK_D), x, tl.zeros_like(x))
            acc = mma(g_t, x, acc, IEEE, UPCAST)
        else:
            acc = tl.dot(g_t.to(ACC), x.to(ACC), acc, input_precision=PREC)
    tl.store(out_ptr + split * s_split + c[:, None] * DIN + d[None, :], acc * scale,
             mask=c_ok[:, None] & d_ok[None, :])


@triton.jit
def _lowrank_dx_kernel(dx_ptr, ds_ptr, a_ptr, dl_ptr, wr_ptr, seed_ptr, T, DIN, R, E, s_dxt, s_dst, s_dlt, p, scale,
               IEEE: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, ACC_C: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, R_BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    # dX (+)= drop'(dS A) + dl Wr for one [BLOCK_T, BLOCK_D] tile: the rank is a K loop (any R, one pass over
    # dX), the unmasked term (MoLoRA's router part; E = 0 for none) one more dot; ACC_C adds to dX in place.
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok, d_ok = rows < T, d < DIN
    upd = tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC)
    for r0 in range(0, R, R_BLOCK):
        r = r0 + tl.arange(0, R_BLOCK)
        r_ok = r < R
        ds = tl.load(ds_ptr + rows[:, None] * s_dst + r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0)
        a = tl.load(a_ptr + r[:, None] * DIN + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        upd = mma(ds, a, upd, IEEE, UPCAST)
    upd = tl.where(_keep(tl.load(seed_ptr), rows, tl.program_id(1) * BLOCK_D, DIN, p, BLOCK_D), upd * scale, 0.0)
    if E > 0:
        ce = tl.arange(0, E_PAD)
        dl = tl.load(dl_ptr + rows[:, None] * s_dlt + ce[None, :], mask=t_ok[:, None] & (ce < E)[None, :],
                     other=0.0)
        wr = tl.load(wr_ptr + ce[:, None] * DIN + d[None, :], mask=(ce < E)[:, None] & d_ok[None, :], other=0.0)
        upd = mma(dl, wr, upd, IEEE, UPCAST)
    ptrs = dx_ptr + rows[:, None].to(tl.int64) * s_dxt + d[None, :]
    ok = t_ok[:, None] & d_ok[None, :]
    if ACC_C:
        upd += tl.load(ptrs, mask=ok, other=0.0).to(ACC)
    tl.store(ptrs, upd.to(dx_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------- launchers
def keep_mask(seed: torch.Tensor | int, t: int, din: int, p: float, device: torch.device) -> torch.Tensor:
    """The keep mask [T, Din] (bool) the kernels regenerate under `seed`: for tests and diagnostics only."""
    seed = torch.tensor([seed], dtype=torch.int64) if isinstance(seed, int) else seed.reshape(1)
    out = torch.empty(t, din, dtype=torch.int8, device=device)
    if out.numel():
        _keep_mask_kernel[(triton.cdiv(t, BLOCK_T), triton.cdiv(din, DX_BLOCK_D))](
            out, seed.to(device=device, dtype=torch.int64), t, din, p, BLOCK_T=BLOCK_T, BLOCK_D=DX_BLOCK_D)
    return out.bool()


def flat_input(x: torch.Tensor, dropout: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [..., Din] -> (x2 [T, Din] contiguous, this call's dropout seed | None): what the Triton ops take."""
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    return x2, (draw_seed(x2.device) if dropout > 0.0 else None)


def shrink(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor | None, p: float) -> torch.Tensor:
    """x [T, Din] (unit stride along Din); a [R, Din] contiguous, x's dtype; seed int64 [1] on x's device, or
    None for no dropout (cuBLAS) -> h = drop(x) a^T [T, R]."""
    if seed is None:
        return x @ a.t()
    t, din = x.shape
    r = a.shape[0]
    if not (t and din and r):
        return torch.zeros(t, r, dtype=x.dtype, device=x.device)
    h = torch.empty(t, r, dtype=x.dtype, device=x.device)
    for c0, c1 in _chunks(r):
        _shrink_kernel[(triton.cdiv(t, BLOCK_T),)](x, a[c0:c1], h[:, c0:], seed, t, din, c1 - c0, x.stride(0),
                                                   h.stride(0), p, 1.0 / (1.0 - p), **dot_flags(x.dtype),
                                                   BLOCK_T=BLOCK_T, BLOCK_D=_block_d(x.dtype), R_PAD=pad(c1 - c0),
                                                   num_warps=8)
    return h


def wgrad(ds: torch.Tensor, x: torch.Tensor, seed: torch.Tensor | None, p: float) -> torch.Tensor:
    """ds [T, R] (unit stride along R; a column slice is fine); x [T, Din] -> dA = ds^T drop(x) [R, Din] in x's
    dtype, from one pass over x per 64 rows (cuBLAS without dropout)."""
    if seed is None:
        return ds.t() @ x
    t, din = x.shape
    r = ds.shape[1]
    if t == 0 or r == 0 or din == 0:
        return torch.zeros(r, din, dtype=x.dtype, device=x.device)
    block_d = _block_d(x.dtype)
    block_t = WGRAD_BLOCK_T if INTERPRET or x.dtype not in (torch.float32, torch.float64) else 32
    n_d = triton.cdiv(din, block_d)
    n_split, per = token_splits(t, n_d, block_t, x.device)
    part = torch.empty(n_split, r, din, dtype=router_dtype(x.dtype), device=x.device)
    for c0, c1 in _chunks(r):
        _wgrad_kernel[(n_d, n_split)](ds[:, c0:], x, part[:, c0:], seed, t, din, c1 - c0, x.stride(0),
                                      ds.stride(0), part.stride(0), per, p, 1.0 / (1.0 - p), DROPOUT=True,
                                      PREC="ieee", **dot_flags(x.dtype),
                                      BLOCK_T=block_t, BLOCK_D=block_d, C_PAD=pad(c1 - c0), num_warps=8)
    return part.sum(0).to(x.dtype)


def lowrank_dx(ds: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float, dl: torch.Tensor | None = None,
               wr: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """drop'(ds a) + dl wr [T, Din], written into a new tensor, or added in place to `out` [T, Din] (unit stride
    along Din), in one pass over the output for any rank. ds [T, R] (unit stride along R); a [R, Din]
    contiguous; dl [T, E] (unit stride along E) / wr [E, Din] contiguous: an unmasked term (MoLoRA's
    router part), or None."""
    t, din = ds.shape[0], a.shape[1]
    acc_c = out is not None
    if out is None:
        out = torch.empty(t, din, dtype=ds.dtype, device=ds.device)
    if not (t and din):
        return out
    e = 0 if dl is None else dl.shape[1]
    if dl is None:
        dl, wr = ds, a
    r_block = 16 if INTERPRET else min(64, pad(ds.shape[1]))
    _lowrank_dx_kernel[(triton.cdiv(t, BLOCK_T), triton.cdiv(din, DX_BLOCK_D))](
        out, ds, a, dl, wr, seed, t, din, ds.shape[1], e, out.stride(0), ds.stride(0), dl.stride(0), p,
        1.0 / (1.0 - p), **dot_flags(out.dtype), ACC_C=acc_c, BLOCK_T=BLOCK_T, BLOCK_D=DX_BLOCK_D,
        R_BLOCK=r_block, E_PAD=pad(e))
    return out


def input_grad(bases: list[tuple[torch.Tensor, torch.Tensor]], ds: torch.Tensor, a: torch.Tensor,
               seed: torch.Tensor, p: float, dl: torch.Tensor | None = None, wr: torch.Tensor | None = None
               ) -> torch.Tensor:
    """An input gradient with dropout on the adapters: sum_i dY_i W_i + drop'(ds a) + dl wr, by the GEMM path of
    _triton_gemm.gemm_path. bases: (dY [T, Dout], W.t() [Din, Dout]) pairs as gemm_sum takes them; ds, a, dl, wr
    as lowrank_dx. `epilogue`: the masked low-rank terms written once, then cuBLAS adds the base terms (beta = 1);
    the others: the base terms (and dl wr) by gemm_sum, then the masked term added in place."""
    path = gemm_path(bases[0][0].device)
    if path == "epilogue":
        return add_bases_(lowrank_dx(ds, a, seed, p, dl, wr), bases)
    out = gemm_sum(bases, dl, None if wr is None else wr.t(), path=path)
    return lowrank_dx(ds, a, seed, p, out=out)
