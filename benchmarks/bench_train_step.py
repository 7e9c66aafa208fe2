"""A full training step (forward, backward, AdamW step) of stage 1 and stage 2 on Qwen2-architecture models
with random weights: tokens/s and memory, medcare vs naive-peft vs naive-medcare.

    python benchmarks/bench_train_step.py --device cpu [--quick]
    python benchmarks/bench_train_step.py --device cuda       # bf16; 0.5B, 1.5B and a 4-layer 7B shape

Stage 1: LoRA (rank 16, dropout 0.05) on q/k/v/o, MoLoRA (E=8, K=2, R=16, Rs=32) on gate/up/down.
Stage 2: knowledge + alignment LoRAs (32 + 32, dropout 0.05) on gate/up/down, loss = CE + orth penalty.
The base weights are frozen and shared by all providers' models; adapters are fp32 as in the paper. The
providers first agree on the loss and on the norm of all gradients (dropout off), then steps are timed,
interleaved. Memory: on CUDA the peak allocated during a step above what was allocated before it (the
models and optimizer states already live), plus `adapter_state_bytes` (trainable parameters + AdamW
state) in each record's extra. Writes <output>/<device>/train_step.{json,md,png}.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402
from benchmarks.providers import medcare as mc  # noqa: E402
from benchmarks.providers import models  # noqa: E402

SUITE = "train_step"
MODES = ["step"]
OPS = {"stage1": ("molora_linear", "lora_linear"), "stage2": ("lora_linear", "orth_penalty")}


def shapes(ctx: harness.Context) -> list[tuple]:
    """(model shape, layers or None for all, batch, sequence length)."""
    if ctx.quick:
        return [("tiny", None, 2, 32)]
    if ctx.device.type == "cuda":
        return [("qwen2-0.5b", None, 4, 1024), ("qwen2-1.5b", None, 4, 1024), ("qwen2-7b", 4, 4, 1024)]
    return [("qwen2-0.5b", 2, 2, 128)]


def _trainable(model) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _providers(ctx, stage: str, base) -> tuple[dict, dict]:
    """name -> (model, penalty fn or None, backend or None); and name -> why skipped."""
    if stage == "stage1":
        med = models.medcare_stage1(base)
        fns = {"naive-medcare": (models.original_stage1(base, med), None, None),
               "naive-peft": (models.peft_stage1(base, med), None, None)}
        penalty = None
    else:
        from benchmarks.providers import naive_medcare, naive_peft

        med = models.medcare_stage2(base)
        orig = models.original_stage2(base, med)
        pm, pairs = models.peft_stage2(base, med)
        fns = {"naive-medcare": (orig, lambda: naive_medcare.orth_loss(orig), None),
               "naive-peft": (pm, lambda: naive_peft.orth_loss(pairs), None)}
        penalty = models.medcare_penalty(med)
    for b in mc.backends(OPS[stage], ctx.device):
        fns[f"medcare-{b}"] = (med, penalty, b)
    skipped = {f"medcare-{b}": why for b, why in mc.missing(OPS[stage], ctx.device).items()}
    return fns, skipped


def _loss(model, penalty, backend, ids):
    with mk_backend(backend):
        loss = model(input_ids=ids, labels=ids).loss
        return loss + penalty() if penalty is not None else loss


def mk_backend(backend):
    if backend is None:
        return contextlib.nullcontext()
    import medcare_kernels as mk

    return mk.use_backend(backend)


def _agreement(ctx, fns, ids) -> tuple[dict, dict]:
    """Loss and global gradient norm of every provider with dropout off; bf16 models get a looser bound on
    the gradient norm (28 layers of bf16 activations between fp32 adapters)."""
    outs, oom = {}, {}
    for name, (model, penalty, backend) in fns.items():
        model.eval()
        params = _trainable(model)
        try:
            loss = _loss(model, penalty, backend, ids)
            loss.backward()
            norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
            outs[name] = [loss.detach().double().reshape(1), norm.reshape(1)]
        except Exception as exc:  # noqa: BLE001
            if not harness.is_oom(exc):
                raise
            oom[name] = "out of memory in the agreement check"
        finally:
            for p in params:
                p.grad = None
            model.train()
            harness.free(ctx.device)
    ref = "naive-medcare" if "naive-medcare" in outs else next(iter(outs))
    tol = harness.tolerance(ctx.dtype) * (1 if ctx.dtype == torch.float32 else 3)
    errs, bad = harness.agree(outs, ref, tol) if ref in outs else ({}, {})
    for n, e in errs.items():
        ctx.log(f"  agreement: {n} vs {ref}, relative error of loss and gradient norm {e:.1e}"
                f"{'  -> SKIPPED' if n in bad else ''}")
    return errs, {**bad, **oom}


def run_case(ctx, stage, shape_name, layers, batch, seq) -> list[harness.Record]:
    dev = ctx.device
    base = models.base_model(shape_name, layers, dtype=ctx.dtype, device=dev)
    cfg = base.config
    shape = dict(model=shape_name + (f"-{layers}layers" if layers else ""), layers=cfg.num_hidden_layers,
                 hidden=cfg.hidden_size, inter=cfg.intermediate_size, batch=batch, seq=seq, dtype=ctx.dtype_name)
    fns, skipped = _providers(ctx, stage, base)
    g = torch.Generator(device="cpu").manual_seed(2)
    pool = harness.Pool(lambda i: torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(dev), 2)
    errs, bad = _agreement(ctx, fns, pool.cur)
    skipped.update(bad)
    cases, opts = {}, {}
    for name, (model, penalty, backend) in fns.items():
        params = _trainable(model)
        opts[name] = opt = torch.optim.AdamW(params, lr=1e-5)

        def step(model=model, penalty=penalty, backend=backend, opt=opt):
            _loss(model, penalty, backend, pool.cur).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def saved(model=model, penalty=penalty, backend=backend):
            return harness.saved_bytes(lambda: _loss(model, penalty, backend, pool.cur), list(model.parameters()))

        n = sum(p.numel() for p in params)
        cases[name] = harness.Case({"step": harness.Timed(step, pool.rotate)},
                                   {"step": f"{stage} training step: forward with loss"
                                            f"{' + orth penalty' if penalty else ''}, backward, AdamW step"},
                                   saved=saved, extra={"trainable_params": n, "adapter_state_bytes": 3 * 4 * n,
                                                       "tokens": batch * seq})
    step_ctx = replace(ctx, warmup=min(ctx.warmup, 1), repeats=min(ctx.repeats, 3 if dev.type == "cuda" else 5))
    records = harness.measure(step_ctx, SUITE, stage, shape, cases, skipped=skipped, agreement=errs)
    for r in records:
        if r.median_ms:
            r.extra["tokens_per_s"] = batch * seq / (r.median_ms / 1e3)
    for n in list(skipped):  # providers skipped before a Case existed (a backend without an op)
        if n not in cases:
            records.append(harness.Record(SUITE, stage, n, shape, "step", "not run", skipped=skipped[n]))
    return records


def _guarded_case(args) -> list[harness.Record]:
    ctx, stage, shape_name, layers, batch, seq = args
    return harness.guarded(ctx, SUITE, stage, dict(model=shape_name, batch=batch, seq=seq), MODES,
                           lambda: run_case(ctx, stage, shape_name, layers, batch, seq))


def run(ctx: harness.Context) -> list[harness.Record]:
    records = []
    for shape_name, layers, batch, seq in shapes(ctx):
        for stage in ("stage1", "stage2"):
            ctx.log(f"[{SUITE}] {stage} {shape_name}{f' ({layers} layers)' if layers else ''} batch {batch} x "
                    f"seq {seq} ({ctx.dtype_name})")
            args = (ctx, stage, shape_name, layers, batch, seq)
            if ctx.device.type == "cuda":
                # Each case in a fresh process: a provider that runs out of memory (naive-medcare's [T, E, Dout]
                # stacks at the larger shapes) cannot leave memory behind that starves the cases after it
                # (seen on an H100: every case after the first out-of-memory was skipped).
                with multiprocessing.get_context("spawn").Pool(1) as pool:
                    records += pool.apply(_guarded_case, (args,))
            else:
                records += _guarded_case(args)
    return records


def main(argv=None) -> int:
    return harness.suite_main(SUITE, run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
