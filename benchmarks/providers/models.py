"""Whole Qwen2-architecture models with random weights, adapted for stage 1 or stage 2 by each provider.

All providers of a shape share one frozen base model (a deep copy that keeps the frozen tensors by
reference), so memory holds the base weights once. medcare's model is built first with medcare.inject;
the naive providers copy its adapter values, so the three models compute the same function.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import naive_medcare, naive_peft

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

# Qwen2 shapes (the public configs); "layers" may be cut to fit a benchmark.
CONFIGS = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def base_model(name: str, layers: int | None, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A Qwen2ForCausalLM of the named shape (optionally fewer layers), random weights, all frozen."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = dict(CONFIGS[name])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = Qwen2Config(**kw, max_position_embeddings=4096, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    model.to(dtype).requires_grad_(False)
    return model


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original's (not copied)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _names(model: nn.Module, leaves: tuple[str, ...]) -> list[str]:
    return [n for n, m in model.named_modules() if n.rpartition(".")[2] in leaves and isinstance(m, nn.Linear)]


@torch.no_grad()
def randomize_b(model: nn.Module, std: float = 0.02) -> None:
    """Fresh adapters have B = 0, which hides them from the agreement check: give every lora_b values."""
    g = torch.Generator(device="cpu").manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith("lora_b"):
            p.copy_(torch.randn(p.shape, generator=g) * std)


# --------------------------------------------------------------------------------------------- medcare
def medcare_stage1(base: nn.Module) -> nn.Module:
    from medcare.config import Stage1Config
    from medcare.inject import apply_stage1

    model = shared_copy(base)
    apply_stage1(model, Stage1Config())
    randomize_b(model)
    return model


def medcare_stage2(base: nn.Module) -> nn.Module:
    from medcare.config import Stage1Config, Stage2Config, resolve_stage2
    from medcare.inject import apply_stage2

    model = shared_copy(base)
    stage1 = Stage1Config()  # the paper's stage 1: the knowledge LoRA has its shared rank (32)
    apply_stage2(model, resolve_stage2(Stage2Config(), stage1), knowledge_rank=stage1.shared_rank)
    randomize_b(model)
    return model


def medcare_penalty(model: nn.Module):
    from medcare.losses import orth_loss

    return lambda: orth_loss(model)


# --------------------------------------------------------------------------------------------- naive-peft
def peft_stage1(base: nn.Module, mc: nn.Module) -> nn.Module:
    """PEFT LoRA on q/k/v/o and on each MLP projection's shared LoRA; routed experts looped (naive_peft)."""
    from medcare.layers import MoLoRALinear

    model = shared_copy(base)
    mlp_names = _names(model, MLP)
    first = mc.get_submodule(mlp_names[0])
    assert isinstance(first, MoLoRALinear)
    attn_rank = mc.get_submodule(_names(base, ATTN)[0]).adapter_ranks["attention"]
    pm = naive_peft.wrap_molora(model, mlp_names, first.num_experts, first.expert_rank, first.top_k,
                                first.shared_rank, first.scaling,
                                extra_targets={n: (attn_rank, 2.0, 0.05) for n in ATTN})
    with torch.no_grad():
        for name in mlp_names:
            src = mc.get_submodule(name)
            pm.get_submodule("base_model.model." + name).load(
                src.router_weight, src.router_bias, [src.expert(e) for e in range(src.num_experts)], src.shared())
        _copy_attention(pm, mc, _names(base, ATTN), "default")
    return pm


def _copy_attention(pm: nn.Module, mc: nn.Module, names: list[str], adapter: str) -> None:
    for name in names:
        a, b = mc.get_submodule(name).adapter("attention")
        layer = pm.get_submodule("base_model.model." + name)
        layer.lora_A[adapter].weight.copy_(a)
        layer.lora_B[adapter].weight.copy_(b)


def peft_stage2(base: nn.Module, mc: nn.Module) -> tuple[nn.Module, list]:
    """One PEFT model with two active adapters 'knowledge' and 'alignment' on gate/up/down, and the pairs
    for the O-LoRA-style penalty loop."""
    import peft

    model = shared_copy(base)
    cfg = dict(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=list(MLP))
    pm = peft.get_peft_model(model, peft.LoraConfig(**cfg), adapter_name="knowledge")
    pm.add_adapter("alignment", peft.LoraConfig(**cfg))
    pm.base_model.set_adapter(["knowledge", "alignment"])
    naive_peft._fp32_adapters(pm)
    with torch.no_grad():
        for name in _names(base, MLP):
            src, layer = mc.get_submodule(name), pm.get_submodule("base_model.model." + name)
            for adapter in ("knowledge", "alignment"):
                a, b = src.adapter(adapter)
                layer.lora_A[adapter].weight.copy_(a)
                layer.lora_B[adapter].weight.copy_(b)
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_" in n)
    return pm, naive_peft.orth_pairs(pm)


# --------------------------------------------------------------------------------------------- naive-medcare
def original_stage1(base: nn.Module, mc: nn.Module) -> nn.Module:
    """The original's wiring: PEFT LoRA on attention first, then NaiveMoLoRA replacing each MLP projection."""
    import peft

    model = shared_copy(base)
    attn_rank = mc.get_submodule(_names(base, ATTN)[0]).adapter_ranks["attention"]
    pm = peft.get_peft_model(model, peft.LoraConfig(r=attn_rank, lora_alpha=2.0 * attn_rank, lora_dropout=0.05,
                                                    target_modules=list(ATTN)))
    naive_peft._fp32_adapters(pm)
    with torch.no_grad():
        _copy_attention(pm, mc, _names(base, ATTN), "default")
    for name in _names(base, MLP):
        src = mc.get_submodule(name)
        full = "base_model.model." + name
        parent, _, attr = full.rpartition(".")
        holder = pm.get_submodule(parent)
        mod = naive_medcare.NaiveMoLoRA(getattr(holder, attr), src.router_weight.detach(), src.router_bias.detach(),
                                        [tuple(t.detach() for t in src.expert(e)) for e in range(src.num_experts)],
                                        tuple(t.detach() for t in src.shared()), top_k=src.top_k, scaling=src.scaling)
        setattr(holder, attr, mod)
        for p in mod.parameters():
            p.requires_grad_(p is not mod.base_layer.weight and p is not mod.base_layer.bias)
    return pm


def original_stage2(base: nn.Module, mc: nn.Module) -> nn.Module:
    """The original's OrthLoRALinear on gate/up/down, fp32 'base' and 'orth' LoRAs."""
    model = shared_copy(base)
    for name in _names(base, MLP):
        src = mc.get_submodule(name)
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent)
        k = tuple(t.detach() for t in src.adapter("knowledge"))
        a = tuple(t.detach() for t in src.adapter("alignment"))
        setattr(holder, attr, naive_medcare.NaiveOrthLoRALinear(getattr(holder, attr), k, a, scaling=src.scaling,
                                                                dropout=src.dropout))
    return model
