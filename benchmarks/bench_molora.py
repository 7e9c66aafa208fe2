"""MoLoRA: one projection and the whole MoLoRA MLP block, forward, backward and both.

    python benchmarks/bench_molora.py --device cpu [--quick]
    python benchmarks/bench_molora.py --device cuda          # bf16, T=8192, Qwen1.5-7B MLP shapes

Providers: base (the frozen projection / frozen MLP: the floor), naive-medcare (the original: every expert
fp32 on every token, [T, E, Dout] stacked), naive-peft (PEFT shared LoRA + a loop over experts with token
gather and index_add), medcare-<backend>, and in the MLP block medcare-triton-gateup (gate and up through one
molora_gate_up call, down through molora_linear) where the triton backend runs on the device. Gradients: x,
routers, all adapters (base weights are frozen, so base's fwd+bwd is its forward plus the input gradient).
Writes <output>/<device>/molora.{json,md,png}.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402
from benchmarks.providers import base, naive_medcare, naive_peft  # noqa: E402
from benchmarks.providers import medcare as mc  # noqa: E402
from benchmarks.providers.params import MLPParams, MoLoRAParams  # noqa: E402

SUITE = "molora"
MODES = ["fwd", "bwd", "fwd+bwd"]


def shapes(ctx: harness.Context) -> dict:
    """T tokens; projections (Din, Dout); the MLP block (hidden, intermediate). E=8, K=2, R=16, Rs=32 always."""
    if ctx.quick:
        return {"T": 128, "proj": [(256, 688)], "mlp": [(256, 688)]}
    if ctx.device.type == "cuda":  # Qwen1.5-7B: gate/up 4096 -> 11008, down 11008 -> 4096
        return {"T": 8192, "proj": [(4096, 11008), (11008, 4096)], "mlp": [(4096, 11008)]}
    return {"T": 1024, "proj": [(2048, 5504), (5504, 2048)], "mlp": [(2048, 5504)]}  # Qwen1.5-1.8B


def _providers(ctx, p, kind: str) -> dict:
    """name -> (fn(x) -> y, parameters with gradients)."""
    if kind == "projection":
        nm = naive_medcare.NaiveMoLoRA.from_params(p)
        peft_model, peft_fn = naive_peft.molora(p)
        fns = {"base": (base.molora(p), []), "naive-medcare": (nm, list(nm.parameters())),
               "naive-peft": (peft_fn, [q for q in peft_model.parameters() if q.requires_grad])}
        for b in mc.backends("molora_linear", ctx.device):
            fns[f"medcare-{b}"] = (mc.molora(p, b), p.trainable())
        return fns
    nm = naive_medcare.NaiveMLP(p)
    peft_model, peft_fn = naive_peft.mlp(p)
    fns = {"base": (base.mlp(p), []), "naive-medcare": (nm, list(nm.parameters())),
           "naive-peft": (peft_fn, [q for q in peft_model.parameters() if q.requires_grad])}
    for b in mc.backends("molora_linear", ctx.device):
        fns[f"medcare-{b}"] = (mc.mlp(p, b), p.trainable())
    if "triton" in mc.backends(("molora_linear", "molora_gate_up"), ctx.device):
        fns["medcare-triton-gateup"] = (mc.mlp_gate_up(p, "triton"), p.trainable())
    return fns


def run_case(ctx: harness.Context, kind: str, T: int, d_in: int, d_out: int) -> list[harness.Record]:
    dev, dt = ctx.device, ctx.dtype
    shape = dict(T=T, Din=d_in, Dout=d_out, E=8, K=2, R=16, Rs=32, dtype=ctx.dtype_name)
    if kind == "mlp-block":
        shape = dict(T=T, hidden=d_in, inter=d_out, E=8, K=2, R=16, Rs=32, dtype=ctx.dtype_name)
        p = MLPParams.random(d_in, d_out, 8, 2, 16, 32, dtype=dt, device=dev)
    else:
        p = MoLoRAParams.random(d_in, d_out, 8, 2, 16, 32, dtype=dt, device=dev)
    for t in p.trainable():
        t.requires_grad_(True)
    fns = _providers(ctx, p, kind)
    g = torch.Generator(device="cpu").manual_seed(1)
    pool = harness.Pool(lambda i: torch.randn(T, d_in, generator=g).to(dev, dt).requires_grad_(True),
                        3 if dev.type == "cuda" else 1)
    dy = torch.randn(T, d_in if kind == "mlp-block" else d_out, generator=g).to(dev, dt)
    checked = {n: f for n, f in fns.items() if n != "base"}
    errs, bad = harness.agree(harness.autograd_outputs(checked, pool.cur, dy), "naive-medcare",
                              harness.tolerance(dt))
    for n, e in errs.items():
        ctx.log(f"  agreement {kind}: {n} vs naive-medcare, relative error of y and dx {e:.1e}"
                f"{'  -> SKIPPED' if n in bad else ''}")
    what = "one MoLoRA projection" if kind == "projection" else "the MoLoRA MLP block (gate, up, SiLU, down)"
    frozen = [q.weight for q in p.projections()] if kind == "mlp-block" else [p.weight]
    cases = harness.autograd_cases(fns, pool, dy, what, frozen)
    cases["base"].measured = {m: s.replace(what, "the frozen " + ("projection" if kind == "projection" else
                                                                  "MLP block") + " (no weight gradient)")
                              for m, s in cases["base"].measured.items()}
    return harness.measure(ctx, SUITE, kind, shape, cases, skipped=bad, agreement=errs)


def run(ctx: harness.Context) -> list[harness.Record]:
    s = shapes(ctx)
    todo = [("projection", s["T"], i, o) for i, o in s["proj"]] + [("mlp-block", s["T"], h, f) for h, f in s["mlp"]]
    records = []
    for kind, T, d_in, d_out in todo:
        ctx.log(f"[{SUITE}] {kind} T={T} {d_in}->{d_out} ({ctx.dtype_name})")
        records += harness.guarded(ctx, SUITE, kind, dict(T=T, Din=d_in, Dout=d_out, dtype=ctx.dtype_name), MODES,
                                   lambda: run_case(ctx, kind, T, d_in, d_out))
    return records


def main(argv=None) -> int:
    return harness.suite_main(SUITE, run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
