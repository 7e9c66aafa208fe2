"""MedCare two-stage fine-tuning on a Hugging Face causal LM.

    python -m medcare.train                 # the bundled demo: stage 1 -> stage 2 -> export, on CPU
    python -m medcare.train stage1 --model DIR --data FILE [FILE ...] --output DIR [options]
    python -m medcare.train stage2 --model DIR --stage1 DIR --data FILE [FILE ...] --output DIR [options]
    python -m medcare.train export --stage2 DIR --output DIR [--model DIR]

Options follow Hugging Face TrainingArguments names (learning_rate, num_train_epochs,
per_device_train_batch_size, gradient_accumulation_steps, bf16, gradient_checkpointing, save_steps,
resume_from_checkpoint, report_to, ...), so torchrun / accelerate launch / FSDP / DeepSpeed work as usual;
the adapter options are the fields of medcare.config.Stage1Config / Stage2Config (`--help` lists all).
`--config FILE` (YAML or JSON, a mapping of option names to values) can hold any of them; the command
line wins over the file. recipes/ has the paper's settings for Qwen1.5-7B.
Defaults are the paper's recipe: lr 2e-4 cosine, 3% warmup, batch 4 x 8 accumulation, 1 epoch in stage 1
and 3 in stage 2, bf16 where the GPU supports it.

`--stage1` also accepts the original implementation's stage-1 output (non_lora_trainables.bin + the PEFT
attention adapter); it is converted in memory.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field

import torch

from . import checkpoint as ckpt
from . import data as data_mod
from .config import ConfigError, Stage1Config, Stage2Config
from .inject import InjectionError, apply_stage1
from .losses import LoadBalanceCollector, OrthPenaltyCollector, orth_loss, orth_pairs
from .usage import usage_callback


class UserError(Exception):
    """A mistake in the command line, files or directories: reported as one line, exit status 2."""


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
    overwrite_output: bool = field(default=False, metadata={"help": "allow a non-empty --output (its stage "
                                                                    "directory and checkpoints are replaced)"})


# ------------------------------------------------------------------------------------------ arguments
def _recipe_defaults(stage: int) -> dict:
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return dict(learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0,
                num_train_epochs=1.0 if stage == 1 else 3.0, per_device_train_batch_size=4,
                gradient_accumulation_steps=8, logging_steps=10, save_steps=500, save_total_limit=2,
                report_to="none", remove_unused_columns=False, bf16=bf16, seed=42,
                train_sampling_strategy="group_by_length", dataloader_pin_memory=torch.cuda.is_available())


def _rename_output(argv: list[str]) -> list[str]:
    """DESIGN's --output is TrainingArguments' --output_dir."""
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
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such config file")
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:  # ValueError covers JSON and UTF-8 decoding errors
        raise UserError(f"{path}: unreadable config file ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: a config file must be a mapping of option names to values")
    return {("output_dir" if k == "output" else k): v for k, v in values.items()}


def parse_stage_args(stage: int, argv: list[str]):
    """(RunArguments, Stage1Config | Stage2Config, TrainingArguments), or UserError listing every problem.
    Precedence: command line > --config file > the paper's recipe > library defaults."""
    from transformers import HfArgumentParser, TrainingArguments

    cfg_cls = Stage1Config if stage == 1 else Stage2Config
    parser = HfArgumentParser((RunArguments, cfg_cls, TrainingArguments), prog=f"python -m medcare.train stage{stage}")
    parser.set_defaults(**_recipe_defaults(stage))
    argv, config_path = _pop_config(_rename_output(argv))
    from_file = read_config_file(config_path) if config_path else {}
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(from_file) - known)
    if unknown:
        raise UserError(f"{config_path}: unknown options {', '.join(unknown)} (see --help)")
    parser.set_defaults(**from_file)
    try:
        run, cfg, targs = parser.parse_args_into_dataclasses(argv)
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    problems = []
    for name in ("model", "data") + (("stage1",) if stage == 2 else ()):
        if not getattr(run, name):
            problems.append(f"--{name} is required")
    if not targs.output_dir:
        problems.append("--output is required")
    if run.label_mask not in ("assistant", "official"):
        problems.append(f"--label_mask must be assistant or official, got {run.label_mask!r}")
    if run.on_bad_records not in ("fail", "skip"):
        problems.append(f"--on_bad_records must be fail or skip, got {run.on_bad_records!r}")
    try:
        cfg.validate()
    except ConfigError as exc:
        problems += exc.problems
    if stage == 2 and cfg.freeze_knowledge and targs.weight_decay > 0:
        problems.append("--freeze_knowledge with --weight_decay > 0 would still decay the frozen knowledge LoRA; "
                        "use --weight_decay 0")
    problems += _output_problems(run, targs)
    if problems:
        raise UserError("; ".join(problems))
    _check_backend()
    return run, cfg, targs


def _output_problems(run: RunArguments, targs) -> list[str]:
    """Never write over what a user has: the inputs, or a non-empty output unless resuming or asked to.
    `--resume_from_checkpoint true|last` means the newest checkpoint-* in --output."""
    from transformers.trainer_utils import get_last_checkpoint

    out = targs.output_dir
    if not out:
        return []
    real = os.path.realpath(out)
    if any(p and os.path.realpath(p) == real for p in (run.model, run.stage1)):
        return [f"--output {out} is also an input (--model or --stage1); choose a new directory"]
    resume = targs.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = get_last_checkpoint(out) if os.path.isdir(out) else None
        if resume is None:
            return [f"--resume_from_checkpoint {targs.resume_from_checkpoint}: no checkpoint-* in {out}"]
        targs.resume_from_checkpoint = resume
    if resume:
        missing = [f for f in (ckpt.MANIFEST_FILE, "trainer_state.json") if not os.path.isfile(os.path.join(resume, f))]
        if missing:
            return [f"--resume_from_checkpoint {resume}: not a training checkpoint (no {', '.join(missing)})"]
    elif os.path.isdir(out) and os.listdir(out) and not run.overwrite_output:
        return [f"--output {out} already exists and is not empty; pass --resume_from_checkpoint last to continue, "
                f"--overwrite_output true to replace it, or choose a new directory"]
    return []


def _check_backend() -> None:
    """A bad MEDCARE_KERNELS_BACKEND is a user error found before any model loads, not mid-training."""
    import medcare_kernels as mk

    try:
        name = mk.current_backend()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    status = mk.available_backends().get(name)
    if name != "auto" and status is not None and not status.startswith("available"):
        raise UserError(f"MEDCARE_KERNELS_BACKEND={name}: {status}")


# ---------------------------------------------------------------------------------- models and data
def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--model_dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def check_model_dir(path: str) -> None:
    """A local model directory must hold config.json; anything else must at least look like a hub id."""
    if os.path.exists(path):
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{path}: not a Hugging Face model directory (no config.json)")
    elif not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise UserError(f"{path}: no such model directory")


def load_config(path: str):
    from transformers import AutoConfig

    check_model_dir(path)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: cannot load the model config ({str(exc).splitlines()[0]})") from None


def load_model_and_tokenizer(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: cannot load the model or tokenizer ({str(exc).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_targets(config, names: list[str]) -> None:
    """The projections to adapt exist in this architecture: checked on a weightless (meta) skeleton, so
    a wrong name costs no weight loading."""
    from transformers import AutoModelForCausalLM

    from .inject import find_linears

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    found = {attr for _, _, attr, _ in find_linears(skeleton, tuple(names))}
    missing = [n for n in names if n not in found]
    if missing:
        raise UserError(f"{type(skeleton).__name__} has no nn.Linear modules named {', '.join(missing)}; "
                        f"pick target projections it has (medcare knows q/k/v/o_proj and gate/up/down_proj)")


def check_data(run: RunArguments) -> data_mod.LoadResult:
    """Read and validate the data once, before any model is loaded; every problem is found, the first
    few are reported in one line. The result feeds build_dataset, so the files are parsed only once."""
    try:
        loaded = data_mod.load_records(run.data, on_error="skip")
        problems, fatal = loaded.problems, False
    except data_mod.DataError as exc:  # an unusable file, or no good record left
        problems, fatal = exc.problems, True
    if problems and (fatal or run.on_bad_records == "fail"):
        first = "; ".join(str(p) for p in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{first}{more}; `python -m medcare.data check {' '.join(run.data)}` lists every problem"
                        + ("" if fatal else ", or pass --on_bad_records skip"))
    return loaded


def build_dataset(run: RunArguments, loaded: data_mod.LoadResult, tokenizer):
    if loaded.problems:
        print(f"medcare: skipped {loaded.skipped} bad records of {loaded.total}", file=sys.stderr)
    try:
        dataset = data_mod.SupervisedDataset(loaded.records, tokenizer, run.model_max_length, mask=run.label_mask)
    except ValueError as exc:  # e.g. truncation left no supervised token in any record, or a bad chat template
        raise UserError(str(exc).splitlines()[0]) from None
    if len(dataset) == 0:
        raise UserError(f"no trainable records in {', '.join(run.data)} (every record was dropped)")
    return dataset


# ------------------------------------------------------------------------------------------- trainer
def _trainer_class():
    from transformers import Trainer

    class MedCareTrainer(Trainer):
        """HF Trainer that saves stage directories and adds the orthogonality penalty in stage 2.

        The penalty enters each micro-step with weight lambda / accumulation when the Trainer does not
        divide the loss by the accumulation itself: either way, one optimizer step receives exactly
        lambda * grad(L_orth), whatever gradient_accumulation_steps is.
        """

        def __init__(self, *args, stage_meta: dict, orth_lambda: float = 0.0, extra_tensors=None, routing=None,
                     **kw):
            super().__init__(*args, **kw)
            self.routing = routing  # stage 1: medcare.usage's callback (expert usage, load-balancing loss)
            self.stage_meta, self.orth_lambda = stage_meta, orth_lambda
            self.extra_tensors = extra_tensors or {}
            self._orth_sum, self._orth_n = 0.0, 0
            self._orth_start: float | None = None  # the penalty before the first update, logged once
            self._orth_start_logged = False
            self._orth_in_forward = self.is_fsdp_enabled or (
                self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3)

        def _orth_weight(self, num_items_in_batch, coef: float | None = None) -> float:
            scaled = getattr(self, "loss_is_scaled_for_ga", None)  # transformers >= 5.19 only
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                    self.compute_loss_func is not None)
            ga = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            coef = self.orth_lambda if coef is None else coef
            return coef / ga if scaled else coef

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.routing is not None and self.routing.coef and model.training:
                with LoadBalanceCollector(model) as balance:  # stage 1's optional load-balancing term
                    out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                aux = balance.total()
                if aux is None:
                    return out
                self.routing.record_aux(aux.detach())
                extra = self._orth_weight(num_items_in_batch, self.routing.coef) * aux
                return (out[0] + extra, *out[1:]) if return_outputs else out + extra
            if not self.orth_lambda or not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self._orth_in_forward:
                with OrthPenaltyCollector(model) as collector:
                    out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                penalty = collector.total()
            else:
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                penalty = orth_loss(model)
            if penalty is None:
                return out
            if self._orth_start is None:
                self._orth_start = float(penalty.detach())
            self._orth_sum += penalty.detach()
            self._orth_n += 1
            extra = self._orth_weight(num_items_in_batch) * penalty
            return (out[0] + extra, *out[1:]) if return_outputs else out + extra

        def log(self, logs, start_time=None):
            if self.routing is not None and "loss" in logs:
                logs.update(self.routing.log_values())
            if self._orth_n and "loss" in logs:
                logs["orth_loss"] = round(float(self._orth_sum) / self._orth_n, 4)
                self._orth_sum, self._orth_n = 0.0, 0
                if not self._orth_start_logged:
                    logs["orth_loss_start"], self._orth_start_logged = round(self._orth_start, 4), True
            super().log(logs, start_time)

        def _save(self, output_dir=None, state_dict=None):
            if not self.args.should_save:
                return
            if state_dict is not None and not state_dict:
                raise RuntimeError("DeepSpeed ZeRO-3 gave no gathered weights to save: set "
                                   "stage3_gather_16bit_weights_on_model_save to true in the DeepSpeed config")
            model = self.accelerator.unwrap_model(self.model)
            tensors = {**ckpt.adapter_state(model, state_dict), **self.extra_tensors}
            ckpt.save_stage(output_dir or self.args.output_dir, tensors, self.stage_meta)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            stage = ckpt.read_stage(resume_from_checkpoint, expect_stage=self.stage_meta["stage"])
            ckpt.load_adapter_state(self.accelerator.unwrap_model(model or self.model), stage.tensors)

    return MedCareTrainer


def _fit(model, tokenizer, dataset, targs, meta: dict, orth_lambda: float = 0.0, extra_tensors=None,
         routing=None) -> list[dict]:
    """Train with the HF Trainer, save the stage directory to targs.output_dir; return the log history."""
    # transformers >= 5.2x calls it activation_checkpointing; older releases gradient_checkpointing.
    if getattr(targs, "activation_checkpointing", False) or targs.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
        for name in ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"):
            if hasattr(targs, name) and getattr(targs, name) is None:
                setattr(targs, name, {"use_reentrant": False})
    model.config.use_cache = False
    trainer = _trainer_class()(model=model, args=targs, train_dataset=dataset,
                               data_collator=data_mod.DataCollator(tokenizer), processing_class=tokenizer,
                               stage_meta=meta, orth_lambda=orth_lambda, extra_tensors=extra_tensors,
                               routing=routing, callbacks=[routing] if routing is not None else None)
    trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    trainer.save_model(targs.output_dir)
    return trainer.state.log_history


# -------------------------------------------------------------------------------------------- stages
@dataclass
class StageResult:
    output: str
    log_history: list[dict] = field(default_factory=list)

    def logged(self, key: str) -> list[float]:
        return [float(h[key]) for h in self.log_history if key in h]


def run_stage1(argv: list[str]) -> StageResult:
    run, cfg, targs = parse_stage_args(1, argv)
    check_targets(load_config(run.model), cfg.attn_targets + cfg.mlp_targets)
    loaded = check_data(run)
    model, tokenizer = load_model_and_tokenizer(run.model, _dtype(run.model_dtype))
    report = apply_stage1(model, cfg)
    print(f"medcare: stage 1 on {run.model}: {report}")
    dataset = build_dataset(run, loaded, tokenizer)
    meta = {"stage": 1, "stage1": cfg.to_dict(),
            "base_model": {"path": os.path.abspath(run.model), "fingerprint": ckpt.model_fingerprint(model.config)}}
    routing = usage_callback(model, cfg.router_aux_loss_coef, count=cfg.expert_usage) \
        if cfg.expert_usage or cfg.router_aux_loss_coef else None
    history = _fit(model, tokenizer, dataset, targs, meta, routing=routing)
    print(f"medcare: stage 1 saved to {targs.output_dir}")
    return StageResult(targs.output_dir, history)


def run_stage2(argv: list[str]) -> StageResult:
    run, cfg, targs = parse_stage_args(2, argv)
    stage1 = ckpt.load_stage1(run.stage1, run.official_top_k)
    config = load_config(run.model)
    ckpt.check_base_matches(stage1, config)  # before loading any weights
    check_targets(config, cfg.targets or stage1.stage1.mlp_targets)
    loaded = check_data(run)
    model, tokenizer = load_model_and_tokenizer(run.model, _dtype(run.model_dtype))
    attention, report = ckpt.transition(model, stage1, cfg)
    print(f"medcare: stage 2 on {run.model} from {run.stage1}: {report}; "
          f"{len(orth_pairs(model)[0])} projections under the orthogonality penalty")
    dataset = build_dataset(run, loaded, tokenizer)
    meta = {"stage": 2, "stage1": stage1.stage1.to_dict(), "stage2": cfg.to_dict(),
            "stage1_dir": os.path.abspath(run.stage1),
            "base_model": {"path": os.path.abspath(run.model), "fingerprint": ckpt.model_fingerprint(model.config)}}
    history = _fit(model, tokenizer, dataset, targs, meta, orth_lambda=cfg.orth_lambda, extra_tensors=attention)
    print(f"medcare: stage 2 saved to {targs.output_dir}")
    return StageResult(targs.output_dir, history)


def run_export(argv: list[str]) -> StageResult:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m medcare.train export",
                                 description="merge a stage-2 directory into a plain Hugging Face checkpoint")
    ap.add_argument("--stage2", required=True, help="the stage-2 output directory")
    ap.add_argument("--output", required=True, help="where to write the merged model (must not exist)")
    ap.add_argument("--model", help="base model directory (default: the one recorded in the stage-2 directory)")
    ap.add_argument("--dtype", default="auto", help="dtype of the saved weights: auto (the base checkpoint's), "
                                                    "float32, bfloat16, float16")
    args = ap.parse_args(argv)
    stage2 = ckpt.read_stage(args.stage2, expect_stage=2)
    base = args.model or stage2.meta["base_model"]["path"]
    if os.path.exists(args.output) and (not os.path.isdir(args.output) or os.listdir(args.output)):
        raise UserError(f"{args.output} already exists and is not empty; choose a new --output")
    ckpt.check_base_matches(stage2, load_config(base))
    model, tokenizer = load_model_and_tokenizer(base, _export_dtype(base, args.dtype))
    merged = ckpt.merge_stage2(model, stage2)

    def build(tmp: str) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    ckpt.publish_dir(build, args.output)
    print(f"medcare: merged {merged} adapters into {base}; plain Hugging Face checkpoint written to {args.output}")
    return StageResult(args.output)


def _export_dtype(base: str, name: str) -> torch.dtype:
    if name != "auto":
        return _dtype(name)
    dt = getattr(load_config(base), "dtype", None) or torch.float32
    return getattr(torch, dt) if isinstance(dt, str) else dt


COMMANDS = {"stage1": run_stage1, "stage2": run_stage2, "export": run_export}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv or argv[0] == "demo":
            from .demo import main as demo_main

            return demo_main(argv[1:])
        if argv[0] in ("-h", "--help"):
            print(__doc__)
            return 0
        if argv[0] not in COMMANDS:
            raise UserError(f"unknown command {argv[0]!r}; expected one of demo, {', '.join(COMMANDS)} (see --help)")
        COMMANDS[argv[0]](argv[1:])
        return 0
    except (UserError, ckpt.CheckpointError, ConfigError, data_mod.DataError, InjectionError) as exc:
        print(f"medcare: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
