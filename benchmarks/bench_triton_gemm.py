"""Kernel-level GPU timings behind the Triton backend's choices (run on the GPU machine, prints a table).

1. The GEMMs alone at the exact Qwen1.5-7B MLP shapes: torch.mm (cuBLAS) against the Triton gemm2; the skinny
   low-rank term alone (cuBLAS mm vs gemm2, K = 160) and cuBLAS's base GEMM with beta = 1 (C read in its
   epilogue); then the forward (x W^T + S B^T, K2 = 160) and the input gradient (dY W + [dh | dl] [A; Wr],
   K2 = 168) by every path of _triton_gemm.gemm_sum. `_triton_gemm.DEFAULT_GEMM` follows this table.
2. One projection, forward + backward (x, router and adapters trainable, W frozen): the floor (frozen base:
   forward + input gradient, cuBLAS) against medcare's triton backend with each GEMM path and the torch backend;
   the bytes autograd saves beyond x; and lora_linear at ranks 64 (with the stage-2 dropout 0.05) and 16.

    python benchmarks/bench_triton_gemm.py [--tokens 8192] [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton.testing

import medcare_kernels as mk
from medcare_kernels.ops import _triton_gemm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import harness  # noqa: E402

MLP = {"gate/up": (4096, 11008), "down": (11008, 4096)}


def bench(fn, reps=50):
    return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")


def gemm_table(t, dt):
    rows = []
    for name, (din, dout) in MLP.items():
        x = torch.randn(t, din, device="cuda", dtype=dt)
        w = torch.randn(dout, din, device="cuda", dtype=dt) / din**0.5
        s = torch.randn(t, 160, device="cuda", dtype=dt)
        b = torch.randn(dout, 160, device="cuda", dtype=dt)
        dy = torch.randn(t, dout, device="cuda", dtype=dt)
        dhl = torch.randn(t, 168, device="cuda", dtype=dt)
        a_ext = torch.randn(168, din, device="cuda", dtype=dt)
        c = torch.mm(x, w.t())
        ms_mm = bench(lambda: torch.mm(x, w.t()))
        ms_g = bench(lambda: _triton_gemm.gemm2(x, w, None, None))
        flops = 2 * t * din * dout
        rec = {"shape": name, "mm_ms": ms_mm, "triton_ms": ms_g, "mm_tflops": flops / ms_mm / 1e9,
               "triton_tflops": flops / ms_g / 1e9,
               # the pieces of the `epilogue` path: the low-rank term written alone, the base GEMM with beta = 1
               "expand_mm_ms": bench(lambda: torch.mm(s, b.t())),
               "expand_gemm2_ms": bench(lambda: _triton_gemm.gemm2(s, b, None, None)),
               "mm_beta1_ms": bench(lambda: c.addmm_(x, w.t())),
               "dx_mm_ms": bench(lambda: torch.mm(dy, w)), "dx_triton_ms": bench(
                   lambda: _triton_gemm.gemm2(dy, w.t(), None, None))}
        for path in _triton_gemm.GEMM_PATHS:
            rec[f"fwd_{path}_ms"] = bench(lambda: _triton_gemm.gemm_sum([(x, w)], s, b, path=path))
            rec[f"dx_{path}_ms"] = bench(lambda: _triton_gemm.gemm_sum([(dy, w.t())], dhl, a_ext.t(), path=path))
        rows.append(rec)
    return rows


def projection_table(t, dt):
    rows = []
    E, K, R, Rs = 8, 2, 16, 32
    for name, (din, dout) in MLP.items():
        x0 = torch.randn(t, din, device="cuda", dtype=dt)
        w = torch.randn(dout, din, device="cuda", dtype=dt) / din**0.5
        rw = torch.randn(E, din, device="cuda") / din**0.5
        rb = torch.zeros(E, device="cuda")
        a = (torch.randn(E * R + Rs, din, device="cuda", dtype=dt) / din**0.5).requires_grad_()
        bb = (torch.randn(dout, E * R + Rs, device="cuda", dtype=dt) * 0.01).requires_grad_()
        rw.requires_grad_()
        rb.requires_grad_()
        dy = torch.randn(t, dout, device="cuda", dtype=dt)
        x = x0.clone().requires_grad_()

        def base():
            torch.nn.functional.linear(x, w).backward(dy)

        def molora(backend, gemm):
            os.environ["MEDCARE_TRITON_GEMM"] = gemm
            with mk.use_backend(backend):
                mk.molora_linear(x, w, None, rw, rb, a, bb, num_experts=E, top_k=K, expert_rank=R,
                                 scaling=2.0).backward(dy)

        ms_base = bench(base)
        rec = {"shape": name, "base_ms": ms_base}
        for label, backend, gemm in [*((f"triton-{p}", "triton", p) for p in _triton_gemm.GEMM_PATHS),
                                     ("torch", "torch", "auto")]:
            ms = bench(lambda: molora(backend, gemm))
            os.environ["MEDCARE_TRITON_GEMM"] = gemm
            with mk.use_backend(backend):
                nbytes = harness.saved_bytes(lambda: mk.molora_linear(
                    x, w, None, rw, rb, a, bb, num_experts=E, top_k=K, expert_rank=R, scaling=2.0),
                    [x, w, rw, rb, a, bb])
            extra = nbytes / (t * (E * R + Rs) * x.element_size())
            rec[f"{label}_ms"] = ms
            rec[f"{label}_x_base"] = ms / ms_base
            rec[f"{label}_saved_vs_TxRt"] = extra
        for r, p in ((64, 0.05), (64, 0.0), (16, 0.0)):
            la = (torch.randn(r, din, device="cuda", dtype=dt) / din**0.5).requires_grad_()
            lb = (torch.randn(dout, r, device="cuda", dtype=dt) * 0.01).requires_grad_()
            for gemm in _triton_gemm.GEMM_PATHS:
                os.environ["MEDCARE_TRITON_GEMM"] = gemm

                def lora():
                    with mk.use_backend("triton"):
                        mk.lora_linear(x, w, None, la, lb, scaling=2.0, dropout=p).backward(dy)

                ms = bench(lora)
                rec[f"lora{r}{'-drop' if p else ''}-{gemm}_x_base"] = ms / ms_base
        os.environ.pop("MEDCARE_TRITON_GEMM", None)
        rows.append(rec)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--output", default="benchmarks/results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_triton_gemm: needs a CUDA device")
    dt = torch.bfloat16
    torch.manual_seed(0)
    gem = gemm_table(args.tokens, dt)
    for r in gem:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    proj = projection_table(args.tokens, dt)
    for r in proj:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    dev = torch.cuda.get_device_name().replace(" ", "-")
    out = os.path.join(args.output, dev)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "triton_gemm.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": triton.__version__, "tokens": args.tokens, "dtype": "bf16", "command": sys.argv,
                   "gemm": gem, "projection": proj}, f, indent=1)


if __name__ == "__main__":
    main()
