"""Put the MedCare adapters into a Hugging Face decoder LM: modules are replaced on the model instance
(never by patching transformers classes), everything that is not an adapter is frozen, and a report says
what was replaced and how many parameters train.

Works with any model whose decoder blocks name their projections q/k/v/o_proj and gate/up/down_proj as
nn.Linear: Qwen2 (which also loads Qwen1.5), Qwen3, Llama, Mistral.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from .config import Stage1Config, Stage2Config
from .layers import LoRALinear, MoLoRALinear, gate_up_forward
from .loading import UserError

ADAPTER_TYPES = (LoRALinear, MoLoRALinear)
# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)): layers.gate_up_forward
# reproduces it, so these get the fused gate+up path (transformers 5: Qwen2 also runs Qwen1.5).
GATE_UP_MLPS = ("Qwen2MLP", "Qwen3MLP", "LlamaMLP", "MistralMLP")


class InjectionError(UserError):
    """The model does not have the projections the stage needs, or already carries adapters."""


@dataclass
class InjectionReport:
    replaced: dict[str, int] = field(default_factory=dict)   # target leaf name -> modules replaced
    trainable: int = 0
    total: int = 0

    def __str__(self) -> str:
        parts = ", ".join(f"{n} x{c}" for n, c in self.replaced.items())
        pct = 100.0 * self.trainable / max(self.total, 1)
        return f"replaced {parts}; trainable parameters {self.trainable:,} of {self.total:,} ({pct:.2f}%)"


def find_linears(model: nn.Module, names: tuple[str, ...]) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    """(qualified name, parent, attribute, layer) of every nn.Linear whose attribute name is in `names`."""
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, ADAPTER_TYPES):
            continue
        for attr, child in parent.named_children():
            if attr in names and isinstance(child, nn.Linear):
                yield (f"{parent_name}.{attr}" if parent_name else attr), parent, attr, child


def adapter_modules(model: nn.Module, kind: type | tuple = ADAPTER_TYPES) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every medcare adapter module of the given type(s), in model order."""
    for name, module in model.named_modules():
        if isinstance(module, kind):
            yield name, module


def _replace(model: nn.Module, names: tuple[str, ...], build) -> dict[str, int]:
    if any(True for _ in adapter_modules(model)):
        raise InjectionError("the model already carries medcare adapters; load a fresh base model")
    found = list(find_linears(model, names))
    counts = {n: sum(1 for _, _, attr, _ in found if attr == n) for n in names}
    missing = [n for n, c in counts.items() if c == 0]
    if missing:  # checked before anything is replaced: a refused model is left exactly as it was
        kind = type(model).__name__
        raise InjectionError(f"{kind} has no nn.Linear modules named {', '.join(missing)}; medcare supports "
                             f"decoder LMs with q/k/v/o_proj and gate/up/down_proj (Qwen2/Qwen1.5, Qwen3, Llama, "
                             f"Mistral)")
    for _, parent, attr, layer in found:
        module = build(attr, layer)
        module.train(layer.training)  # an eval-mode model stays in eval mode (no adapter dropout)
        setattr(parent, attr, module)
    return counts


def freeze_non_adapters(model: nn.Module) -> InjectionReport:
    """requires_grad only on adapter parameters (the adapters' base layers stay frozen); count them."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module in adapter_modules(model):
        for p in module.parameters(recurse=False):
            p.requires_grad_(True)
    report = InjectionReport()
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        numel = getattr(p, "ds_numel", None) or p.numel()  # a ZeRO-3 partitioned parameter holds no local data
        report.total += numel
        report.trainable += numel if p.requires_grad else 0
    return report


def apply_stage1(model: nn.Module, cfg: Stage1Config) -> InjectionReport:
    """Attention LoRA on cfg.attn_targets, MoLoRA (experts + shared LoRA + router) on cfg.mlp_targets; with
    num_experts = 0 (no noise aggregator) the MLP projections get a LoRALinear holding the shared LoRA alone, as
    role "shared" (the checkpoint keys, the transition and stage 2 treat it exactly as MoLoRA's shared LoRA)."""
    cfg.validate()

    def build(attr: str, layer: nn.Linear) -> nn.Module:
        if attr in cfg.mlp_targets and not cfg.routed:
            return LoRALinear(layer, {"shared": cfg.shared_rank}, scaling=cfg.mlp_scaling, dropout=cfg.mlp_dropout,
                              dtype=cfg.adapter_dtype)
        if attr in cfg.mlp_targets:
            return MoLoRALinear(layer, num_experts=cfg.num_experts, top_k=cfg.top_k, expert_rank=cfg.expert_rank,
                                shared_rank=cfg.shared_rank, scaling=cfg.mlp_scaling, dropout=cfg.mlp_dropout,
                                dtype=cfg.adapter_dtype)
        return LoRALinear(layer, {"attention": cfg.attn_rank}, scaling=cfg.attn_scaling, dropout=cfg.attn_dropout,
                          dtype=cfg.adapter_dtype)

    counts = _replace(model, tuple(cfg.attn_targets) + tuple(cfg.mlp_targets), build)
    fuse_gate_up(model)
    report = freeze_non_adapters(model)
    report.replaced = counts
    return report


def fuse_gate_up(model: nn.Module) -> int:
    """Route each SwiGLU MLP whose gate_proj and up_proj are both MoLoRA through layers.gate_up_forward: one
    medcare_kernels.molora_gate_up call for both on the triton backend (one shrink GEMM, dA GEMM, router-wgrad
    pass and dX update instead of two), the MLP's own forward otherwise. Set as the instance's `forward`
    attribute (a functools.partial, so deepcopy and pickling follow the instance); the class, the modules and
    every state_dict key stay as they are. Returns how many MLPs were routed."""
    count = 0
    for _, module in model.named_modules():
        if (type(module).__name__ in GATE_UP_MLPS and "forward" not in vars(module)
                and isinstance(getattr(module, "gate_proj", None), MoLoRALinear)
                and isinstance(getattr(module, "up_proj", None), MoLoRALinear)):
            module.forward = functools.partial(gate_up_forward, module)
            count += 1
    return count


def apply_lora(model: nn.Module, targets, adapters: dict[str, int], *, scaling: float, dropout: float,
               dtype: str) -> InjectionReport:
    """LoRALinear with the named adapters (packed in this order, one scaling) on every nn.Linear named in
    `targets`; everything else frozen."""
    def build(attr: str, layer: nn.Linear) -> nn.Module:
        return LoRALinear(layer, adapters, scaling=scaling, dropout=dropout, dtype=dtype)

    counts = _replace(model, tuple(targets), build)
    report = freeze_non_adapters(model)
    report.replaced = counts
    return report


def apply_stage2(model: nn.Module, cfg: Stage2Config, knowledge_rank: int) -> InjectionReport:
    """Knowledge (rank = stage 1's shared rank) + alignment LoRAs, packed in that order, on cfg.targets.

    `cfg` must be resolved (config.resolve_stage2 fills rank, scaling and targets). The knowledge slots are
    left at their fresh initialisation: the stage-model builder (stage_model.py) copies stage 1's shared LoRA
    into them. With knowledge_rank 0 only the alignment LoRA exists.
    """
    cfg.validate()
    if not cfg.resolved:
        raise ValueError("apply_stage2 needs a resolved Stage2Config (medcare.config.resolve_stage2)")
    adapters = {"knowledge": knowledge_rank, "alignment": cfg.rank} if knowledge_rank else {"alignment": cfg.rank}
    report = apply_lora(model, cfg.targets, adapters, scaling=cfg.scaling, dropout=cfg.dropout,
                        dtype=cfg.adapter_dtype)
    if cfg.freeze_knowledge and knowledge_rank:
        for _, module in adapter_modules(model, LoRALinear):
            module.freeze_adapter("knowledge")
    return report
