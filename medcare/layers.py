"""Adapter modules. Each wraps the original nn.Linear as `base_layer` (the PEFT/litgpt contract), holds its
adapters packed the way medcare_kernels wants them (no stacking per step), and computes with one call to
medcare_kernels. The base layer stays frozen and untouched until merge().

    LoRALinear    y = base(x) + s * B A drop(x), several named LoRAs packed along the rank
                  (stage 1: "attention"; stage 2: "knowledge" then "alignment")
    MoLoRALinear  y = base(x) + s * sum_{j<K} w_j B_{I_j} A_{I_j} x + s * Bs As x
                  (stage 1 MLP: routed experts = noise aggregator, shared LoRA = knowledge aggregator)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

import medcare_kernels as mk


def _adapter_dtype(base_layer: nn.Linear, dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return base_layer.weight.dtype
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _check_base(base_layer: nn.Module) -> None:
    if not isinstance(base_layer, nn.Linear):
        raise TypeError(f"adapters wrap nn.Linear layers, got {type(base_layer).__name__}")


class _MergeMixin:
    """merge() / unmerge() on top of delta_weight(): W += delta and W -= delta, computed in fp32."""

    merged: bool
    base_layer: nn.Linear

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged; unmerge() first")
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged")
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False


class LoRALinear(_MergeMixin, nn.Module):
    """A frozen linear layer plus named LoRAs of one scaling, packed: lora_a [sum R, Din], lora_b [Dout, sum R].

    Args:
        base_layer: the layer to adapt; kept as `self.base_layer`.
        adapters: name -> rank, in packing order.
        scaling: s in y = base(x) + s * B A x.
        dropout: on the adapters' input, one draw shared by all packed adapters (training mode only).
        dtype: adapter parameter dtype ("float32", ..., or "auto" = the base weight's).
    """

    def __init__(self, base_layer: nn.Linear, adapters: dict[str, int], *, scaling: float, dropout: float = 0.0,
                 dtype: str | torch.dtype | None = "float32"):
        super().__init__()
        _check_base(base_layer)
        if not adapters or any(r < 1 for r in adapters.values()):
            raise ValueError(f"adapters must map names to ranks >= 1, got {adapters}")
        self.base_layer = base_layer
        self.adapter_ranks = dict(adapters)
        self.scaling, self.dropout, self.merged = float(scaling), float(dropout), False
        total = sum(adapters.values())
        kw = dict(device=base_layer.weight.device, dtype=_adapter_dtype(base_layer, dtype))
        self.lora_a = nn.Parameter(torch.empty(total, base_layer.in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(base_layer.out_features, total, **kw))
        self._frozen: set[str] = set()
        self.reset_parameters()

    def reset_parameters(self, names: list[str] | None = None) -> None:
        """A kaiming-uniform(a=sqrt(5)) and B = 0 for the given adapters (all by default): delta starts at 0."""
        with torch.no_grad():
            for name in names or list(self.adapter_ranks):
                sl = self.adapter_slice(name)
                nn.init.kaiming_uniform_(self.lora_a[sl], a=math.sqrt(5))
                self.lora_b[:, sl].zero_()

    def adapter_slice(self, name: str) -> slice:
        start = 0
        for n, r in self.adapter_ranks.items():
            if n == name:
                return slice(start, start + r)
            start += r
        raise KeyError(f"no adapter {name!r}; this layer has {', '.join(self.adapter_ranks)}")

    def adapter(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (A [R, Din], B [Dout, R]) of one packed adapter; gradients flow into the packed parameters."""
        sl = self.adapter_slice(name)
        return self.lora_a[sl], self.lora_b[:, sl]

    @torch.no_grad()
    def set_adapter(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy given A and B into one adapter's slot (exactly, up to the parameter dtype)."""
        sa, sb = self.adapter(name)
        if a.shape != sa.shape or b.shape != sb.shape:
            raise ValueError(f"adapter {name!r} expects A {tuple(sa.shape)} and B {tuple(sb.shape)}, "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
        sa.copy_(a)
        sb.copy_(b)

    def freeze_adapter(self, name: str) -> None:
        """Keep one packed adapter fixed: its rows of the gradients are zeroed (the others still train).
        With decoupled weight decay > 0 the optimizer would still shrink it; the trainer forbids that."""
        self.adapter_slice(name)
        if not self._frozen:
            self.lora_a.register_hook(lambda g: self._mask_grad(g, 0))
            self.lora_b.register_hook(lambda g: self._mask_grad(g, 1))
        self._frozen.add(name)

    def _mask_grad(self, grad: torch.Tensor, dim: int) -> torch.Tensor:
        grad = grad.clone()
        for name in self._frozen:
            grad.narrow(dim, self.adapter_slice(name).start, self.adapter_ranks[name]).zero_()
        return grad

    def delta_weight(self) -> torch.Tensor:
        """s * B A over all packed adapters, fp32 [Dout, Din]."""
        return self.scaling * (self.lora_b.detach().float() @ self.lora_a.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return mk.lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_a, self.lora_b,
                              scaling=self.scaling, dropout=self.dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}={r}" for n, r in self.adapter_ranks.items())
        return f"adapters=({ranks}), scaling={self.scaling}, dropout={self.dropout}, merged={self.merged}"


class MoLoRALinear(_MergeMixin, nn.Module):
    """A frozen linear layer plus E routed LoRA experts (top-K softmax router) and an always-on shared LoRA.

    Parameters (packed, experts in order, shared last): router_weight [E, Din], router_bias [E],
    lora_a [E*R + Rs, Din], lora_b [Dout, E*R + Rs]. merge() folds only the shared LoRA into the base
    weight: the routed part depends on the input and stays a routed computation.
    """

    def __init__(self, base_layer: nn.Linear, *, num_experts: int, top_k: int, expert_rank: int, shared_rank: int,
                 scaling: float, dropout: float = 0.0, dtype: str | torch.dtype | None = "float32"):
        super().__init__()
        _check_base(base_layer)
        if not 1 <= top_k <= num_experts or expert_rank < 1 or shared_rank < 0:
            raise ValueError(f"need 1 <= top_k <= num_experts, expert_rank >= 1, shared_rank >= 0; got "
                             f"top_k={top_k}, num_experts={num_experts}, expert_rank={expert_rank}, "
                             f"shared_rank={shared_rank}")
        self.base_layer = base_layer
        self.num_experts, self.top_k, self.expert_rank, self.shared_rank = num_experts, top_k, expert_rank, shared_rank
        self.scaling, self.dropout, self.merged = float(scaling), float(dropout), False
        d_in, d_out, total = base_layer.in_features, base_layer.out_features, num_experts * expert_rank + shared_rank
        kw = dict(device=base_layer.weight.device, dtype=_adapter_dtype(base_layer, dtype))
        # The router is fp32 unless adapters are explicitly kept in float64: routing must not see bf16 logits.
        rkw = dict(device=kw["device"], dtype=torch.float64 if kw["dtype"] == torch.float64 else torch.float32)
        self.router_weight = nn.Parameter(torch.empty(num_experts, d_in, **rkw))
        self.router_bias = nn.Parameter(torch.empty(num_experts, **rkw))
        self.lora_a = nn.Parameter(torch.empty(total, d_in, **kw))
        self.lora_b = nn.Parameter(torch.zeros(d_out, total, **kw))
        self._routing_hooks: OrderedDict[int, Callable] = OrderedDict()
        self.reset_parameters()

    def register_routing_hook(self, hook: Callable[[MoLoRALinear, torch.Tensor, torch.Tensor], None]
                              ) -> RemovableHandle:
        """Call hook(module, x, indices) after every forward: x the input [..., Din], indices [..., K] int64 the
        experts each token was routed to, exactly as the kernel used them. Expert-usage counters and the
        load-balancing loss read the routing decision here instead of recomputing the router. Returns a handle
        whose remove() unregisters the hook (torch's hook convention)."""
        handle = RemovableHandle(self._routing_hooks)
        self._routing_hooks[handle.id] = hook
        return handle

    def reset_parameters(self) -> None:
        """Router as nn.Linear's default; every A kaiming-uniform(a=sqrt(5)); every B = 0."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.router_weight, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(self.base_layer.in_features)
            nn.init.uniform_(self.router_bias, -bound, bound)
            for e in range(self.num_experts + (1 if self.shared_rank else 0)):
                rows = self._rows(e)
                nn.init.kaiming_uniform_(self.lora_a[rows], a=math.sqrt(5))
            self.lora_b.zero_()

    def _rows(self, e: int) -> slice:
        """Rows of expert e in lora_a (columns in lora_b); e == num_experts is the shared LoRA."""
        r = self.expert_rank
        return slice(e * r, (e + 1) * r) if e < self.num_experts else slice(self.num_experts * r, None)

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (A_e [R, Din], B_e [Dout, R]) of routed expert e."""
        if not 0 <= e < self.num_experts:
            raise IndexError(f"expert {e} out of range [0, {self.num_experts})")
        return self.lora_a[self._rows(e)], self.lora_b[:, self._rows(e)]

    def shared(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (As [Rs, Din], Bs [Dout, Rs]) of the shared (knowledge-aggregator) LoRA."""
        rows = self._rows(self.num_experts)
        return self.lora_a[rows], self.lora_b[:, rows]

    def delta_weight(self) -> torch.Tensor:
        """s * Bs As, the always-on part, fp32 [Dout, Din]."""
        a, b = self.shared()
        return self.scaling * (b.detach().float() @ a.detach().float())

    def kernel_args(self) -> tuple[torch.Tensor | None, ...]:
        """(weight, bias, router_weight, router_bias, lora_a, lora_b) as medcare_kernels.molora_linear takes them."""
        a, b = self.lora_a, self.lora_b
        if self.merged:  # the shared LoRA lives in the base weight now; route over the experts only
            a, b = a[: self.num_experts * self.expert_rank], b[:, : self.num_experts * self.expert_rank]
        return self.base_layer.weight, self.base_layer.bias, self.router_weight, self.router_bias, a, b

    def kernel_kwargs(self) -> dict:
        """The keyword arguments of medcare_kernels.molora_linear (adapter dropout only in training mode)."""
        return dict(num_experts=self.num_experts, top_k=self.top_k, expert_rank=self.expert_rank,
                    scaling=self.scaling, dropout=self.dropout if self.training else 0.0)

    def routed(self, x: torch.Tensor, indices: torch.Tensor) -> None:
        """Tell the routing hooks how x was routed (forward does; so does the fused MLP path of gate_up_forward)."""
        for hook in list(self._routing_hooks.values()):
            hook(self, x, indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, indices = mk.molora_linear(x, *self.kernel_args(), **self.kernel_kwargs(), return_indices=True)
        self.routed(x, indices)
        return y

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, expert_rank={self.expert_rank}, "
                f"shared_rank={self.shared_rank}, scaling={self.scaling}, merged={self.merged}")


def gate_up_fusable(gate: nn.Module, up: nn.Module, x: torch.Tensor) -> bool:
    """Whether an MLP's gate and up projections can run as one medcare_kernels.molora_gate_up call with exactly
    the effect of calling both modules: two unmerged MoLoRALinear with the same E/K/R/scaling/dropout and mode,
    no torch module hooks to run (DeepSpeed ZeRO-3 and accelerate's offloading hook each Linear: then the modules
    are called), and the call would run on the triton backend (the torch backend's molora_gate_up is two
    molora_linear calls: nothing to gain)."""
    if not (isinstance(gate, MoLoRALinear) and isinstance(up, MoLoRALinear)) or gate.merged or up.merged:
        return False
    if gate.kernel_kwargs() != up.kernel_kwargs() or _has_module_hooks(gate) or _has_module_hooks(up):
        return False
    try:
        return mk.resolved_backend("molora_gate_up", x.device) == "triton"
    except mk.BackendUnavailableError:  # an explicit backend without the op: the modules' own calls say so
        return False


def _has_module_hooks(m: nn.Module) -> bool:
    own = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
    glob = [getattr(nn.modules.module, n, {}) for n in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                          "_global_backward_hooks", "_global_backward_pre_hooks")]
    return any(len(h) for h in own) or any(len(h) for h in glob)


def gate_up_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A SwiGLU MLP's forward, down_proj(act_fn(gate_proj(x)) * up_proj(x)), with gate and up as one
    medcare_kernels.molora_gate_up call where gate_up_fusable says it has the modules' effect (routing hooks
    included); otherwise the MLP class's own forward. medcare.inject installs it on MLP instances as
    functools.partial(gate_up_forward, mlp). With adapter dropout > 0 (off by default on MoLoRA) gate and up
    share one dropout draw on this path, where two module calls draw two."""
    gate, up = mlp.gate_proj, mlp.up_proj
    if not gate_up_fusable(gate, up, x):
        return type(mlp).forward(mlp, x)
    (y_gate, y_up), (idx_gate, idx_up) = mk.molora_gate_up(x, gate.kernel_args(), up.kernel_args(),
                                                           **gate.kernel_kwargs(), return_indices=True)
    gate.routed(x, idx_gate)
    up.routed(x, idx_up)
    return mlp.down_proj(mlp.act_fn(y_gate) * y_up)
