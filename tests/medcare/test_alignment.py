"""Alignment-required tasks (medcare.alignment) in medcare.eval: the metrics on hand-computed cases, malformed
and empty replies included; the record checks, each a one-line error naming file and line before any model
loads; generation stopping at the end of a one-line answer reads the same batched as alone; a report with both
kinds of task."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_testing import one_thread, tiny_model

from medcare import alignment as al
from medcare import eval as ev

KEYS = "diseases: asthma, copd; drugs: salbutamol; symptoms: wheeze; tests: none"
INTENT = {"type": "classification", "prompt": "Classify: where do I go?", "answer": "department",
          "labels": ["diagnosis", "medication", "department"], "reply_prefix": "intent: "}
NORMALISE = {"type": "normalisation", "prompt": "Standard term of HTN?", "answer": "hypertension",
             "reply_prefix": "standard term: "}
EXTRACT = {"type": "extraction", "prompt": "Extract from the note ...", "answer": KEYS}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def item(record: dict) -> al.AlignItem:
    return ev.to_item(record, "f.jsonl:1", "f")


# ----------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("reply, tp, fp, fn, f1, fmt", [
    (KEYS, 4, 0, 0, 1.0, True),
    ("Diseases: Asthma, COPD; drugs: salbutamol; symptoms: wheeze; tests: none.", 4, 0, 0, 1.0, True),
    ("diseases: asthma; drugs: salbutamol, aspirin; symptoms: none; tests: none", 2, 1, 2,
     2 * (2 / 3) * 0.5 / (2 / 3 + 0.5), True),
    ("diseases: asthma\nsomething else", 1, 0, 3, 2 * 1 * 0.25 / 1.25, False),  # a line that is no field
    ("colour: blue; diseases: asthma", 1, 1, 3, 2 * 0.5 * 0.25 / 0.75, False),   # a field nobody asked for
    ("", 0, 0, 4, 0.0, False),
    ("I cannot help with that.", 0, 0, 4, 0.0, False),
])
def test_extraction_field_level_counts(reply, tp, fp, fn, f1, fmt):
    rec = al.score(item(EXTRACT), reply)
    assert (rec["tp"], rec["fp"], rec["fn"], rec["format_ok"]) == (tp, fp, fn, fmt)
    assert rec["score"] == pytest.approx(f1)


def test_extraction_json_format_and_empty_gold():
    record = {**EXTRACT, "format": "json", "answer": {"diseases": ["asthma"], "drugs": []}}
    rec = al.score(item(record), 'Here: {"diseases": ["Asthma"], "drugs": []}')
    assert rec["score"] == 1.0 and rec["format_ok"]
    bad = al.score(item(record), "diseases: asthma")
    assert bad["score"] == 0.0 and not bad["format_ok"]
    nothing = item({**EXTRACT, "answer": "drugs: none"})  # a note without drugs: right only when the reply says so
    assert al.score(nothing, "drugs: none")["score"] == 1.0
    assert al.score(nothing, "drugs: aspirin")["score"] == 0.0


@pytest.mark.parametrize("reply, prediction, correct, fmt", [
    ("standard term: hypertension", "hypertension", True, True),
    ("Standard term: Hypertension.", "Hypertension.", True, True),
    ("hypertension", "hypertension", True, False),          # right term, prefix missing
    ("term: high blood pressure", "high blood pressure", False, False),
    ("", "", False, False),
])
def test_normalisation_exact_match(reply, prediction, correct, fmt):
    rec = al.score(item(NORMALISE), reply)
    assert (rec["prediction"], rec["score"], rec["format_ok"]) == (prediction, float(correct), fmt)


@pytest.mark.parametrize("reply, prediction, correct, fmt", [
    ("intent: department", "department", True, True),
    ("intent: Department", "department", True, True),
    ("It is about the department, not a diagnosis", "department", True, False),
    ("intent: diagnosis", "diagnosis", False, True),
    ("intent: triage", None, False, False),
    ("", None, False, False),
])
def test_classification_label_accuracy(reply, prediction, correct, fmt):
    rec = al.score(item(INTENT), reply)
    assert (rec["prediction"], rec["score"], rec["format_ok"]) == (prediction, float(correct), fmt)


def test_summary_micro_averages_extraction_and_means_the_rest():
    recs = [al.score(item(EXTRACT), KEYS), al.score(item(EXTRACT), "diseases: asthma"),
            al.score(item(NORMALISE), "standard term: hypertension"), al.score(item(INTENT), "intent: diagnosis")]
    s = al.summarise(recs)
    ext = s["by_type"]["extraction"]
    # tp 4 + 1, fp 0, fn 0 + 3: precision 1, recall 5/8
    assert (ext["precision"], ext["recall"]) == (1.0, 5 / 8) and ext["f1"] == pytest.approx(2 * 5 / 8 / (1 + 5 / 8))
    assert s["by_type"]["normalisation"]["exact_match"] == 1.0 and s["by_type"]["classification"]["accuracy"] == 0.0
    assert s["n"] == 4 and s["score"] == pytest.approx((1 + recs[1]["score"] + 1 + 0) / 4)
    assert s["format_ok"] == 1.0  # "diseases: asthma" is a well-formed partial reply
    assert "extraction" in al.table(s) and "f1" in al.table(s)


# ------------------------------------------------------------------------------------------------ records
@pytest.mark.parametrize("record, message", [
    ({k: v for k, v in INTENT.items() if k != "answer"}, "has no gold 'answer'"),
    ({**INTENT, "answer": ""}, "has no gold 'answer'"),
    ({**INTENT, "type": "summary"}, "'type' must be one of extraction, normalisation, classification"),
    ({**INTENT, "answer": "triage"}, "answer 'triage' is not one of the allowed labels"),
    ({k: v for k, v in INTENT.items() if k != "labels"}, "classification needs 'labels'"),
    ({**EXTRACT, "answer": "just words"}, "is not 'key: a, b; key: none'"),
    ({**EXTRACT, "format": "xml"}, "'format' must be kv or json"),
    ({"type": "normalisation", "answer": "x"}, "needs a 'prompt' string or a conversation with a user turn"),
    ({**NORMALISE, "prompt": "  "}, "the prompt is empty"),
])
def test_bad_records_are_refused_with_the_reason(record, message):
    with pytest.raises(ev.EvalError, match="^f.jsonl:1: ") as info:
        item(record)
    assert message in str(info.value)


def test_conversation_records_keep_system_and_user_turns_only():
    record = {"type": "normalisation", "answer": "asthma", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Term for wheezy lungs?"},
        {"role": "assistant", "content": "standard term: asthma"}]}
    got = item(record)
    assert [t["role"] for t in got.messages] == ["system", "user"] and got.lang == "en"


@pytest.mark.parametrize("case", ["no_answer", "unknown_type", "bad_label", "empty_file", "empty_list"])
def test_cli_refuses_bad_alignment_files_before_loading_a_model(tmp_path, capfd, case):
    path = tmp_path / "tasks.jsonl"
    good = json.dumps(NORMALISE) + "\n"
    bad = {"no_answer": {k: v for k, v in INTENT.items() if k != "answer"}, "unknown_type": {**INTENT, "type": "ner"},
           "bad_label": {**INTENT, "answer": "surgery"}}.get(case)
    path.write_text("" if case == "empty_file" else "[]" if case == "empty_list" else good + json.dumps(bad) + "\n")
    # The model directory does not exist: the data error must come first.
    assert ev.main(["--model", str(tmp_path / "no-model"), "--data", str(path), "--no-progress"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medcare.eval: error: ") and str(path) in err[0], err
    if case in ("no_answer", "unknown_type", "bad_label"):
        assert f"{path}:line 2: " in err[0]
    assert "no-model" not in err[0]


# --------------------------------------------------------------------------------------------- generation
def test_one_line_stop_reads_the_same_batched_as_alone(chatml_tokenizer):
    tok = chatml_tokenizer
    model = tiny_model("qwen2", len(tok), seed=3)
    prompts = [ev.render_prompt(tok, [{"role": "user", "content": q}]) for q in
               ("Extract the drugs.", "Classify this query, please, it is a long one with many words", "Hi")]
    stop = ev.AnswerSentenceStop.FIRST_LINE
    batched = ev.generate_responses(model, tok, prompts, 3, 12, torch.device("cpu"), progress=False, stop=stop)
    alone = [ev.generate_responses(model, tok, [p], 1, 12, torch.device("cpu"), progress=False, stop=stop)[0]
             for p in prompts]
    assert batched == alone
    assert all("\n" not in r.strip() for r in batched)


def test_a_report_with_both_kinds_of_task(chatml_tokenizer, monkeypatch):
    tok = chatml_tokenizer
    model = tiny_model("qwen2", len(tok), seed=3)
    question = ev.to_item({"question": "Q?", "options": ["yes", "no"], "answer": "A"}, "q", "mcq")
    tasks = [item(EXTRACT), item(NORMALISE), item(INTENT)]
    replies = {"Extract from the note ...": "diseases: asthma", "Standard term of HTN?": "standard term: hypertension",
               "Classify: where do I go?": "intent: medication"}
    budgets = []

    def fake(model, tokenizer, prompts, batch_size, max_new_tokens, device, progress=True, **kw):
        budgets.append((max_new_tokens, kw.get("stop")))
        return [next(v for k, v in replies.items() if k in p) for p in prompts]

    monkeypatch.setattr(ev, "generate_responses", fake)
    result = ev.evaluate(model, tok, [question, *tasks], "loglik", progress=False)
    assert len(result.records) == 1 and [r["type"] for r in result.alignment] == [t.type for t in tasks]
    assert sorted(b for b, _ in budgets) == sorted(al.MAX_NEW_TOKENS.values())  # one call per budget
    assert all(stop is ev.AnswerSentenceStop.FIRST_LINE for _, stop in budgets)
    report = result.report()
    assert report["n"] == 1 and report["alignment"]["n"] == 3 and len(report["alignment"]["items"]) == 3
    assert report["alignment"]["by_type"]["normalisation"]["exact_match"] == 1.0
    assert report["alignment"]["by_type"]["classification"]["accuracy"] == 0.0
    table = result.table()
    assert "multiple choice" in table and "alignment" in table and "by type" in table
    only_tasks = ev.evaluate(model, tok, tasks, "generate", progress=False)
    assert only_tasks.records == [] and "multiple choice" not in only_tasks.table()
