"""The three steps of MedCare as functions of a command line: stage 1, stage 2 (from a stage-1 directory) and
export. `python -m medcare.train` (medcare/train.py) dispatches to them; the demo calls them directly with
the command lines it prints.

Each step checks everything it can before loading weights: the options (medcare.args), the data (every
record, and the truncation check with the model's tokenizer), the target projections (on a weightless
skeleton), and for stage 2 the stage-1 directory against the base model.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, set_seed

from . import checkpoint as ckpt
from .args import RunArguments, parse_stage_args
from .config import resolve_stage2
from .data import DataError, LoadResult, SupervisedDataset, load_records
from .files import publish_dir
from .inject import apply_stage1, find_linears
from .loading import (
    CommandParser,
    UserError,
    checkpoint_dtype,
    load_config,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_dtype,
)
from .losses import orth_pairs
from .stage_model import build_stage_model
from .trainer import ExpertUsageCallback, fit


@dataclass
class StageResult:
    output: str
    log_history: list[dict] = field(default_factory=list)

    def logged(self, key: str) -> list[float]:
        return [float(h[key]) for h in self.log_history if key in h]


def say(message: str, err: bool = False) -> None:
    """Print once per job: on the main process only under torchrun / accelerate."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr if err else sys.stdout)


# ------------------------------------------------------------------------------------------ checks
@contextmanager
def no_zero3_init(targs):
    """Model construction without DeepSpeed's ZeRO-3 partitioning (transformers applies it to every model built
    while a ZeRO-3 TrainingArguments is alive): for the weightless skeleton below, which zero.Init cannot
    partition (meta tensors hold no data)."""
    hf_config = getattr(targs, "hf_deepspeed_config", None)
    if hf_config is None:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(hf_config)


def check_targets(config, names: list[str], targs=None) -> None:
    """The projections to adapt exist in this architecture: checked on a weightless (meta) skeleton, so
    a wrong name costs no weight loading."""
    with no_zero3_init(targs), torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    found = {attr for _, _, attr, _ in find_linears(skeleton, tuple(names))}
    missing = [n for n in names if n not in found]
    if missing:
        raise UserError(f"{type(skeleton).__name__} has no nn.Linear modules named {', '.join(missing)}; "
                        f"pick target projections it has (medcare knows q/k/v/o_proj and gate/up/down_proj)")


def check_data(run: RunArguments) -> LoadResult:
    """Read and validate the data once, before any model is loaded; every problem is found, the first
    few are reported in one line. The result feeds build_dataset, so the files are parsed only once."""
    try:
        loaded = load_records(run.data, on_error="skip")
        problems, fatal = loaded.problems, False
    except DataError as exc:  # an unusable file, or no good record left
        problems, fatal = exc.problems, True
    if problems and (fatal or run.on_bad_records == "fail"):
        first = "; ".join(str(p) for p in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{first}{more}; `python -m medcare.data check {' '.join(run.data)}` lists every problem"
                        + ("" if fatal else ", or pass --on_bad_records skip"))
    return loaded


def build_dataset(run: RunArguments, loaded: LoadResult, tokenizer) -> SupervisedDataset:
    """Tokenise (before the model is loaded). A record that truncation leaves without a supervised token is
    a bad record like any other: an error under --on_bad_records fail, skipped and counted under skip."""
    try:
        with warnings.catch_warnings():  # the drop is reported below, as an error or in the skip count
            warnings.simplefilter("ignore")
            dataset = SupervisedDataset(loaded.records, tokenizer, run.model_max_length, mask=run.label_mask)
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
        say(f"medcare: skipped {skipped} bad records of {loaded.total} ({loaded.skipped} invalid, "
            f"{dataset.dropped} truncated away)", err=True)
    if len(dataset) == 0:
        raise UserError(f"no trainable records in {', '.join(run.data)} (every record was dropped)")
    return dataset


def _tokenized(run: RunArguments):
    """(tokenizer, dataset): the data is read, checked and tokenised before any weight loads."""
    loaded = check_data(run)
    tokenizer = load_tokenizer(run.model)
    return tokenizer, build_dataset(run, loaded, tokenizer)


def _base_meta(path: str, model) -> dict:
    return {"path": os.path.abspath(path), "fingerprint": ckpt.model_fingerprint(model.config)}


# ------------------------------------------------------------------------------------------ stages
def run_stage1(argv: list[str]) -> StageResult:
    args = parse_stage_args(1, argv)
    run, cfg, targs = args.run, args.cfg, args.targs
    check_targets(load_config(run.model), cfg.attn_targets + cfg.mlp_targets, targs)
    tokenizer, dataset = _tokenized(run)
    model = load_model(run.model, resolve_dtype(run.model_dtype))
    set_seed(targs.seed)  # before the adapters are created: their initial values depend on --seed only
    report = apply_stage1(model, cfg)
    say(f"medcare: stage 1 on {run.model}: {report}")
    meta = {"stage": 1, "stage1": cfg.to_dict(), "base_model": _base_meta(run.model, model)}
    routing = ExpertUsageCallback(model, cfg.router_aux_loss_coef, count=cfg.expert_usage) \
        if cfg.routed and (cfg.expert_usage or cfg.router_aux_loss_coef) else None
    history = fit(model, tokenizer, dataset, targs, meta, resume=args.resume, routing=routing,
                  chunked_loss=run.chunked_loss)
    say(f"medcare: stage 1 saved to {targs.output_dir}")
    return StageResult(targs.output_dir, history)


def run_stage2(argv: list[str]) -> StageResult:
    args = parse_stage_args(2, argv)
    run, targs = args.run, args.targs
    stage1 = ckpt.load_stage1(run.stage1, run.official_top_k)
    cfg = resolve_stage2(args.cfg, stage1.stage1)
    config = load_config(run.model)
    ckpt.check_base_matches(stage1, config)  # before loading any weights
    check_targets(config, cfg.targets, targs)
    tokenizer, dataset = _tokenized(run)
    model = load_model(run.model, resolve_dtype(run.model_dtype))
    set_seed(targs.seed)  # the fresh alignment A is drawn here: the same on every process and every run
    built = build_stage_model(model, stage1, alignment=cfg)
    say(f"medcare: stage 2 on {run.model} from {run.stage1}: {built.report}; "
        f"{len(orth_pairs(model)[0])} projections under the orthogonality penalty")
    meta = {"stage": 2, "stage1": stage1.stage1.to_dict(), "stage2": built.stage2.to_dict(),
            "stage1_dir": os.path.abspath(run.stage1), "base_model": _base_meta(run.model, model)}
    history = fit(model, tokenizer, dataset, targs, meta, resume=args.resume, orth_lambda=cfg.orth_lambda,
                  extra_tensors=built.attention, chunked_loss=run.chunked_loss)
    say(f"medcare: stage 2 saved to {targs.output_dir}")
    return StageResult(targs.output_dir, history)


def export_parser() -> CommandParser:
    ap = CommandParser(prog="python -m medcare.train export",
                                 description="merge a stage-2 directory into a plain Hugging Face checkpoint")
    ap.add_argument("--stage2", required=True, help="the stage-2 output directory")
    ap.add_argument("--output", required=True, help="where to write the merged model (must not exist)")
    ap.add_argument("--model", help="base model directory (default: the one recorded in the stage-2 directory)")
    ap.add_argument("--dtype", default="auto", help="dtype of the saved weights: auto (the base checkpoint's), "
                                                    "float32, bfloat16, float16")
    return ap


def run_export(argv: list[str]) -> StageResult:
    args = export_parser().parse_args(argv)
    stage2 = ckpt.read_stage(args.stage2, expect_stage=2)
    base = args.model or stage2.meta["base_model"]["path"]
    if os.path.exists(args.output) and (not os.path.isdir(args.output) or os.listdir(args.output)):
        raise UserError(f"{args.output} already exists and is not empty; choose a new --output")
    ckpt.check_base_matches(stage2, load_config(base))
    dtype = checkpoint_dtype(base) if args.dtype == "auto" else resolve_dtype(args.dtype, option="--dtype")
    model, tokenizer = load_model_and_tokenizer(base, dtype)
    built = build_stage_model(model, stage2, merged=True)

    def build(tmp: str) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    publish_dir(build, args.output)
    print(f"medcare: {built.description} on {base}; plain Hugging Face checkpoint written to {args.output}")
    return StageResult(args.output)


COMMANDS = {"stage1": run_stage1, "stage2": run_stage2, "export": run_export}
