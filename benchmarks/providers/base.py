"""The floor: the frozen projection alone, y = x W^T (+ b), i.e. one cuBLAS GEMM on GPU.

Timed with x requiring grad and frozen weights, so its fwd+bwd is the base forward plus the input gradient
only (no weight gradient): exactly the work a LoRA/MoLoRA layer cannot avoid.
"""

from __future__ import annotations

import torch.nn.functional as F

from .params import LoRAParams, MLPParams, MoLoRAParams


def molora(p: MoLoRAParams):
    return lambda x: F.linear(x, p.weight)


def lora(p: LoRAParams):
    return lambda x: F.linear(x, p.weight, p.bias)


def mlp(m: MLPParams):
    """The frozen SwiGLU MLP: down(silu(gate x) * up x)."""
    return lambda x: F.linear(F.silu(F.linear(x, m.gate.weight)) * F.linear(x, m.up.weight), m.down.weight)
