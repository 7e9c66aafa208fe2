"""The benchmark providers compute medcare's math (checked against medcare_kernels.reference, not only
against each other), and the agreement check rejects a provider that computes something else."""

from __future__ import annotations

import pytest
import torch

import medcare_kernels as mk
from benchmarks import bench_molora, bench_orth, bench_train_step, harness
from benchmarks.providers import base, naive_medcare, naive_peft
from benchmarks.providers import medcare as mc
from benchmarks.providers.params import LoRAParams, MLPParams, MoLoRAParams, OrthParams
from medcare_kernels import _backend

CPU = torch.device("cpu")


def _grad_inputs(p):
    for t in p.trainable():
        t.requires_grad_(True)


def test_molora_providers_match_the_reference():
    p = MoLoRAParams.random(24, 40, 4, 2, 4, 8, dtype=torch.float32, device=CPU)
    _grad_inputs(p)
    x, dy = torch.randn(16, 24), torch.randn(16, 40)
    ref = mk.reference.molora_linear(x, p.weight, None, p.router_weight, p.router_bias, p.lora_a, p.lora_b,
                                     num_experts=4, top_k=2, expert_rank=4, scaling=2.0)
    nm = naive_medcare.NaiveMoLoRA.from_params(p)
    pm, peft_fn = naive_peft.molora(p)
    fns = {"ref": (lambda x: ref, []), "naive-medcare": (nm, []), "naive-peft": (peft_fn, []),
           "medcare-torch": (mc.molora(p, "torch"), [])}
    outs = {n: [f(x).detach()] for n, (f, _) in fns.items()}
    errs, bad = harness.agree(outs, "ref", 1e-5)
    assert not bad and set(errs) == {"naive-medcare", "naive-peft", "medcare-torch"}
    # the gradient of x also agrees, and the base provider is the frozen projection
    got = harness.autograd_outputs({n: fns[n] for n in ("naive-medcare", "naive-peft", "medcare-torch")}, x, dy)
    assert not harness.agree(got, "naive-medcare", 1e-5)[1]
    torch.testing.assert_close(base.molora(p)(x), x @ p.weight.T)


def test_mlp_block_providers_agree():
    m = MLPParams.random(16, 40, 4, 2, 4, 8, dtype=torch.float32, device=CPU)
    x, dy = torch.randn(8, 16), torch.randn(8, 16)
    nm = naive_medcare.NaiveMLP(m)
    _, peft_block = naive_peft.mlp(m)
    fns = {"naive-medcare": (nm, []), "naive-peft": (peft_block, []), "medcare-torch": (mc.mlp(m, "torch"), [])}
    errs, bad = harness.agree(harness.autograd_outputs(fns, x, dy), "naive-medcare", 1e-5)
    assert not bad and len(errs) == 2


@pytest.mark.skipif(not _backend._runs_on("triton", CPU) or "molora_gate_up" not in _backend._registry["triton"],
                    reason="the triton backend does not run on CPU tensors here (no TRITON_INTERPRET=1)")
def test_mlp_block_gate_up_provider_agrees():
    """medcare-triton-gateup (under the interpreter here) computes the block the other providers do."""
    m = MLPParams.random(16, 40, 4, 2, 4, 8, dtype=torch.float32, device=CPU)
    x, dy = torch.randn(8, 16), torch.randn(8, 16)
    fns = {"naive-medcare": (naive_medcare.NaiveMLP(m), []), "medcare-torch": (mc.mlp(m, "torch"), []),
           "medcare-triton-gateup": (mc.mlp_gate_up(m, "triton"), [])}
    errs, bad = harness.agree(harness.autograd_outputs(fns, x, dy), "naive-medcare", harness.tolerance(torch.float32))
    assert not bad and set(errs) == {"medcare-torch", "medcare-triton-gateup"}


def test_mlp_block_lists_the_gate_up_provider_where_triton_runs(monkeypatch):
    """bench_molora's MLP block times medcare-triton-gateup next to medcare-triton exactly where the triton
    backend runs natively (never under the interpreter, so not on CPU)."""
    ctx = harness.Context(CPU, torch.float32, quick=True, warmup=0, repeats=1)
    m = MLPParams.random(16, 40, 4, 2, 4, 8, dtype=torch.float32, device=CPU)
    assert "medcare-triton-gateup" not in bench_molora._providers(ctx, m, "mlp-block")
    monkeypatch.setattr(mc, "backends", lambda ops, device: ["torch", "triton"])
    names = list(bench_molora._providers(ctx, m, "mlp-block"))
    assert names.index("medcare-triton-gateup") == names.index("medcare-triton") + 1
    assert "medcare-triton-gateup" not in bench_molora._providers(ctx, MoLoRAParams.random(
        16, 40, 4, 2, 4, 8, dtype=torch.float32, device=CPU), "projection")


def test_stage2_lora_providers_match_the_reference():
    p = LoRAParams.random(24, 40, {"knowledge": 8, "alignment": 8}, dtype=torch.float32, device=CPU, bias=True,
                          dropout=0.05)
    x = torch.randn(10, 24)
    ref = mk.reference.lora_linear(x, p.weight, p.bias, p.lora_a, p.lora_b, scaling=2.0)
    pm, layer = naive_peft.lora(p)
    outs = {"ref": [ref], "naive-medcare": [naive_medcare.lora(p).eval()(x)], "naive-peft": [pm.eval() and layer(x)],
            "medcare-torch": [mc.lora(p, "torch", dropout=0.0)(x)]}
    errs, bad = harness.agree(outs, "ref", 1e-5)
    assert not bad, bad


def test_orth_providers_match_the_reference():
    o = OrthParams.random(2, 16, 40, 4, device=CPU)
    want = mk.reference.orth_penalty(o.a_base, o.a_orth)
    holder = naive_medcare.orth_holder(o)
    pairs = list(zip(o.a_base, o.a_orth, strict=True))
    torch.testing.assert_close(naive_medcare.orth_loss(holder), want)
    torch.testing.assert_close(naive_peft.orth_loss(pairs), want)
    torch.testing.assert_close(mc.orth(o, "torch")(), want)
    # the holder's names are the original's, so its name scan finds every pair and only those
    names = [n for n, _ in holder.named_parameters()]
    assert "model.layers.1.mlp.down_proj.base.lora_A.weight" in names and len(names) == 2 * len(o.names)


def test_agreement_rejects_a_wrong_provider():
    p = MoLoRAParams.random(24, 40, 4, 2, 4, 8, dtype=torch.float32, device=CPU)
    x = torch.randn(16, 24)
    wrong = MoLoRAParams(**{**p.__dict__, "scaling": 1.0})        # half the adapter contribution
    outs = {"naive-medcare": [naive_medcare.NaiveMoLoRA.from_params(p)(x)],
            "medcare-torch": [mc.molora(p, "torch")(x)], "bad": [mc.molora(wrong, "torch")(x)],
            "nan": [torch.full((16, 40), float("nan"))]}
    errs, bad = harness.agree(outs, "naive-medcare", harness.tolerance(torch.float32))
    assert set(bad) == {"bad", "nan"} and errs["medcare-torch"] < 1e-5


def test_orth_case_agrees_and_times_every_provider():
    ctx = harness.Context(CPU, torch.float32, quick=True, warmup=0, repeats=1)
    built = {f"medcare-{b}" for b in mc.backends(("orth_penalty",), CPU)}   # torch, and ext where it is compiled
    assert "medcare-torch" in built
    for dtype, tol in [("float32", 1e-5), ("bfloat16", 3e-2)]:
        recs = bench_orth.run_case(ctx, "tiny", 2, 16, 40, 4, dtype)
        assert {r.provider for r in recs} == {"naive-medcare", "naive-peft"} | built
        assert all(r.skipped is None and r.median_ms > 0 and r.extra["agreement_rel_err"] < tol
                   for r in recs if r.provider != "naive-medcare")
        # The header states the least traffic: 2 layers x 3 pairs of [4, 16|16|40] A's, 2 bytes or 4 each.
        a_bytes = 2 * 2 * 4 * (16 + 16 + 40) * (4 if dtype == "float32" else 2)
        assert recs[0].shape["traffic"] == f"{harness.fmt_bytes(a_bytes)}/{harness.fmt_bytes(3 * a_bytes)}"


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_train_step_models_agree(stage):
    """medcare, the PEFT build and the original's build of one tiny Qwen2 give the same loss and gradients."""
    ctx = harness.Context(CPU, torch.float32, quick=True, warmup=0, repeats=1)
    base_model = bench_train_step.models.base_model("tiny", None, dtype=torch.float32, device=CPU)
    fns, skipped = bench_train_step._providers(ctx, stage, base_model)
    ids = torch.randint(0, 512, (2, 16))
    errs, bad = bench_train_step._agreement(ctx, fns, ids)
    # A compiled ext backend has only route_topk/orth_penalty: it is left out of a stage it cannot run alone.
    assert not bad and all(why.startswith("backend ") for why in skipped.values())
    assert set(errs) == {"naive-peft"} | {f"medcare-{b}" for b in mc.backends(bench_train_step.OPS[stage], CPU)}
    assert max(errs.values()) < 1e-5
    # the naive models really carry the adapters: their trainable parameter counts equal medcare's
    counts = {n: sum(p.numel() for p in bench_train_step._trainable(m)) for n, (m, _, _) in fns.items()}
    assert len(set(counts.values())) == 1, counts
    # the frozen base weights are shared, not copied
    emb = base_model.get_input_embeddings().weight
    for model, _, _ in fns.values():
        assert any(p is emb for p in model.parameters())
