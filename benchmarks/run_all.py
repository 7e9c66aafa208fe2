"""Run every benchmark suite and write <output>/<device>/<suite>.{json,md,png}.

    python benchmarks/run_all.py --device cpu --quick            # small shapes: a few minutes on 2 cores
    python benchmarks/run_all.py --device cuda                   # bf16, the target shapes (~5 min on an H100)
    python benchmarks/run_all.py --device cuda --suites molora,orth --time-budget 120

Suites run cheapest first (routing, orth, lora, molora, train_step), so a --time-budget cut drops the
expensive cases, each recorded as skipped with the reason. Afterwards the performance targets are read off the
folder's results (benchmarks/targets.py) into <output>/<device>/targets.md. A suite that fails with an error is reported
and the others still run (exit status 1 then).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import (  # noqa: E402
    bench_lora,
    bench_molora,
    bench_orth,
    bench_routing,
    bench_train_step,
    harness,
    targets,
)

SUITES = {m.SUITE: m for m in (bench_routing, bench_orth, bench_lora, bench_molora, bench_train_step)}
CUDA_BUDGET_S = 480.0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(ap)
    ap.add_argument("--suites", default=",".join(SUITES),
                    help=f"comma-separated subset of {', '.join(SUITES)} (default: all)")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        ap.error(f"--suites: unknown suite(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SUITES)}")
    args.suites = names
    if args.time_budget is None and args.device == "cuda" and not args.quick:
        args.time_budget = CUDA_BUDGET_S
    return ap, args


def main(argv=None) -> int:
    start = time.monotonic()
    ap, args = parse_args(argv)
    ctx = harness.context_from(args, ap, start)
    ctx.log(f"run_all: device {harness.device_slug(ctx.device)}, {ctx.dtype_name}, suites {', '.join(args.suites)}"
            f"{', quick' if ctx.quick else ''}"
            f"{f', time budget {args.time_budget:.0f} s' if args.time_budget else ''}")
    failed = []
    for name in args.suites:
        t0 = time.monotonic()
        torch.manual_seed(0)
        try:
            records = SUITES[name].run(ctx)
        except Exception:  # noqa: BLE001 - a bug in one suite must not cost the other suites' results
            traceback.print_exc()
            ctx.log(f"run_all: suite {name} FAILED (traceback above); going on with the others")
            failed.append(name)
            harness.free(ctx.device)
            continue
        out = harness.write_suite(args.output, ctx, name, records)
        ok = sum(r.median_ms is not None for r in records)
        ctx.log(f"run_all: {name}: {ok} of {len(records)} records measured in {time.monotonic() - t0:.0f} s "
                f"-> {out}/{name}.md")
    folder = os.path.join(args.output, harness.device_slug(ctx.device))
    if os.path.isdir(folder):
        ctx.log(f"run_all: targets ({folder}/targets.md)\n{targets.write(folder)}")
    ctx.log(f"run_all: done in {time.monotonic() - start:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
