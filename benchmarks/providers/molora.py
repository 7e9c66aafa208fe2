"""MoLoRA projection providers, all built from one `MoLoRAParams` so they compute the same function.

base          the frozen projection alone, y = x W^T: the floor
naive-medcare the original implementation's computation (MedCare utils.py MoLoRALinear.molora_helper2):
              fp32 adapters, every expert on every token, outputs stacked [T, E, Dout], top-k gathered,
              the shared expert concatenated with weight 1, einsum
medcare-<b>   medcare_kernels.molora_linear on backend <b>
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import medcare_kernels as mk


@dataclass
class MoLoRAParams:
    weight: torch.Tensor          # [Dout, Din], frozen
    router_weight: torch.Tensor   # [E, Din], fp32
    router_bias: torch.Tensor     # [E], fp32
    lora_a: torch.Tensor          # [E*R + Rs, Din]
    lora_b: torch.Tensor          # [Dout, E*R + Rs]
    num_experts: int
    top_k: int
    expert_rank: int
    scaling: float

    @classmethod
    def random(cls, d_in, d_out, E, K, R, Rs, *, dtype, device, scaling=2.0):
        g = torch.Generator(device="cpu").manual_seed(0)

        def rnd(*shape, std, dt=dtype):
            return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt)

        return cls(rnd(d_out, d_in, std=d_in**-0.5), rnd(E, d_in, std=d_in**-0.5, dt=torch.float32),
                   rnd(E, std=0.1, dt=torch.float32), rnd(E * R + Rs, d_in, std=d_in**-0.5),
                   rnd(d_out, E * R + Rs, std=0.02), E, K, R, scaling)

    def trainable(self) -> list[torch.Tensor]:
        return [self.router_weight, self.router_bias, self.lora_a, self.lora_b]


def base(p: MoLoRAParams):
    return lambda x: F.linear(x, p.weight)


def medcare(p: MoLoRAParams, backend: str):
    def fn(x):
        with mk.use_backend(backend):
            return mk.molora_linear(x, p.weight, None, p.router_weight, p.router_bias, p.lora_a, p.lora_b,
                                    num_experts=p.num_experts, top_k=p.top_k, expert_rank=p.expert_rank,
                                    scaling=p.scaling)

    return fn


class NaiveMoLoRA(torch.nn.Module):
    """The original implementation's MoLoRA forward, rewritten from its description (fp32 experts as
    nn.Linear pairs, dense over all experts, stack + gather + einsum)."""

    def __init__(self, p: MoLoRAParams):
        super().__init__()
        E, R = p.num_experts, p.expert_rank
        rs = p.lora_a.shape[0] - E * R
        self.weight, self.top_k, self.scaling = p.weight, p.top_k, p.scaling
        self.switch = torch.nn.Linear(p.weight.shape[1], E, device=p.weight.device)
        self.switch.weight.data.copy_(p.router_weight)
        self.switch.bias.data.copy_(p.router_bias)
        self.experts_a = torch.nn.ModuleList(self._lin(p.lora_a[e * R:(e + 1) * R]) for e in range(E))
        self.experts_b = torch.nn.ModuleList(self._lin(p.lora_b[:, e * R:(e + 1) * R]) for e in range(E))
        self.share_a = self._lin(p.lora_a[E * R:]) if rs else None
        self.share_b = self._lin(p.lora_b[:, E * R:]) if rs else None

    @staticmethod
    def _lin(w: torch.Tensor) -> torch.nn.Linear:
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=torch.float32)
        lin.weight.data.copy_(w)
        return lin

    def forward(self, x):
        y = F.linear(x, self.weight)
        xf = x.float()
        probs = torch.softmax(self.switch(xf), dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        pairs = zip(self.experts_a, self.experts_b, strict=True)
        outs = torch.stack([b(a(xf)) * self.scaling for a, b in pairs])                                # [E,T,Do]
        outs = outs.transpose(0, 1)
        picked = outs.gather(1, idx.unsqueeze(-1).expand(-1, -1, outs.shape[-1]))                      # [T,K,Do]
        if self.share_a is not None:
            shared = self.share_b(self.share_a(xf)) * self.scaling
            picked = torch.cat([picked, shared.unsqueeze(1)], dim=1)
            w = torch.cat([w, torch.ones_like(w[:, :1])], dim=1)
        return y + torch.einsum("be,bef->bf", w, picked).to(y.dtype)


def naive_medcare(p: MoLoRAParams):
    module = NaiveMoLoRA(p)
    return module, module.forward
