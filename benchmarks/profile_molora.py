"""Where the time of one MoLoRA projection's forward+backward goes, per CUDA kernel (torch.profiler).

    python benchmarks/profile_molora.py [--backend triton|torch] [--tokens 8192] [--shape gate|down] [--gemm PATH]

Prints the frozen base's GPU time per step (forward + input gradient, cuBLAS) beside the projection's, then the
projection's kernels, so each kernel's share of the excess over the base reads off directly. --gemm sets
MEDCARE_TRITON_GEMM (the Triton backend's GEMM path; default: its `auto`).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

import medcare_kernels as mk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--shape", default="gate", choices=("gate", "down"))
    ap.add_argument("--gemm", default=None, help="MEDCARE_TRITON_GEMM for this run (cublas, add, epilogue, fused)")
    args = ap.parse_args()
    if args.gemm:
        os.environ["MEDCARE_TRITON_GEMM"] = args.gemm
    din, dout = (4096, 11008) if args.shape == "gate" else (11008, 4096)
    E, K, R, Rs, t, dt = 8, 2, 16, 32, args.tokens, torch.bfloat16
    x = torch.randn(t, din, device="cuda", dtype=dt, requires_grad=True)
    w = torch.randn(dout, din, device="cuda", dtype=dt) / din**0.5
    rw = (torch.randn(E, din, device="cuda") / din**0.5).requires_grad_()
    rb = torch.zeros(E, device="cuda", requires_grad=True)
    a = (torch.randn(E * R + Rs, din, device="cuda", dtype=dt) / din**0.5).requires_grad_()
    b = (torch.randn(dout, E * R + Rs, device="cuda", dtype=dt) * 0.01).requires_grad_()
    dy = torch.randn(t, dout, device="cuda", dtype=dt)

    def step():
        with mk.use_backend(args.backend):
            mk.molora_linear(x, w, None, rw, rb, a, b, num_experts=E, top_k=K, expert_rank=R, scaling=2.0).backward(dy)

    def base():
        torch.nn.functional.linear(x, w).backward(dy)

    def gpu_ms_per_step(fn, n=10):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        return sum(e.self_device_time_total for e in events) / n / 1e3, prof

    base_ms, _ = gpu_ms_per_step(base)
    ms, prof = gpu_ms_per_step(step)
    print(f"== {args.backend} {args.shape} T={t} gemm={os.environ.get('MEDCARE_TRITON_GEMM', 'auto')}: "
          f"{ms:.3f} ms of GPU time per step, base {base_ms:.3f} ms, {ms / base_ms:.2f}x "
          f"(kernel times below: totals over 10 steps)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


if __name__ == "__main__":
    main()
