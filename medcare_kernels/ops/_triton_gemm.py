"""The Triton ops' GEMMs: Y = X W^T (+ more base terms) + S B^T (+ bias), a frozen base GEMM and a low-rank term.

gemm2 is a Triton GEMM with a second K segment, C = A1 B1^T + A2 B2^T (+ bias) (+ C): the LoRAFusion idea
without concatenating anything. fp32 accumulation; fp32 operands use IEEE fp32 dots (never TF32: the torch
backend does not use TF32 either).

`gemm_sum` is what the ops call: the sum of the big base terms and one skinny low-rank term (the forward
expand S lora_b^T with K = Rt; the input gradient's [dh | dl] [lora_a; Wr] with K = Rt + E), by one of four
paths (MEDCARE_TRITON_GEMM, or `auto` = DEFAULT_GEMM on a GPU):

    cublas    base by cuBLAS (writes C), then the low-rank term by a cuBLAS in-place addmm: a separate pass
              that reads and writes C again
    add       the same with gemm2 accumulating into C for the second pass
    epilogue  the low-rank term (+ bias) written into C first by gemm2, then the base GEMMs by cuBLAS with
              beta = 1, reading C in their epilogue
    fused     one gemm2 with the low-rank term as the 2nd K segment (C written once; needs gemm2 at cuBLAS speed)

All but `fused` move the same bytes on C (write, read, write). What differs is where the read and the second
write happen: in `cublas` / `add` in a pass of their own, bound by memory after the GEMM is done; in
`epilogue` inside the compute-bound base GEMM, where the memory system has room to spare, so the read can
hide under its main loop. The separate pass of `epilogue` only writes C (K = Rt is one or a few tiles).

Why not `fused` by default: the base GEMM is the bulk of the work and cuBLAS runs it faster than gemm2; why not
`cublas`: its skinny in-place addmm runs well below the bandwidth its traffic needs. `add` swaps that kernel
for gemm2; `epilogue` also moves the read of C into the base GEMM. The measurements behind both statements, and
what is still to be timed, are in benchmarks/results/nvidia-h100-80gb-hbm3/NOTES.md ("Kernel design numbers").
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference import router_dtype

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

GEMM_PATHS = ("cublas", "add", "epilogue", "fused")
# The path `auto` takes on a GPU, by the argument of the module doc: the same bytes as "cublas" / "add", with the
# read of C moved into the compute-bound base GEMM, and none of "cublas"'s skinny addmm. bench_triton_gemm.py
# times all four paths at the exact shapes; this follows its table (benchmarks/results/<device>/NOTES.md).
DEFAULT_GEMM = "epilogue"


def _configs():
    if INTERPRET:  # the interpreter cannot autotune over several configs; small tiles keep it quick
        return [triton.Config({"BM": 32, "BN": 32, "BK": 16, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    cfgs = []
    # The fastest three at the Qwen1.5-7B MLP shapes by bench_triton_gemm.py, plus a small-M one.
    for bm, bn, bk, w, s in [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4)]:
        cfgs.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s))
    return cfgs


# K1 + K2 up to this: the low-rank term alone (K = Rt, Rt + E; molora_gate_up's Rt_g + Rt_u + 2E = 336), a GEMM
# bound by writing its output.
SKINNY_K = 512


def _skinny_configs():
    """Configs for K <= SKINNY_K, where the time is writing (and, accumulating, reading) C: a K loop of one to
    four steps, so tiles with little shared memory, several CTAs per SM, one's stores under another's loads;
    the big-GEMM configs are among them, so autotuning never picks worse than before."""
    if INTERPRET:
        return _configs()
    cfgs = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(128, 128, 64, 4, 2), (128, 256, 32, 8, 3), (64, 256, 64, 4, 2),
                                     (128, 64, 64, 4, 3)]]
    return cfgs + _configs()


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. IEEE: exact fp32 products (fp32 operands; never TF32). UPCAST: bf16
    operands go through fp32 (only under TRITON_INTERPRET, whose bf16 dot is wrong; on a GPU bf16 x bf16
    products are exact in fp32 either way, so the numerics are the same)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE or UPCAST:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def split_range(split, T_PER_SPLIT, T):
    """The token range [start, end) of weight-gradient program `split` (token_splits' layout)."""
    start = split * T_PER_SPLIT
    return start, tl.minimum(start + T_PER_SPLIT, T)


@triton.jit
def load_rows(ptr, t, d, s_t, t_ok, d_ok):
    """The [len(t), len(d)] tile of a [T, D] tensor with row stride s_t (int64 row offsets), 0 outside."""
    return tl.load(ptr + t[:, None].to(tl.int64) * s_t + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)


def pad(n: int) -> int:
    """A tile width for n columns (experts, ranks): the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


def tl_acc(dtype: torch.dtype):
    """The accumulation type of operands of `dtype` as a Triton type: reference.router_dtype's rule (fp32; fp64
    for fp64 operands, which only gradchecks use)."""
    return tl.float64 if router_dtype(dtype) == torch.float64 else tl.float32


def dot_flags(dtype: torch.dtype) -> dict:
    """The IEEE/UPCAST constexprs of `mma` for operands of `dtype`, and ACC, the accumulation type (tl_acc)."""
    return {"IEEE": dtype in (torch.float32, torch.float64), "UPCAST": INTERPRET and dtype == torch.bfloat16,
            "ACC": tl_acc(dtype)}


@triton.jit
def _k_segment(acc, a_ptr, b_ptr, K, s_am, s_ak, s_bn, s_bk, rm64, rn, rk, m_ok, n_ok, IEEE: tl.constexpr,
               UPCAST: tl.constexpr, BK: tl.constexpr):
    """acc + A[rm, :K] B[rn, :K]^T over one K segment of gemm2, BK columns a step."""
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(a_ptr + rm64[:, None] * s_am + kk[None, :] * s_ak, mask=m_ok[:, None] & (kk[None, :] < K),
                    other=0.0)
        b = tl.load(b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn, mask=(kk[:, None] < K) & n_ok[None, :],
                    other=0.0)
        acc = mma(a, b.to(a.dtype), acc, IEEE, UPCAST)
    return acc


@triton.jit
def _gemm2_body(a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, c_ptr, M, N, K1, K2, M_BUCKET,
                  s_a1m, s_a1k, s_b1n, s_b1k, s_a2m, s_a2k, s_b2n, s_b2k, s_cm, s_cn,
                  HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                  ACC_C: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped launch order: GROUP_M row-blocks share each column block of B while it is in L2.
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rm64 = rm.to(tl.int64)  # row offsets of [T, *] operands are 64-bit: T * Dout passes 2^31 at ~196k tokens
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BM, BN), dtype=ACC)
    acc = _k_segment(acc, a1_ptr, b1_ptr, K1, s_a1m, s_a1k, s_b1n, s_b1k, rm64, rn, rk, m_ok, n_ok, IEEE, UPCAST, BK)
    acc = _k_segment(acc, a2_ptr, b2_ptr, K2, s_a2m, s_a2k, s_b2n, s_b2k, rm64, rn, rk, m_ok, n_ok, IEEE, UPCAST, BK)
    c_ptrs = c_ptr + rm64[:, None] * s_cm + rn[None, :] * s_cn
    c_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(ACC)[None, :]
    if ACC_C:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(ACC)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# Four autotuners over one kernel: (big-GEMM | skinny-K configs) x (writing C | accumulating into C).
# Accumulating calls (ACC_C, the `add` path) restore C after each timing trial (restore_value), or the trials
# would add the term once each; writing calls must not pay for that clone and copy inside their timed trials.
# Accumulating also loads the C tile beside the fp32 accumulator: configs whose accumulator takes over 64
# registers a thread spill on sm_90 then (tests/medcare_kernels/test_triton_sm90.py), so those calls skip them.
# The token count M enters the key as M_BUCKET (the next power of two; the kernel does not read it): a training
# run sees a new T at almost every step, and autotuning each (compiles are cached, the timing trials are not)
# would cost tens of ms a step. N and K are the model's widths, fixed for a run; s_b1k / s_b2k tell a forward's
# row-major B (1) from an input gradient's W^T view, which tile differently at equal N and K.
_KEY = ["M_BUCKET", "N", "K1", "K2", "s_b1k", "s_b2k", "IEEE", "UPCAST", "ACC", "HAS_BIAS"]


def _acc_configs(configs):
    return [c for c in configs if c.kwargs["BM"] * c.kwargs["BN"] <= 64 * 32 * c.num_warps] or configs


_gemm2_kernel = triton.autotune(configs=_configs(), key=_KEY)(_gemm2_body)
_skinny_kernel = triton.autotune(configs=_skinny_configs(), key=_KEY)(_gemm2_body)
_gemm2_acc_kernel = triton.autotune(configs=_acc_configs(_configs()), key=_KEY, restore_value=["c_ptr"])(_gemm2_body)
_skinny_acc_kernel = triton.autotune(configs=_acc_configs(_skinny_configs()), key=_KEY,
                                     restore_value=["c_ptr"])(_gemm2_body)


# Token rows per program of the weight-gradient kernels (router wgrad, the dropout dA): each program loops over
# its token split in tiles of this many rows (small under the interpreter, which runs every program in Python).
WGRAD_BLOCK_T = 16 if INTERPRET else 64


def token_splits(t: int, n_blocks: int, block_t: int, device: torch.device) -> tuple[int, int]:
    """(splits, tokens per split) for a weight-gradient kernel whose programs are (Din block, token split): enough
    splits over T to fill the machine twice over with `n_blocks` Din blocks, each covering whole token tiles (its
    fp32 partials are summed afterwards: deterministic, no atomics)."""
    sms = 4 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count
    n_split = max(1, min(triton.cdiv(t, 4 * block_t), triton.cdiv(2 * sms, n_blocks)))
    per = triton.cdiv(triton.cdiv(t, n_split), block_t) * block_t
    return triton.cdiv(t, per), per


def gemm_path(device: torch.device) -> str:
    """The GEMM path of the Triton ops (module doc): $MEDCARE_TRITON_GEMM if set, else `auto` = DEFAULT_GEMM
    (under the interpreter on CPU: "fused", so the CPU tests run gemm2's both segments)."""
    choice = os.environ.get("MEDCARE_TRITON_GEMM", "auto").strip().lower()
    if choice not in ("auto",) + GEMM_PATHS:
        raise ValueError(f"$MEDCARE_TRITON_GEMM must be auto, {', '.join(GEMM_PATHS)}; got {choice!r}")
    if choice == "auto":
        choice = "fused" if (INTERPRET and device.type == "cpu") else DEFAULT_GEMM
    return choice


def add_bases_(out: torch.Tensor, bases: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """out += sum_i a_i w_i^T by cuBLAS with beta = 1 (out read in its epilogue); bases as gemm_sum's."""
    for a, w in bases:
        out.addmm_(a, w.t())
    return out


def gemm_sum(bases: list[tuple[torch.Tensor, torch.Tensor]], s: torch.Tensor | None, b: torch.Tensor | None,
             bias: torch.Tensor | None = None, *, path: str | None = None) -> torch.Tensor:
    """sum_i a_i w_i^T + s b^T (+ bias) [M, N] by the path of `gemm_path` (module doc).

    bases: one or more big terms (a [M, K], w [N, K]; any strides: pass W.t() views for an input gradient);
    s [M, K2] / b [N, K2]: the skinny low-rank term (None for none); bias [N] | None. Allocated in a's dtype.
    """
    path = path or gemm_path(bases[0][0].device)
    if path not in GEMM_PATHS:
        raise ValueError(f"unknown GEMM path {path!r}; expected one of {GEMM_PATHS}")
    (a0, w0), rest = bases[0], bases[1:]
    if path == "epilogue" and s is not None:      # the low-rank term (+ bias) written once, then the bases
        return add_bases_(gemm2(s, b, None, None, bias), bases)
    if path == "fused" and not rest and s is not None:
        return gemm2(a0, w0, s, b, bias)
    if path == "fused" and rest:                  # the first two base terms as one two-segment GEMM
        out = add_bases_(gemm2(a0, w0, *rest[0], bias), rest[1:])
    else:
        out = add_bases_(torch.addmm(bias, a0, w0.t()) if bias is not None else torch.mm(a0, w0.t()), rest)
    if s is None:
        return out
    if path == "add":
        return gemm2(s, b, None, None, out=out, accumulate=True)
    return out.addmm_(s, b.t())


def gemm2(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor | None, b2: torch.Tensor | None,
          bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
          accumulate: bool = False) -> torch.Tensor:
    """C = a1 b1^T + a2 b2^T + bias, or C += ... with accumulate=True (into `out`).

    a1 [M, K1]; b1 [N, K1] (any strides: pass W.t() views for the input gradient); a2 [M, K2] | None;
    b2 [N, K2] | None; bias [N] | None; out [M, N] (row-major; allocated in a1's dtype when None).
    """
    m, k1 = a1.shape
    n = b1.shape[0]
    if a2 is None:
        a2, b2 = a1[:, :0], b1[:, :0]
    k2 = a2.shape[1]
    if out is None:
        out = torch.empty(m, n, dtype=a1.dtype, device=a1.device)
    if m == 0 or n == 0:
        return out

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    if k1 + k2 <= SKINNY_K:
        kernel = _skinny_acc_kernel if accumulate else _skinny_kernel
    else:
        kernel = _gemm2_acc_kernel if accumulate else _gemm2_kernel
    kernel[grid](a1, b1, a2, b2, bias if bias is not None else a1, out, m, n, k1, k2, triton.next_power_of_2(m),
                 a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1), a2.stride(0), a2.stride(1),
                 b2.stride(0), b2.stride(1), out.stride(0), out.stride(1),
                 HAS_BIAS=bias is not None, ACC_C=accumulate, **dot_flags(a1.dtype))
    return out
