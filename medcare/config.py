"""Typed configuration of the two MedCare stages. Every check runs up front and all problems are reported
together (one ConfigError listing each), before a model is loaded or a file is written."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields

from .loading import UserError

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "auto")


class ConfigError(UserError):
    """One or more invalid settings; str() lists every problem on its own line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration: " + "; ".join(problems))


def _check_common(cfg, problems: list[str]) -> None:
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:  # "take it from stage 1" (Stage2Config.rank / scaling / targets)
            continue
        if f.name.endswith("rank") and (not isinstance(v, int) or v < (0 if f.name == "shared_rank" else 1)):
            problems.append(f"{f.name} must be an int >= {0 if f.name == 'shared_rank' else 1}, got {v!r}")
        if f.name.endswith("alpha") and (not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            problems.append(f"{f.name} must be a positive number, got {v!r}")
        if f.name.endswith("dropout") and (not isinstance(v, (int, float)) or not 0.0 <= v < 1.0):
            problems.append(f"{f.name} must be in [0, 1), got {v!r}")
    if cfg.adapter_dtype not in ADAPTER_DTYPES:
        problems.append(f"adapter_dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {cfg.adapter_dtype!r}")


@dataclass
class Stage1Config:
    """Stage 1, knowledge aggregation: attention LoRA + MoLoRA (routed experts + shared LoRA) on the MLP."""

    attn_rank: int = field(default=16, metadata={"help": "rank of the attention LoRA (q/k/v/o)"})
    attn_alpha: float = field(default=32.0, metadata={"help": "attention LoRA alpha; scaling = alpha / rank"})
    attn_dropout: float = field(default=0.05, metadata={"help": "dropout on the attention LoRA input"})
    num_experts: int = field(default=8, metadata={"help": "E, routed LoRA experts per MLP projection (0: none, "
                                                            "the MLP gets the shared LoRA only, a plain LoRA)"})
    top_k: int = field(default=2, metadata={"help": "K, experts each token is routed to (unused when E = 0)"})
    expert_rank: int = field(default=16, metadata={"help": "R, rank of each routed expert"})
    shared_rank: int = field(default=32, metadata={"help": "Rs, rank of the always-on shared (knowledge) LoRA"})
    mlp_alpha: float = field(default=32.0, metadata={"help": "MoLoRA alpha; scaling = alpha / expert_rank, "
                                                             "shared by experts and the shared LoRA"})
    mlp_dropout: float = field(default=0.0, metadata={"help": "dropout on the MoLoRA input (paper: 0)"})
    attn_targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS),
                                    metadata={"help": "attention projections"})
    mlp_targets: list[str] = field(default_factory=lambda: list(MLP_TARGETS), metadata={"help": "MLP projections"})
    adapter_dtype: str = field(default="float32", metadata={"help": "dtype of adapter and router parameters "
                                                                    "(float32 as the paper; auto = the model's)"})
    router_aux_loss_coef: float = field(default=0.0, metadata={"help": "weight of the load-balancing loss "
                                                                       "E * sum_e f_e P_e (0 = off, the paper)"})
    expert_usage: bool = field(default=True, metadata={"help": "count expert usage during training; write "
                                                               "expert_usage.json + .png into the output"})

    @property
    def attn_scaling(self) -> float:
        return self.attn_alpha / self.attn_rank

    @property
    def mlp_scaling(self) -> float:
        return self.mlp_alpha / self.expert_rank

    @property
    def routed(self) -> bool:
        """Whether the MLP has routed experts (the noise aggregator); num_experts = 0 leaves the shared LoRA only."""
        return self.num_experts > 0

    def validate(self) -> Stage1Config:
        problems: list[str] = []
        _check_common(self, problems)
        if isinstance(self.num_experts, int) and isinstance(self.top_k, int):
            if self.num_experts < 0:
                problems.append(f"num_experts must be >= 0, got {self.num_experts}")
            elif self.num_experts == 0:  # no noise aggregator: the MLP's shared LoRA is all there is
                if isinstance(self.shared_rank, int) and self.shared_rank < 1:
                    problems.append("num_experts = 0 needs shared_rank >= 1: without routed experts the shared LoRA "
                                    "is the only MLP adapter")
            elif not 1 <= self.top_k <= self.num_experts:
                problems.append(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        else:
            problems.append(f"num_experts and top_k must be ints, got {self.num_experts!r}, {self.top_k!r}")
        if not self.mlp_targets:
            problems.append("mlp_targets is empty; stage 1 needs at least one MLP projection")
        coef = self.router_aux_loss_coef
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
            problems.append(f"router_aux_loss_coef must be a number >= 0, got {coef!r}")
        elif coef and self.num_experts == 0:
            problems.append(f"router_aux_loss_coef = {coef} balances routed experts, and num_experts = 0 has none")
        if problems:
            raise ConfigError(problems)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# Stage 2 without a stage-1 directory to take them from (a plain model): the paper's values.
STAGE2_FALLBACK_RANK, STAGE2_FALLBACK_SCALING = 32, 2.0


@dataclass
class Stage2Config:
    """Stage 2, downstream alignment: knowledge LoRA (from stage 1's shared LoRA) + new alignment LoRA."""

    rank: int | None = field(default=None, metadata={"help": "rank of the alignment LoRA (default: stage 1's "
                                                             "shared rank Rs; the knowledge LoRA keeps Rs)"})
    scaling: float | None = field(default=None, metadata={"help": "LoRA scaling of both adapters (default and "
                                                                  "required: stage 1's MoLoRA scaling)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapters' input (one shared draw)"})
    orth_lambda: float = field(default=1.0, metadata={"help": "weight of the orthogonality penalty "
                                                              "sum |A_knowledge A_alignment^T|"})
    freeze_knowledge: bool = field(default=False, metadata={"help": "train the alignment LoRA only"})
    targets: list[str] | None = field(default=None, metadata={"help": "MLP projections (default: those stage 1 "
                                                                      "trained MoLoRA on)"})
    adapter_dtype: str = field(default="float32", metadata={"help": "dtype of adapter parameters"})

    def validate(self) -> Stage2Config:
        problems: list[str] = []
        _check_common(self, problems)
        if self.scaling is not None and (not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling)):
            problems.append(f"scaling must be a finite number, got {self.scaling!r}")
        lam = self.orth_lambda
        if not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            problems.append(f"orth_lambda must be a number >= 0, got {self.orth_lambda!r}")
        if self.targets is not None and not self.targets:
            problems.append("targets is empty; stage 2 needs at least one MLP projection")
        if problems:
            raise ConfigError(problems)
        return self

    @property
    def resolved(self) -> bool:
        """Whether rank, scaling and targets are filled in (`resolve_stage2`)."""
        return None not in (self.rank, self.scaling, self.targets)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_stage2(cfg: Stage2Config, stage1: Stage1Config | None) -> Stage2Config:
    """A new, validated Stage2Config with every "take it from stage 1" field filled in; the only place the
    fallbacks live. With a stage-1 config: rank = its shared rank (its expert rank when it has no shared LoRA),
    scaling = its MoLoRA scaling (required: the knowledge LoRA must start exactly where stage 1 left it),
    targets = its MoLoRA targets (others would have no knowledge LoRA). Without one: the paper's values."""
    cfg.validate()
    if stage1 is None:
        return dataclasses.replace(cfg, rank=cfg.rank or STAGE2_FALLBACK_RANK,
                                   scaling=STAGE2_FALLBACK_SCALING if cfg.scaling is None else cfg.scaling,
                                   targets=list(MLP_TARGETS) if cfg.targets is None else list(cfg.targets))
    problems = []
    scaling = stage1.mlp_scaling if cfg.scaling is None else cfg.scaling
    if abs(scaling - stage1.mlp_scaling) > 1e-12:
        problems.append(f"stage-2 scaling {scaling} differs from stage 1's MoLoRA scaling {stage1.mlp_scaling}: the "
                        f"knowledge LoRA would not start where stage 1 left it (pass --scaling {stage1.mlp_scaling})")
    targets = list(stage1.mlp_targets) if cfg.targets is None else list(cfg.targets)
    extra = sorted(set(targets) - set(stage1.mlp_targets))
    if stage1.shared_rank and extra:
        problems.append(f"stage 1 trained MoLoRA on {', '.join(stage1.mlp_targets)} only, so {', '.join(extra)} has "
                        f"no knowledge LoRA; pass --targets {' '.join(stage1.mlp_targets)}")
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(cfg, rank=cfg.rank or stage1.shared_rank or stage1.expert_rank, scaling=scaling,
                               targets=targets)
