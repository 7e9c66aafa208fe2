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

Reliability: checkpoints (checkpoint-N) are built under a temporary name and renamed into place, so a kill
during a save leaves the previous one intact; `--resume_from_checkpoint last` continues a killed run exactly
(adapters, optimizer, scheduler, RNG and data order: the sampler's order is a function of seed and epoch);
a NaN or infinite loss or gradient stops training before the optimizer applies it (exit status 1, naming the
step), and non-finite adapters are never written. Under torchrun on CPU the gloo backend is selected.
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


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or weight: training stopped before applying or saving it (exit status 1)."""


STAGING_PREFIX = ".partial-"  # checkpoint-N is written as .partial-checkpoint-N/checkpoint-N, then renamed


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
    # Under torchrun without CUDA, accelerate only sets up gloo DDP when told to use the CPU; otherwise every
    # process would train alone on all the data and all would write the same output.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return dict(use_cpu=multi_cpu, ddp_find_unused_parameters=False,  # every adapter parameter gets a gradient
                learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0,
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
    if stage == 2 and cfg.freeze_knowledge and targs.fsdp and int((targs.fsdp_config or {}).get("version", 2)) == 1:
        problems.append("--freeze_knowledge does not work with FSDP1 (its flattened parameters bypass the gradient "
                        "mask); use FSDP2 (fsdp_config version 2) or DDP")
    if stage == 2 and cfg.freeze_knowledge and targs.weight_decay > 0:
        problems.append("--freeze_knowledge with --weight_decay > 0 would still decay the frozen knowledge LoRA; "
                        "use --weight_decay 0")
    problems += _output_problems(run, targs)
    problems += _launch_problems(targs)
    if problems:
        raise UserError("; ".join(problems))
    _check_backend()
    return run, cfg, targs


def _launch_problems(targs) -> list[str]:
    """A multi-process launch that would not train as one job (each process alone) is refused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and targs.world_size != world:
        return [f"launched as {world} processes but the Trainer set up {targs.world_size} (pass --use_cpu true "
                f"on a machine without GPUs, or check the launcher's environment)"]
    return []


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


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: cannot load the model ({str(exc).splitlines()[0]})") from None


def load_model_and_tokenizer(path: str, dtype: torch.dtype):
    return load_model(path, dtype), load_tokenizer(path)


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
    """Tokenise (before the model is loaded). A record that truncation leaves without a supervised token is
    a bad record like any other: an error under --on_bad_records fail, skipped and counted under skip."""
    import warnings

    try:
        with warnings.catch_warnings():  # the drop is reported below, as an error or in the skip count
            warnings.simplefilter("ignore")
            dataset = data_mod.SupervisedDataset(loaded.records, tokenizer, run.model_max_length,
                                                 mask=run.label_mask)
    except ValueError as exc:  # e.g. truncation left no supervised token in any record, or a bad chat template
        raise UserError(str(exc).splitlines()[0]) from None
    truncated = [loaded.origins[i] for i in dataset.dropped_indices] if loaded.origins else []
    if truncated and run.on_bad_records == "fail":
        where = "; ".join(f"{path}:{loc}" for path, loc in truncated[:3])
        more = f" (and {len(truncated) - 3} more)" if len(truncated) > 3 else ""
        raise UserError(f"{where}{more}: no assistant token left after truncation to {dataset.max_length} tokens; "
                        f"raise --model_max_length or pass --on_bad_records skip")
    skipped = loaded.skipped + dataset.dropped
    if skipped:
        _say(f"medcare: skipped {skipped} bad records of {loaded.total} ({loaded.skipped} invalid, "
             f"{dataset.dropped} truncated away)", err=True)
    if len(dataset) == 0:
        raise UserError(f"no trainable records in {', '.join(run.data)} (every record was dropped)")
    return dataset


def _say(message: str, err: bool = False) -> None:
    """Print once per job: on the main process only under torchrun / accelerate."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr if err else sys.stdout)


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
            self._staging: str | None = None  # set while a checkpoint is written under its temporary name
            self._bad_loss: float | None = None  # the first non-finite micro-batch loss of this step
            self.epoch_sampler = None
            for callback in _callbacks(self):
                self.add_callback(callback)

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

        # ------------------------------------------------------------------ saving and loading
        def _save(self, output_dir=None, state_dict=None):
            if not self.args.should_save:
                return
            if state_dict is not None and not state_dict:
                raise RuntimeError("DeepSpeed ZeRO-3 gave no gathered weights to save: set "
                                   "stage3_gather_16bit_weights_on_model_save to true in the DeepSpeed config")
            model = self.accelerator.unwrap_model(self.model)
            self._write_stage(output_dir, ckpt.adapter_state(model, state_dict))

        def _write_stage(self, output_dir, tensors) -> None:
            try:
                ckpt.save_stage(output_dir or self.args.output_dir, {**tensors, **self.extra_tensors},
                                self.stage_meta)
            except ckpt.CheckpointError as exc:  # non-finite adapters: the guard below missed a divergence
                raise TrainingDiverged(f"at step {self.state.global_step}: {exc}; "
                                       f"{_last_good(self.args.output_dir)}") from None

        def save_model(self, output_dir=None, _internal_call=False):
            # With a sharded FSDP state dict the HF Trainer writes only its shards and never calls _save:
            # gather the adapters (a collective, every rank) and write the stage directory as well.
            if self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(
                    self.accelerator.state.fsdp_plugin.state_dict_type):
                tensors = self._gather_adapters()
                if self.args.should_save:
                    self._write_stage(output_dir, tensors)
            super().save_model(output_dir, _internal_call)

        def _fsdp1(self):
            from torch.distributed.fsdp import FullyShardedDataParallel

            return isinstance(self.model_wrapped, FullyShardedDataParallel)

        def _gather_adapters(self) -> dict:
            model = self.accelerator.unwrap_model(self.model)
            if self._fsdp1():
                from torch.distributed.fsdp import FullyShardedDataParallel

                with FullyShardedDataParallel.summon_full_params(self.model_wrapped, writeback=False):
                    return ckpt.adapter_state(model)
            return ckpt.adapter_state(model)  # FSDP2: DTensor parameters are gathered one by one

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            stage = ckpt.read_stage(resume_from_checkpoint, expect_stage=self.stage_meta["stage"])
            if self.is_fsdp_enabled and self._fsdp1():
                from torch.distributed.fsdp import FullyShardedDataParallel

                with FullyShardedDataParallel.summon_full_params(self.model_wrapped, writeback=True):
                    ckpt.load_adapter_state(self.accelerator.unwrap_model(self.model), stage.tensors)
                return
            ckpt.load_adapter_state(self.accelerator.unwrap_model(model or self.model), stage.tensors)

        def _get_output_dir(self, trial):
            return self._staging or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            """checkpoint-N is written whole under a temporary name, fsynced, then renamed into place: a kill
            during the save leaves the previous checkpoint as the newest one (and --resume ... last finds it)."""
            run_dir = super()._get_output_dir(trial)
            name = f"checkpoint-{self.state.global_step}"
            self._staging = os.path.join(run_dir, STAGING_PREFIX + name)
            os.makedirs(os.path.join(self._staging, name), exist_ok=True)
            try:
                super()._save_checkpoint(model, trial)  # its rotation sees only the staging directory
            finally:
                self._staging = None
            self.accelerator.wait_for_everyone()  # every rank's files (RNG state, shards) are written
            if self.args.should_save:
                staging = os.path.join(run_dir, STAGING_PREFIX + name)
                ckpt.publish_checkpoint(os.path.join(staging, name), os.path.join(run_dir, name))
                os.rmdir(staging)
                self._rotate(run_dir)
            self.accelerator.wait_for_everyone()

        def _rotate(self, run_dir: str) -> None:
            try:
                from transformers.trainer_utils import rotate_checkpoints
            except ImportError:  # older transformers: a Trainer method
                self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)
                return
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)

        # --------------------------------------------------------------------------- data order
        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            strategy = getattr(self.args, "train_sampling_strategy", "random")
            if strategy not in ("group_by_length", "random") or not hasattr(dataset, "lengths"):
                return super()._get_train_sampler(train_dataset)
            group = (self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
                     * self.args.world_size) if strategy == "group_by_length" else None
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self.epoch_sampler = data_mod.EpochSampler(dataset.lengths, group, seed)
            return self.epoch_sampler

        # ------------------------------------------------------------------------ numerical guard
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self._bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
                self._bad_loss = float(loss.detach().float().sum())
            return loss

        def check_finite(self) -> None:
            """Before each optimizer step: stop (on every rank) if a micro-batch loss or a gradient is not
            finite. With fp16 loss scaling inf gradients are expected: the scaler skips that step itself."""
            bad_grads: list[str] = []
            if getattr(self.accelerator, "scaler", None) is None:
                params = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
                local = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for _, p in params]
                if local and not bool(torch.stack([torch.isfinite(g).all() for g in local]).all()):
                    bad_grads = [ckpt.clean_name(n) for (n, _), g in zip(params, local, strict=True)
                                 if not bool(torch.isfinite(g).all())]
            flags = torch.tensor([self._bad_loss is not None, bool(bad_grads)], dtype=torch.float32,
                                 device=self.args.device)
            if self.args.world_size > 1:
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            loss, self._bad_loss = self._bad_loss, None
            if flags.any():
                step = self.state.global_step + 1
                what = (f"the loss is {loss}" if loss is not None else "the loss is not finite on another process"
                        ) if flags[0] else (f"the gradient of {bad_grads[0]} is not finite" if bad_grads
                                            else "a gradient is not finite on another process")
                raise TrainingDiverged(f"training stopped at step {step}: {what}; the update was not applied and "
                                       f"nothing was saved; {_last_good(self.args.output_dir)} (lower the learning "
                                       f"rate, or check the data, then resume)")

    return MedCareTrainer


def _last_good(output_dir: str) -> str:
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
    return f"the last good checkpoint is {last}" if last else "no checkpoint was saved before"


def _callbacks(trainer) -> list:
    """Per-step hooks the trainer needs: the numerical guard before each optimizer step, and the epoch of
    the data order at each epoch start (also after a resume, where accelerate may not forward set_epoch)."""
    from transformers import TrainerCallback

    class ReliabilityCallback(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            sampler = getattr(trainer, "epoch_sampler", None)
            if sampler is not None:
                sampler.set_epoch(int(state.epoch or 0))

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            trainer.check_finite()

    return [ReliabilityCallback()]


def _remove_partial_checkpoints(output_dir: str) -> None:
    """Staging directories of saves that a kill interrupted: never complete, never resumed from."""
    import shutil

    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith(STAGING_PREFIX + "checkpoint-"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


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
    if targs.should_save:
        _remove_partial_checkpoints(targs.output_dir)
    trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    trainer.save_model(targs.output_dir)
    return trainer.state.log_history


# -------------------------------------------------------------------------------------------- stages
def _seed(targs) -> None:
    """Seed before the adapters are created, so their initial values depend on --seed only."""
    from transformers import set_seed

    set_seed(targs.seed)


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
    tokenizer = load_tokenizer(run.model)
    dataset = build_dataset(run, loaded, tokenizer)  # every data problem is found before the weights load
    model = load_model(run.model, _dtype(run.model_dtype))
    _seed(targs)
    report = apply_stage1(model, cfg)
    _say(f"medcare: stage 1 on {run.model}: {report}")
    meta = {"stage": 1, "stage1": cfg.to_dict(),
            "base_model": {"path": os.path.abspath(run.model), "fingerprint": ckpt.model_fingerprint(model.config)}}
    routing = usage_callback(model, cfg.router_aux_loss_coef, count=cfg.expert_usage) \
        if cfg.expert_usage or cfg.router_aux_loss_coef else None
    history = _fit(model, tokenizer, dataset, targs, meta, routing=routing)
    _say(f"medcare: stage 1 saved to {targs.output_dir}")
    return StageResult(targs.output_dir, history)


def run_stage2(argv: list[str]) -> StageResult:
    run, cfg, targs = parse_stage_args(2, argv)
    stage1 = ckpt.load_stage1(run.stage1, run.official_top_k)
    config = load_config(run.model)
    ckpt.check_base_matches(stage1, config)  # before loading any weights
    check_targets(config, cfg.targets or stage1.stage1.mlp_targets)
    loaded = check_data(run)
    tokenizer = load_tokenizer(run.model)
    dataset = build_dataset(run, loaded, tokenizer)
    model = load_model(run.model, _dtype(run.model_dtype))
    _seed(targs)  # the fresh alignment A is drawn here: the same on every process and every run
    attention, report = ckpt.transition(model, stage1, cfg)
    _say(f"medcare: stage 2 on {run.model} from {run.stage1}: {report}; "
         f"{len(orth_pairs(model)[0])} projections under the orthogonality penalty")
    meta = {"stage": 2, "stage1": stage1.stage1.to_dict(), "stage2": cfg.to_dict(),
            "stage1_dir": os.path.abspath(run.stage1),
            "base_model": {"path": os.path.abspath(run.model), "fingerprint": ckpt.model_fingerprint(model.config)}}
    history = _fit(model, tokenizer, dataset, targs, meta, orth_lambda=cfg.orth_lambda, extra_tensors=attention)
    _say(f"medcare: stage 2 saved to {targs.output_dir}")
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
        _close_process_group(finished=True)
        return 0
    except (UserError, ckpt.CheckpointError, ConfigError, data_mod.DataError, InjectionError) as exc:
        print(f"medcare: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"medcare: error: {exc}", file=sys.stderr)
        return 1
    finally:
        _close_process_group(finished=False)


def _close_process_group(finished: bool) -> None:
    """Under torchrun the Trainer starts a process group; end it before the interpreter exits. Left alive, gloo's
    threads can abort a rank at exit after a successful run ("terminate called without an active exception",
    seen once in CI). After a successful run every rank gets here, so they first wait for each other; on an
    error path a barrier could wait for a rank that is gone, so the group is only destroyed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
