"""The stage-2 orthogonality penalty sum_{layers, projections} sum |A_k A_a^T| and its gradient.

    python benchmarks/bench_orth.py --device cpu [--quick]
    python benchmarks/bench_orth.py --device cuda

Cases: 28 layers x 3 projections at Qwen2-7B widths (gate/up A [32, 3584], down A [32, 18944]) and a small
model's worth (Qwen2-0.5B: 24 x 3, widths 896 / 4864). Providers: naive-medcare (the original: an O(P^2)
scan of named_parameters() per step to match each base A with its orth A, then one GEMM per pair; here
over the A parameters only, which flatters it: in a model the scan also walks every other parameter),
naive-peft (the O-LoRA loop over pairs matched once: the per-pair Python loop), medcare-<backend>
(medcare_kernels.orth_penalty, one call). No floor: there is no frozen computation to compare with.
Writes <output>/<device>/orth.{json,md,png}.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402
from benchmarks.providers import medcare as mc  # noqa: E402
from benchmarks.providers import naive_medcare, naive_peft  # noqa: E402
from benchmarks.providers.params import OrthParams  # noqa: E402

SUITE = "orth"
MODES = ["fwd", "fwd+bwd"]


def shapes(ctx: harness.Context) -> list[tuple]:
    """(case, layers, hidden, intermediate, rank)."""
    if ctx.quick:
        return [("qwen2-7b-widths", 4, 512, 1376, 32), ("small-model", 4, 128, 344, 8)]
    return [("qwen2-7b-widths", 28, 3584, 18944, 32), ("qwen2-0.5b", 24, 896, 4864, 32)]


def _providers(ctx, o: OrthParams) -> dict:
    """name -> (fn() -> scalar, the A tensors it differentiates, in OrthParams order)."""
    holder = naive_medcare.orth_holder(o)
    pairs = [(a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True))
             for a, b in zip(o.a_base, o.a_orth, strict=True)]
    fns = {"naive-medcare": (lambda: naive_medcare.orth_loss(holder), naive_medcare.holder_tensors(holder, o)),
           "naive-peft": (lambda: naive_peft.orth_loss(pairs), [a for a, _ in pairs] + [b for _, b in pairs])}
    for b in mc.backends("orth_penalty", ctx.device):
        fns[f"medcare-{b}"] = (mc.orth(o, b), o.tensors())
    return fns


def run_case(ctx, case, layers, hidden, inter, rank) -> list[harness.Record]:
    shape = dict(pairs=f"{layers}x3", hidden=hidden, inter=inter, R=rank, dtype="float32")
    o = OrthParams.random(layers, hidden, inter, rank, device=ctx.device)
    for t in o.tensors():
        t.requires_grad_(True)
    fns = _providers(ctx, o)
    outs = {}
    for name, (fn, params) in fns.items():
        harness._zero(params)
        v = fn()
        v.backward()
        outs[name] = [v.detach().reshape(1), torch.cat([t.grad.flatten() for t in params])]
        harness._zero(params)
    errs, bad = harness.agree(outs, "naive-medcare", harness.tolerance(torch.float32))
    for n, e in errs.items():
        ctx.log(f"  agreement {case}: {n} vs naive-medcare, relative error of value and gradients {e:.1e}"
                f"{'  -> SKIPPED' if n in bad else ''}")
    cases = {}
    for name, (fn, params) in fns.items():
        def zero(params=params):
            harness._zero(params)

        cases[name] = harness.Case(
            {"fwd": harness.Timed(fn, zero), "fwd+bwd": harness.Timed(lambda fn=fn: fn().backward(), zero)},
            {"fwd": f"the penalty over {layers}x3 pairs (graph kept for backward)",
             "fwd+bwd": f"the penalty over {layers}x3 pairs and its gradient into every A"},
            saved=lambda fn=fn, params=params: harness.saved_bytes(fn, params))
    return harness.measure(ctx, SUITE, case, shape, cases, skipped=bad, agreement=errs)


def run(ctx: harness.Context) -> list[harness.Record]:
    records = []
    for case, layers, hidden, inter, rank in shapes(ctx):
        ctx.log(f"[{SUITE}] {case}: {layers}x3 pairs, widths {hidden}/{inter}, rank {rank}")
        records += harness.guarded(ctx, SUITE, case, dict(pairs=f"{layers}x3", hidden=hidden, inter=inter), MODES,
                                   lambda: run_case(ctx, case, layers, hidden, inter, rank))
    return records


def main(argv=None) -> int:
    return harness.suite_main(SUITE, run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
