"""The project's performance targets, read off a results folder: one row per target with what was measured.

    python benchmarks/targets.py                                   # benchmarks/results/<the GPU folder, else cpu>
    python benchmarks/targets.py benchmarks/results/nvidia-h100-80gb-hbm3

run_all.py writes the same table to <output>/<device>/targets.md after the suites. Each target names its suite,
case, mode and shape filter (the issues' numbers: H100, bf16, T=8192, Qwen1.5-7B / Qwen2-7B shapes); the
verdict uses GPU busy time where the target is about kernel cost (the microsecond ops, whose wall clock is host
work; benchmarks/README.md) and wall-clock medians otherwise. A target whose records are missing or skipped
reads "not measured", never met.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402

MEDCARE = ("medcare-triton", "medcare-ext")   # the backends the targets are about, in order of preference


@dataclass
class Target:
    what: str
    suite: str
    case: str
    mode: str
    where: Callable[[dict], bool]     # shape filter
    kind: str                         # "x base" (ratio to base, <= goal) | "vs naive" (speed-up, >= goal)
                                      # | "ms" (time, <= goal) | "tokens/s vs naive" (>= goal)
    goal: float
    clock: str = "wall"               # "wall" (median_ms) | "busy" (gpu_busy_ms)


def _shape(**want):
    return lambda s: all(s.get(k) == v for k, v in want.items())


TARGETS = [
    Target("MoLoRA projection gate/up 4096->11008, fwd+bwd", "molora", "projection", "fwd+bwd",
           _shape(Din=4096, Dout=11008), "x base", 1.15),
    Target("MoLoRA projection down 11008->4096, fwd+bwd", "molora", "projection", "fwd+bwd",
           _shape(Din=11008, Dout=4096), "x base", 1.15),
    Target("MoLoRA projection gate/up vs a PEFT-style loop", "molora", "projection", "fwd+bwd",
           _shape(Din=4096, Dout=11008), "vs naive", 2.5),
    Target("MoLoRA MLP block, fwd+bwd", "molora", "mlp-block", "fwd+bwd", _shape(), "x base", 1.15),
    Target("stage-2 LoRA rank 32+32 (dropout 0.05), fwd+bwd", "lora", "stage2-projection", "fwd+bwd", _shape(),
           "x base", 1.08),
    Target("orth penalty 28x3 at Qwen2-7B widths (fp32), fwd+bwd", "orth", "qwen2-7b-widths", "fwd+bwd",
           _shape(dtype="float32"), "ms", 0.060, "busy"),
    Target("orth penalty 28x3 at Qwen2-7B widths (bf16), fwd+bwd", "orth", "qwen2-7b-widths", "fwd+bwd",
           _shape(dtype="bfloat16"), "ms", 0.060, "busy"),
    Target("orth penalty vs the per-pair loop (fp32)", "orth", "qwen2-7b-widths", "fwd+bwd",
           _shape(dtype="float32"), "vs naive", 20.0, "busy"),
    Target("route_topk T=8192 vs softmax+topk+divide+scatter", "routing", "route-topk", "fwd+bwd", _shape(T=8192),
           "vs naive", 3.0, "busy"),
    Target("stage-1 training step at the 1.5B shape, tokens/s", "train_step", "stage1", "step",
           _shape(model="qwen2-1.5b"), "tokens/s vs naive", 2.0),
]


def _load(folder: str) -> list[dict]:
    records = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and not name.startswith("triton_gemm"):
            with open(os.path.join(folder, name)) as f:
                data = json.load(f)
            records += data.get("records", []) if isinstance(data, dict) else []
    return records


def _value(rec: dict, clock: str) -> float | None:
    v = rec.get("gpu_busy_ms" if clock == "busy" else "median_ms")
    return v if isinstance(v, (int, float)) and v > 0 and not rec.get("skipped") else None


def evaluate(t: Target, records: list[dict]) -> tuple[str, str, str]:
    """(provider, measured, verdict) for one target."""
    mine = [r for r in records if r["suite"] == t.suite and r["case"] == t.case and r["mode"] == t.mode
            and t.where(r["shape"])]
    by = {r["provider"]: r for r in mine}
    name = next((p for p in MEDCARE if p in by and _value(by[p], t.clock) is not None), None)
    if name is None:
        return "-", "-", "not measured"
    me = _value(by[name], t.clock)
    if t.kind == "ms":
        return name, harness.fmt_ms(me), "met" if me <= t.goal else "missed"
    if t.kind == "tokens/s vs naive":
        other = by.get(harness.NAIVE)
        if other is None or _value(other, "wall") is None:
            return name, "-", "not measured"
        ratio = _value(other, "wall") / _value(by[name], "wall")
        peak = by[name].get("peak_bytes"), other.get("peak_bytes")
        lower = None if None in peak else peak[0] < peak[1]
        verdict = "met" if ratio >= t.goal and lower is not False else "missed"
        return name, f"{ratio:.2f}x" + ("" if lower is None else f", peak {'lower' if lower else 'higher'}"), verdict
    other = by.get(harness.FLOOR if t.kind == "x base" else harness.NAIVE)
    theirs = None if other is None else _value(other, t.clock)
    if theirs is None:
        return name, "-", "not measured"
    ratio = me / theirs if t.kind == "x base" else theirs / me
    ok = ratio <= t.goal if t.kind == "x base" else ratio >= t.goal
    return name, f"{ratio:.2f}x", "met" if ok else "missed"


def table(records: list[dict]) -> str:
    out = ["| target | goal | clock | provider | measured | verdict |", "|---|---:|---|---|---:|---|"]
    for t in TARGETS:
        goal = (f"<= {harness.fmt_ms(t.goal)}" if t.kind == "ms" else
                f"<= {t.goal:.2f}x base" if t.kind == "x base" else f">= {t.goal:g}x faster")
        provider, measured, verdict = evaluate(t, records)
        out.append(f"| {t.what} | {goal} | {'GPU busy' if t.clock == 'busy' else 'wall'} | {provider} | {measured} | "
                   f"{verdict} |")
    return "\n".join(out) + "\n"


def write(folder: str) -> str:
    """Writes <folder>/targets.md from the suites' JSON there; returns the table."""
    text = table(_load(folder))
    with open(os.path.join(folder, "targets.md"), "w") as f:
        f.write(f"# Performance targets ({os.path.basename(os.path.normpath(folder))})\n\n"
                f"`python benchmarks/targets.py {folder}`: read off the suites' JSON in this folder "
                f"(benchmarks/targets.py says which clock each target uses and why).\n\n{text}")
    return text


def _default_folder() -> str:
    gpus = [d for d in sorted(os.listdir(harness.RESULTS)) if d not in ("cpu", "quick")
            and os.path.isdir(os.path.join(harness.RESULTS, d))]
    return os.path.join(harness.RESULTS, gpus[0] if gpus else "cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", nargs="?", default=None, help="a results/<device> folder (default: the GPU one)")
    args = ap.parse_args(argv)
    folder = args.folder or _default_folder()
    if not os.path.isdir(folder):
        ap.error(f"{folder}: no such results folder")
    print(write(folder), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
