"""medcare.eval's speed on a real model, before and after, measured side by side in one run.

    python benchmarks/bench_eval.py                      # SmolLM2-135M-Instruct, the demo's held-out data, CPU
    python benchmarks/bench_eval.py --model DIR --questions q.jsonl --tasks t.jsonl --device cuda

Three measurements on the same model, questions and alignment tasks:
  * loglik: one sequence per candidate letter (the reference) vs one forward per question (the letter logits at
    the answer position); the predictions must agree;
  * generation, before: every reply (questions and alignment tasks) greedy up to 256 new tokens or the end of
    the turn, 8 a batch (a plain implementation);
  * generation, after: medcare.eval's defaults: questions stop after their answer sentence (--max-new-tokens
    budget), alignment tasks get a budget per type and stop at the end of a one-line answer, 16 a batch.
Writes <output>/<device>/eval_speed.{json,md}; the issue's target is the "after" generation of 60 questions +
30 alignment tasks on SmolLM2-135M in <= 60 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medcare import alignment  # noqa: E402
from medcare import eval as ev  # noqa: E402
from medcare.base_model import smollm2  # noqa: E402
from medcare.data import render_prompt  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "medcare", "demo")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M-Instruct, converted once)")
    ap.add_argument("--questions", default=os.path.join(DEMO, "eval.jsonl"), help="multiple-choice file")
    ap.add_argument("--tasks", default=os.path.join(DEMO, "eval_align.jsonl"), help="alignment task file")
    ap.add_argument("--n-questions", type=int, default=60)
    ap.add_argument("--n-tasks", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return ap.parse_args(argv)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    model_dir = args.model or smollm2()
    model, tok, _ = ev.load_model(model_dir, None, "float32", args.device, "drop")
    questions = ev.load_items([args.questions], args.n_questions)
    tasks = ev.load_items([args.tasks], args.n_tasks)
    assert all(isinstance(q, ev.Item) for q in questions) and all(isinstance(t, ev.AlignItem) for t in tasks)
    device = next(model.parameters()).device
    contexts = [render_prompt(tok, q.messages) + ev.PREFIX[q.lang] for q in questions]
    rows: dict[str, dict] = {}

    with torch.inference_mode():
        for name, one in (("loglik, one sequence per candidate", False), ("loglik, one forward per question", True)):
            scores, secs = timed(lambda one=one: ev.loglik_predict(model, tok, questions, contexts, 1, 16, device,
                                                                   progress=False, one_forward=one))
            seqs = sum(len(ev._rows(tok, j, c, ev.candidates(q, 1), q.lang, False, one))
                       for j, (q, c) in enumerate(zip(questions, contexts, strict=True)))
            rows[name] = {"seconds": secs, "sequences": seqs, "predictions": [max(s, key=s.get) for s in scores]}

        prompts = [render_prompt(tok, x.messages) for x in [*questions, *tasks]]
        before, secs = timed(lambda: ev.generate_responses(model, tok, prompts, 8, 256, device, progress=False))
        rows["generate, before: 256 tokens or end of turn, batch 8"] = {"seconds": secs, "replies": len(before)}

        def after():
            result = ev.evaluate(model, tok, [*questions, *tasks], "generate", batch_size=16,
                                 max_new_tokens=ev.DEFAULT_MAX_NEW_TOKENS, progress=False)
            return result

        result, secs = timed(after)
        rows["generate, after: medcare.eval defaults, batch 16"] = {
            "seconds": secs, "replies": len(result.records) + len(result.alignment),
            "mcq_accuracy": result.accuracy, "alignment_score": alignment.summarise(result.alignment)["score"]}

    fast, slow = rows["loglik, one forward per question"], rows["loglik, one sequence per candidate"]
    agree = fast.pop("predictions") == slow.pop("predictions")
    dev_name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).lower().replace(" ", "-")
    report = {"model": model_dir, "device": dev_name, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "questions": len(questions), "tasks": len(tasks),
              "loglik_predictions_agree": agree, "rows": rows}
    out = os.path.join(args.output, dev_name)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "eval_speed.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    lines = [f"# medcare.eval speed: {len(questions)} questions + {len(tasks)} alignment tasks, "
             f"{os.path.basename(model_dir.rstrip('/'))}, {dev_name}, {report['threads']} threads", "",
             "| what | seconds | work |", "|---|---:|---|"]
    for name, r in rows.items():
        work = f"{r['sequences']} sequences" if "sequences" in r else f"{r['replies']} replies"
        lines.append(f"| {name} | {r['seconds']:.1f} | {work} |")
    lines += ["", f"loglik predictions agree: {agree}; loglik speed-up "
                  f"{slow['seconds'] / fast['seconds']:.1f}x; generation speed-up "
                  f"{rows['generate, before: 256 tokens or end of turn, batch 8']['seconds'] / secs:.1f}x", ""]
    with open(os.path.join(out, "eval_speed.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
