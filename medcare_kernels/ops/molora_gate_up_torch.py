"""molora_gate_up, torch backend: the gate and up MoLoRA projections of one x as two molora_linear calls.

Each call is molora_torch's autograd Function (what it fuses and saves is described there): saved for backward
are x once (both calls keep the caller's tensor), h, probs and indices of each projection. The one shared
dropout draw of the adapters' input (reference.molora_gate_up) comes from rewinding the generator between the
two calls, so both draw, and both backwards redraw, the same mask. The shared shrink GEMM is the Triton
backend's (molora_gate_up_triton.py); on CPU the two [T, Rt] shrinks are a small part of the projections.
Reference: medcare_kernels.reference.molora_gate_up.
"""

from __future__ import annotations

from ..reference import rng_state, set_rng_state
from .molora_torch import molora_linear


def molora_gate_up(x, gate, up, *, num_experts, top_k, expert_rank, scaling, dropout=0.0):
    """(y_gate [..., Dout_g], y_up [..., Dout_u], indices_gate [..., K], indices_up [..., K])."""
    kw = dict(num_experts=num_experts, top_k=top_k, expert_rank=expert_rank, scaling=scaling, dropout=dropout)
    state = rng_state(x.device) if dropout > 0.0 else None
    y_gate, idx_gate = molora_linear(x, *gate, **kw)
    if state is not None:
        set_rng_state(x.device, state)
    y_up, idx_up = molora_linear(x, *up, **kw)
    return y_gate, y_up, idx_gate, idx_up
