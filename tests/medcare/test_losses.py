"""medcare.losses: the stage-2 orthogonality penalty, by value and by gradient, computed on the live
parameters (orth_loss) and inside forward (OrthPenaltyCollector)."""

from __future__ import annotations

import pytest
import torch
from pipeline_testing import (
    MLP,
    NUM_LAYERS,
    input_ids,
    one_thread,
    randomize_adapters,
    stage1_config,
    stage2_config,
    tiny_model,
)

from medcare.inject import adapter_modules, apply_stage1, apply_stage2
from medcare.layers import LoRALinear
from medcare.losses import OrthPenaltyCollector, orth_loss, orth_pairs

KR, AR = 8, 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def stage2_model(arch="qwen2", **cfg):
    model = tiny_model(arch)
    apply_stage2(model, stage2_config(rank=AR, **cfg), knowledge_rank=KR)
    randomize_adapters(model, std=0.2)
    return model


def hand_penalty(model) -> torch.Tensor:
    """sum over projections of |A_k A_a^T|.sum(), from the packed rows (knowledge first), in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for _, m in adapter_modules(model, LoRALinear):
        a = m.lora_a.detach().double()
        total = total + (a[:KR] @ a[KR:KR + AR].T).abs().sum()
    return total


def zero_grads(model):
    for p in model.parameters():
        p.grad = None


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_orth_loss_value(arch):
    torch.manual_seed(0)
    model = stage2_model(arch)
    a_base, a_orth = orth_pairs(model)
    assert len(a_base) == len(a_orth) == NUM_LAYERS * len(MLP)
    value = orth_loss(model)
    assert value.dim() == 0 and value.dtype == torch.float32
    want = hand_penalty(model)
    assert want > 1.0
    torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=0)


def test_orth_loss_gradient_matches_autograd_on_the_formula():
    torch.manual_seed(0)
    model = stage2_model()
    modules = [m for _, m in adapter_modules(model, LoRALinear)]
    leaves = [m.lora_a.detach().clone().requires_grad_(True) for m in modules]
    formula = sum((a[:KR] @ a[KR:].T).abs().sum() for a in leaves)
    formula.backward()
    orth_loss(model).backward()
    for m, leaf in zip(modules, leaves, strict=True):
        g = m.lora_a.grad
        assert g is not None and torch.count_nonzero(g[:KR]) > 0 and torch.count_nonzero(g[KR:]) > 0
        torch.testing.assert_close(g, leaf.grad, rtol=1e-5, atol=1e-6)
        # The penalty involves A only.
        assert m.lora_b.grad is None or torch.count_nonzero(m.lora_b.grad) == 0
    # Explicitly: d/dAk = sign(Ak Aa^T) Aa, d/dAa = sign(Ak Aa^T)^T Ak.
    a = modules[0].lora_a.detach()
    s = torch.sign(a[:KR] @ a[KR:].T)
    torch.testing.assert_close(modules[0].lora_a.grad[:KR], s @ a[KR:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(modules[0].lora_a.grad[KR:], s.T @ a[:KR], rtol=1e-5, atol=1e-6)


def test_a_gradient_step_on_the_penalty_lowers_it():
    torch.manual_seed(0)
    model = stage2_model()
    before = orth_loss(model)
    before.backward()
    with torch.no_grad():
        for _, m in adapter_modules(model, LoRALinear):
            m.lora_a -= 1e-3 * m.lora_a.grad
    assert orth_loss(model) < before.detach() - 1e-3


def test_orth_penalty_collector_matches_orth_loss():
    torch.manual_seed(0)
    model = stage2_model()
    model.train()
    ids = input_ids()
    with OrthPenaltyCollector(model) as collector:
        model(input_ids=ids)
        model(input_ids=ids)  # a second forward (e.g. checkpoint recomputation) must not add terms twice
    total = collector.total()
    assert len(collector.terms) == NUM_LAYERS * len(MLP)
    direct = orth_loss(model)
    torch.testing.assert_close(total, direct, rtol=1e-6, atol=0)
    modules = [m for _, m in adapter_modules(model, LoRALinear)]
    zero_grads(model)
    total.backward()
    collected = [m.lora_a.grad.clone() for m in modules]
    zero_grads(model)
    direct.backward()
    for m, g in zip(modules, collected, strict=True):
        assert torch.count_nonzero(g) > 0
        torch.testing.assert_close(g, m.lora_a.grad, rtol=1e-6, atol=1e-7)
    # The hooks are gone after the context: a later forward records nothing.
    model(input_ids=ids)
    assert len(collector.terms) == NUM_LAYERS * len(MLP)
    assert all(not m._forward_pre_hooks for m in modules)


def test_orth_penalty_collector_records_nothing_without_grad():
    torch.manual_seed(0)
    model = stage2_model()
    with OrthPenaltyCollector(model) as collector, torch.no_grad():
        model(input_ids=input_ids())
    assert collector.total() is None


def test_no_stage2_adapters_gives_none():
    torch.manual_seed(0)
    plain = tiny_model("qwen2")
    assert orth_loss(plain) is None
    stage1 = tiny_model("qwen2")
    apply_stage1(stage1, stage1_config())
    assert orth_loss(stage1) is None
    alignment_only = tiny_model("qwen2")
    apply_stage2(alignment_only, stage2_config(), knowledge_rank=0)
    assert orth_loss(alignment_only) is None
    with OrthPenaltyCollector(alignment_only) as collector:
        alignment_only(input_ids=input_ids())
    assert collector.total() is None
