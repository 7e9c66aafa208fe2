"""Loss terms the trainer adds explicitly (never hidden in a model's forward).

orth_loss: the stage-2 orthogonality penalty sum_{layers, projections} sum_ij |A_knowledge A_alignment^T|_ij,
one batched medcare_kernels.orth_penalty call over every stage-2 projection. It is computed on the live
parameters, so it has a real gradient (the original implementation computed it on detached DeepSpeed copies).

Under parameter sharding (FSDP, DeepSpeed ZeRO-3) parameters are only whole inside their module's forward;
there `OrthPenaltyCollector` records each projection's term during forward and the trainer sums them.
"""

from __future__ import annotations

import torch
from torch import nn

import medcare_kernels as mk

from .inject import adapter_modules
from .layers import LoRALinear


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
