"""medcare on each backend: the medcare_kernels functionals, and medcare's modules for whole models.

`backends(op, device)` lists the backends that are built, implement the op and run on the device without
an interpreter (Triton under TRITON_INTERPRET=1 is a correctness tool, never timed), so new backends are
picked up as they land, without changes here.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

import medcare_kernels as mk
from medcare_kernels import _backend

from .params import LoRAParams, MLPParams, MoLoRAParams, OrthParams


def _ops(status: str) -> set[str]:
    m = re.match(r"available \((.*)\)", status)
    return {s.strip() for s in m.group(1).split(",")} if m else set()


def backends(ops: str | tuple[str, ...], device: torch.device) -> list[str]:
    """Backends (torch, triton, ext) that implement every op in `ops` and run on `device` natively."""
    ops = (ops,) if isinstance(ops, str) else ops
    names = []
    for name, status in mk.available_backends().items():
        if not set(ops) <= _ops(status):
            continue
        if name == "triton" and device.type != "cuda":
            continue
        if _backend._runs_on(name, device):
            names.append(name)
    return names


def missing(ops: tuple[str, ...], device: torch.device) -> dict[str, str]:
    """Backends that are built and run on the device but lack some of `ops`: name -> why not timed."""
    out = {}
    for name, status in mk.available_backends().items():
        have = _ops(status)
        if have and not set(ops) <= have and (name != "triton" or device.type == "cuda"):
            out[name] = f"backend {name} has no {', '.join(sorted(set(ops) - have))}"
    return out


def molora(p: MoLoRAParams, backend: str):
    def fn(x):
        with mk.use_backend(backend):
            return mk.molora_linear(x, p.weight, None, p.router_weight, p.router_bias, p.lora_a, p.lora_b,
                                    num_experts=p.num_experts, top_k=p.top_k, expert_rank=p.expert_rank,
                                    scaling=p.scaling)

    return fn


def mlp(m: MLPParams, backend: str):
    gate, up, down = (molora(p, backend) for p in m.projections())
    return lambda x: down(F.silu(gate(x)) * up(x))


def mlp_gate_up(m: MLPParams, backend: str):
    """The MLP block with gate and up as one molora_gate_up call (one shrink GEMM, dA GEMM, router-wgrad pass and
    low-rank dX update for both), then down as molora_linear."""
    gate, up = ((p.weight, None, p.router_weight, p.router_bias, p.lora_a, p.lora_b) for p in (m.gate, m.up))
    kw = dict(num_experts=m.gate.num_experts, top_k=m.gate.top_k, expert_rank=m.gate.expert_rank,
              scaling=m.gate.scaling)
    down = molora(m.down, backend)

    def fn(x):
        with mk.use_backend(backend):
            y_gate, y_up = mk.molora_gate_up(x, gate, up, **kw)
        return down(F.silu(y_gate) * y_up)

    return fn


def lora(p: LoRAParams, backend: str, *, dropout: float | None = None):
    drop = p.dropout if dropout is None else dropout

    def fn(x):
        with mk.use_backend(backend):
            return mk.lora_linear(x, p.weight, p.bias, p.lora_a, p.lora_b, scaling=p.scaling, dropout=drop)

    return fn


def orth(o: OrthParams, backend: str):
    def fn():
        with mk.use_backend(backend):
            return mk.orth_penalty(o.a_base, o.a_orth)

    return fn


def route(backend: str, top_k: int):
    def fn(logits):
        with mk.use_backend(backend):
            return mk.route_topk(logits, top_k)[0]

    return fn
