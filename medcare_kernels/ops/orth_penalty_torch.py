"""orth_penalty, torch backend: L = sum_i sum_jk |A_base_i A_orth_i^T|_jk as a few batched GEMMs.

Pairs are grouped by (shape of A_base, shape of A_orth); each group is one bmm over stacked matrices
(a model has about three groups: gate/up share Din, down has its own), instead of a loop per pair.
fp32 accumulation (float64 stays float64).

Saved for backward: the inputs (parameters, no copies) and sign(P) per group [G, R1, R2] (tiny).
Backward: dA_base = g * sign(P) A_orth, dA_orth = g * sign(P)^T A_base, sign(0) = 0 as torch.abs.
Reference: medcare_kernels.reference.orth_penalty.
"""

from __future__ import annotations

import torch

from ._common import accum_dtype


def _groups(a_base, a_orth) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, (a, b) in enumerate(zip(a_base, a_orth, strict=True)):
        groups.setdefault((tuple(a.shape), tuple(b.shape)), []).append(i)
    return groups


def _stack(tensors, ids, dtype) -> torch.Tensor:
    return torch.stack([tensors[i].to(dtype) for i in ids])


class OrthPenaltyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n_pairs: int, *tensors):
        a_base, a_orth = tensors[:n_pairs], tensors[n_pairs:]
        dt = accum_dtype(tensors)
        groups = _groups(a_base, a_orth)
        total = torch.zeros((), dtype=dt, device=tensors[0].device)
        signs = []
        for ids in groups.values():
            p = torch.bmm(_stack(a_base, ids, dt), _stack(a_orth, ids, dt).transpose(1, 2))   # [G, R1, R2]
            total = total + p.abs().sum()
            signs.append(p.sign_())
        ctx.n_pairs, ctx.group_ids = n_pairs, list(groups.values())
        ctx.save_for_backward(*tensors, *signs)
        return total

    @staticmethod
    def backward(ctx, grad):
        n = ctx.n_pairs
        saved = ctx.saved_tensors
        a_base, a_orth, signs = saved[:n], saved[n:2 * n], saved[2 * n:]
        need_base, need_orth = ctx.needs_input_grad[1:n + 1], ctx.needs_input_grad[n + 1:]
        grads: list[torch.Tensor | None] = [None] * (2 * n)
        for ids, sign in zip(ctx.group_ids, signs, strict=True):
            sign = sign * grad
            if any(need_base[i] for i in ids):
                d_base = torch.bmm(sign, _stack(a_orth, ids, sign.dtype)).unbind(0)
                for i, g in zip(ids, d_base, strict=True):
                    grads[i] = g.to(a_base[i].dtype) if need_base[i] else None
            if any(need_orth[i] for i in ids):
                d_orth = torch.bmm(sign.transpose(1, 2), _stack(a_base, ids, sign.dtype)).unbind(0)
                for i, g in zip(ids, d_orth, strict=True):
                    grads[n + i] = g.to(a_orth[i].dtype) if need_orth[i] else None
        return (None, *grads)


def orth_penalty(a_base, a_orth) -> torch.Tensor:
    return OrthPenaltyFunction.apply(len(a_base), *a_base, *a_orth)
