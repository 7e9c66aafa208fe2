"""The helpers the ops share, importable without Triton: dropout draws that backward can redraw (over
reference.rng_state / set_rng_state), gate expansion, dtype rules and casts, the base GEMM. The Triton ops'
shared Triton helpers (tile padding, accumulation type, dot flags, token splits) are in _triton_gemm.py, the
module of their shared GEMMs."""

from __future__ import annotations

import torch

from ..reference import dropout_keep_mask, rng_state, router_dtype, set_rng_state


def accum_dtype(tensors) -> torch.dtype:
    """One accumulation dtype for tensors that may differ in dtype: float64 if any is, else float32
    (reference.router_dtype's rule over several tensors)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else router_dtype(tensors[0].dtype)


def draw_keep(x: torch.Tensor, p: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(keep mask, RNG state before the draw). The state lets backward redraw the mask instead of saving
    a [T, Din] tensor; the draw itself is reference.dropout_keep_mask, so all torch-RNG backends agree."""
    if p == 0.0:
        return None, None
    state = rng_state(x.device)
    return dropout_keep_mask(x, p), state


def redraw_keep(x: torch.Tensor, p: float, state: torch.Tensor | None) -> torch.Tensor | None:
    """The mask draw_keep returned, regenerated from its saved state without touching the global RNG."""
    if state is None:
        return None
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [], device_type="cuda"):
        set_rng_state(x.device, state)
        return dropout_keep_mask(x, p)


def apply_keep(t: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """Inverted dropout with a given mask: t * keep / (1 - p)."""
    return t if keep is None else t * keep.reshape(t.shape).to(t.dtype) / (1.0 - p)


def adapter_input_grad(dy2: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, lora_a: torch.Tensor,
                       keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """dX = dY W + drop'(dS A) [T, Din]: the base part, and the adapters' part through the dropout mask (whose
    inverted scaling drop' applies to the gradient as to the input)."""
    dx = dy2 @ weight
    if keep is None:
        return dx.addmm_(ds, lora_a)
    return dx.add_(apply_keep(ds @ lora_a, keep, p))


def expand_gates(gates: torch.Tensor, expert_rank: int, shared_rank: int, scaling: float) -> torch.Tensor:
    """[T, E] gates -> [T, E*R + Rs] column scales: s * gate per expert column, s per shared column."""
    g = gates.repeat_interleave(expert_rank, dim=-1)
    if shared_rank:
        g = torch.cat([g, g.new_ones(g.shape[0], shared_rank)], dim=-1)
    return g * scaling


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def grad_like(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """A gradient in its parameter's own dtype (parameters may be stored wider than the compute dtype)."""
    return None if grad is None or like is None else grad.to(like.dtype)


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [..., Dout], its [T, Dout] view) with y = x W^T + b. y owns its storage (F.linear on N-D input returns
    a view, which autograd would forbid callers to modify in place), and the 2-D view lets the adapters be
    added in place with addmm_."""
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    y2, x2 = y.view(-1, weight.shape[0]), x.reshape(-1, x.shape[-1])
    if bias is None:
        torch.mm(x2, weight.t(), out=y2)
    else:
        torch.addmm(bias, x2, weight.t(), out=y2)
    return y, y2
