"""Random parameter sets shared by all providers of a case, so every provider computes the same function.

Values are random normal at realistic scales (never zeros: B = 0 would hide the adapters from the
agreement check and lets some kernels skip work); a fixed seed makes runs repeatable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _rnd(g: torch.Generator, *shape, std: float, dtype, device) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)


@dataclass
class MoLoRAParams:
    """One MoLoRA projection in medcare's packed layout (experts first, shared last)."""

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
    def random(cls, d_in, d_out, E, K, R, Rs, *, dtype, device, scaling=2.0, seed=0) -> MoLoRAParams:
        g = _gen(seed)
        kw = dict(dtype=dtype, device=device)
        fp32 = dict(dtype=torch.float32, device=device)
        return cls(_rnd(g, d_out, d_in, std=d_in**-0.5, **kw), _rnd(g, E, d_in, std=d_in**-0.5, **fp32),
                   _rnd(g, E, std=0.1, **fp32), _rnd(g, E * R + Rs, d_in, std=d_in**-0.5, **kw),
                   _rnd(g, d_out, E * R + Rs, std=0.05, **kw), E, K, R, scaling)

    @property
    def shared_rank(self) -> int:
        return self.lora_a.shape[0] - self.num_experts * self.expert_rank

    def trainable(self) -> list[torch.Tensor]:
        return [self.router_weight, self.router_bias, self.lora_a, self.lora_b]

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.expert_rank
        return self.lora_a[e * r:(e + 1) * r], self.lora_b[:, e * r:(e + 1) * r]

    def shared(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.num_experts * self.expert_rank
        return self.lora_a[n:], self.lora_b[:, n:]


@dataclass
class MLPParams:
    """A SwiGLU MLP block whose three projections are MoLoRA: down(silu(gate(x)) * up(x))."""

    gate: MoLoRAParams
    up: MoLoRAParams
    down: MoLoRAParams

    @classmethod
    def random(cls, hidden, inter, E, K, R, Rs, *, dtype, device) -> MLPParams:
        return cls(*(MoLoRAParams.random(i, o, E, K, R, Rs, dtype=dtype, device=device, seed=s)
                     for s, (i, o) in enumerate([(hidden, inter), (hidden, inter), (inter, hidden)])))

    def projections(self) -> list[MoLoRAParams]:
        return [self.gate, self.up, self.down]

    def trainable(self) -> list[torch.Tensor]:
        return [t for p in self.projections() for t in p.trainable()]


@dataclass
class LoRAParams:
    """A LoRA projection with named adapters of one scaling packed along the rank (medcare's layout)."""

    weight: torch.Tensor          # [Dout, Din], frozen
    bias: torch.Tensor | None     # [Dout] (attention q/k/v have one in Qwen2)
    lora_a: torch.Tensor          # [sum R, Din]
    lora_b: torch.Tensor          # [Dout, sum R]
    ranks: dict[str, int]         # adapter name -> rank, in packing order
    scaling: float
    dropout: float

    @classmethod
    def random(cls, d_in, d_out, ranks: dict[str, int], *, dtype, device, bias=False, scaling=2.0, dropout=0.0,
               seed=0) -> LoRAParams:
        g = _gen(seed)
        kw = dict(dtype=dtype, device=device)
        total = sum(ranks.values())
        return cls(_rnd(g, d_out, d_in, std=d_in**-0.5, **kw), _rnd(g, d_out, std=0.1, **kw) if bias else None,
                   _rnd(g, total, d_in, std=d_in**-0.5, **kw), _rnd(g, d_out, total, std=0.05, **kw), dict(ranks),
                   scaling, dropout)

    def adapter(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        start = 0
        for n, r in self.ranks.items():
            if n == name:
                return self.lora_a[start:start + r], self.lora_b[:, start:start + r]
            start += r
        raise KeyError(name)

    def trainable(self) -> list[torch.Tensor]:
        return [self.lora_a, self.lora_b]


@dataclass
class OrthParams:
    """The stage-2 A matrices of a model: per (layer, projection) the knowledge A and the alignment A."""

    names: list[str]              # "model.layers.{l}.mlp.{proj}"
    a_base: list[torch.Tensor]    # [Rk, Din_i] (fp32 unless asked), the knowledge LoRA's A
    a_orth: list[torch.Tensor]    # [Ra, Din_i], the alignment LoRA's A

    @classmethod
    def random(cls, layers: int, hidden: int, inter: int, rank: int, *, device, seed=0,
               dtype: torch.dtype = torch.float32) -> OrthParams:
        g = _gen(seed)
        names, base, orth = [], [], []
        for layer in range(layers):
            for proj, d_in in (("gate_proj", hidden), ("up_proj", hidden), ("down_proj", inter)):
                names.append(f"model.layers.{layer}.mlp.{proj}")
                base.append(_rnd(g, rank, d_in, std=d_in**-0.5, dtype=dtype, device=device))
                orth.append(_rnd(g, rank, d_in, std=d_in**-0.5, dtype=dtype, device=device))
        return cls(names, base, orth)

    def tensors(self) -> list[torch.Tensor]:
        return self.a_base + self.a_orth
