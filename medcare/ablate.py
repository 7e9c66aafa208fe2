"""The paper's ablation at micro scale: does each part of MedCare earn its place on a real model?

    python -m medcare.ablate                                # the demo's data on SmolLM2-135M-Instruct, one seed
    python -m medcare.ablate --variants medcare,no_orth --seeds 3 --output ablation
    python -m medcare.ablate --tiny --max-steps 2           # the pipeline on the tiny random model (a check)
    python -m medcare.ablate --model MY_MODEL --data s1.jsonl s2.jsonl eval.jsonl eval_align.jsonl

Every variant trains on the same base, data, seed and token budget with the demo's settings (medcare.demo: the
same stage commands, flags and evaluation), one after another, and is scored on the held-out knowledge questions
and alignment tasks; the base and each stage 1 are scored too, so the table shows how much of its stage 1's
knowledge gain each variant kept. The variants:

  medcare            stage 1 (attention LoRA + routed experts + shared LoRA) -> stage 2 (knowledge + alignment
                     LoRA, orthogonality penalty) -> export
  single_stage       one LoRA run on all the data, what most users run today: attention LoRA + an MLP LoRA of
                     the rank MedCare ends with (knowledge + alignment), on the stage-1 data repeated as many
                     times as stage 1 sees it plus the stage-2 data as many times as stage 2 sees it, shuffled
                     together (the same training sequences as MedCare's two stages)
  no_noise           MedCare whose stage 1 has no noise aggregator (--num_experts 0: the shared LoRA only)
  no_orth            stage 2 with lambda = 0 (no orthogonality penalty)
  freeze_knowledge   stage 2 with the knowledge LoRA frozen (--freeze_knowledge)

MedCare, no_orth and freeze_knowledge share one stage 1, trained once per seed. Each finished step leaves a
marker beside its output, so a killed ablation run again with the same --output continues where it stopped (an
unfinished step is redone from its start), and a run with more --seeds or --variants adds only what is new.
Writes <output>/ablation.json, ablation.md and ablation.png.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass

from . import alignment, demo
from .base_model import smollm2
from .config import Stage1Config
from .files import write_json
from .loading import CommandParser, UserError, load_config
from .trainer import TrainingDiverged


@dataclass(frozen=True)
class Variant:
    title: str
    stage1: str | None = "medcare"          # the stage-1 run it continues (STAGE1); None: one single-stage run
    stage2_flags: tuple[str, ...] = ()


# The stage-1 runs variants continue: name -> (row title, extra stage-1 flags).
STAGE1 = {"medcare": ("stage 1", ()),
          "no_noise": ("stage 1, shared LoRA only", ("--num_experts", "0"))}
VARIANTS = {
    "medcare": Variant("MedCare (orth penalty, lambda = 1)"),
    "single_stage": Variant("single-stage LoRA on all the data", stage1=None),
    "no_noise": Variant("without the noise aggregator (stage 1: shared LoRA only)", stage1="no_noise"),
    "no_orth": Variant("without the orth penalty (lambda = 0)", stage2_flags=("--orth_lambda", "0")),
    "freeze_knowledge": Variant("stage 2 with the knowledge LoRA frozen", stage2_flags=("--freeze_knowledge",
                                                                                         "true")),
}
# What the table reads from each evaluation: (label, path into the summary).
KNOWLEDGE = (("named", "named"), ("cloze", "cloze"), ("letter", "generate"))
ALIGNMENT = (("extract F1", "extraction"), ("normalise EM", "normalisation"), ("intent acc", "classification"))
# Metrics the verdict compares with MedCare's.
HEADLINE = (("named", "named"), ("cloze", "cloze"), ("extract F1", "extraction"), ("intent acc", "classification"))


def _parser() -> CommandParser:
    ap = CommandParser(prog="python -m medcare.ablate", description=__doc__.split("\n")[0])
    ap.add_argument("--output", default="medcare-ablation", help="directory (reused: a finished step is skipped)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", type=int, default=1, help="repeat with seeds 0..N-1; the table gives mean and spread")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model (a pipeline check; nothing is learned)")
    ap.add_argument("--model", default=None, help="your base model directory instead of SmolLM2-135M-Instruct (trained "
                                                  "with the demo's settings for a pretrained model)")
    ap.add_argument("--data", nargs=4, default=None, metavar=("STAGE1", "STAGE2", "EVAL", "EVAL_ALIGN"),
                    help="your data instead of the demo's: stage-1 and stage-2 training files, held-out multiple-"
                         "choice questions and held-out alignment tasks (medcare.eval formats)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop each stage after this many steps (a check)")
    return ap


def _variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    for name in names:
        if name not in VARIANTS:
            raise UserError(f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    if not names:
        raise UserError("--variants is empty")
    return list(dict.fromkeys(names))


def step(path: str, work) -> dict:
    """Run `work()` unless `path` is marked finished (<path>.done); an unfinished `path` is removed first. The
    marker holds what `work` returned (JSON) and its seconds."""
    marker = f"{path}.done"
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            return json.load(f)
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    t0 = time.time()
    value = work() or {}
    result = {**value, "seconds": round(time.time() - t0, 1)}
    write_json(marker, result)
    return result


def _scores(by_mode) -> dict:
    """The numbers the table needs from one model's evaluation (medcare.demo.evaluate_models)."""
    gen = by_mode["generate"]
    align = gen.alignment_summary() or {"by_type": {}}
    return {"generate": gen.accuracy, "named": gen.named_accuracy, "loglik": by_mode["loglik"].accuracy,
            "cloze": by_mode["cloze"].accuracy,
            **{kind: align["by_type"].get(kind, {}).get(alignment.METRIC[kind]) for _, kind in ALIGNMENT}}


def _records(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]


def single_stage_data(stage1: str, stage2: str, epochs: tuple[str, str], path: str) -> dict:
    """Write the single-stage LoRA's data: the stage-1 records epochs[0] times and the stage-2 records epochs[1]
    times (one epoch over it = the sequences MedCare's two stages train on; the trainer shuffles them
    together). Returns the budget: records and training sequences of each stage."""
    r1, r2 = _records(stage1), _records(stage2)
    e1, e2 = int(epochs[0]), int(epochs[1])
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(r1 * e1 + r2 * e2)
    return {"stage1_records": len(r1), "stage1_epochs": e1, "stage2_records": len(r2), "stage2_epochs": e2,
            "sequences": len(r1) * e1 + len(r2) * e2}


class Ablation:
    """The steps of one ablation directory (each a `step`: skipped when its marker exists)."""

    def __init__(self, root: str, base: str, data: tuple[str, ...], flags: list[str], epochs: tuple[str, str]):
        self.root, self.base, self.data, self.flags, self.epochs = root, base, data, flags, epochs
        self.all_data = os.path.join(root, "data", "single_stage.jsonl")

    def evaluate(self, path: str, name: str, model: str, stage_dir: str | None) -> dict:
        def work() -> dict:
            scores = _scores(demo.evaluate_models({name: (model, stage_dir)}, self.data[2], self.data[3])[name])
            return {"scores": scores}

        return step(path, work)

    def train(self, path: str, argv: list[str]) -> dict:
        try:
            return step(path, lambda: demo.run_command([*argv, "--output", path]) and None)
        except TrainingDiverged as exc:
            raise UserError(f"{path}: training diverged ({exc}); lower the learning rate in medcare.demo.BASE_FLAGS "
                            f"or pick another seed") from None

    def stage1(self, seed_dir: str, key: str, flags: list[str]) -> tuple[str, dict]:
        """(directory, {"scores", "seconds", "train_seconds"}) of stage-1 run `key`."""
        where = seed_dir if key == "medcare" else os.path.join(seed_dir, key)
        s1 = os.path.join(where, "stage1")
        trained = self.train(s1, ["stage1", "--model", self.base, "--data", self.data[0], *flags,
                                  "--num_train_epochs", self.epochs[0], *STAGE1[key][1]])
        scored = self.evaluate(os.path.join(where, "stage1_eval"), key, self.base, s1)
        return s1, {**scored["scores"], "train_seconds": trained["seconds"]}

    def variant(self, seed_dir: str, name: str, flags: list[str], stage1: dict) -> dict:
        """The scores of one variant's final model, with its training seconds (its stage 1 included)."""
        v, vdir = VARIANTS[name], os.path.join(seed_dir, name)
        if v.stage1 is None:
            rank = 2 * Stage1Config().shared_rank  # MedCare's MLP ends with knowledge (Rs) + alignment (Rs) LoRA
            trained = self.train(os.path.join(vdir, "train"), [
                "stage1", "--model", self.base, "--data", self.all_data, *flags, "--num_train_epochs", "1",
                "--num_experts", "0", "--shared_rank", str(rank)])
            scored = self.evaluate(os.path.join(vdir, "eval"), name, self.base, os.path.join(vdir, "train"))
            return {**scored["scores"], "train_seconds": trained["seconds"]}
        s1, first = stage1[v.stage1]
        s2, ex = os.path.join(vdir, "stage2"), os.path.join(vdir, "export")
        trained = self.train(s2, ["stage2", "--model", self.base, "--stage1", s1, "--data", self.data[1], *flags,
                                  "--num_train_epochs", self.epochs[1], *v.stage2_flags])
        step(ex, lambda: demo.run_command(["export", "--stage2", s2, "--output", ex]) and None)
        scored = self.evaluate(os.path.join(vdir, "eval"), name, ex, None)
        return {**scored["scores"], "train_seconds": round(first["train_seconds"] + trained["seconds"], 1)}


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        names = _variants(args.variants)
        if args.seeds < 1:
            raise UserError(f"--seeds must be >= 1, got {args.seeds}")
        if args.model and args.tiny:
            raise UserError("--model and --tiny exclude each other")
        for path in args.data or ():
            if not os.path.isfile(path):
                raise UserError(f"--data {path}: no such file")
        kind = "tiny" if args.tiny else "smollm2"
        root = os.path.abspath(args.output)
        t0 = time.time()
        if args.model:
            load_config(args.model)  # a missing or unusable model directory is one line, before anything is written
        base = args.model or (smollm2() if not args.tiny else None)
        if args.data:
            data = tuple(os.path.abspath(p) for p in args.data)
            os.makedirs(os.path.join(root, "data"), exist_ok=True)
        else:
            data = demo.write_data(os.path.join(root, "data"), english_only=not args.tiny)
        if args.tiny:
            base = os.path.join(root, "base")
            step(base, lambda: demo.build_base_model(base) and None)
        flags = list(demo.TRAIN_FLAGS + demo.BASE_FLAGS[kind])
        epochs = demo.EPOCHS[kind]
        if args.max_steps:
            flags += ["--max_steps", str(args.max_steps)]
        ab = Ablation(root, base, data, flags, epochs)
        budget = single_stage_data(data[0], data[1], epochs, ab.all_data)
        base_scores = ab.evaluate(os.path.join(root, "base_eval"), "base", base, None)["scores"]
        stage1_keys = ["medcare", *dict.fromkeys(VARIANTS[n].stage1 for n in names if VARIANTS[n].stage1 not in
                                                 (None, "medcare"))]
        per_seed = []
        for seed in range(args.seeds):
            sdir = os.path.join(root, f"seed-{seed}")
            seed_flags = [*flags, "--seed", str(seed), "--data_seed", str(seed)]
            stage1 = {key: ab.stage1(sdir, key, seed_flags) for key in stage1_keys}
            row = {STAGE1[key][0]: scores for key, (_, scores) in stage1.items()}
            for name in names:
                row[name] = ab.variant(sdir, name, seed_flags, stage1)
            per_seed.append(row)
        refs = {name: STAGE1[VARIANTS[name].stage1][0] for name in names if VARIANTS[name].stage1}
        report = summarise(base_scores, per_seed, refs)
        report.update(variants={n: VARIANTS[n].title for n in names}, seeds=args.seeds, base=base,
                      data=list(data), flags=flags, epochs=epochs, budget=budget,
                      seconds=round(time.time() - t0))
        write_json(os.path.join(root, "ablation.json"), report)
        text = table(report)
        with open(os.path.join(root, "ablation.md"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        chart(report, os.path.join(root, "ablation.png"))
        print("\n" + text)
        print(f"\nmedcare.ablate: {root}/ablation.json, ablation.md, ablation.png ({report['seconds']} s)")
        return 0
    except UserError as exc:
        print(f"medcare.ablate: error: {exc}", file=sys.stderr)
        return 2


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "spread": (max(values) - min(values)) / 2, "values": values}


def summarise(base: dict, per_seed: list[dict], refs: dict[str, str]) -> dict:
    """Mean and spread (half the range) over seeds of every score of every row (stage-1 runs and variants, in
    the order of the per-seed rows), and for each variant in `refs` the share of its stage 1's knowledge gain
    over the base that it kept (per seed, then averaged; a seed whose stage 1 gained nothing is left out)."""
    rows = {}
    for name in per_seed[0]:
        values: dict[str, list[float]] = {}
        for row in per_seed:
            for key, v in row[name].items():
                if isinstance(v, int | float):
                    values.setdefault(key, []).append(float(v))
            if name in refs:
                for label, key in KNOWLEDGE[:2]:
                    if key not in base or key not in row[name]:
                        continue
                    gain = row[refs[name]][key] - base[key]
                    if gain > 0:
                        values.setdefault(f"kept {label}", []).append((row[name][key] - base[key]) / gain)
        rows[name] = {k: _stats(v) for k, v in values.items()}
    return {"base_scores": base, "rows": rows, "refs": refs, "per_seed": per_seed}


def verdict(report: dict) -> list[str]:
    """Each variant against MedCare on the headline metrics: the difference of the means, and whether it is
    larger than the seed spread (the two half-ranges together); with one seed there is no spread to compare
    with, and one held-out question is worth 100 / (number of questions) points."""
    rows = report["rows"]
    if "medcare" not in rows:
        return []
    ref = rows["medcare"]
    lines = []
    for name, title in report["variants"].items():
        if name == "medcare":
            continue
        parts = []
        for label, key in HEADLINE:
            if key not in rows[name] or key not in ref:
                continue
            diff = 100 * (rows[name][key]["mean"] - ref[key]["mean"])
            spread = 100 * (rows[name][key]["spread"] + ref[key]["spread"])
            if report["seeds"] > 1:
                within = "within" if abs(diff) <= spread else "beyond"
                parts.append(f"{label} {diff:+.1f} ({within} the spread {spread:.1f})")
            else:
                parts.append(f"{label} {diff:+.1f}")
        lines.append(f"- {title} vs MedCare: " + "; ".join(parts))
    if report["seeds"] == 1:
        lines.append("- one seed: no spread is measured, so none of these differences is shown to be more than "
                     "noise; run with --seeds 3")
    return lines


def _cell(entry: dict | None, percent: bool = True) -> str:
    if entry is None:
        return "-"
    scale = 100 if percent else 1
    text = f"{scale * entry['mean']:.1f}" if percent else f"{entry['mean']:.0f}"
    if len(entry["values"]) > 1:
        text += f" ± {scale * entry['spread']:.1f}" if percent else f" ± {entry['spread']:.0f}"
    return text


def _title(report: dict, name: str) -> str:
    return report["variants"].get(name, name)


def table(report: dict) -> str:
    cols = [*(label for label, _ in KNOWLEDGE), "kept named", "kept cloze", *(label for label, _ in ALIGNMENT),
            "train s"]
    keys = [*(key for _, key in KNOWLEDGE), "kept named", "kept cloze", *(key for _, key in ALIGNMENT),
            "train_seconds"]
    b = report.get("budget")
    budget = (f"Budget: every model trains on the same {b['sequences']} sequences ({b['stage1_records']} stage-1 "
              f"records x {b['stage1_epochs']} + {b['stage2_records']} stage-2 records x {b['stage2_epochs']}). "
              if b else "")
    lines = [f"# medcare.ablate: {report['seeds']} seed(s), {report['seconds']} s",
             "", "knowledge: held-out questions on facts stage 1 taught (named: the reply names the right option; "
             "cloze: option text likelihood; letter: the paper's protocol); kept: share of its stage 1's gain over "
             "the base that the final model keeps; alignment: held-out tasks scored on the reply; train s: "
             "training seconds of the model, its stage 1 included. Percentages; ± half the range over seeds. "
             + budget, "", "| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    base = report["base_scores"]
    lines.append("| base | " + " | ".join(
        "-" if base.get(k) is None or k.startswith("kept") or k == "train_seconds" else f"{100 * base[k]:.1f}"
        for k in keys) + " |")
    for name, row in report["rows"].items():
        lines.append(f"| {_title(report, name)} | " + " | ".join(_cell(row.get(k), k != "train_seconds")
                                                                 for k in keys) + " |")
    found = verdict(report)
    return "\n".join(lines + (["", *found] if found else []))


def chart(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["base", *report["rows"]]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        if name == "base":
            means = [100 * (report["base_scores"].get(k) or 0) for _, k in HEADLINE]
            errs = [0] * len(HEADLINE)
        else:
            row = report["rows"][name]
            means = [100 * row.get(k, {"mean": 0})["mean"] for _, k in HEADLINE]
            errs = [100 * row.get(k, {"spread": 0})["spread"] for _, k in HEADLINE]
        ax.bar([j + i * width for j in range(len(HEADLINE))], means, width, yerr=errs, label=_title(report, name),
               capsize=2)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(HEADLINE))], [m for m, _ in HEADLINE])
    ax.set_ylabel("% on held-out data")
    ax.set_title(f"medcare.ablate ({report['seeds']} seed(s){', bars: half the range' if report['seeds'] > 1 else ''})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
