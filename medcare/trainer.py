"""MedCare's Hugging Face Trainer: stage directories instead of model checkpoints, the explicit loss terms of
each stage, and the reliability the CLI promises.

    MedCareTrainer        saves the adapters as a stage directory (checkpoint-N and the output); adds the
                          stage-2 orthogonality penalty and the optional stage-1 load-balancing loss, each
                          weighted so that one optimizer step receives exactly coef * grad whatever the
                          gradient accumulation; checkpoints published by rename; a deterministic data order
    ReliabilityCallback   the numerical guard before every optimizer step, the data order's epoch
    ExpertUsageCallback   stage 1's expert-usage counters (medcare.usage) and load-balancing loss log
    fit                   train one stage with them (and the chunked loss head, medcare.loss_head) and write
                          its stage directory

The penalty is computed on the live parameters (a real gradient). Under FSDP / ZeRO-3 parameters are whole
only inside their module's forward, so there it is collected during the forward (OrthPenaltyCollector).
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from . import checkpoint as ckpt
from . import loss_head
from .data import DataCollator, EpochSampler
from .files import publish_checkpoint
from .losses import LoadBalanceCollector, OrthPenaltyCollector, orth_loss
from .usage import USAGE_FILE, ExpertUsage, make_report, read_report, save_usage, summary_lines, write_report

STAGING_PREFIX = ".partial-"  # checkpoint-N is written as .partial-checkpoint-N/checkpoint-N, then renamed


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or weight: training stopped before applying or saving it (exit status 1)."""


def last_good(output_dir: str) -> str:
    last = get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
    return f"the last good checkpoint is {last}" if last else "no checkpoint was saved before"


def remove_partial_checkpoints(output_dir: str) -> None:
    """Staging directories of saves that a kill interrupted: never complete, never resumed from."""
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith(STAGING_PREFIX + "checkpoint-"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


# ------------------------------------------------------------------------------------------ callbacks
class ReliabilityCallback(TrainerCallback):
    """The numerical guard before each optimizer step, and the epoch of the data order at each epoch start
    (also after a resume, where accelerate may not forward set_epoch)."""

    def __init__(self, trainer: MedCareTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.trainer.epoch_sampler is not None:
            self.trainer.epoch_sampler.set_epoch(int(state.epoch or 0))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.check_finite()


class ExpertUsageCallback(TrainerCallback):
    """Stage 1: counts expert usage (`count`), logs the mean load cv with every loss log, writes
    expert_usage.json + .png into the output directory and prints the summary at the end. The trainer adds the
    load-balancing loss when `coef` > 0 and reports it here (logged as router_aux_loss); the trainer also
    writes the counts into each checkpoint before it is published and restores them on resume."""

    def __init__(self, model, coef: float = 0.0, count: bool = True):
        self.usage = ExpertUsage(model) if count else None
        self.coef = coef
        self._aux_sum, self._aux_n = 0.0, 0

    def record_aux(self, value: torch.Tensor) -> None:
        """The load-balancing loss of one micro-batch (a detached device scalar: no sync)."""
        self._aux_sum = self._aux_sum + value
        self._aux_n += 1

    def log_values(self) -> dict[str, float]:
        """Extra values for a training log line (reads the counters: called at logging steps only)."""
        out = {}
        if self.usage is not None and self.usage.slots:
            report = make_report({n: (s.pairs.cpu(), s.tokens.cpu()) for n, s in self.usage.slots.items()},
                                 self.usage.num_experts, self.usage.top_k)
            out["expert_load_cv"] = round(report["summary"]["mean_cv"], 4)
        if self._aux_n:
            out["router_aux_loss"] = round(float(self._aux_sum) / self._aux_n, 4)
            self._aux_sum, self._aux_n = 0.0, 0
        return out

    def report(self, steps: int) -> dict | None:
        """The counts summed over processes (a collective: every rank calls it), or None when not counting."""
        return None if self.usage is None else self.usage.report(steps=steps, router_aux_loss_coef=self.coef)

    def resume(self, checkpoint: str, main_process: bool) -> None:
        """Continue the counts of a checkpoint; only the main process loads them (counts are summed over
        processes, so the others start at 0)."""
        if self.usage is not None and main_process and os.path.isfile(os.path.join(checkpoint, USAGE_FILE)):
            self.usage.load_report(read_report(checkpoint))

    def on_train_end(self, args, state, control, **kw):
        if self.usage is None:
            return
        report = self.report(state.global_step)
        self.usage.detach()
        if state.is_world_process_zero:
            _, png = save_usage(report, args.output_dir)
            print("medcare: " + "\n".join(summary_lines(report)), file=sys.stdout)
            print(f"medcare: expert usage written to {os.path.join(args.output_dir, USAGE_FILE)}"
                  + (f" and {png}" if png else ""))


# -------------------------------------------------------------------------------------------- trainer
class MedCareTrainer(Trainer):
    """HF Trainer that saves stage directories and adds each stage's explicit loss terms.

    Args (beyond Trainer's):
        stage_meta: the manifest fields of the stage directory (stage, configs, base model).
        orth_lambda: weight of the orthogonality penalty (stage 2; 0 = none).
        extra_tensors: tensors saved beside the adapters (stage 2 keeps stage 1's attention LoRA for export).
        routing: stage 1's ExpertUsageCallback (counts, load-balancing loss), added as a callback too.
    """

    def __init__(self, *args, stage_meta: dict, orth_lambda: float = 0.0, extra_tensors=None,
                 routing: ExpertUsageCallback | None = None, **kw):
        super().__init__(*args, **kw)
        self.stage_meta, self.orth_lambda, self.routing = stage_meta, orth_lambda, routing
        self.extra_tensors = extra_tensors or {}
        self._orth_sum, self._orth_n = 0.0, 0
        self._orth_start: float | None = None  # the penalty before the first update, logged once
        self._orth_start_logged = False
        self._sharded_params = self.is_fsdp_enabled or (
            self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3)
        self._staging: str | None = None  # set while a checkpoint is written under its temporary name
        self._bad_loss: float | None = None  # the first non-finite micro-batch loss of this step
        self.epoch_sampler: EpochSampler | None = None
        self.add_callback(ReliabilityCallback(self))
        if routing is not None:
            self.add_callback(routing)

    def train(self, resume_from_checkpoint: str | None = None, **kw):
        if resume_from_checkpoint and self.routing is not None:
            self.routing.resume(resume_from_checkpoint, self.is_world_process_zero())
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kw)

    # ------------------------------------------------------------------------------- loss terms
    def _term_weight(self, coef: float, num_items_in_batch) -> float:
        """coef / accumulation when the Trainer does not divide the loss by the accumulation itself (it then
        sums micro-batch losses normalised by the step's label count): one step receives exactly coef * grad."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)  # transformers >= 5.19 only
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None)
        ga = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return coef / ga if scaled else coef

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.routing is not None and self.routing.coef:
            out, extra = self._with_load_balance(model, inputs, return_outputs, num_items_in_batch)
        elif self.orth_lambda:
            out, extra = self._with_orth_penalty(model, inputs, return_outputs, num_items_in_batch)
        else:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if extra is None:
            return out
        return (out[0] + extra, *out[1:]) if return_outputs else out + extra

    def _with_load_balance(self, model, inputs, return_outputs, num_items_in_batch):
        with LoadBalanceCollector(model) as balance:
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        aux = balance.total()
        if aux is None:
            return out, None
        self.routing.record_aux(aux.detach())
        return out, self._term_weight(self.routing.coef, num_items_in_batch) * aux

    def _with_orth_penalty(self, model, inputs, return_outputs, num_items_in_batch):
        if self._sharded_params:
            with OrthPenaltyCollector(model) as collector:
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            penalty = collector.total()
        else:
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            penalty = orth_loss(model)
        if penalty is None:
            return out, None
        if self._orth_start is None:
            self._orth_start = float(penalty.detach())
        self._orth_sum += penalty.detach()
        self._orth_n += 1
        return out, self._term_weight(self.orth_lambda, num_items_in_batch) * penalty

    def log(self, logs, start_time=None):
        if self.routing is not None and "loss" in logs:
            logs.update(self.routing.log_values())
        if self._orth_n and "loss" in logs:
            logs["orth_loss"] = round(float(self._orth_sum) / self._orth_n, 4)
            self._orth_sum, self._orth_n = 0.0, 0
            if not self._orth_start_logged:
                logs["orth_loss_start"], self._orth_start_logged = round(self._orth_start, 4), True
        super().log(logs, start_time)

    # ------------------------------------------------------------------------ saving and loading
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
        except ckpt.CheckpointError as exc:  # non-finite adapters: the guard missed a divergence
            raise TrainingDiverged(f"at step {self.state.global_step}: {exc}; "
                                   f"{last_good(self.args.output_dir)}") from None

    def save_model(self, output_dir=None, _internal_call=False):
        # With a sharded FSDP state dict the HF Trainer writes only its shards and never calls _save:
        # gather the adapters (a collective, every rank) and write the stage directory as well.
        if self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(
                self.accelerator.state.fsdp_plugin.state_dict_type):
            tensors = self._gather_adapters()
            if self.args.should_save:
                self._write_stage(output_dir, tensors)
        super().save_model(output_dir, _internal_call)

    def _fsdp1(self) -> bool:
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
        """checkpoint-N is written whole under a temporary name (adapters, optimizer, RNG, trainer state and the
        expert-usage counts), fsynced, then renamed into place: a kill during the save leaves the previous
        checkpoint as the newest one (and --resume_from_checkpoint last finds it)."""
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_PREFIX + name)
        self._staging = staging
        os.makedirs(os.path.join(staging, name), exist_ok=True)
        try:
            super()._save_checkpoint(model, trial)  # its rotation sees only the staging directory
        finally:
            self._staging = None
        self._save_usage(os.path.join(staging, name))
        self.accelerator.wait_for_everyone()  # every rank's files (RNG state, shards) are written
        if self.args.should_save:
            publish_checkpoint(os.path.join(staging, name), os.path.join(run_dir, name))
            os.rmdir(staging)
            self._rotate(run_dir)
        self.accelerator.wait_for_everyone()

    def _save_usage(self, checkpoint_dir: str) -> None:
        report = self.routing.report(self.state.global_step) if self.routing is not None else None
        if report is not None and self.args.should_save:  # every rank took part in the sum above
            write_report(report, checkpoint_dir)

    def _rotate(self, run_dir: str) -> None:
        try:
            from transformers.trainer_utils import rotate_checkpoints
        except ImportError:  # older transformers: a Trainer method
            self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)
            return
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint)

    # ----------------------------------------------------------------------------------- data order
    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        strategy = getattr(self.args, "train_sampling_strategy", "random")
        if strategy not in ("group_by_length", "random") or not hasattr(dataset, "lengths"):
            return super()._get_train_sampler(train_dataset)
        group = (self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
                 * self.args.world_size) if strategy == "group_by_length" else None
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self.epoch_sampler = EpochSampler(dataset.lengths, group, seed)
        return self.epoch_sampler

    # ------------------------------------------------------------------------------- numerical guard
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = float(loss.detach().float().sum())
        return loss

    def _non_finite_grads(self) -> list[str]:
        # With fp16 loss scaling inf gradients are expected: the scaler skips that step itself.
        if getattr(self.accelerator, "scaler", None) is not None:
            return []
        params = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        local = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for _, p in params]
        if not local or bool(torch.stack([torch.isfinite(g).all() for g in local]).all()):
            return []
        return [ckpt.clean_name(n) for (n, _), g in zip(params, local, strict=True)
                if not bool(torch.isfinite(g).all())]

    def check_finite(self) -> None:
        """Before each optimizer step: stop (on every rank) if a micro-batch loss or a gradient is not finite."""
        bad_grads = self._non_finite_grads()
        flags = torch.tensor([self._bad_loss is not None, bool(bad_grads)], dtype=torch.float32,
                             device=self.args.device)
        if self.args.world_size > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        loss, self._bad_loss = self._bad_loss, None
        if not flags.any():
            return
        if flags[0]:
            what = f"the loss is {loss}" if loss is not None else "the loss is not finite on another process"
        else:
            what = (f"the gradient of {bad_grads[0]} is not finite" if bad_grads
                    else "a gradient is not finite on another process")
        raise TrainingDiverged(f"training stopped at step {self.state.global_step + 1}: {what}; the update was not "
                               f"applied and nothing was saved; {last_good(self.args.output_dir)} (lower the "
                               f"learning rate, or check the data, then resume)")


def install_loss_head(model, targs, chunked_loss: bool) -> loss_head.Installed | None:
    """The chunked loss head (medcare.loss_head) where it computes the model's own loss exactly, else None and
    a line saying why (printed once per job)."""
    if not chunked_loss:
        return None
    why = loss_head.unsupported(model) or (
        f"{targs.n_gpu} GPUs in one process (DataParallel replicas cannot share it); launch with torchrun"
        if targs.n_gpu > 1 else None)
    if why:
        if targs.process_index == 0:
            print(f"medcare: the chunked loss head is off: {why}; the model's own head computes every logit")
        return None
    return loss_head.install(model)


def fit(model, tokenizer, dataset, targs, meta: dict, *, resume: str | None = None, orth_lambda: float = 0.0,
        extra_tensors=None, routing: ExpertUsageCallback | None = None, chunked_loss: bool = True) -> list[dict]:
    """Train one stage with the HF Trainer and save its stage directory to targs.output_dir; returns the log
    history. `resume`: the checkpoint directory to continue from (already resolved). `chunked_loss`: the
    loss at supervised positions only, a chunk of logits at a time (medcare.loss_head), where it is exact."""
    if getattr(targs, "activation_checkpointing", False) or targs.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    model.config.use_cache = False
    head = install_loss_head(model, targs, chunked_loss)
    try:
        return _fit(model, tokenizer, dataset, targs, meta, resume, orth_lambda, extra_tensors, routing)
    finally:
        if head is not None:
            head.remove()


def _fit(model, tokenizer, dataset, targs, meta, resume, orth_lambda, extra_tensors, routing) -> list[dict]:
    trainer = MedCareTrainer(model=model, args=targs, train_dataset=dataset, data_collator=DataCollator(tokenizer),
                             processing_class=tokenizer, stage_meta=meta, orth_lambda=orth_lambda,
                             extra_tensors=extra_tensors, routing=routing)
    if targs.should_save:
        remove_partial_checkpoints(targs.output_dir)
    if trainer._sharded_params and trainer.is_world_process_zero():
        how = "DeepSpeed ZeRO-3" if trainer.is_deepspeed_enabled else "FSDP"
        print(f"medcare: parameters sharded by {how} over {targs.world_size} processes; the orthogonality "
              f"penalty is collected inside each projection's forward, the adapters are gathered to save")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(targs.output_dir)
    trainer.save_state()  # trainer_state.json beside the adapters: the run's log_history (loss, orth_loss, ...)
    return trainer.state.log_history
