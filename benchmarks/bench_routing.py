"""Router top-k: softmax -> top-k -> renormalise -> dense gates [T, E], forward and backward.

    python benchmarks/bench_routing.py --device cpu [--quick]
    python benchmarks/bench_routing.py --device cuda          # T=8192, E=8, K=2

Providers: naive-peft (what one writes in PyTorch: torch.softmax, torch.topk, divide, scatter into a
dense [T, E]; autograd does the backward), medcare-<backend> (medcare_kernels.route_topk). Logits and
gates are fp32, as the router's. Writes <output>/<device>/routing.{json,md,png}.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402
from benchmarks.providers import medcare as mc  # noqa: E402

SUITE = "routing"
MODES = ["fwd", "bwd", "fwd+bwd"]


def torch_route(top_k: int):
    def fn(logits):
        w, idx = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, idx, w / w.sum(dim=-1, keepdim=True))

    return fn


def shapes(ctx: harness.Context) -> list[tuple]:
    return [(512, 8, 2)] if ctx.quick else [(8192, 8, 2), (8192 * 4, 8, 2)]


def run_case(ctx, T, E, K) -> list[harness.Record]:
    shape = dict(T=T, E=E, K=K, dtype="float32")
    fns = {"naive-peft": (torch_route(K), [])}
    for b in mc.backends("route_topk", ctx.device):
        fns[f"medcare-{b}"] = (mc.route(b, K), [])
    g = torch.Generator(device="cpu").manual_seed(1)
    # The pool is large enough on GPU that rotating through it leaves the L2 cold even without the flush.
    pool = harness.Pool(lambda i: (torch.randn(T, E, generator=g) * 2).to(ctx.device).requires_grad_(True),
                        64 if ctx.device.type == "cuda" else 1)
    dy = torch.randn(T, E, generator=g).to(ctx.device)
    errs, bad = harness.agree(harness.autograd_outputs(fns, pool.cur, dy), "naive-peft", 1e-5)
    for n, e in errs.items():
        ctx.log(f"  agreement: {n} vs naive-peft, relative error of gates and dlogits {e:.1e}"
                f"{'  -> SKIPPED' if n in bad else ''}")
    cases = harness.autograd_cases(fns, pool, dy, f"routing {T}x{E} logits to top-{K} gates", [])
    return harness.measure(ctx, SUITE, "route-topk", shape, cases, skipped=bad, agreement=errs)


def run(ctx: harness.Context) -> list[harness.Record]:
    records = []
    for T, E, K in shapes(ctx):
        ctx.log(f"[{SUITE}] T={T} E={E} K={K}")
        records += harness.guarded(ctx, SUITE, "route-topk", dict(T=T, E=E, K=K), MODES,
                                   lambda: run_case(ctx, T, E, K))
    return records


def main(argv=None) -> int:
    return harness.suite_main(SUITE, run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
