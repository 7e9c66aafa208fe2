"""medcare.inject: which modules are replaced, what trains, that fresh adapters are the identity, refusals,
stage 2's packing and freezing, and train/eval mode preservation, on tiny Qwen2 and Llama models."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from pipeline_testing import (
    ATTN,
    HIDDEN,
    MLP,
    NUM_LAYERS,
    input_ids,
    logits,
    one_thread,
    randomize_adapters,
    stage1_config,
    stage2_config,
    tiny_model,
)
from torch import nn

import medcare_kernels as mk
from medcare.inject import InjectionError, adapter_modules, apply_stage1, apply_stage2
from medcare.layers import LoRALinear, MoLoRALinear, gate_up_forward, gate_up_fusable
from medcare_kernels import _backend

ARCH_IDS = ["qwen2", "llama"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def expected_names(targets) -> set[str]:
    out = set()
    for i in range(NUM_LAYERS):
        for t in targets:
            out.add(f"model.layers.{i}.{'self_attn' if t in ATTN else 'mlp'}.{t}")
    return out


@pytest.mark.parametrize("arch", ARCH_IDS)
def test_stage1_replaces_exactly_the_projections(arch):
    torch.manual_seed(0)
    model = tiny_model(arch)
    linears_before = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = apply_stage1(model, stage1_config())
    lora = {n for n, _ in adapter_modules(model, LoRALinear)}
    molora = {n for n, _ in adapter_modules(model, MoLoRALinear)}
    assert lora == expected_names(ATTN)
    assert molora == expected_names(MLP)
    assert report.replaced == {t: NUM_LAYERS for t in ATTN + MLP}
    for name, module in adapter_modules(model):
        assert type(module.base_layer) is nn.Linear
        leaf = name.rsplit(".", 1)[1]
        if leaf in MLP:
            assert (module.num_experts, module.top_k, module.expert_rank, module.shared_rank) == (4, 2, 4, 8)
            assert module.scaling == 2.0
        else:
            assert module.adapter_ranks == {"attention": 4} and module.scaling == 2.0
    # Nothing else changed: every other nn.Linear (lm_head) is where it was, unwrapped; and the wrapped
    # base layers are the original Linear modules (now one level down).
    linears_after = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    replaced = expected_names(ATTN + MLP)
    assert linears_after == (linears_before - replaced) | {f"{n}.base_layer" for n in replaced}
    assert type(model.lm_head) is nn.Linear
    # The class is untouched (modules replaced on the instance, never patched on the class).
    assert type(tiny_model(arch).model.layers[0].mlp.gate_proj) is nn.Linear


@pytest.mark.parametrize("arch", ARCH_IDS)
def test_stage1_trains_exactly_the_adapters_and_routers(arch):
    torch.manual_seed(0)
    model = tiny_model(arch)
    report = apply_stage1(model, stage1_config())
    want = set()
    for n in expected_names(ATTN):
        want |= {f"{n}.lora_a", f"{n}.lora_b"}
    for n in expected_names(MLP):
        want |= {f"{n}.lora_a", f"{n}.lora_b", f"{n}.router_weight", f"{n}.router_bias"}
    got = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == want
    params = dict(model.named_parameters())
    assert report.trainable == sum(params[n].numel() for n in want)
    assert report.total == sum(p.numel() for p in model.parameters())
    assert 0 < report.trainable < report.total


@pytest.mark.parametrize("arch", ARCH_IDS)
def test_fresh_stage1_adapters_leave_logits_unchanged(arch):
    torch.manual_seed(0)
    model = tiny_model(arch)
    plain = copy.deepcopy(model)
    ids = input_ids()
    apply_stage1(model, stage1_config(attn_dropout=0.05))
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-6)
    # ... and a non-trivial adapter does change them (the comparison above can fail).
    randomize_adapters(model)
    assert (logits(model, ids) - logits(plain, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCH_IDS)
def test_fresh_stage2_adapters_leave_logits_unchanged(arch):
    torch.manual_seed(0)
    model = tiny_model(arch)
    plain = copy.deepcopy(model)
    ids = input_ids()
    apply_stage2(model, stage2_config(), knowledge_rank=8)
    # The knowledge slot is at its fresh init (B = 0) until the transition fills it.
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-6)


class AttentionOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(8, 8), nn.Linear(8, 8)
        self.v_proj, self.o_proj = nn.Linear(8, 8), nn.Linear(8, 8)


class NoTargets(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn, self.c_fc = nn.Linear(8, 24), nn.Linear(8, 32)


def test_model_without_targets_is_refused():
    torch.manual_seed(0)
    with pytest.raises(InjectionError, match="gate_proj"):
        apply_stage1(NoTargets(), stage1_config())
    with pytest.raises(InjectionError, match="gate_proj"):
        apply_stage2(NoTargets(), stage2_config(), knowledge_rank=8)


def test_missing_mlp_targets_named_in_the_error():
    torch.manual_seed(0)
    with pytest.raises(InjectionError) as exc:
        apply_stage1(AttentionOnly(), stage1_config())
    assert "gate_proj" in str(exc.value) and "up_proj" in str(exc.value) and "down_proj" in str(exc.value)
    assert "q_proj" not in str(exc.value).split("named", 1)[1].split(";")[0]


def test_refused_injection_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = AttentionOnly()
    with pytest.raises(InjectionError):
        apply_stage1(model, stage1_config())
    assert not list(adapter_modules(model))
    assert type(model.q_proj) is nn.Linear


@pytest.mark.parametrize("second", ["stage1", "stage2"])
def test_injecting_twice_is_refused(second):
    torch.manual_seed(0)
    model = tiny_model("qwen2")
    apply_stage1(model, stage1_config())
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(InjectionError, match="already"):
        if second == "stage1":
            apply_stage1(model, stage1_config())
        else:
            apply_stage2(model, stage2_config(), knowledge_rank=8)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_stage2_after_stage2_is_refused():
    torch.manual_seed(0)
    model = tiny_model("llama")
    apply_stage2(model, stage2_config(), knowledge_rank=8)
    with pytest.raises(InjectionError):
        apply_stage2(model, stage2_config(), knowledge_rank=8)


@pytest.mark.parametrize("arch", ARCH_IDS)
def test_stage2_packs_knowledge_then_alignment(arch):
    torch.manual_seed(0)
    model = tiny_model(arch)
    report = apply_stage2(model, stage2_config(rank=6, scaling=2.0, dropout=0.05), knowledge_rank=8)
    assert report.replaced == {t: NUM_LAYERS for t in MLP}
    modules = dict(adapter_modules(model))
    assert set(modules) == expected_names(MLP)
    for m in modules.values():
        assert type(m) is LoRALinear
        assert list(m.adapter_ranks.items()) == [("knowledge", 8), ("alignment", 6)]
        assert m.lora_a.shape == (14, m.base_layer.in_features) and m.lora_b.shape == (m.base_layer.out_features, 14)
        assert m.adapter_slice("knowledge") == slice(0, 8) and m.adapter_slice("alignment") == slice(8, 14)
        assert m.scaling == 2.0 and m.dropout == 0.05
        assert torch.count_nonzero(m.lora_b) == 0
    for i in range(NUM_LAYERS):
        for t in ATTN:
            assert type(getattr(model.model.layers[i].self_attn, t)) is nn.Linear
    got = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == {f"{n}.{p}" for n in expected_names(MLP) for p in ("lora_a", "lora_b")}


def test_stage2_without_knowledge_has_alignment_only():
    torch.manual_seed(0)
    model = tiny_model("qwen2")
    apply_stage2(model, stage2_config(rank=6), knowledge_rank=0)
    modules = dict(adapter_modules(model))
    assert set(modules) == expected_names(MLP)  # the loop below checks every MLP projection, not none
    for m in modules.values():
        assert list(m.adapter_ranks.items()) == [("alignment", 6)]


def _grads_after_backward(model):
    ids = input_ids()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return {n: m for n, m in adapter_modules(model)}


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_knowledge_freezes_the_knowledge_slice_only(freeze):
    torch.manual_seed(0)
    model = tiny_model("qwen2")
    apply_stage2(model, stage2_config(freeze_knowledge=freeze), knowledge_rank=8)
    randomize_adapters(model)
    modules = _grads_after_backward(model)
    assert set(modules) == expected_names(MLP)
    for name, m in modules.items():
        ga, gb = m.lora_a.grad, m.lora_b.grad
        knowledge_zero = torch.count_nonzero(ga[:8]) == 0 and torch.count_nonzero(gb[:, :8]) == 0
        assert knowledge_zero == freeze, name
        assert torch.count_nonzero(ga[8:]) > 0 and torch.count_nonzero(gb[:, 8:]) > 0, name
    # The parameters stay trainable (the optimizer sees them); only their knowledge rows are masked.
    assert all(m.lora_a.requires_grad and m.lora_b.requires_grad for m in modules.values())


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("training", [False, True])
def test_injection_keeps_the_models_mode(stage, training):
    torch.manual_seed(0)
    model = tiny_model("qwen2")
    model.train(training)
    if stage == 1:
        apply_stage1(model, stage1_config(attn_dropout=0.5))
    else:
        apply_stage2(model, stage2_config(dropout=0.5), knowledge_rank=8)
    assert all(m.training == training for m in model.modules())
    if not training:
        randomize_adapters(model)
        ids = input_ids()
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------- fused gate+up path
TRITON_ON_CPU = _backend._runs_on("triton", torch.device("cpu")) and "molora_gate_up" in _backend._registry["triton"]


def _count_gate_up_calls(monkeypatch) -> list:
    calls = []
    real = mk.molora_gate_up

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mk, "molora_gate_up", counting)
    return calls


def _unfused(model):
    """The same model with every MLP back on its class's forward (what stage 1 did before the fused path)."""
    for _, module in model.named_modules():
        if "forward" in vars(module):
            del module.forward
    return model


@pytest.mark.parametrize("arch", ARCH_IDS)
def test_stage1_routes_mlps_through_gate_up_and_keeps_state_dict_and_classes(arch):
    torch.manual_seed(0)
    model = tiny_model(arch)
    apply_stage1(model, stage1_config())
    mlps = [layer.mlp for layer in model.model.layers]
    assert all(isinstance(m.forward, functools.partial) and m.forward.func is gate_up_forward for m in mlps)
    assert type(mlps[0]) is type(tiny_model(arch).model.layers[0].mlp)    # the class is untouched
    plain = _unfused(copy.deepcopy(model))
    assert list(model.state_dict()) == list(plain.state_dict())
    # deepcopy keeps the path pointing at the copy's own MLP, not the original's
    twin = copy.deepcopy(model)
    assert all(m.forward.args[0] is m for m in (layer.mlp for layer in twin.model.layers))


@pytest.mark.skipif(not TRITON_ON_CPU, reason="the triton backend does not run on CPU tensors here")
@pytest.mark.parametrize("arch", ARCH_IDS)
def test_gate_up_path_matches_module_calls_on_triton(arch, monkeypatch):
    """On the triton backend stage-1 MLPs run gate+up as one molora_gate_up call, with the outputs, gradients
    and routing-hook reports of calling the two modules."""
    torch.manual_seed(0)
    fused = tiny_model(arch)
    apply_stage1(fused, stage1_config())
    randomize_adapters(fused)
    plain = _unfused(copy.deepcopy(fused))
    ids = input_ids()
    calls = _count_gate_up_calls(monkeypatch)
    results = []
    for model in (fused, plain):
        seen = []
        for _, m in adapter_modules(model, MoLoRALinear):
            m.register_routing_hook(lambda mod, x, idx, seen=seen: seen.append(idx.clone()))
        model.train()
        with mk.use_backend("triton"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, seen))
    assert len(calls) == NUM_LAYERS                                         # fused: once per MLP; plain: never
    (loss_f, grads_f, seen_f), (loss_p, grads_p, seen_p) = results
    torch.testing.assert_close(loss_f, loss_p)
    # every trainable tensor: A and B of each attention LoRA; A, B, router weight and bias of each MoLoRA
    assert grads_f.keys() == grads_p.keys() and len(grads_f) == (2 * len(ATTN) + 4 * len(MLP)) * NUM_LAYERS
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], msg=name)
    assert len(seen_f) == len(seen_p) == 3 * NUM_LAYERS and all(torch.equal(a, b) for a, b in zip(seen_f, seen_p))


def test_gate_up_path_falls_back_to_the_module_calls(monkeypatch):
    """Elsewhere the MLP's own forward runs: the torch backend, a merged projection, hooks on a projection."""
    torch.manual_seed(0)
    model = tiny_model("qwen2")
    apply_stage1(model, stage1_config())
    randomize_adapters(model)
    ids = input_ids()
    want = logits(_unfused(copy.deepcopy(model)), ids)
    calls = _count_gate_up_calls(monkeypatch)
    with mk.use_backend("torch"):
        torch.testing.assert_close(logits(model, ids), want)
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, HIDDEN)
    hooked = []
    handle = mlp.gate_proj.register_forward_hook(lambda *a: hooked.append(1))
    assert not gate_up_fusable(mlp.gate_proj, mlp.up_proj, x)
    mlp(x)
    assert hooked == [1]
    handle.remove()
    mlp.up_proj.merge()
    assert not gate_up_fusable(mlp.gate_proj, mlp.up_proj, x)
    mlp.up_proj.unmerge()
    with mk.use_backend("torch"):
        assert not gate_up_fusable(mlp.gate_proj, mlp.up_proj, x)
    assert calls == []
