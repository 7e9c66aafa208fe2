"""MedCare two-stage fine-tuning on a Hugging Face causal LM.

    python -m medcare.train                 # the bundled demo: stage 1 -> stage 2 -> export -> eval
    python -m medcare.train [demo] --output DIR [demo options]    (python -m medcare.train demo --help)
    python -m medcare.train stage1 --model DIR --data FILE [FILE ...] --output DIR [options]
    python -m medcare.train stage2 --model DIR --stage1 DIR --data FILE [FILE ...] --output DIR [options]
    python -m medcare.train export --stage2 DIR --output DIR [--model DIR]

Options follow Hugging Face TrainingArguments names (learning_rate, num_train_epochs,
per_device_train_batch_size, gradient_accumulation_steps, bf16, gradient_checkpointing, save_steps,
resume_from_checkpoint, report_to, ...), so torchrun / accelerate launch / FSDP / DeepSpeed work as usual;
the adapter options are the fields of medcare.config.Stage1Config / Stage2Config
(`python -m medcare.train stage1 --help` lists all; the same for stage2, export, demo).
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

import atexit
import os
import sys
from typing import NoReturn

import torch.distributed as dist

from .demo import main as demo_main
from .loading import UserError
from .pipeline import COMMANDS
from .trainer import TrainingDiverged

SUBCOMMANDS = ("demo", *COMMANDS)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__.strip())
            print(f"\nsubcommands: {', '.join(SUBCOMMANDS)}; "
                  f"`python -m medcare.train SUBCOMMAND --help` lists its options")
            return 0
        if not argv or argv[0] == "demo" or argv[0].startswith("-"):  # options without a subcommand: the demo's
            return demo_main(argv[1:] if argv and argv[0] == "demo" else argv)
        if argv[0] not in COMMANDS:
            raise UserError(f"unknown command {argv[0]!r}; expected one of {', '.join(SUBCOMMANDS)} (see --help)")
        COMMANDS[argv[0]](argv[1:])
        close_process_group(finished=True)
        return 0
    except UserError as exc:  # ConfigError, DataError, CheckpointError, InjectionError, ... derive from it
        print(f"medcare: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"medcare: error: {exc}", file=sys.stderr)
        return 1
    finally:
        close_process_group(finished=False)


_closed_gloo_group = False


def close_process_group(finished: bool) -> None:
    """Under torchrun the Trainer starts a process group; end it before the interpreter exits. After a
    successful run every rank gets here, so they first wait for each other (rank 0 may still be writing the
    stage directory); on an error path a barrier could wait for a rank that is gone, so the group is only
    destroyed. A no-op without a process group."""
    global _closed_gloo_group
    if not (dist.is_available() and dist.is_initialized()):
        return
    _closed_gloo_group = _closed_gloo_group or dist.get_backend() == "gloo"
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """Exit with `code`. After a gloo process group, without the interpreter's final teardown: a gloo worker
    thread can still hold a finished collective (a barrier holds the collectives before it) whose tensors have
    Python objects; when it drops them during interpreter finalization it waits for the GIL, is torn down by
    pthread_exit, and the process aborts ("terminate called without an active exception", SIGABRT, seen in
    CI on a successful run; core dump: ~AsyncAllgatherCoalescedWork in ProcessGroupGloo::runLoop ->
    decref_pyobject -> take_gil -> PyThread_exit_thread). Everything registered with atexit (logging, report
    integrations) still runs first and the streams are flushed; only the finalization is skipped."""
    if not _closed_gloo_group:
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_process(main())
