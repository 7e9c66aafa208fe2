"""The stage-2 orthogonality penalty sum_{layers, projections} sum |A_k A_a^T| and its gradient.

    python benchmarks/bench_orth.py --device cpu [--quick]
    python benchmarks/bench_orth.py --device cuda

Cases: 28 layers x 3 projections at Qwen2-7B widths (gate/up A [32, 3584], down A [32, 18944]) and a small
model's worth (Qwen2-0.5B: 24 x 3, widths 896 / 4864). Providers: naive-medcare (the original: an O(P^2)
scan of named_parameters() per step to match each base A with its orth A, then one GEMM per pair; here
over the A parameters only, which flatters it: in a model the scan also walks every other parameter),
naive-peft (the O-LoRA loop over pairs matched once: the per-pair Python loop), medcare-<backend>
(medcare_kernels.orth_penalty, one call). No floor provider: there is no frozen computation to compare with;
instead each case's header gives the least traffic (forward / forward+backward) and its time at H100 bandwidth,
the floor of the "GPU busy" column. The wall-clock medians of all providers include their host work (Python,
dispatch, and autograd's per-parameter gradient accumulation: 168 AccumulateGrad nodes at 7B), which inside a
training step overlaps the GPU's work on the model.
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
    """(case, layers, hidden, intermediate, rank, parameter dtype). fp32 is what medcare trains (adapters keep
    fp32 weights under --bf16); bf16 halves the bytes every provider must move."""
    if ctx.quick:
        return [("qwen2-7b-widths", 4, 512, 1376, 32, "float32"), ("small-model", 4, 128, 344, 8, "float32")]
    return [("qwen2-7b-widths", 28, 3584, 18944, 32, "float32"), ("qwen2-7b-widths", 28, 3584, 18944, 32, "bfloat16"),
            ("qwen2-0.5b", 24, 896, 4864, 32, "float32")]


def traffic(o: OrthParams) -> tuple[int, int]:
    """Least bytes a forward and a forward+backward must move: read every A; then read them again for the
    gradients and write a gradient for each (sign(P) is r1 x r2 per pair, negligible). At 3.35 TB/s (H100 HBM3)
    this is the device-time floor of any implementation."""
    a = sum(t.numel() * t.element_size() for t in o.tensors())
    return a, 3 * a


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


def run_case(ctx, case, layers, hidden, inter, rank, dtype) -> list[harness.Record]:
    o = OrthParams.random(layers, hidden, inter, rank, device=ctx.device, dtype=harness.DTYPES[dtype])
    fwd_bytes, train_bytes = traffic(o)
    shape = dict(pairs=f"{layers}x3", hidden=hidden, inter=inter, R=rank, dtype=dtype,
                 traffic=f"{harness.fmt_bytes(fwd_bytes)}/{harness.fmt_bytes(train_bytes)}",
                 floor_at_3_35TBps=f"{harness.fmt_ms(fwd_bytes / 3.35e9)}/{harness.fmt_ms(train_bytes / 3.35e9)}")
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
    errs, bad = harness.agree(outs, "naive-medcare", harness.tolerance(harness.DTYPES[dtype]))
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
    for case, layers, hidden, inter, rank, dtype in shapes(ctx):
        ctx.log(f"[{SUITE}] {case}: {layers}x3 pairs, widths {hidden}/{inter}, rank {rank}, {dtype}")
        records += harness.guarded(ctx, SUITE, case, dict(pairs=f"{layers}x3", hidden=hidden, inter=inter, dtype=dtype),
                                   MODES, lambda: run_case(ctx, case, layers, hidden, inter, rank, dtype))
    return records


def main(argv=None) -> int:
    return harness.suite_main(SUITE, run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
