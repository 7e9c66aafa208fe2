"""Loss terms the trainer adds explicitly (never hidden in a model's forward).

orth_loss: the stage-2 orthogonality penalty sum_{layers, projections} sum_ij |A_knowledge A_alignment^T|_ij,
one batched medcare_kernels.orth_penalty call over every stage-2 projection. It is computed on the live
parameters, so it has a real gradient (the original implementation computed it on detached DeepSpeed copies).

Under parameter sharding (FSDP, DeepSpeed ZeRO-3) parameters are only whole inside their module's forward;
there `OrthPenaltyCollector` records each projection's term during forward and the trainer sums them.

load_balance_loss: the optional stage-1 load-balancing term (off by default: the paper has none), the
Switch-Transformer form E * sum_e f_e P_e per MoLoRA projection, f_e the share of routed slots expert e got
(from the kernel's own routing decision, no gradient) and P_e its mean router probability (the gradient
path). It is 1 when routing is uniform and grows to E/K when every token picks the same K experts.
`LoadBalanceCollector` gathers it from every projection during a forward, padding excluded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import medcare_kernels as mk

from .inject import adapter_modules
from .layers import LoRALinear, MoLoRALinear


def orth_pairs(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(A_knowledge views, A_alignment views) of every stage-2 projection that has both adapters."""
    a_base, a_orth = [], []
    for _, module in adapter_modules(model, LoRALinear):
        if "knowledge" in module.adapter_ranks and "alignment" in module.adapter_ranks:
            a_base.append(module.adapter("knowledge")[0])
            a_orth.append(module.adapter("alignment")[0])
    return a_base, a_orth


def orth_loss(model: nn.Module) -> torch.Tensor | None:
    """The penalty over all stage-2 projections (fp32 scalar), or None when the model has none."""
    a_base, a_orth = orth_pairs(model)
    if not a_base:
        return None
    return mk.orth_penalty(a_base, a_orth)


class OrthPenaltyCollector:
    """Computes each projection's penalty inside its forward (where sharded parameters are gathered).

    Use as a context manager around the model's forward; `total()` is the same value, with the same
    gradient, as orth_loss(model) on unsharded parameters. Only the first forward of each module per
    context counts, so gradient-checkpointing recomputation does not add terms twice.
    """

    def __init__(self, model: nn.Module):
        self.modules = [m for _, m in adapter_modules(model, LoRALinear)
                        if "knowledge" in m.adapter_ranks and "alignment" in m.adapter_ranks]
        self.terms: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, module: LoRALinear, args) -> None:
        if id(module) not in self.terms and torch.is_grad_enabled():
            self.terms[id(module)] = mk.orth_penalty([module.adapter("knowledge")[0]], [module.adapter("alignment")[0]])

    def __enter__(self) -> OrthPenaltyCollector:
        self.terms.clear()
        self._handles = [m.register_forward_pre_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def total(self) -> torch.Tensor | None:
        return torch.stack(list(self.terms.values())).sum() if self.terms else None


# ------------------------------------------------------------------------------ stage-1 load balancing
class TokenMask:
    """The attention_mask of the model's current forward, for routing hooks deep inside it.

    A MoLoRA projection sees padded positions too and has no mask of its own; a forward pre-hook on the
    whole model remembers the mask the caller passed (HF Trainer: `attention_mask` of the collated batch),
    and `for_tokens` hands it to a projection whose token grid matches (batch x sequence). `calls` counts
    model forwards, so a hook can tell a new micro-batch from gradient-checkpointing recomputation.
    """

    def __init__(self, model: nn.Module):
        self.mask: torch.Tensor | None = None
        self.calls = 0
        self._handle = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def _pre_forward(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.calls += 1

    def for_tokens(self, lead_shape: torch.Size) -> torch.Tensor | None:
        """The mask flattened to [T] (1 = real token) when it fits a projection input of leading shape
        `lead_shape`, else None (count every position: no mask given, or a layout it does not describe)."""
        if self.mask is None or tuple(self.mask.shape) != tuple(lead_shape):
            return None
        return self.mask.reshape(-1)

    def remove(self) -> None:
        self._handle.remove()


def load_balance_loss(logits: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e P_e over the tokens with mask 1 (all when mask is None), an fp32 (fp64 for fp64 logits) scalar.

    Args:
        logits: router logits [T, E] (differentiable: the gradient reaches the router through P).
        indices: the experts each token was routed to [T, K] (the kernel's decision; no gradient).
        mask: [T], 1 for tokens that count, 0 for padding.
    """
    num_experts, top_k = logits.shape[-1], indices.shape[-1]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    probs = torch.softmax(logits.to(dtype), dim=-1)
    kw = dict(device=probs.device, dtype=dtype)
    m = torch.ones(probs.shape[0], **kw) if mask is None else mask.to(**kw)
    n = m.sum().clamp_min(1.0)
    mean_prob = (probs * m[:, None]).sum(0) / n                                          # P_e
    slots = torch.zeros(num_experts, **kw).index_add_(0, indices.reshape(-1).to(probs.device),
                                                      m.repeat_interleave(top_k))
    share = slots / (n * top_k)                                                         # f_e
    return num_experts * (share * mean_prob).sum()


class LoadBalanceCollector:
    """Collects load_balance_loss from every MoLoRA projection during a forward (a context manager around
    it); `total()` is their mean. The router logits are recomputed from the projection's input (an [E, Din]
    GEMM, in the input's dtype: the routing decision itself stays the kernel's fp32 one), the selected
    experts are the kernel's. Only the first forward of each projection per context counts (gradient
    checkpointing recomputes), and only while gradients are enabled."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.terms: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._mask: TokenMask | None = None

    def _hook(self, module: MoLoRALinear, x: torch.Tensor, indices: torch.Tensor) -> None:
        if id(module) in self.terms or not torch.is_grad_enabled() or not module.training:
            return
        x2 = x.reshape(-1, x.shape[-1])
        bias = None if module.router_bias is None else module.router_bias.to(x2.dtype)
        with torch.autocast(x2.device.type, enabled=False):
            logits = F.linear(x2, module.router_weight.to(x2.dtype), bias)
        mask = self._mask.for_tokens(x.shape[:-1]) if self._mask else None
        self.terms[id(module)] = load_balance_loss(logits, indices.reshape(-1, indices.shape[-1]), mask)

    def __enter__(self) -> LoadBalanceCollector:
        self.terms.clear()
        self._mask = TokenMask(self.model)
        self._handles = [m.register_routing_hook(self._hook) for _, m in adapter_modules(self.model, MoLoRALinear)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._mask is not None:
            self._mask.remove()
            self._mask = None

    def total(self) -> torch.Tensor | None:
        return torch.stack(list(self.terms.values())).mean() if self.terms else None
