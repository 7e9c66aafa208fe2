"""One op per file. `*_torch.py`: the torch backend (autograd Functions over PyTorch ops); the fused
Triton ops and the C++ extension's Python side register themselves as further backends."""

from .lora_torch import LoRALinearFunction
from .molora_torch import MoLoRALinearFunction
from .orth_penalty_torch import OrthPenaltyFunction
from .routing_torch import RouteTopKFunction

__all__ = ["LoRALinearFunction", "MoLoRALinearFunction", "OrthPenaltyFunction", "RouteTopKFunction"]
