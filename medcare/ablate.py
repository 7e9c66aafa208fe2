"""The paper's ablation at micro scale: does each part of MedCare earn its place on a real model?

    python -m medcare.ablate                                # the demo's data on SmolLM2-135M-Instruct, one seed
    python -m medcare.ablate --variants medcare,no_orth --seeds 3 --output ablation
    python -m medcare.ablate --tiny --max-steps 2           # the pipeline on the tiny random model (a check)

Every variant trains on the same base, data and seed with the demo's settings (medcare.demo: the same stage
commands, flags and evaluation), one after another, and is scored on the held-out knowledge questions and
alignment tasks; stage 1 and the base are scored too, so the table shows how much of stage 1's knowledge gain
each variant kept. Built variants (each shares MedCare's stage 1, which is trained once per seed):

  medcare            stage 1 -> stage 2 (knowledge + alignment LoRA, orthogonality penalty) -> export
  no_orth            stage 2 with lambda = 0 (no orthogonality penalty)
  freeze_knowledge   stage 2 with the knowledge LoRA frozen (--freeze_knowledge)

Not built yet (refused with a clear line): single_stage (one LoRA on all the data) and no_noise (stage 1 with
the shared LoRA only). Each finished step leaves a marker beside its output, so a killed ablation run again with
the same --output continues where it stopped (an unfinished step is redone from its start). Writes
<output>/ablation.json, ablation.md and ablation.png.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass

from . import alignment
from .base_model import smollm2
from .files import write_json
from .loading import CommandParser, UserError


@dataclass(frozen=True)
class Variant:
    title: str
    stage2_flags: tuple[str, ...]


VARIANTS = {
    "medcare": Variant("MedCare (orth penalty, lambda = 1)", ()),
    "no_orth": Variant("without the orth penalty (lambda = 0)", ("--orth_lambda", "0")),
    "freeze_knowledge": Variant("stage 2 with the knowledge LoRA frozen", ("--freeze_knowledge", "true")),
}
PLANNED = {"single_stage": "single-stage LoRA on all the data", "no_noise": "stage 1 with the shared LoRA only"}
# What the table reads from each evaluation: (label, path into the summary).
KNOWLEDGE = (("named", "named"), ("cloze", "cloze"), ("letter", "generate"))
ALIGNMENT = (("extract F1", "extraction"), ("normalise EM", "normalisation"), ("intent acc", "classification"))


def _parser() -> CommandParser:
    ap = CommandParser(prog="python -m medcare.ablate", description=__doc__.split("\n")[0])
    ap.add_argument("--output", default="medcare-ablation", help="directory (reused: a finished step is skipped)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", type=int, default=1, help="repeat with seeds 0..N-1; the table gives mean and spread")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model (a pipeline check; nothing is learned)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop each stage after this many steps (a check)")
    return ap


def _variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    for name in names:
        if name in PLANNED:
            raise UserError(f"--variants {name} ({PLANNED[name]}) is not built yet; built: {', '.join(VARIANTS)}")
        if name not in VARIANTS:
            raise UserError(f"--variants: unknown variant {name!r}; built: {', '.join(VARIANTS)}")
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


def main(argv: list[str] | None = None) -> int:
    from . import demo

    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        names = _variants(args.variants)
        if args.seeds < 1:
            raise UserError(f"--seeds must be >= 1, got {args.seeds}")
        kind = "tiny" if args.tiny else "smollm2"
        root = os.path.abspath(args.output)
        t0 = time.time()
        base = smollm2() if not args.tiny else None
        data = demo.write_data(os.path.join(root, "data"), english_only=not args.tiny)
        if args.tiny:
            base = os.path.join(root, "base")
            step(base, lambda: demo.build_base_model(base) and None)
        flags = list(demo.TRAIN_FLAGS + demo.BASE_FLAGS[kind])
        epochs = demo.EPOCHS[kind]
        if args.max_steps:
            flags += ["--max_steps", str(args.max_steps)]

        def evaluate(models: dict) -> dict:
            return {name: _scores(r) for name, r in demo.evaluate_models(models, data[2], data[3]).items()}

        runs = {"base": step(os.path.join(root, "base_eval"), lambda: evaluate({"base": (base, None)}))["base"]}
        per_seed = []
        for seed in range(args.seeds):
            sdir = os.path.join(root, f"seed-{seed}")
            seed_flags = [*flags, "--seed", str(seed), "--data_seed", str(seed)]
            s1 = os.path.join(sdir, "stage1")
            step(s1, lambda s1=s1, f=seed_flags: demo._run(
                ["stage1", "--model", base, "--data", data[0], "--output", s1, *f, "--num_train_epochs", epochs[0]])
                and None)
            row = {"stage 1": step(os.path.join(sdir, "stage1_eval"),
                                   lambda s1=s1: evaluate({"stage 1": (base, s1)}))["stage 1"]}
            for name in names:
                vdir = os.path.join(sdir, name)
                s2, ex = os.path.join(vdir, "stage2"), os.path.join(vdir, "export")
                trained = step(s2, lambda s1=s1, s2=s2, f=seed_flags, name=name: demo._run(
                    ["stage2", "--model", base, "--stage1", s1, "--data", data[1], "--output", s2, *f,
                     "--num_train_epochs", epochs[1], *VARIANTS[name].stage2_flags]) and None)
                step(ex, lambda s2=s2, ex=ex: demo._run(["export", "--stage2", s2, "--output", ex]) and None)
                row[name] = {**step(os.path.join(vdir, "eval"), lambda ex=ex, name=name: evaluate({name: (ex, None)}))[
                    name], "stage2_seconds": trained["seconds"]}
            per_seed.append(row)
        report = summarise(runs["base"], per_seed, names)
        report.update(variants={n: VARIANTS[n].title for n in names}, seeds=args.seeds, base=base,
                      data=os.path.join(root, "data"), flags=flags, epochs=epochs, seconds=round(time.time() - t0))
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


def summarise(base: dict, per_seed: list[dict], names: list[str]) -> dict:
    """Mean and spread (half the range) over seeds of every score, and the share of stage 1's knowledge gain
    over the base that each variant kept (per seed, then averaged)."""
    rows = {}
    for name in ["stage 1", *names]:
        values: dict[str, list[float]] = {}
        for row in per_seed:
            for key, v in row[name].items():
                if isinstance(v, int | float):
                    values.setdefault(key, []).append(float(v))
            if name != "stage 1":
                for label, key in KNOWLEDGE[:2]:
                    gain = row["stage 1"][key] - base[key]
                    if gain > 0:
                        values.setdefault(f"kept {label}", []).append((row[name][key] - base[key]) / gain)
        rows[name] = {k: {"mean": statistics.fmean(v), "spread": (max(v) - min(v)) / 2, "values": v}
                      for k, v in values.items()}
    return {"base_scores": base, "rows": rows, "per_seed": per_seed}


def _cell(entry: dict | None, percent: bool = True) -> str:
    if entry is None:
        return "-"
    scale = 100 if percent else 1
    text = f"{scale * entry['mean']:.1f}"
    return text + (f" ± {scale * entry['spread']:.1f}" if len(entry["values"]) > 1 else "")


def table(report: dict) -> str:
    cols = [*(label for label, _ in KNOWLEDGE), "kept named", "kept cloze", *(label for label, _ in ALIGNMENT),
            "stage 2 s"]
    keys = [*(key for _, key in KNOWLEDGE), "kept named", "kept cloze", *(key for _, key in ALIGNMENT),
            "stage2_seconds"]
    lines = [f"# medcare.ablate: {report['seeds']} seed(s), {report['seconds']} s",
             "", "knowledge: held-out questions on facts stage 1 taught (named: the reply names the right option; "
             "cloze: option text likelihood; letter: the paper's protocol); kept: share of stage 1's gain over the "
             "base that remains; alignment: held-out tasks scored on the reply. Percentages; ± half the range over "
             "seeds.", "", "| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    base = report["base_scores"]
    lines.append("| base | " + " | ".join(
        "-" if base.get(k) is None or k.startswith("kept") or k == "stage2_seconds" else f"{100 * base[k]:.1f}"
        for k in keys) + " |")
    for name, row in report["rows"].items():
        title = name if name == "stage 1" else report["variants"][name]
        lines.append(f"| {title} | " + " | ".join(_cell(row.get(k), k != "stage2_seconds") for k in keys) + " |")
    return "\n".join(lines)


def chart(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("named", "named"), ("cloze", "cloze"), ("extract F1", "extraction"), ("intent acc", "classification")]
    names = ["base", *report["rows"]]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        if name == "base":
            means = [100 * (report["base_scores"].get(k) or 0) for _, k in metrics]
            errs = [0] * len(metrics)
            label = "base"
        else:
            row = report["rows"][name]
            means = [100 * row.get(k, {"mean": 0})["mean"] for _, k in metrics]
            errs = [100 * row.get(k, {"spread": 0})["spread"] for _, k in metrics]
            label = name if name == "stage 1" else report["variants"][name]
        ax.bar([j + i * width for j in range(len(metrics))], means, width, yerr=errs, label=label, capsize=2)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(metrics))], [m for m, _ in metrics])
    ax.set_ylabel("% on held-out data")
    ax.set_title(f"medcare.ablate ({report['seeds']} seed(s))")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
