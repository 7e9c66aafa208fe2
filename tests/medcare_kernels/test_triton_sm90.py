"""The Triton dropout kernels compiled for an H100 (sm_90a) without one: Triton's compiler and its bundled ptxas
run on CPU. This catches what the interpreter cannot: code the GPU compiler rejects, and register spills (the
per-element Philox state once spilled 1.3 KB per thread at 4 warps). Runs in a subprocess without
TRITON_INTERPRET, which this test session sets."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
PTXAS = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas*")))

SCRIPT = textwrap.dedent('''
    import re, subprocess, sys, tempfile
    import torch, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from medcare_kernels.ops import _triton_dropout as td

    try:  # the ptxas Triton itself uses for sm_90 (wheels bundle two; which one depends on the version)
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(90).path
    except (ImportError, TypeError, AttributeError):
        ptxas = sys.argv[1]
    common = {"p": "fp32", "scale": "fp32", "T": "i32", "DIN": "i32", "R": "i32", "C": "i32", "seed_ptr": "*i64"}
    consts = ("IEEE", "UPCAST", "ACC", "BLOCK_T", "BLOCK_D", "R_PAD", "C_PAD", "DROPOUT", "PREC")

    # What the JIT specialises at the real shapes: 16-divisible pointers, dims and row strides (tt.divisibility),
    # unit strides as constexpr 1; without them loads are not vectorised and the code is not the GPU's.
    DIV16 = {"T", "DIN", "s_xt", "s_dxt", "M", "N", "K1", "K2", "s_a1m", "s_b1n", "s_a2m", "s_b2n", "s_cm"}

    def check(name, fn, ptrs, extra, c, warps, stages=3):
        sig = {**{k: v for k, v in ptrs}, **common, **extra, **{k: "constexpr" for k in consts}}
        sig = {k: sig[k] for k in fn.arg_names}
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
                 if v.startswith("*") or k in DIV16}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=c, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(k.asm["ptx"])
            f.flush()
            out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"],
                                 capture_output=True, text=True, check=True).stderr
        spill = sum(int(n) for n in re.findall(r"(\\d+) bytes spill stores", out))
        smem = k.metadata.shared
        spill += smem > 227 * 1024  # over an H100's shared memory: the launch would fail
        regs = max(int(n) for n in re.findall(r"Used (\\d+) registers", out))
        print(f"{name}: {regs} registers, {smem} bytes shared, {spill} bytes spilled")
        return spill

    bad = 0
    # shrink/wgrad ranks per launch: at most td.R_CHUNK = 64 (wider adapters run in chunks); 16 is the attention
    # LoRA's. For dX, R_PAD is the rank step R_BLOCK.
    for dt in ("bf16", "fp16", "fp32"):
        for r_pad in (16, 32, 64):
            ty, torch_dt = "*" + dt, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
            f = dict(IEEE=dt == "fp32", UPCAST=False, ACC=tl.float32, R_PAD=r_pad)
            tag = f"{dt} R_PAD={r_pad}"
            bad += check(f"shrink {tag}", td._shrink_kernel, [("x_ptr", ty), ("a_ptr", ty), ("h_ptr", ty)],
                         {"s_xt": "i32", "s_ht": "i32"}, dict(f, BLOCK_T=td.BLOCK_T, BLOCK_D=td._block_d(torch_dt)),
                         8)
            fw = {k: v for k, v in f.items() if k != "R_PAD"}
            bad += check(f"wgrad {tag}", td._wgrad_kernel, [("g_ptr", ty), ("x_ptr", ty), ("out_ptr", "*fp32")],
                         {"s_xt": "i32", "s_gt": "i32", "s_split": "i32", "T_PER_SPLIT": "i32"},
                         dict(fw, DROPOUT=True, PREC="ieee", C_PAD=r_pad, BLOCK_T=32 if dt == "fp32" else
                              td.WGRAD_BLOCK_T, BLOCK_D=td._block_d(torch_dt)), 8)
            # The dX kernel loops over the rank in R_BLOCK steps (no chunks), with the unmasked router term.
            fx = {k: v for k, v in f.items() if k != "R_PAD"}
            bad += check(f"dx {tag}", td._lowrank_dx_kernel,
                         [("dx_ptr", ty), ("ds_ptr", ty), ("a_ptr", ty), ("dl_ptr", ty), ("wr_ptr", ty)],
                         {"s_dxt": "i32", "s_dst": "i32", "s_dlt": "i32", "E": "i32", "ACC_C": "constexpr",
                          "R_BLOCK": "constexpr", "E_PAD": "constexpr"},
                         dict(fx, ACC_C=True, BLOCK_T=td.BLOCK_T, BLOCK_D=td.DX_BLOCK_D, R_BLOCK=r_pad, E_PAD=16), 4)
    # The wgrad kernel as molora_triton.router_wgrad launches it: no mask, fp32 dots on dl [T, E] fp32 (E_PAD 16:
    # E=8, also molora_gate_up's two routers side by side; 64: molora_linear's limit). Not asserted: E_PAD=128
    # (molora_gate_up at E=64) spills 4-584 bytes a thread (see the H100 NOTES.md).
    from medcare_kernels.ops import molora_triton as mt
    for dt in ("bf16", "fp16", "fp32"):
        for e_pad in (16, 64):
            bad += check(f"router wgrad {dt} E_PAD={e_pad}", td._wgrad_kernel,
                         [("g_ptr", "*fp32"), ("x_ptr", "*" + dt), ("out_ptr", "*fp32")],
                         {"s_xt": "i32", "s_gt": "i32", "s_split": "i32", "T_PER_SPLIT": "i32"},
                         dict(DROPOUT=False, PREC="ieee" if dt == "fp32" else "tf32x3", IEEE=False, UPCAST=False,
                              ACC=tl.float32, BLOCK_T=td.WGRAD_BLOCK_T, BLOCK_D=mt._wgrad_block_d(e_pad),
                              C_PAD=e_pad), 4)
    # gemm2 with every autotune config (big-GEMM and skinny-K ones), bf16, with a bias.
    from medcare_kernels.ops import _triton_gemm as tg
    unit = ("s_a1k", "s_b1k", "s_a2k", "s_b2k", "s_cn")      # the forward's row-major operands
    g_sig = {**{k: "*bf16" for k in ("a1_ptr", "b1_ptr", "a2_ptr", "b2_ptr", "bias_ptr", "c_ptr")},
             **{k: "i32" for k in tg._gemm2_body.arg_names
                if k[:2] == "s_" or k in ("M", "N", "K1", "K2", "M_BUCKET")},
             **{k: "constexpr" for k in unit}}
    configs = {(str(c.kwargs), c.num_warps, c.num_stages): c for c in tg._skinny_configs()}.values()
    for acc_c in (False, True):  # accumulating: the configs its autotuners have (tg._acc_configs)
        for cfg in (tg._acc_configs(list(configs)) if acc_c else configs):
            c = dict(cfg.kwargs, HAS_BIAS=True, IEEE=False, UPCAST=False, ACC=tl.float32, ACC_C=acc_c,
                     **{k: 1 for k in unit})
            sig = {**g_sig, **{k: "constexpr" for k in c}}
            bad += check(f"gemm2 ACC_C={acc_c} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}", tg._gemm2_body,
                         list(sig.items()), {}, c, cfg.num_warps, cfg.num_stages)
    sys.exit(1 if bad else 0)
''')


@pytest.mark.slow  # a real Triton compile of every kernel config for sm_90 (ptxas), ~40 s on 2 cores
@pytest.mark.skipif(not PTXAS, reason="this Triton wheel bundles no ptxas")
def test_dropout_kernels_and_gemm2_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", SCRIPT, PTXAS[0]], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"sm_90a build failed or spilled:\n{res.stdout}\n{res.stderr[-3000:]}"
    # 27 dropout-kernel builds, 6 router-wgrad builds, 8 + 3 gemm2 configs (writing, accumulating)
    assert res.stdout.count("registers") == 27 + 6 + 8 + 3, res.stdout
