"""Small helpers shared by the torch-backend ops: dropout draws that backward can redraw, gate expansion."""

from __future__ import annotations

import torch

from ..reference import dropout_keep_mask


def rng_state(device: torch.device) -> torch.Tensor:
    """The generator state a dropout draw on `device` starts from (a few KB on the host)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    """Rewind the generator of `device` to `state` (a later draw repeats the one that started there)."""
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


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
    cuda = x.device.type == "cuda"
    with torch.random.fork_rng(devices=[x.device] if cuda else [], device_type="cuda"):
        if cuda:
            torch.cuda.set_rng_state(state, x.device)
        else:
            torch.set_rng_state(state)
        return dropout_keep_mask(x, p)


def apply_keep(t: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """Inverted dropout with a given mask: t * keep / (1 - p)."""
    return t if keep is None else t * keep.reshape(t.shape).to(t.dtype) / (1.0 - p)


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
