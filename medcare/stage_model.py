"""The model a stage directory describes, built on a freshly loaded base: the one builder that the transition,
evaluation (`medcare.eval --stage-dir`), the demo's export check and export all use.

    build_stage_model(model, stage, experts=..., merged=..., alignment=...) -> BuiltStage

| stage directory | experts | merged | the model                                                                     |
|-----------------|---------|--------|-------------------------------------------------------------------------------|
| stage 1         | keep    | no     | the training model: attention LoRA + MoLoRA (routed experts, routers, shared) |
| stage 1         | drop    | no     | stage 1 without its noise aggregator, as the paper deploys it: attention LoRA  |
|                 |         |        | merged into W, the shared LoRA as a "knowledge" LoRA module                    |
| stage 1         | drop    | yes    | the same, everything merged into W (a plain model)                             |
| stage 1 + alignment=Stage2Config | | | the transition: the row above with a fresh alignment LoRA (B = 0) beside  |
|                 |         |        | knowledge, so it computes exactly what "stage 1 without experts" computes      |
| stage 2         |         | no     | attention merged; knowledge + alignment LoRA modules (what stage 2 trained)    |
| stage 2         |         | yes    | W += s_attn Ba Aa (attention) and s (Bk Ak + Ba Aa) (MLP): the export           |

Every scaling comes from the directory's recorded configs (attention: stage 1's alpha / rank; MLP: stage 1's
MoLoRA scaling, which stage 2 must share). Every check runs before a weight changes: a refused build leaves
the model as it was.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .checkpoint import CheckpointError, StageDir, check_base_matches, load_adapter_state
from .config import Stage2Config, resolve_stage2
from .inject import InjectionReport, apply_lora, apply_stage1, apply_stage2

EXPERT_MODES = ("drop", "keep")


@dataclass
class BuiltStage:
    """What build_stage_model did."""

    description: str
    attention: dict[str, torch.Tensor] = field(default_factory=dict)  # stage 1's attention LoRA (merged into W)
    report: InjectionReport | None = None       # the adapter modules put on the model (None when all merged)
    stage2: Stage2Config | None = None          # the resolved stage-2 config of the model (transition, stage 2)
    merged_pairs: int = 0                       # LoRA pairs merged into W (attention, and all with merged=True)


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


@torch.no_grad()
def merge_lora_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], scalings: dict[str, float]) -> int:
    """W += sum over roles of s_role * B A, for every "<module>.<role>.lora_a/b" pair in `tensors` whose role
    is in `scalings` (the module may be a plain nn.Linear or an adapter's base layer). Deltas are summed in
    fp32 and each weight is updated once, so a bf16 checkpoint is rounded once. Every module is looked up
    before any weight changes: a refused merge leaves the model as it was. Returns the pairs merged."""
    deltas: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    merged = 0
    for key, a in tensors.items():
        name, role, tensor = key.rsplit(".", 2)
        if tensor != "lora_a" or role not in scalings:
            continue
        layer = _find(model, name)
        if layer is None:
            raise CheckpointError(f"the model has no module {name!r} for adapter tensor {key!r}")
        weights[name] = getattr(layer, "base_layer", layer).weight
        delta = scalings[role] * (tensors[f"{name}.{role}.lora_b"].float() @ a.float())
        deltas[name] = deltas[name] + delta if name in deltas else delta
        merged += 1
    with _whole(list(weights.values())):
        for name, delta in deltas.items():
            w = weights[name]
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
    return merged


def _whole(params: list[torch.Tensor]):
    """A context in which the parameters are whole: under DeepSpeed ZeRO-3 (a model built while a ZeRO-3
    TrainingArguments is alive is partitioned as it loads) they are gathered, and what rank 0 writes into them
    is partitioned again on exit (every rank computes the same delta); otherwise nothing to do."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


def build_stage_model(model: nn.Module, stage: StageDir, *, experts: str = "drop", merged: bool = False,
                      alignment: Stage2Config | None = None) -> BuiltStage:
    """Put what `stage` holds on `model` (a fresh base, modified in place); see the module docstring."""
    if experts not in EXPERT_MODES:
        raise ValueError(f"experts must be one of {', '.join(EXPERT_MODES)}, got {experts!r}")
    problems = []
    if alignment is not None and (stage.stage != 1 or merged or experts == "keep"):
        problems.append("a fresh alignment LoRA goes on a stage-1 directory without experts, unmerged")
    if merged and stage.stage == 1 and experts == "keep":
        problems.append("routed experts depend on the input and cannot be merged into W")
    if problems:
        raise ValueError("; ".join(problems))
    check_base_matches(stage, model.config)
    if stage.stage == 1 and experts == "keep":
        report = apply_stage1(model, stage.stage1)
        load_adapter_state(model, stage.tensors)
        return BuiltStage("stage 1 (routed experts kept)", report=report)
    if stage.stage == 1:
        return _stage1_without_experts(model, stage, merged, alignment)
    return _stage2(model, stage, merged)


def _stage1_without_experts(model: nn.Module, stage: StageDir, merged: bool,
                            alignment: Stage2Config | None) -> BuiltStage:
    s1 = stage.stage1
    cfg = resolve_stage2(alignment or Stage2Config(dropout=0.0), s1)  # checked before any weight changes
    attention, knowledge = stage.role("attention"), stage.role("shared", rename="knowledge")
    if merged:
        n = merge_lora_tensors(model, {**attention, **knowledge}, {"attention": s1.attn_scaling,
                                                                   "knowledge": s1.mlp_scaling})
        return BuiltStage("stage 1 without routed experts, merged into the weights", attention, stage2=cfg,
                          merged_pairs=n)
    n = merge_lora_tensors(model, attention, {"attention": s1.attn_scaling})
    if alignment is not None:
        report = apply_stage2(model, cfg, knowledge_rank=s1.shared_rank)
        what = "stage-2 start: stage 1's shared LoRA as knowledge + a fresh alignment LoRA"
    elif s1.shared_rank:
        report = apply_lora(model, cfg.targets, {"knowledge": s1.shared_rank}, scaling=cfg.scaling, dropout=0.0,
                            dtype=cfg.adapter_dtype)
        what = "stage 1 (shared LoRA only, routed experts dropped)"
    else:
        return BuiltStage("stage 1 (attention LoRA only: no shared LoRA, routed experts dropped)", attention,
                          merged_pairs=n)
    if s1.shared_rank:
        load_adapter_state(model, knowledge, roles=("knowledge",))
    return BuiltStage(what, attention, report, cfg, n)


def _stage2(model: nn.Module, stage: StageDir, merged: bool) -> BuiltStage:
    s1 = stage.stage1
    cfg = resolve_stage2(stage.stage2, s1)
    attention = stage.role("attention")
    if merged:
        n = merge_lora_tensors(model, stage.tensors, {"attention": s1.attn_scaling, "knowledge": cfg.scaling,
                                                      "alignment": cfg.scaling})
        return BuiltStage(f"stage 2 merged into the weights ({n} adapters)", attention, stage2=cfg, merged_pairs=n)
    n = merge_lora_tensors(model, attention, {"attention": s1.attn_scaling})
    report = apply_stage2(model, cfg, knowledge_rank=s1.shared_rank)
    load_adapter_state(model, stage.tensors, roles=("knowledge", "alignment"))
    return BuiltStage("stage 2 (knowledge + alignment LoRAs, unmerged)", attention, report, cfg, n)
