"""What a careful user writes with PEFT (huggingface/peft) for the same two stages:

- LoRA layers are PEFT's `lora.Linear` (adapters in fp32, PEFT's default `autocast_adapter_dtype`).
- Stage 1 MLP: the shared LoRA (knowledge aggregator) is a PEFT LoRA on the frozen projection; the routed
  experts are PEFT-style A/B nn.Linear pairs (fp32) run in a Python loop over experts, each on the tokens
  routed to it only (per-expert token gather, then index_add into the output), as MixLoRA / MoE-PEFT do.
- Stage 2: one PEFT model with two active adapters, "knowledge" and "alignment" (each its own dropout
  draw, as PEFT does), and an O-LoRA-style penalty: a Python loop over the (knowledge A, alignment A) pairs,
  matched by name once, one GEMM + abs + sum per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .params import LoRAParams, MLPParams, MoLoRAParams


def _peft():
    import peft

    return peft


class PeftMoLoRA(nn.Module):
    """y = shared(x) + sum over routed experts of w * s * B_e A_e x, the experts looped over in Python.
    `shared` starts as the frozen nn.Linear; PEFT then wraps it with the shared LoRA."""

    def __init__(self, base_layer: nn.Linear, num_experts: int, expert_rank: int, top_k: int, scaling: float):
        super().__init__()
        d_in, d_out, dev = base_layer.in_features, base_layer.out_features, base_layer.weight.device
        self.shared, self.top_k, self.scaling = base_layer, top_k, scaling
        self.router = nn.Linear(d_in, num_experts, device=dev, dtype=torch.float32)
        self.experts_a = nn.ModuleList(nn.Linear(d_in, expert_rank, bias=False, device=dev) for _ in range(num_experts))
        self.experts_b = nn.ModuleList(nn.Linear(expert_rank, d_out, bias=False, device=dev)
                                       for _ in range(num_experts))

    def forward(self, x):
        y = self.shared(x)
        shape = x.shape
        xf = x.reshape(-1, shape[-1]).to(self.router.weight.dtype)
        w, idx = torch.topk(torch.softmax(self.router(xf), dim=-1), self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros(xf.shape[0], y.shape[-1], device=xf.device, dtype=xf.dtype)
        for e, (a, b) in enumerate(zip(self.experts_a, self.experts_b, strict=True)):
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            ye = b(a(xf[tok])) * (self.scaling * w[tok, slot].unsqueeze(-1))
            out = out.index_add(0, tok, ye)
        return y + out.reshape(*shape[:-1], -1).to(y.dtype)

    @torch.no_grad()
    def load(self, router_weight, router_bias, experts: list[tuple], shared: tuple | None) -> None:
        """Copy the router, the experts and (if PEFT wrapped `shared`) the shared LoRA from packed tensors."""
        self.router.weight.copy_(router_weight)
        self.router.bias.copy_(router_bias)
        for (a, b), la, lb in zip(experts, self.experts_a, self.experts_b, strict=True):
            la.weight.copy_(a)
            lb.weight.copy_(b)
        if shared is not None and shared[0].shape[0]:
            self.shared.lora_A["default"].weight.copy_(shared[0])
            self.shared.lora_B["default"].weight.copy_(shared[1])

    def trainable(self) -> list[nn.Parameter]:
        return [*self.router.parameters(), *self.experts_a.parameters(), *self.experts_b.parameters()]


def _fp32_adapters(model: nn.Module) -> None:
    """PEFT's autocast_adapter_dtype: adapter weights in fp32 whatever the base dtype (any PEFT version)."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()


def _frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def wrap_molora(root: nn.Module, names: list[str], E: int, R: int, K: int, Rs: int, scaling: float,
                extra_targets: dict[str, tuple[int, float, float]] | None = None) -> nn.Module:
    """Replace each nn.Linear at `names` (dotted paths under root) by a PeftMoLoRA, then let PEFT put the
    shared LoRA (rank Rs, no dropout) on every `.shared` and a LoRA on each `extra_targets` leaf name
    (name -> (rank, scaling, dropout)). Returns the PEFT model."""
    peft = _peft()
    for name in names:
        parent, _, attr = name.rpartition(".")
        holder = root.get_submodule(parent) if parent else root
        setattr(holder, attr, PeftMoLoRA(getattr(holder, attr), E, R, K, scaling))
    extra = extra_targets or {}
    targets = list(extra) + (["shared"] if Rs else [])
    if not targets:
        return root
    first = next(iter(extra.values()), (Rs, scaling, 0.0))
    ranks = {k: v[0] for k, v in extra.items()} | ({"shared": Rs} if Rs else {})
    alphas = {k: v[0] * v[1] for k, v in extra.items()} | ({"shared": Rs * scaling} if Rs else {})
    cfg = peft.LoraConfig(r=first[0], lora_alpha=first[0] * first[1], lora_dropout=first[2], target_modules=targets,
                          rank_pattern=ranks, alpha_pattern=alphas)
    model = peft.get_peft_model(root, cfg)
    _fp32_adapters(model)
    for name, module in model.named_modules():
        if name.endswith(".shared") and hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = nn.Identity()        # the paper: no dropout on MLP adapters
        if isinstance(module, PeftMoLoRA):
            for p in module.trainable():
                p.requires_grad_(True)
    return model


class _Holder(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for k, v in children.items():
            self.add_module(k, v)


def molora(p: MoLoRAParams) -> tuple[nn.Module, PeftMoLoRA]:
    """One MoLoRA projection: (the PEFT model holding it, the PeftMoLoRA to call)."""
    root = _Holder(proj=_frozen_linear(p.weight))
    model = wrap_molora(root, ["proj"], p.num_experts, p.expert_rank, p.top_k, p.shared_rank, p.scaling)
    module = model.get_submodule("base_model.model.proj" if model is not root else "proj")
    module.load(p.router_weight, p.router_bias, [p.expert(e) for e in range(p.num_experts)], p.shared())
    return model, module


def mlp(m: MLPParams) -> tuple[nn.Module, nn.Module]:
    """The MLP block with each projection a PeftMoLoRA: (PEFT model, callable block)."""
    g = m.gate
    root = _Holder(gate_proj=_frozen_linear(g.weight), up_proj=_frozen_linear(m.up.weight),
                   down_proj=_frozen_linear(m.down.weight))
    model = wrap_molora(root, ["gate_proj", "up_proj", "down_proj"], g.num_experts, g.expert_rank, g.top_k,
                        g.shared_rank, g.scaling)
    inner = model.get_submodule("base_model.model") if model is not root else root
    for name, p in zip(("gate_proj", "up_proj", "down_proj"), m.projections(), strict=True):
        getattr(inner, name).load(p.router_weight, p.router_bias, [p.expert(e) for e in range(p.num_experts)],
                                  p.shared())

    def block(x):
        return inner.down_proj(F.silu(inner.gate_proj(x)) * inner.up_proj(x))

    return model, block


def lora(p: LoRAParams) -> tuple[nn.Module, nn.Module]:
    """A projection with PEFT LoRAs, one PEFT adapter per named adapter of p, all active."""
    peft = _peft()
    root = _Holder(proj=_frozen_linear(p.weight, p.bias))
    names = list(p.ranks)
    model = None
    for name in names:
        r = p.ranks[name]
        cfg = peft.LoraConfig(r=r, lora_alpha=r * p.scaling, lora_dropout=p.dropout, target_modules=["proj"])
        if model is None:
            model = peft.get_peft_model(root, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    model.base_model.set_adapter(names)
    _fp32_adapters(model)
    layer = model.get_submodule("base_model.model.proj")
    with torch.no_grad():
        for name in names:
            a, b = p.adapter(name)
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model, layer


def orth_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The O-LoRA penalty as a per-pair Python loop: sum_i sum |A_k,i A_a,i^T|."""
    loss = 0.0
    for a_k, a_a in pairs:
        loss = loss + torch.abs(torch.mm(a_k, a_a.T)).sum()
    return loss


def orth_pairs(model: nn.Module, base: str = "knowledge", new: str = "alignment") -> list[tuple]:
    """(knowledge A, alignment A) of every PEFT LoRA layer holding both adapters, matched once by name."""
    pairs = []
    for _, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and base in lora_a and new in lora_a:
            pairs.append((lora_a[base].weight, lora_a[new].weight))
    return pairs
