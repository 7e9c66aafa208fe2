"""One MoLoRA projection, forward and backward: medcare vs the frozen base (floor) vs the original code.

    python benchmarks/bench_molora.py --device cpu            # Qwen1.5-1.8B MLP shape, fp32
    python benchmarks/bench_molora.py --device cuda --dtype bfloat16 --tokens 8192 --d-in 4096 --d-out 11008

Prints, per mode (fwd, bwd, fwd+bwd), each provider's median time, its ratio to the base projection and
its speed-up over naive-medcare, and the bytes autograd saves for backward; writes
<output>/<device>/molora.{json,md}. Gradients: x, router, lora_a, lora_b (the base weight is frozen).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402
from benchmarks.providers import molora as prov  # noqa: E402
from medcare_kernels import _backend  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--tokens", type=int, default=1024, help="T, tokens per call")
    ap.add_argument("--d-in", type=int, default=2048)
    ap.add_argument("--d-out", type=int, default=5504)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16, help="R, rank of each routed expert")
    ap.add_argument("--shared-rank", type=int, default=32, help="Rs, rank of the shared (knowledge) LoRA")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    ap.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    if args.quick:
        args.tokens, args.d_in, args.d_out, args.repeats, args.warmup = 256, 512, 1376, 3, 1
    return args


def providers(p: prov.MoLoRAParams, device: torch.device) -> dict:
    fns = {"base": (prov.base(p), []), "naive-medcare": None}
    naive_module, naive_fn = prov.naive_medcare(p)
    fns["naive-medcare"] = (naive_fn, list(naive_module.parameters()))
    for name in ("torch", "triton", "ext"):
        if "molora_linear" in _backend._registry[name] and _backend._runs_on(name, device):
            fns[f"medcare-{name}"] = (prov.medcare(p, name), p.trainable())
    return fns


def check_agreement(fns: dict, x: torch.Tensor) -> dict[str, float]:
    """Max |y - y_naive| per provider: all providers compute the same function (base excepted)."""
    with torch.no_grad():
        want = fns["naive-medcare"][0](x).double()
        return {n: (fn(x).double() - want).abs().max().item() for n, (fn, _) in fns.items() if n != "base"}


def measure(args) -> list[harness.Record]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    p = prov.MoLoRAParams.random(args.d_in, args.d_out, args.experts, args.top_k, args.rank, args.shared_rank,
                                 dtype=dtype, device=device)
    for t in p.trainable():
        t.requires_grad_(True)
    x = torch.randn(args.tokens, args.d_in, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.tokens, args.d_out, device=device, dtype=dtype)
    fns = providers(p, device)
    for name, err in check_agreement(fns, x).items():
        print(f"agreement: {name} max |y - y_naive-medcare| = {err:.2e}")
    shape = dict(T=args.tokens, Din=args.d_in, Dout=args.d_out, E=args.experts, K=args.top_k, R=args.rank,
                 Rs=args.shared_rank, dtype=args.dtype)

    def zero(params):
        x.grad = None
        for t in params:
            t.grad = None

    graphs: dict = {}

    def make(mode, name, fn, params):
        if mode == "fwd":
            return harness.Timed(lambda: fn(x))
        if mode == "fwd+bwd":
            return harness.Timed(lambda: fn(x).backward(dy), setup=lambda: zero(params))
        # bwd alone: the graph is built untimed, right before each timed backward.
        return harness.Timed(lambda: graphs.pop(name).backward(dy),
                             setup=lambda: (zero(params), graphs.__setitem__(name, fn(x))))

    records = []
    for mode in ("fwd", "bwd", "fwd+bwd"):
        calls = {name: make(mode, name, fn, params) for name, (fn, params) in fns.items()}
        times = harness.interleaved(calls, device, warmup=args.warmup, repeats=args.repeats)
        for name, (fn, params) in fns.items():
            saved = harness.saved_bytes(lambda: fn(x), [x, p.weight, *params]) if mode != "bwd" else None
            peak = harness.peak_bytes(lambda: calls[name].run(device), device) if mode == "fwd+bwd" else None
            records.append(harness.Record("molora", name, shape, mode, **harness.summarize(times[name]),
                                          saved_bytes=saved, peak_bytes=peak))
    return records


def device_slug(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name().lower().replace(" ", "-")
    return "cpu"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    records = measure(args)
    table = harness.ratio_table(records, floor="base", naive="naive-medcare")
    print(table)
    out_dir = os.path.join(args.output, device_slug(args.device))
    harness.write_json(os.path.join(out_dir, "molora.json"), "molora", records)
    with open(os.path.join(out_dir, "molora.md"), "w") as f:
        f.write(f"# molora ({args.device}, {args.dtype})\n\n`{harness.environment()['command']}`\n\n{table}\n")
    print(f"wrote {out_dir}/molora.json and molora.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
