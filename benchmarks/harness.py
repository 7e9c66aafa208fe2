"""Measuring harness shared by the bench_*.py suites.

Rules (so ratios mean something): providers are measured side by side in one process, interleaved
round-robin after a warm-up, on the same random inputs (never zeros); each record keeps median, min and
max over the repeats. GPU times come from CUDA events around each call, CPU times from perf_counter.
Memory: the bytes autograd saves for backward (saved_tensors_hooks, storages counted once, inputs and
parameters excluded), and on CUDA the peak allocated during the call above what was allocated before.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Record:
    """One provider x shape x mode measurement."""

    suite: str
    provider: str
    shape: dict
    mode: str                      # "fwd", "bwd" or "fwd+bwd"
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    saved_bytes: int | None = None  # bytes autograd keeps between forward and backward, beyond the inputs
    peak_bytes: int | None = None   # CUDA: peak allocated during the call above the baseline
    extra: dict = field(default_factory=dict)


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu_threads": torch.get_num_threads(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of fn."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@dataclass
class Timed:
    """A call to time, and an untimed setup run right before each call (e.g. building a graph for backward)."""

    fn: Callable[[], object]
    setup: Callable[[], object] | None = None

    def run(self, device: torch.device) -> float:
        if self.setup is not None:
            self.setup()
            _sync(device)
        return time_once(self.fn, device)


def interleaved(calls: dict[str, Timed], device: torch.device, *, warmup: int, repeats: int
                ) -> dict[str, list[float]]:
    """Round-robin timing: every repeat runs each provider once, so drift hits all providers alike."""
    for _ in range(warmup):
        for call in calls.values():
            call.run(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(call.run(device))
    return times


def saved_bytes(fn: Callable[[], object], exclude: list[torch.Tensor]) -> int:
    """Bytes autograd saves for backward while fn() builds its graph, not counting `exclude` (inputs,
    parameters) and counting each storage once."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def summarize(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "repeats": len(times)}


def write_json(path: str, suite: str, records: list[Record]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"suite": suite, "environment": environment(), "records": [asdict(r) for r in records]}, f,
                  indent=1)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def ratio_table(records: list[Record], *, floor: str, naive: str) -> str:
    """Markdown, one table per shape: each provider and mode with its median time, its ratio to the floor,
    its speed-up over the naive provider, and what autograd saves for backward (and its share of naive's)."""
    by_shape: dict[str, dict[tuple, Record]] = {}
    for r in records:
        by_shape.setdefault(shape_str(r.shape), {})[(r.mode, r.provider)] = r
    out = []
    for shape, recs in by_shape.items():
        out += [f"**{shape}**", "", "| mode | provider | median ms | min..max ms | x floor | vs naive | saved for bwd |"
                " saved vs naive |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for (mode, name), r in recs.items():
            fl, nv = recs.get((mode, floor)), recs.get((mode, naive))
            x_floor = f"{r.median_ms / fl.median_ms:.2f}x" if fl else "-"
            speed = f"{nv.median_ms / r.median_ms:.2f}x faster" if nv else "-"
            share = (f"{100 * r.saved_bytes / nv.saved_bytes:.1f}%" if nv and nv.saved_bytes and r.saved_bytes
                     is not None else "-")
            out.append(f"| {mode} | {name} | {r.median_ms:.2f} | {r.min_ms:.2f}..{r.max_ms:.2f} | {x_floor} | "
                       f"{speed} | {fmt_bytes(r.saved_bytes)} | {share} |")
        out.append("")
    return "\n".join(out)
