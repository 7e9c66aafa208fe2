"""LoRA projections: the stage-2 MLP projection (knowledge + alignment, rank 32 + 32 = 64) and the stage-1
attention LoRA (rank 16), forward, backward and both, with the recipe's dropout 0.05 on the adapters.

    python benchmarks/bench_lora.py --device cpu [--quick]
    python benchmarks/bench_lora.py --device cuda            # bf16, T=8192, Qwen1.5-7B widths

Providers: base (the frozen projection: the floor), naive-medcare (stage 2 only: the original's
OrthLoRALinear, two fp32 LoRAs on one dropout draw; its attention LoRA was PEFT, i.e. naive-peft),
naive-peft (PEFT lora.Linear; stage 2 with two active adapters), medcare-<backend> (lora_linear, the
adapters packed into one rank-64 LoRA). Providers are checked to agree with dropout off, then timed with it.
Writes <output>/<device>/lora.{json,md,png}.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402
from benchmarks.providers import base, naive_medcare, naive_peft  # noqa: E402
from benchmarks.providers import medcare as mc  # noqa: E402
from benchmarks.providers.params import LoRAParams  # noqa: E402

SUITE = "lora"
MODES = ["fwd", "bwd", "fwd+bwd"]
DROPOUT = 0.05


def shapes(ctx: harness.Context) -> list[tuple]:
    """(case, T, Din, Dout, adapters, bias): stage-2 gate/up projection and the q_proj attention LoRA."""
    if ctx.quick:
        T, h, f = 128, 256, 688
    elif ctx.device.type == "cuda":
        T, h, f = 8192, 4096, 11008    # Qwen1.5-7B
    else:
        T, h, f = 1024, 2048, 5504     # Qwen1.5-1.8B
    return [("stage2-projection", T, h, f, {"knowledge": 32, "alignment": 32}, False),
            ("attention", T, h, h, {"attention": 16}, True)]


def _providers(ctx, p: LoRAParams, train: bool) -> dict:
    """name -> (fn(x) -> y, parameters with gradients); train=False turns dropout off (agreement check)."""
    peft_model, peft_layer = naive_peft.lora(p)
    peft_model.train(train)
    fns = {"base": (base.lora(p), []),
           "naive-peft": (peft_layer, [q for q in peft_model.parameters() if q.requires_grad])}
    if "knowledge" in p.ranks:
        nm = naive_medcare.lora(p).train(train)
        fns["naive-medcare"] = (nm, [q for q in nm.parameters() if q.requires_grad])
    for b in mc.backends("lora_linear", ctx.device):
        fns[f"medcare-{b}"] = (mc.lora(p, b, dropout=None if train else 0.0), p.trainable())
    return fns


def run_case(ctx, case, T, d_in, d_out, ranks, bias) -> list[harness.Record]:
    dev, dt = ctx.device, ctx.dtype
    shape = dict(T=T, Din=d_in, Dout=d_out, R="+".join(str(r) for r in ranks.values()), dropout=DROPOUT,
                 dtype=ctx.dtype_name)
    p = LoRAParams.random(d_in, d_out, ranks, dtype=dt, device=dev, bias=bias, dropout=DROPOUT)
    for t in p.trainable():
        t.requires_grad_(True)
    g = torch.Generator(device="cpu").manual_seed(1)
    pool = harness.Pool(lambda i: torch.randn(T, d_in, generator=g).to(dev, dt).requires_grad_(True),
                        3 if dev.type == "cuda" else 1)
    dy = torch.randn(T, d_out, generator=g).to(dev, dt)
    check = {n: f for n, f in _providers(ctx, p, train=False).items() if n != "base"}
    ref = "naive-medcare" if "naive-medcare" in check else "naive-peft"
    errs, bad = harness.agree(harness.autograd_outputs(check, pool.cur, dy), ref, harness.tolerance(dt))
    for n, e in errs.items():
        ctx.log(f"  agreement {case}: {n} vs {ref} (dropout off), relative error of y and dx {e:.1e}"
                f"{'  -> SKIPPED' if n in bad else ''}")
    del check
    fns = _providers(ctx, p, train=True)
    what = f"the LoRA projection (adapters {shape['R']}, dropout {DROPOUT})"
    cases = harness.autograd_cases(fns, pool, dy, what, [p.weight, p.bias])
    cases["base"].measured = {m: s.replace(what, "the frozen projection (no weight gradient)")
                              for m, s in cases["base"].measured.items()}
    return harness.measure(ctx, SUITE, case, shape, cases, skipped=bad, agreement=errs)


def run(ctx: harness.Context) -> list[harness.Record]:
    records = []
    for case, T, d_in, d_out, ranks, bias in shapes(ctx):
        ctx.log(f"[{SUITE}] {case} T={T} {d_in}->{d_out} ranks {ranks} ({ctx.dtype_name})")
        records += harness.guarded(ctx, SUITE, case, dict(T=T, Din=d_in, Dout=d_out, dtype=ctx.dtype_name), MODES,
                                   lambda: run_case(ctx, case, T, d_in, d_out, ranks, bias))
    return records


def main(argv=None) -> int:
    return harness.suite_main(SUITE, run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
