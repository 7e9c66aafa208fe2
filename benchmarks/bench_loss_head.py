"""The LM loss head of a stage-1 training step: the model's own head (logits [batch, length, vocab] at every
position, upcast to fp32) vs medcare's chunked head (medcare.loss_head: the loss at supervised positions
only, 441 rows of fp32 logits at a time, each chunk's gradient formed in forward), side by side in one run.

    python benchmarks/bench_loss_head.py                      # CPU, fp32, Qwen2-0.5B shape, batch 4 x 1024
    python benchmarks/bench_loss_head.py --device cuda        # bf16: 0.5B, 1.5B and a 4-layer 7B shape
    python benchmarks/bench_loss_head.py --quick              # tiny shape, seconds (what the tests run)

A step: forward with assistant-only labels (each row's prompt, about the first half, is -100), backward,
AdamW on the stage-1 adapters (attention LoRA, MoLoRA E=8 K=2 R=16 Rs=32 on the MLP), random frozen base
weights. Each head runs in its own fresh process (one after the other), so neither inherits the other's
allocator state: step time is the median of --steps steps after one warm-up; memory is the peak during a
step above what was resident before it (CPU: resident set sampled every ms; CUDA: max_memory_allocated),
and the process's peak. Both heads' first-step losses are reported (same seed, same batch, dropout off).
Writes benchmarks/results/<device>/loss_head.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402
from benchmarks.providers import models  # noqa: E402

HEADS = ("plain", "chunked")


def shapes(device: str, quick: bool, checkpointing: bool, layers: int | None = None) -> list[dict]:
    if layers:  # a cut of the CPU shape (the full 24 layers without checkpointing need ~25 GB with the plain head)
        return [dict(model="qwen2-0.5b", layers=layers, batch=4, seq=1024, checkpointing=checkpointing)]
    if quick:
        return [dict(model="tiny", layers=None, batch=2, seq=64, checkpointing=checkpointing)]
    if device == "cuda":
        return [dict(model=m, layers=layers, batch=4, seq=1024, checkpointing=checkpointing)
                for m, layers in (("qwen2-0.5b", None), ("qwen2-1.5b", None), ("qwen2-7b", 4))]
    return [dict(model="qwen2-0.5b", layers=None, batch=4, seq=1024, checkpointing=checkpointing)]


def make_batch(vocab: int, batch: int, seq: int, device) -> dict:
    """Token ids and assistant-only labels: each row's first 40-60% (its prompt) is unlabelled."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    for row, cut in enumerate(torch.randint(int(0.4 * seq), int(0.6 * seq) + 1, (batch,), generator=g).tolist()):
        labels[row, :cut] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def _peak_during(fn, device: torch.device) -> int | None:
    if device.type == "cuda":
        return harness.peak_bytes(fn, device)
    return harness.rss_growth(fn)


def run_head(head: str, shape: dict, device_name: str, dtype_name: str, steps: int) -> dict:
    """One head at one shape, in this (fresh) process."""
    from medcare import loss_head

    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    torch.manual_seed(0)
    base = models.base_model(shape["model"], shape["layers"], dtype=dtype, device=device)
    model = models.medcare_stage1(base)
    if shape["checkpointing"]:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable(**{"activation_checkpointing_kwargs" if enable.__name__.startswith("activation") else
                  "gradient_checkpointing_kwargs": {"use_reentrant": False}})
        model.enable_input_require_grads()
    if head == "chunked":
        loss_head.install(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    inputs = make_batch(base.config.vocab_size, shape["batch"], shape["seq"], device)
    model.train()  # the chunked head runs in training mode
    for m in model.modules():  # dropout off everywhere, so both heads see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    losses, times, peaks = [], [], []

    def step():
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    for i in range(steps + 1):
        t0 = time.perf_counter()
        peak = _peak_during(step, device)
        harness.sync(device)
        if i:  # the first step warms up (and allocates AdamW's state)
            times.append(time.perf_counter() - t0)
            peaks.append(peak)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(head=head, first_loss=losses[0], step_s=statistics.median(times), step_times_s=times,
                step_peak_bytes=max(p for p in peaks if p is not None) if any(p is not None for p in peaks) else None,
                process_peak_bytes=(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_peak))


def _in_fresh_process(args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_head, args)


def table(rows: list[dict]) -> str:
    out = ["| shape | head | step time | ratio | step peak memory | ratio | process peak | first-step loss |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = next(x for x in rows if x["shape"] == r["shape"] and x["head"] == "plain")
        t_ratio = r["step_s"] / p["step_s"]
        m_ratio = (r["step_peak_bytes"] / p["step_peak_bytes"]) if r["step_peak_bytes"] and p["step_peak_bytes"] \
            else float("nan")
        out.append(f"| {r['shape']} | {r['head']} | {r['step_s']:.2f} s | {t_ratio:.2f}x | "
                   f"{harness.fmt_bytes(r['step_peak_bytes'])} | {m_ratio:.2f}x | "
                   f"{harness.fmt_bytes(r['process_peak_bytes'])} | {r['first_loss']:.6f} |")
    return "\n".join(out)


def shape_name(s: dict) -> str:
    name = s["model"] + (f" ({s['layers']} layers)" if s["layers"] else "")
    return f"{name}, batch {s['batch']} x {s['seq']}" + (", grad ckpt" if s["checkpointing"] else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per head (after one warm-up step)")
    ap.add_argument("--quick", action="store_true", help="the tiny shape only (seconds)")
    ap.add_argument("--gradient_checkpointing", action="store_true",
                    help="checkpoint the decoder layers (the activations then weigh less beside the head)")
    ap.add_argument("--layers", type=int, default=None, help="the Qwen2-0.5B shape cut to this many layers")
    ap.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_loss_head: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    rows = []
    for s in shapes(args.device, args.quick, args.gradient_checkpointing, args.layers):
        for head in HEADS:
            print(f"[loss_head] {shape_name(s)}, {dtype}: {head} head ...", flush=True)
            r = _in_fresh_process((head, s, args.device, dtype, args.steps))
            rows.append({**r, "shape": shape_name(s), **{f"shape_{k}": v for k, v in s.items()}})
            print(f"  step {r['step_s']:.2f} s, step peak {harness.fmt_bytes(r['step_peak_bytes'])}, "
                  f"loss {r['first_loss']:.6f}", flush=True)
    folder = os.path.join(args.output, "quick" if args.quick else "", harness.device_slug(args.device))
    os.makedirs(folder, exist_ok=True)
    suffix = ("_ckpt" if args.gradient_checkpointing else "") + (f"_{args.layers}layers" if args.layers else "")
    with open(os.path.join(folder, f"loss_head{suffix}.json"), "w") as f:
        json.dump({"suite": "loss_head", "environment": harness.environment(), "dtype": dtype, "rows": rows}, f,
                  indent=1)
    md = (f"# Loss head: the model's own vs medcare's chunked ({dtype}, {args.device})\n\n"
          f"`{harness.environment()['command']}`\n\nA stage-1 training step (forward with assistant-only labels "
          f"on about half the positions, backward, AdamW on the adapters). Ratios are chunked / plain, measured "
          f"in this run.\n\n{table(rows)}\n")
    with open(os.path.join(folder, f"loss_head{suffix}.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
