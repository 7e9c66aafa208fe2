"""The options of `python -m medcare.train stage1|stage2`: parsed, checked all at once, never rewritten.

Options are Hugging Face TrainingArguments names plus the fields of RunArguments and Stage1Config /
Stage2Config. Precedence: command line > `--config FILE` (YAML or JSON) > the paper's recipe (below) >
library defaults. Every problem is found before any model loads and reported together, as one UserError.
Validation reads the arguments and returns what it derived (the checkpoint to resume from) instead of
writing it back into TrainingArguments.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import medcare_kernels as mk

from .checkpoint import MANIFEST_FILE
from .config import ConfigError, Stage1Config, Stage2Config
from .loading import DTYPES, UserError, bf16_ok


@dataclass
class RunArguments:
    """What to train on; everything else is a TrainingArguments or a Stage*Config field."""

    model: str = field(default=None, metadata={"help": "base model: a Hugging Face model directory (or hub id)"})
    data: list[str] = field(default=None, metadata={"help": "training data files (JSON or JSONL)"})
    stage1: str = field(default=None, metadata={"help": "stage 2 only: the stage-1 output directory"})
    model_max_length: int = field(default=None, metadata={"help": "truncate sequences to this many tokens "
                                                                  "(default: the tokenizer's, else 2048)"})
    label_mask: str = field(default="assistant", metadata={"help": "assistant: supervise assistant replies only; "
                                                                   "official: the original implementation's masking"})
    on_bad_records: str = field(default="fail", metadata={"help": "fail | skip: what a bad data record does"})
    model_dtype: str = field(default="auto", metadata={"help": "dtype to load the base model in: auto (bf16 on a "
                                                               "bf16 GPU, else float32), float32, bfloat16, float16"})
    official_top_k: int = field(default=None, metadata={"help": "stage 2 from an original stage-1 directory whose "
                                                                "config.json lacks num_experts_per_token"})
    chunked_loss: bool = field(default=True, metadata={"help": "compute the LM loss only at supervised positions, "
                                                               "a chunk of logits at a time (never all of them); "
                                                               "false: the model's own loss head"})
    overwrite_output: bool = field(default=False, metadata={"help": "allow a non-empty --output (its stage "
                                                                    "directory and checkpoints are replaced)"})


@dataclass
class StageArgs:
    """A checked stage command line."""

    run: RunArguments
    cfg: Stage1Config | Stage2Config
    targs: TrainingArguments
    resume: str | None  # the checkpoint directory to continue from (--resume_from_checkpoint, resolved)


def recipe_defaults(stage: int, known: set[str]) -> dict:
    """The paper's recipe as option defaults (only options this transformers release has)."""
    # Under torchrun without CUDA, accelerate only sets up gloo DDP when told to use the CPU; otherwise every
    # process would train alone on all the data and all would write the same output.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    defaults = dict(use_cpu=multi_cpu, ddp_find_unused_parameters=False,  # every adapter gets a gradient
                    learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0,
                    num_train_epochs=1.0 if stage == 1 else 3.0, per_device_train_batch_size=4,
                    gradient_accumulation_steps=8, logging_steps=10, save_steps=500, save_total_limit=2,
                    report_to="none", remove_unused_columns=False, bf16=bf16_ok(), seed=42,
                    train_sampling_strategy="group_by_length", dataloader_pin_memory=torch.cuda.is_available())
    # Non-reentrant checkpointing: frozen inputs of a checkpointed block still get a gradient path. Newer
    # transformers name the option activation_checkpointing_kwargs, older ones gradient_checkpointing_kwargs.
    ckpt_kwargs = next((k for k in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs") if k in known),
                       None)
    if ckpt_kwargs:
        defaults[ckpt_kwargs] = {"use_reentrant": False}
    return {k: v for k, v in defaults.items() if k in known}


def _rename_output(argv: list[str]) -> list[str]:
    """The CLI's --output is TrainingArguments' --output_dir."""
    out = []
    for a in argv:
        if a == "--output":
            a = "--output_dir"
        elif a.startswith("--output="):
            a = "--output_dir=" + a.split("=", 1)[1]
        out.append(a)
    return out


def _pop_config(argv: list[str]) -> tuple[list[str], str | None]:
    """Remove `--config FILE` (or --config=FILE) from argv."""
    out, path, it = [], None, iter(argv)
    for a in it:
        if a == "--config":
            path = next(it, None)
            if path is None:
                raise UserError("--config needs a file (YAML or JSON)")
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            out.append(a)
    return out, path


def read_config_file(path: str) -> dict:
    """A flat mapping of option name -> value from a YAML or JSON file (no code is ever executed)."""
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such config file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:  # ValueError covers JSON and UTF-8 decoding errors
        raise UserError(f"{path}: unreadable config file ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: a config file must be a mapping of option names to values")
    return {("output_dir" if k == "output" else k): v for k, v in values.items()}


def stage_parser(stage: int) -> HfArgumentParser:
    cfg_cls = Stage1Config if stage == 1 else Stage2Config
    parser = HfArgumentParser((RunArguments, cfg_cls, TrainingArguments), prog=f"python -m medcare.train stage{stage}")
    parser.set_defaults(**recipe_defaults(stage, {a.dest for a in parser._actions}))
    return parser


def parse_stage_args(stage: int, argv: list[str]) -> StageArgs:
    """The checked options of a stage command, or UserError listing every problem."""
    parser = stage_parser(stage)
    argv, config_path = _pop_config(_rename_output(argv))
    from_file = read_config_file(config_path) if config_path else {}
    unknown = sorted(set(from_file) - {a.dest for a in parser._actions})
    if unknown:
        raise UserError(f"{config_path}: unknown options {', '.join(unknown)} (see --help)")
    parser.set_defaults(**from_file)
    start_deepspeed(argv, from_file)
    try:
        run, cfg, targs = parser.parse_args_into_dataclasses(argv)
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    resume, resume_problems = resolve_resume(targs)
    problems = _required(stage, run, targs) + _choice_problems(run) + _config_problems(stage, cfg, targs)
    problems += resume_problems + _output_problems(run, targs, resume) + _launch_problems(targs)
    if problems:
        raise UserError("; ".join(problems))
    check_backend()
    return StageArgs(run, cfg, targs, resume)


def _deepspeed_config(argv: list[str], from_file: dict) -> str | None:
    for i, a in enumerate(argv):
        if a == "--deepspeed":
            return argv[i + 1] if i + 1 < len(argv) else ""
        if a.startswith("--deepspeed="):
            return a.split("=", 1)[1]
    return from_file.get("deepspeed")


def start_deepspeed(argv: list[str], from_file: dict) -> None:
    """With --deepspeed: DeepSpeed must be installed (one line saying what to install otherwise), and under a
    multi-process launch without GPUs its communication layer is started on gloo before TrainingArguments
    exist. Otherwise accelerate sets up plain gloo DDP there (--use_cpu), DeepSpeed's own view of the job stays
    at one process, and the first ZeRO-3 model construction stops with "train_batch_size 4 != 2 * 1 * 1". On
    GPUs accelerate starts it itself."""
    config = _deepspeed_config(argv, from_file)
    if config is None:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, with gloo below
    try:
        import deepspeed
    except ImportError:
        raise UserError("--deepspeed needs DeepSpeed: pip install 'medcare[deepspeed]' (or pip install deepspeed)"
                        ) from None
    if config and not config.lstrip().startswith("{") and not os.path.isfile(config):
        raise UserError(f"--deepspeed {config}: no such DeepSpeed config file")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        import deepspeed.comm

        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def _required(stage: int, run: RunArguments, targs) -> list[str]:
    problems = [f"--{name} is required" for name in ("model", "data") + (("stage1",) if stage == 2 else ())
                if not getattr(run, name)]
    return problems + ([] if targs.output_dir else ["--output is required"])


def _choice_problems(run: RunArguments) -> list[str]:
    problems = []
    if run.label_mask not in ("assistant", "official"):
        problems.append(f"--label_mask must be assistant or official, got {run.label_mask!r}")
    if run.on_bad_records not in ("fail", "skip"):
        problems.append(f"--on_bad_records must be fail or skip, got {run.on_bad_records!r}")
    if run.model_dtype not in DTYPES:  # found here, with the others, before the model loads
        problems.append(f"--model_dtype must be one of {', '.join(DTYPES)}, got {run.model_dtype!r}")
    return problems


def _config_problems(stage: int, cfg, targs) -> list[str]:
    try:
        cfg.validate()
        problems = []
    except ConfigError as exc:
        problems = list(exc.problems)
    if stage == 2 and cfg.freeze_knowledge and targs.fsdp and int((targs.fsdp_config or {}).get("version", 2)) == 1:
        problems.append("--freeze_knowledge does not work with FSDP1 (its flattened parameters bypass the gradient "
                        "mask); use FSDP2 (fsdp_config version 2) or DDP")
    if stage == 2 and cfg.freeze_knowledge and targs.weight_decay > 0:
        problems.append("--freeze_knowledge with --weight_decay > 0 would still decay the frozen knowledge LoRA; "
                        "use --weight_decay 0")
    return problems


def _launch_problems(targs) -> list[str]:
    """A multi-process launch that would not train as one job (each process alone) is refused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and targs.world_size != world:
        return [f"launched as {world} processes but the Trainer set up {targs.world_size} (pass --use_cpu true "
                f"on a machine without GPUs, or check the launcher's environment)"]
    return []


def resolve_resume(targs) -> tuple[str | None, list[str]]:
    """(the checkpoint directory --resume_from_checkpoint names, problems). `true` / `last` mean the newest
    checkpoint-* in --output; a checkpoint must hold a stage manifest and the trainer state."""
    resume, out = targs.resume_from_checkpoint, targs.output_dir
    if not resume or not out:
        return None, []
    if resume.lower() in ("true", "last"):
        resume = get_last_checkpoint(out) if os.path.isdir(out) else None
        if resume is None:
            return None, [f"--resume_from_checkpoint {targs.resume_from_checkpoint}: no checkpoint-* in {out}"]
    missing = [f for f in (MANIFEST_FILE, "trainer_state.json") if not os.path.isfile(os.path.join(resume, f))]
    if missing:
        return None, [f"--resume_from_checkpoint {resume}: not a training checkpoint (no {', '.join(missing)})"]
    return resume, []


def _output_problems(run: RunArguments, targs, resume: str | None) -> list[str]:
    """Never write over what a user has: the inputs, or a non-empty output unless resuming or asked to."""
    out = targs.output_dir
    if not out:
        return []
    real = os.path.realpath(out)
    if any(p and os.path.realpath(p) == real for p in (run.model, run.stage1)):
        return [f"--output {out} is also an input (--model or --stage1); choose a new directory"]
    if not targs.resume_from_checkpoint and os.path.isdir(out) and os.listdir(out) and not run.overwrite_output:
        return [f"--output {out} already exists and is not empty; pass --resume_from_checkpoint last to continue, "
                f"--overwrite_output true to replace it, or choose a new directory"]
    return []


def check_backend() -> None:
    """A bad MEDCARE_KERNELS_BACKEND is a user error found before any model loads, not mid-training."""
    try:
        name = mk.current_backend()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    status = mk.available_backends().get(name)
    if name != "auto" and status is not None and not status.startswith("available"):
        raise UserError(f"MEDCARE_KERNELS_BACKEND={name}: {status}")
