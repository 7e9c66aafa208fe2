"""The original implementation's computation (MedCare, BlueZeros/MedCare `medcare/model/utils.py` and
`medcare/train/trainer.py`), rewritten in its style from its description:

- MoLoRA (`MoLoRALinear.molora_helper2`): the frozen bf16 base GEMM, then x cast to fp32; every routed
  expert is an fp32 nn.Linear pair run on every token; the E outputs are stacked [E, T, Dout], transposed,
  the top-k gathered, the shared expert (one LoRA of rank Rs) concatenated with weight 1, and an einsum
  combines them.
- Stage 2 (`OrthLoRALinear`): two fp32 LoRAs `base` (knowledge) and `orth` (alignment) on one dropout draw.
- The orthogonality loss (`MedCareTrainer.training_step`, copied from O-LoRA): for every parameter whose
  name holds "base." and "lora_A", a scan of all parameters for the matching "orth" lora_A, then
  |A_base A_orth^T| summed: an O(P^2) name scan and one small GEMM per pair, every step.
- Attention in stage 1 is PEFT LoRA (the original used PEFT 0.9 for q/k/v/o).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .params import LoRAParams, MLPParams, MoLoRAParams, OrthParams


def _lin(w: torch.Tensor) -> nn.Linear:
    """An fp32 bias-free nn.Linear holding a copy of w [out, in] (the original creates its adapters fp32)."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


class NaiveMoLoRA(nn.Module):
    """MoLoRA as the original computes it (dense over all experts, stack + gather + einsum, fp32 adapters)."""

    def __init__(self, base_layer: nn.Linear, router_weight, router_bias, experts: list[tuple], shared: tuple | None,
                 *, top_k: int, scaling: float):
        super().__init__()
        self.base_layer, self.top_k, self.scaling = base_layer, top_k, scaling
        self.switch = nn.Linear(router_weight.shape[1], router_weight.shape[0], device=router_weight.device)
        with torch.no_grad():
            self.switch.weight.copy_(router_weight)
            self.switch.bias.copy_(router_bias)
        self.experts = nn.ModuleList(nn.ModuleDict({"lora_A": _lin(a), "lora_B": _lin(b)}) for a, b in experts)
        self.share_experts = (nn.ModuleDict({"lora_A": _lin(shared[0]), "lora_B": _lin(shared[1])})
                              if shared is not None and shared[0].shape[0] else None)

    @classmethod
    def from_params(cls, p: MoLoRAParams) -> NaiveMoLoRA:
        base = nn.Linear(p.weight.shape[1], p.weight.shape[0], bias=False, device=p.weight.device, dtype=p.weight.dtype)
        base.weight = nn.Parameter(p.weight, requires_grad=False)
        return cls(base, p.router_weight, p.router_bias, [p.expert(e) for e in range(p.num_experts)], p.shared(),
                   top_k=p.top_k, scaling=p.scaling)

    def forward(self, x):
        y = self.base_layer(x)
        shape = x.shape
        xf = x.reshape(-1, shape[-1]).float()
        probs = torch.softmax(self.switch(xf), dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        outs = torch.stack([e["lora_B"](e["lora_A"](xf)) * self.scaling for e in self.experts])        # [E,T,Do]
        outs = outs.transpose(0, 1)
        picked = outs.gather(1, idx.unsqueeze(-1).expand(-1, -1, outs.shape[-1]))                      # [T,K,Do]
        if self.share_experts is not None:
            shared = self.share_experts["lora_B"](self.share_experts["lora_A"](xf)) * self.scaling
            picked = torch.cat([picked, shared.unsqueeze(1)], dim=1)
            w = torch.cat([w, torch.ones_like(w[:, :1])], dim=1)
        return y + torch.einsum("be,bef->bf", w, picked).reshape(*shape[:-1], -1).to(y.dtype)


class NaiveMLP(nn.Module):
    """down(silu(gate x) * up x) with the three projections as NaiveMoLoRA."""

    def __init__(self, m: MLPParams):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (NaiveMoLoRA.from_params(p) for p in m.projections())

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class NaiveOrthLoRALinear(nn.Module):
    """Stage 2 as the original: y = base(x) + s B_base A_base drop(x) + s B_orth A_orth drop(x), fp32 LoRAs."""

    def __init__(self, base_layer: nn.Linear, knowledge: tuple, alignment: tuple, *, scaling: float, dropout: float):
        super().__init__()
        self.base_layer, self.scaling = base_layer, scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.base = nn.ModuleDict({"lora_A": _lin(knowledge[0]), "lora_B": _lin(knowledge[1])})
        self.orth = nn.ModuleDict({"lora_A": _lin(alignment[0]), "lora_B": _lin(alignment[1])})

    def forward(self, x):
        y = self.base_layer(x)
        xd = self.lora_dropout(x.float())
        delta = (self.base["lora_B"](self.base["lora_A"](xd)) * self.scaling
                 + self.orth["lora_B"](self.orth["lora_A"](xd)) * self.scaling)
        return y + delta.to(y.dtype)


def lora(p: LoRAParams) -> NaiveOrthLoRALinear:
    """The stage-2 projection (adapters 'knowledge' then 'alignment')."""
    base = nn.Linear(p.weight.shape[1], p.weight.shape[0], bias=p.bias is not None, device=p.weight.device,
                     dtype=p.weight.dtype)
    base.weight = nn.Parameter(p.weight, requires_grad=False)
    if p.bias is not None:
        base.bias = nn.Parameter(p.bias, requires_grad=False)
    return NaiveOrthLoRALinear(base, p.adapter("knowledge"), p.adapter("alignment"), scaling=p.scaling,
                               dropout=p.dropout)


def orth_loss(model: nn.Module) -> torch.Tensor:
    """The original's penalty: per (base, orth) pair found by an O(P^2) scan of named_parameters()."""
    loss = 0.0
    for name, param in model.named_parameters():
        if "base." in name and "lora_A" in name:
            prefix = name.split("base.")[0]
            for name_, param_ in model.named_parameters():
                if name_.startswith(prefix + "orth") and "lora_A" in name_:
                    loss = loss + torch.abs(torch.mm(param, param_.T)).sum()
                    break
    return loss


def _put(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Place module at a dotted path under root, creating plain containers on the way."""
    *path, leaf = dotted.split(".")
    node = root
    for part in path:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


def orth_holder(o: OrthParams) -> nn.Module:
    """A module tree whose parameter names are the original's (`...mlp.gate_proj.base.lora_A.weight`), holding
    copies of the A matrices, for timing `orth_loss` without a whole model around it."""
    root = nn.Module()
    for name, a, b in zip(o.names, o.a_base, o.a_orth, strict=True):
        _put(root, name, nn.ModuleDict({"base": nn.ModuleDict({"lora_A": _lin(a)}),
                                        "orth": nn.ModuleDict({"lora_A": _lin(b)})}))
    return root


def holder_tensors(root: nn.Module, o: OrthParams) -> list[torch.Tensor]:
    """The holder's A parameters in OrthParams order (all base, then all orth), for comparing gradients."""
    mods = [root.get_submodule(n) for n in o.names]
    return [m["base"]["lora_A"].weight for m in mods] + [m["orth"]["lora_A"].weight for m in mods]
