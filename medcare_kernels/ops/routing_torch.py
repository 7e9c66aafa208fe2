"""route_topk, torch backend: fp32 softmax -> top-k (ties to the lower index) -> renormalise.

Saved for backward: the softmax probabilities [T, E] and the indices [T, K] (tiny); the gates are
recomputed from them. Reference: medcare_kernels.reference.route_topk.

Backward, with Z = sum_{j in I} p_j and w = p_I / Z:
    dp_e  = (dw_e - sum_{j in I} dw_j w_j) / Z   for e in I, 0 elsewhere
    dl    = p * (dp - sum_e p_e dp_e)            (softmax backward)
"""

from __future__ import annotations

import torch

from ..reference import router_dtype


def route_topk_fwd(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [..., E] -> (probs [..., E], indices [..., K] int64, gates [..., E]), all router dtype."""
    probs = torch.softmax(logits.to(router_dtype(logits.dtype)), dim=-1)
    # A stable descending sort keeps equal probabilities in index order: ties go to the lower index.
    # contiguous(): keep [T, K] alive for backward, not the whole [T, E] sort result behind the slice.
    indices = torch.sort(probs, dim=-1, descending=True, stable=True).indices[..., :top_k].contiguous()
    gates = gates_from(probs, indices)
    return probs, indices, gates


def gates_from(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Dense renormalised gates [..., E] from the probabilities and the selected indices."""
    w = probs.gather(-1, indices)
    return torch.zeros_like(probs).scatter(-1, indices, w / w.sum(dim=-1, keepdim=True))


def route_topk_bwd(d_gates: torch.Tensor, probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """d_gates [..., E] (only the selected entries matter) -> d_logits [..., E], router dtype."""
    d_gates = d_gates.to(probs.dtype)
    p_sel = probs.gather(-1, indices)
    z = p_sel.sum(dim=-1, keepdim=True)
    w = p_sel / z
    dw = d_gates.gather(-1, indices)
    dp_sel = (dw - (dw * w).sum(dim=-1, keepdim=True)) / z
    dp = torch.zeros_like(probs).scatter(-1, indices, dp_sel)
    return probs * (dp - (dp * probs).sum(dim=-1, keepdim=True))


class RouteTopKFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, top_k: int):
        probs, indices, gates = route_topk_fwd(logits, top_k)
        ctx.save_for_backward(probs, indices)
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(indices)
        return gates, indices

    @staticmethod
    def backward(ctx, d_gates, _d_indices):
        probs, indices = ctx.saved_tensors
        if d_gates is None:
            return None, None
        return route_topk_bwd(d_gates, probs, indices).to(ctx.logits_dtype), None


def route_topk(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return RouteTopKFunction.apply(logits, top_k)
