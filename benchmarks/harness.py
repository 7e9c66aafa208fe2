"""Measuring harness shared by the bench_*.py suites.

Rules (so ratios mean something): providers are measured side by side in one process, interleaved
round-robin after a warm-up, on the same random inputs (never zeros); each record keeps median, min and
max over the repeats. GPU times come from CUDA events around each call, with the L2 cache flushed and the
input rotated (untimed) before every call; CPU times from perf_counter. On a GPU each record also has the GPU's
busy time per call (torch.profiler: the summed durations of the call's kernels, copies and memsets). The two
differ when the host is the bottleneck: a microsecond op called from Python costs its host time in a
micro-benchmark, but only its busy time inside a training step, where the host runs ahead of the GPU.
Every provider first has to agree numerically with the others (`agree`) before it is timed.

Memory: the bytes autograd saves for backward (saved_tensors_hooks, storages counted once, inputs and
parameters excluded); on CUDA the peak allocated during one call above what was allocated before it
(torch.cuda.max_memory_allocated, reset around each provider); on CPU the growth of the resident set
during one call (sampled, see `rss_growth`). A provider x shape that runs out of memory, or that does not
agree, is recorded as skipped with the reason instead of crashing the suite.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FLOOR, NAIVE, ORIGINAL = "base", "naive-peft", "naive-medcare"


@dataclass
class Record:
    """One provider x shape x mode measurement (or the reason it was skipped)."""

    suite: str
    case: str                       # what is measured, e.g. "projection", "mlp-block", "stage1-step"
    provider: str
    shape: dict
    mode: str                       # "fwd", "bwd", "fwd+bwd", "step"
    measured: str                   # one line: what one timed call does
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    repeats: int = 0
    gpu_busy_ms: float | None = None  # CUDA: median GPU busy time of one call (kernels + copies)
    saved_bytes: int | None = None  # bytes autograd keeps between forward and backward, beyond inputs/params
    peak_bytes: int | None = None   # CUDA: peak allocated during a call above the allocation before it
    rss_bytes: int | None = None    # CPU: resident-set growth observed during a call (sampled)
    skipped: str | None = None      # why there is no time (out of memory, disagreement, time budget)
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- context
@dataclass
class Context:
    """What every suite needs: device, dtype, repeats, the time budget, and progress output."""

    device: torch.device
    dtype: torch.dtype
    quick: bool = False
    warmup: int = 2
    repeats: int = 7
    deadline: float = float("inf")     # time.monotonic() after which no new case starts
    gpu_busy: bool = True              # CUDA: also profile each provider's GPU busy time

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        print(msg, flush=True)


def default_dtype(device: str) -> str:
    return "bfloat16" if device == "cuda" else "float32"


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per provider before timing")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per provider (the median is reported)")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="start no new case after this many seconds (cases left are recorded as skipped)")
    ap.add_argument("--no-gpu-busy", action="store_true",
                    help="skip the profiler pass that measures each call's GPU busy time (CUDA)")
    ap.add_argument("--output", default=RESULTS, help="results go to OUTPUT/<device>/ (default benchmarks/results)")


def context_from(args, ap: argparse.ArgumentParser, start: float | None = None) -> Context:
    """Validate the common arguments (one-line errors through ap.error) and build the Context."""
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    for name in ("warmup", "repeats"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "warmup" else 1):
            ap.error(f"--{name} must be >= {0 if name == 'warmup' else 1}, got {v}")
    if args.time_budget is not None and args.time_budget <= 0:
        ap.error(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    dtype = DTYPES[args.dtype or default_dtype(args.device)]
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else (7 if args.device == "cuda" else 5))
    start = time.monotonic() if start is None else start
    deadline = start + args.time_budget if args.time_budget else float("inf")
    return Context(torch.device(args.device), dtype, args.quick, warmup, repeats, deadline,
                   gpu_busy=not getattr(args, "no_gpu_busy", False))


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu_threads": torch.get_num_threads(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    for mod in ("triton", "transformers", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    try:
        import medcare_kernels as mk

        env["medcare_kernels_backends"] = mk.available_backends()
    except ImportError:
        pass
    return env


def device_slug(device: torch.device | str) -> str:
    """Results folder name: 'cpu', or the GPU's name ('nvidia-h100-80gb-hbm3')."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name().lower().replace(" ", "-")
    return "cpu"


# ------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_L2: dict[torch.device, torch.Tensor] = {}


def flush_cache(device: torch.device) -> None:
    """Overwrite the GPU's L2 (as triton.testing.do_bench does) so no call starts with a warm cache."""
    if device.type != "cuda":
        return
    if device not in _L2:
        _L2[device] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    _L2[device].zero_()


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of fn (CUDA events on GPU, perf_counter on CPU)."""
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
    """A call to time, and an untimed setup run right before each call (zero grads, build a graph, rotate
    the input); the L2 is flushed between setup and call."""

    fn: Callable[[], object]
    setup: Callable[[], object] | None = None

    def run(self, device: torch.device) -> float:
        if self.setup is not None:
            self.setup()
        flush_cache(device)
        sync(device)
        return time_once(self.fn, device)


_MARK = "medcare.timed-call"


def gpu_busy(call: Timed, device: torch.device, repeats: int) -> float | None:
    """CUDA: the median over `repeats` calls of the GPU's busy time in one call, in ms: the summed durations of
    the kernels, copies and memsets it ran (torch.profiler), without host time or idle gaps. None off CUDA or
    when the profiler saw no device activity (no CUPTI)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            if call.setup is not None:
                call.setup()
            flush_cache(device)
            sync(device)
            with record_function(_MARK):  # the window closes after the sync: every kernel of the call is inside
                call.fn()
                sync(device)
    return busy_ms(prof.profiler.kineto_results.events())


def busy_ms(events) -> float | None:
    """From profiler (kineto) events: the median over the host-side windows of `_MARK` of the summed durations
    of the device's work (kernels, copies, memsets) that starts inside each window, in ms; None when no window
    saw any. Annotations are not work: every record_function range (ours, the optimizer's step, ...) also has
    a span on the GPU timeline covering the kernels it launched."""
    windows = [(e.start_ns(), e.end_ns()) for e in events if e.name() == _MARK and e.device_type().name == "CPU"]
    work = [(e.start_ns(), e.duration_ns()) for e in events
            if e.device_type().name != "CPU" and not e.is_user_annotation()]
    per = [sum(d for t, d in work if lo <= t <= hi) for lo, hi in sorted(windows)]
    return statistics.median(per) / 1e6 if any(per) else None


class Pool:
    """A few random inputs used in turn, so a GPU call never finds its input already in cache."""

    def __init__(self, make: Callable[[int], object], size: int):
        self.items = [make(i) for i in range(max(size, 1))]
        self.i = 0

    def rotate(self) -> None:
        self.i = (self.i + 1) % len(self.items)

    @property
    def cur(self):
        return self.items[self.i]


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free(device: torch.device) -> None:
    """Release what the last provider left behind so the next starts from the same state."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def interleaved(calls: dict[str, Timed], device: torch.device, *, warmup: int, repeats: int
                ) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Round-robin timing: every repeat runs each provider once, so drift hits all providers alike.
    A provider that runs out of memory is dropped (its reason returned) and the others go on."""
    failed: dict[str, str] = {}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + repeats):
        for name, call in calls.items():
            if name in failed:
                continue
            try:
                t = call.run(device)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is absorbed; anything else re-raises
                if not is_oom(exc):
                    raise
                failed[name] = f"out of memory: {str(exc).splitlines()[0][:160]}"
            if name in failed:
                free(device)  # outside the except block: the traceback's frames (and their tensors) are gone
                continue
            if i >= warmup:
                times[name].append(t)
    return times, failed


def summarize(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "repeats": len(times)}


# ------------------------------------------------------------------------------------------- memory
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
    """CUDA: the peak allocated while fn() runs, above what was allocated before it."""
    if device.type != "cuda":
        return None
    free(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_growth(fn: Callable[[], object]) -> int | None:
    """CPU: the largest resident-set growth seen while fn() runs, sampled every millisecond by a thread.
    Large tensors are mmap'ed and returned to the OS when freed, so this tracks the peak of live
    memory; allocator reuse of already-resident pages can only make it read low. None off Linux."""
    if not os.path.exists("/proc/self/statm"):
        return None
    gc.collect()
    try:  # hand freed heap pages back to the OS first, so reused pages do not hide the call's allocations
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    start, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        peak[0] = max(peak[0], _rss())
        done.set()
        t.join()
    return max(peak[0] - start, 0)


# ------------------------------------------------------------------------------------------- agreement
def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (Frobenius): a handful of near-tie routing flips among
    thousands of tokens stays small, a wrong formula does not."""
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def tolerance(dtype: torch.dtype) -> float:
    """Relative agreement demanded between providers: providers compute in different orders and in fp32
    or the low-precision dtype, so bf16/fp16 get a rounding-sized bound."""
    return {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2}.get(dtype, 3e-2)


def agree(results: dict[str, list[torch.Tensor]], ref: str, tol: float) -> tuple[dict[str, float], dict[str, str]]:
    """Worst relative error of each provider's outputs (value and gradients) against provider `ref`;
    returns (errors, disagreeing providers -> reason)."""
    errs, bad = {}, {}
    for name, outs in results.items():
        if name == ref:
            continue
        errs[name] = max(rel_err(o, w) for o, w in zip(outs, results[ref], strict=True))
        if not errs[name] <= tol:  # also catches NaN
            bad[name] = f"disagrees with {ref}: relative error {errs[name]:.2e} > {tol:.0e}"
    return errs, bad


# ------------------------------------------------------------------------------------------- a case
@dataclass
class Case:
    """One provider at one shape: a Timed per mode, plus how to count what autograd saves."""

    calls: dict[str, Timed]
    measured: dict[str, str]                       # mode -> one line saying what a timed call does
    saved: Callable[[], int] | None = None         # bytes saved for backward by one forward
    extra: dict = field(default_factory=dict)


def measure(ctx: Context, suite: str, case: str, shape: dict, cases: dict[str, Case],
            skipped: dict[str, str] | None = None, agreement: dict[str, float] | None = None) -> list[Record]:
    """Time every provider's calls, mode by mode and interleaved, then take each one's memory; providers in
    `skipped` (and any that run out of memory) become skipped records with the reason."""
    skipped = dict(skipped or {})
    agreement = agreement or {}
    records = []
    modes = list(dict.fromkeys(m for c in cases.values() for m in c.calls))
    for mode in modes:
        calls = {n: c.calls[mode] for n, c in cases.items() if mode in c.calls and n not in skipped}
        free(ctx.device)
        times, failed = interleaved(calls, ctx.device, warmup=ctx.warmup, repeats=ctx.repeats)
        for name, c in cases.items():
            if mode not in c.calls:
                continue
            why = skipped.get(name) or failed.get(name)
            extra = {**c.extra, **({"agreement_rel_err": agreement[name]} if name in agreement else {})}
            rec = Record(suite, case, name, shape, mode, c.measured[mode], skipped=why, extra=extra)
            if why is None:
                for k, v in summarize(times[name]).items():
                    setattr(rec, k, v)
                _busy(ctx, rec, c.calls[mode])
                _memory(ctx, rec, c, mode)
            records.append(rec)
        skipped.update(failed)
    return records


def _busy(ctx: Context, rec: Record, call: Timed) -> None:
    if not (ctx.gpu_busy and ctx.device.type == "cuda"):
        return
    try:
        rec.gpu_busy_ms = gpu_busy(call, ctx.device, min(ctx.repeats, 3))
    except Exception as exc:  # noqa: BLE001 - a profiler failure loses this column, not the run
        if is_oom(exc):
            free(ctx.device)
        first = str(exc).splitlines()[0][:120] if str(exc) else ""
        rec.extra["gpu_busy"] = f"not measured: {type(exc).__name__}: {first}"


def _memory(ctx: Context, rec: Record, c: Case, mode: str) -> None:
    call = c.calls[mode]
    try:
        if c.saved is not None and mode in ("fwd", "fwd+bwd", "step"):
            rec.saved_bytes = c.saved()
        if mode not in ("fwd+bwd", "step") and len(c.calls) > 1:
            return  # the peak of a training call is what matters; fwd and bwd alone would repeat it
        if ctx.device.type == "cuda":
            rec.peak_bytes = peak_bytes(lambda: call.run(ctx.device), ctx.device)
        else:
            if call.setup is not None:
                call.setup()
            rec.rss_bytes = rss_growth(call.fn)
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        rec.extra["memory"] = "out of memory while measuring memory"
    free(ctx.device)


def _zero(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def autograd_cases(fns: dict[str, tuple[Callable, list[torch.Tensor]]], pool: Pool, dy: torch.Tensor,
                   what: str, frozen: list[torch.Tensor]) -> dict[str, Case]:
    """Cases for providers y = fn(x) over the inputs in `pool` (x requires grad): fwd (builds the graph, as
    in training), bwd alone (graph built untimed right before), fwd+bwd. fns: name -> (fn, parameters that
    get gradients; they are zeroed untimed before each call and not counted as saved). `frozen` (the base
    weights) are not counted as saved either: they are parameters that live anyway."""
    cases = {}
    for name, (fn, params) in fns.items():
        graphs: list = []

        def setup(params=params):
            pool.rotate()
            _zero([pool.cur, *params])

        def setup_bwd(fn=fn, params=params, graphs=graphs):
            setup(params)
            graphs.append(fn(pool.cur))

        calls = {"fwd": Timed(lambda fn=fn: fn(pool.cur), setup),
                 "bwd": Timed(lambda graphs=graphs: graphs.pop().backward(dy), setup_bwd),
                 "fwd+bwd": Timed(lambda fn=fn: fn(pool.cur).backward(dy), setup)}
        measured = {"fwd": f"forward of {what}, graph kept for backward",
                    "bwd": f"backward of {what} (dy given): gradients of x and of the trainable parameters",
                    "fwd+bwd": f"forward + backward of {what}"}
        cases[name] = Case(calls, measured, saved=lambda fn=fn, params=params: saved_bytes(
            lambda: fn(pool.cur), [pool.cur, *params, *frozen]))
    return cases


def autograd_outputs(fns: dict[str, tuple[Callable, list[torch.Tensor]]], x: torch.Tensor, dy: torch.Tensor
                     ) -> dict[str, list[torch.Tensor]]:
    """Each provider's [y, dL/dx] on one input with the same dy (for `agree`)."""
    out = {}
    for name, (fn, params) in fns.items():
        xx = x.detach().clone().requires_grad_(True)
        _zero(params)
        y = fn(xx)
        y.backward(dy)
        out[name] = [y.detach(), xx.grad.detach()]
        _zero(params)
    return out


def skip_all(suite: str, case: str, shape: dict, providers: list[str], modes: list[str], reason: str
             ) -> list[Record]:
    """Records for a case that did not run at all (time budget, out of memory while building)."""
    return [Record(suite, case, p, shape, m, "not run", skipped=reason) for p in providers for m in modes]


def guarded(ctx: Context, suite: str, case: str, shape: dict, modes: list[str], fn: Callable[[], list[Record]]
            ) -> list[Record]:
    """Run one case unless the time budget is spent; running out of memory while building it skips the case
    (recorded), anything else is a bug and propagates. Memory is released afterwards either way."""
    if ctx.time_left() <= 0:
        ctx.log(f"  skipped {case}: time budget spent")
        return skip_all(suite, case, shape, ["all"], modes, "time budget spent")
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        ctx.log(f"  skipped {case}: out of memory while building it")
        return skip_all(suite, case, shape, ["all"], modes, "out of memory while building the case")
    finally:
        free(ctx.device)


# ------------------------------------------------------------------------------------------- output
def write_json(path: str, suite: str, records: list[Record], settings: dict | None = None) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"suite": suite, "environment": environment(), "settings": settings or {},
                   "records": [asdict(r) for r in records]}, f, indent=1)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_ms(ms: float) -> str:
    return f"{ms * 1e3:.1f} µs" if ms < 1 else f"{ms:.2f} ms"


def shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def ratio_table(records: list[Record]) -> str:
    """Markdown, one table per case x shape: each provider and mode with its median time, its ratio to
    the floor (`base`), its speed-up over `naive-peft` and over `naive-medcare`, and its memory."""
    groups: dict[tuple[str, str], dict[tuple, Record]] = {}
    for r in records:
        groups.setdefault((r.case, shape_str(r.shape)), {})[(r.mode, r.provider)] = r
    out = []
    for (case, shape), recs in groups.items():
        rate = any("tokens_per_s" in r.extra for r in recs.values())
        busy = any(r.gpu_busy_ms is not None for r in recs.values())
        mem = "peak" if any(r.peak_bytes is not None for r in recs.values()) else "RSS growth"
        out += [f"**{case}** {shape}", "",
                "| mode | provider | median | min..max | x base | vs naive-peft | vs naive-medcare |"
                + (" GPU busy | busy x base | busy vs naive-peft |" if busy else "")
                + (" tokens/s |" if rate else "") + f" saved for bwd | {mem} |",
                "|---|---|---:|---:|---:|---:|---:|" + ("---:|" * 3 if busy else "") + ("---:|" if rate else "")
                + "---:|---:|"]
        for (mode, name), r in recs.items():
            if r.skipped:
                out.append(f"| {mode} | {name} | skipped: {r.skipped} |" + " |" * (6 + 3 * busy + rate))
                continue
            cols = [mode, name, fmt_ms(r.median_ms), f"{fmt_ms(r.min_ms)}..{fmt_ms(r.max_ms)}",
                    _ratio(r, recs.get((mode, FLOOR)), "x"), _ratio(r, recs.get((mode, NAIVE)), "faster"),
                    _ratio(r, recs.get((mode, ORIGINAL)), "faster")]
            if busy:
                cols += ["-" if r.gpu_busy_ms is None else fmt_ms(r.gpu_busy_ms),
                         _ratio(r, recs.get((mode, FLOOR)), "x", "gpu_busy_ms"),
                         _ratio(r, recs.get((mode, NAIVE)), "faster", "gpu_busy_ms")]
            if rate:
                cols.append(f"{r.extra['tokens_per_s']:,.0f}" if "tokens_per_s" in r.extra else "-")
            cols += [fmt_bytes(r.saved_bytes), fmt_bytes(r.peak_bytes if r.peak_bytes is not None else r.rss_bytes)]
            out.append("| " + " | ".join(cols) + " |")
        out.append("")
    return "\n".join(out)


def _ratio(r: Record, other: Record | None, kind: str, field_name: str = "median_ms") -> str:
    mine, theirs = getattr(r, field_name), getattr(other, field_name, None)
    if mine is None or theirs is None or mine <= 0 or theirs <= 0:
        return "-"
    return f"{mine / theirs:.2f}x" if kind == "x" else f"{theirs / mine:.2f}x"


def plot(records: list[Record], path: str, title: str) -> bool:
    """Bar chart of median time per case x mode (log scale), one bar per provider; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in records if r.median_ms is not None]
    groups = list(dict.fromkeys(f"{r.case}\n{_short(r.shape)}\n{r.mode}" for r in ok))
    providers = list(dict.fromkeys(r.provider for r in ok))
    if not groups:
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(len(providers), 2) / 3), 4.5))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        vals = {f"{r.case}\n{_short(r.shape)}\n{r.mode}": r.median_ms for r in ok if r.provider == p}
        xs = [g for g in range(len(groups)) if groups[g] in vals]
        ax.bar([x + i * width for x in xs], [vals[groups[x]] for x in xs], width, label=p)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call, ms (log)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _short(shape: dict) -> str:
    keep = [k for k in ("model", "T", "Din", "Dout", "hidden", "inter", "pairs", "R") if k in shape]
    return " ".join(f"{k}={shape[k]}" for k in keep[:3])


def write_suite(out_root: str, ctx: Context, suite: str, records: list[Record], settings: dict | None = None
                ) -> str:
    """<out_root>/<device>/<suite>.json, .md and .png; returns the folder."""
    out_dir = os.path.join(out_root, device_slug(ctx.device))
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"{suite}.json"), suite, records, settings)
    table = ratio_table(records)
    env = environment()
    with open(os.path.join(out_dir, f"{suite}.md"), "w") as f:
        f.write(f"# {suite} ({env.get('gpu', 'cpu')}, {ctx.dtype_name}{', quick' if ctx.quick else ''})\n\n"
                f"`{env['command']}`\n\ntorch {env['torch']}, {env['cpu_threads']} CPU threads"
                f"{', CUDA ' + str(env['cuda']) if 'cuda' in env else ''}. Times are medians of {ctx.repeats} "
                f"interleaved calls after {ctx.warmup} warm-up calls; `x base` is the ratio to the frozen "
                f"projection, `vs ...` the speed-up over that provider.\n\n{table}\n")
    if plot(records, os.path.join(out_dir, f"{suite}.png"), f"{suite} ({env.get('gpu', 'cpu')}, {ctx.dtype_name})"):
        with open(os.path.join(out_dir, f"{suite}.md"), "a") as f:
            f.write(f"\n![{suite}]({suite}.png)\n")
    return out_dir


def suite_main(suite: str, run: Callable[[Context], list[Record]], doc: str, argv=None) -> int:
    """The CLI every bench_*.py shares: parse, run the suite, print the table, write json/md/png."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    add_common_args(ap)
    args = ap.parse_args(argv)
    ctx = context_from(args, ap)
    torch.manual_seed(0)
    records = run(ctx)
    print(ratio_table(records), flush=True)
    out_dir = write_suite(args.output, ctx, suite, records)
    print(f"wrote {out_dir}/{suite}.json, .md, .png", flush=True)
    return 0
