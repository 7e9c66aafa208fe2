"""The math of medcare, in plain PyTorch: the single home of every formula.

Every backend (torch, triton, ext) is tested against these functions, and these functions are tested
against deliberately dumb per-token loops (tests/medcare_kernels/test_reference.py). They favour clarity
over speed and memory, let autograd derive every gradient, and run in any floating dtype, float64
included (router math is done in float32, or float64 when the input is float64).

Shape letters: T tokens (any leading dims flattened), Din, Dout, E experts, K top-k, R expert rank,
Rs shared rank.

    route_topk:     p = softmax(logits); (w, I) = top-K(p) (ties -> lower index); w = w / sum(w)
    lora_linear:    y = x W^T + b + s * B A drop(x)
    molora_linear:  y = x W^T + b + s * sum_{j<K} w_j B_{I_j} A_{I_j} drop(x) + s * Bs As drop(x)
    molora_gate_up: (molora_linear(x, *gate), molora_linear(x, *up)) with ONE dropout draw for both
    orth_penalty:   L = sum_pairs sum_ij | A_base A_orth^T |_ij
    linear_cross_entropy: L = sum_{t: y_t != ignore} (logsumexp(x_t W^T + b) - (x_t W^T + b)_{y_t}) [/ count]

`drop` is inverted dropout on the adapters' input only (the base GEMM and the router see x); one mask
is drawn per call and shared by all adapters packed in lora_a (see `dropout_keep_mask`). The GEMMs run in
x's dtype (weights stored in another dtype are cast); gradients reach each parameter in its own dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["molora_linear", "molora_gate_up", "lora_linear", "route_topk", "orth_penalty", "linear_cross_entropy",
           "dropout_keep_mask", "router_dtype", "rng_state", "set_rng_state"]


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """Router / gate math runs in float32, never lower (bf16 softmax over logits overflows and ties)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor | None:
    """The dropout draw shared by all backends that use torch's RNG: keep where U[0,1) >= p.

    Drawn in float32 from the global generator of x's device, so a backend that restores the RNG state
    redraws the identical mask in backward instead of saving it. Returns None when p == 0.
    """
    if p == 0.0:
        return None
    return torch.rand(x.shape, device=x.device, dtype=torch.float32) >= p


def _like(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """GEMMs run in x's dtype; parameters stored wider (fp32 adapters beside bf16 activations) are cast."""
    return None if t is None else t.to(x.dtype)


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    keep = dropout_keep_mask(x, p)
    return x if keep is None else x * keep.to(x.dtype) / (1.0 - p)


def route_topk(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax, top-k, renormalise.

    Args:
        logits: [..., E] router logits, any floating dtype.
        top_k: K, 1 <= K <= E.

    Returns:
        gates: [..., E] float32 (float64 for float64 logits); w_j at the selected experts, 0 elsewhere,
            rows summing to 1. Differentiable into `logits` through the renormalised weights.
        indices: [..., K] int64, the selected experts by decreasing probability, ties to the lower index.
    """
    p = torch.softmax(logits.to(router_dtype(logits.dtype)), dim=-1)
    # K rounds of argmax (first maximum wins, as documented for torch.argmax) give the tie rule exactly.
    masked = p.detach().clone()
    picks = []
    for _ in range(top_k):
        j = masked.argmax(dim=-1, keepdim=True)
        picks.append(j)
        masked.scatter_(-1, j, float("-inf"))
    indices = torch.cat(picks, dim=-1)
    w = p.gather(-1, indices)
    w = w / w.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(p).scatter(-1, indices, w)
    return gates, indices


def lora_linear(x, weight, bias, lora_a, lora_b, *, scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """y = x W^T + b + s * (drop(x) A^T) B^T.

    Shapes: x [..., Din]; weight [Dout, Din]; bias [Dout] or None; lora_a [R, Din]; lora_b [Dout, R].
    Several LoRAs with the same scaling pack along the rank (stage 2: knowledge then alignment).
    """
    h = F.linear(_dropout(x, dropout), _like(lora_a, x))
    return F.linear(x, _like(weight, x), _like(bias, x)) + scaling * F.linear(h, _like(lora_b, x))


def molora_linear(x, weight, bias, router_weight, router_bias, lora_a, lora_b, *, num_experts: int,
                  top_k: int, expert_rank: int, scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """A frozen projection plus K of E routed LoRA experts and an always-on shared LoRA.

        logits = x Wr^T + br                                 (float32)
        gates  = route_topk(logits, K)                       [T, E], w_j at selected experts
        h      = drop(x) lora_a^T                            [T, E*R + Rs]
        g      = s * [gates repeated R times | 1 (Rs times)] [T, E*R + Rs]
        y      = x W^T + b + (h * g) lora_b^T

    Shapes: x [..., Din]; weight [Dout, Din]; bias [Dout] or None; router_weight [E, Din];
    router_bias [E] or None; lora_a [E*R + Rs, Din] (experts in order, shared last);
    lora_b [Dout, E*R + Rs].
    """
    rdt = router_dtype(x.dtype)
    rb = None if router_bias is None else router_bias.to(rdt)
    logits = F.linear(x.to(rdt), router_weight.to(rdt), rb)
    gates, _ = route_topk(logits, top_k)
    shared_rank = lora_a.shape[0] - num_experts * expert_rank
    g = torch.cat([gates.repeat_interleave(expert_rank, dim=-1), gates.new_ones(*gates.shape[:-1], shared_rank)],
                  dim=-1)
    h = F.linear(_dropout(x, dropout), _like(lora_a, x))
    return F.linear(x, _like(weight, x), _like(bias, x)) + F.linear(h * (scaling * g).to(h.dtype), _like(lora_b, x))


def molora_gate_up(x, gate, up, *, num_experts: int, top_k: int, expert_rank: int, scaling: float,
                   dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up projections of a SwiGLU MLP, two MoLoRA projections of the same x:

        (y_gate, y_up) = (molora_linear(x, *gate, ...), molora_linear(x, *up, ...))

    gate and up are each (weight, bias, router_weight, router_bias, lora_a, lora_b) as molora_linear takes
    them (same E, K, R and scaling; Dout and the shared rank may differ). Dropout: ONE draw of the adapters'
    input mask, shared by every adapter of both projections (the fused op drops x once for one shrink GEMM):
    the generator is rewound between the two calls, so both draw the same mask and it ends where one draw
    leaves it. Without dropout this is exactly two molora_linear calls.
    """
    kw = dict(num_experts=num_experts, top_k=top_k, expert_rank=expert_rank, scaling=scaling, dropout=dropout)
    state = rng_state(x.device) if dropout > 0.0 else None
    y_gate = molora_linear(x, *gate, **kw)
    if state is not None:
        set_rng_state(x.device, state)
    return y_gate, molora_linear(x, *up, **kw)


def rng_state(device: torch.device) -> torch.Tensor:
    """The state of `device`'s generator (a few KB on the host): a dropout draw that starts here can be repeated,
    by every backend (ops/_common.draw_keep) and by molora_gate_up's shared draw above."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    """Rewind `device`'s generator to `state`: the next draw repeats the one that started there."""
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def orth_penalty(a_base: Sequence[torch.Tensor], a_orth: Sequence[torch.Tensor]) -> torch.Tensor:
    """L = sum over pairs i of sum_jk | (A_base_i A_orth_i^T)_jk |, accumulated in float32 (float64 stays).

    Shapes: a_base[i] [R1_i, Din_i], a_orth[i] [R2_i, Din_i]; pairs may differ in Din and ranks.
    The gradient is sign(P) A_orth and sign(P)^T A_base with sign(0) = 0 (torch.abs's subgradient).
    """
    total = None
    for a, b in zip(a_base, a_orth, strict=True):
        dt = router_dtype(torch.promote_types(a.dtype, b.dtype))
        term = (a.to(dt) @ b.to(dt).T).abs().sum()
        total = term if total is None else total + term
    return total


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, *,
                         ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits x W^T + b against labels, as a language-model head computes it: the logits
    in x's dtype, upcast to float32 (float64 stays) for the softmax; rows labelled ignore_index contribute
    nothing. reduction "sum", or "mean" over the labelled rows (NaN when there is none, as torch's).

    Shapes: x [..., Din]; weight [V, Din]; bias [V] | None; labels [...] (int64, x's leading dims).
    This is the plain head: it holds all logits [T, V] at once (the memory the fused op avoids).
    """
    logits = F.linear(x, weight.to(x.dtype), _like(bias, x)).to(router_dtype(x.dtype))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)
