"""medcare.eval: scoring on a tiny model against an answer key known from a brute-force (unbatched, unpadded)
scoring of every candidate, in both modes and both record formats, with multi-answer items and CJK text;
the answer extraction's edge cases; prompts identical to training's; stage directories applied unmerged
compute what the export computes; the CLI's report and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_testing import (
    one_thread,
    randomize_adapters,
    save_base,
    stage1_config,
    stage1_meta,
    stage2_config,
    stage2_meta,
    tiny_model,
)

from medcare import checkpoint as ckpt
from medcare import eval as ev
from medcare.inject import apply_stage1
from medcare.stage_model import build_stage_model

QUESTIONS = [  # (question, options, language)
    ("What is the usual adult dose of aspirin?", ["100 mg", "500 mg", "5 g", "50 g"], "en"),
    ("患者头痛三天，伴有发热和咳嗽，最可能的诊断是？", {"A": "感冒", "B": "哮喘", "C": "痛风", "D": "糖尿病"}, "zh"),
    ("Which symptom is typical of asthma?", ["Wheezing", "Rash", "Fever", "Itch", "Cough at night"], "en"),
    ("建议多喝水，注意休息，必要时就医。哪项正确？", ["多喝水", "熬夜", "注意休息"], "zh"),
    ("Is metformin used for diabetes?", {"A": "Yes", "B": "No"}, "en"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module", params=["chatml", "template"])
def setup(request, chatml_tokenizer, template_tokenizer):
    tok = chatml_tokenizer if request.param == "chatml" else template_tokenizer
    return tiny_model("qwen2", len(tok), seed=1), tok


@torch.no_grad()
def brute_force_scores(model, tok, item: ev.Item, context: str, max_size: int) -> dict[str, float]:
    """Each candidate's log-likelihood from its own unpadded forward, summed token by token in a loop."""
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx = encode(context)
    sep, end = (" ", ".") if item.lang == "en" else ("", "。")
    scores = {}
    for cand in ev.candidates(item, max_size):
        full = encode(context + sep + cand + (end if max_size > 1 else ""))
        n = 0
        while n < min(len(ctx), len(full)) and ctx[n] == full[n]:
            n += 1
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
        scores[cand] = sum(float(logp[t - 1, full[t]]) for t in range(max(n, 1), len(full)))
    return scores


def plain_records(answers: list[str]) -> list[dict]:
    return [{"question": q, "options": o, "answer": a, "task": f"t{i % 2}", "type": lang}
            for i, ((q, o, lang), a) in enumerate(zip(QUESTIONS, answers))]


def original_records(answers: list[str]) -> list[dict]:
    out = []
    for i, ((q, o, _), a) in enumerate(zip(QUESTIONS, answers)):
        opts = o if isinstance(o, dict) else dict(zip("ABCDE", o))
        text = q + "\n" + "\n".join(f"{k}. {v}" for k, v in opts.items())
        out.append({"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "..."}],
                    "eval": {"answer": a, "type": "single" if len(a) == 1 else "multi", "task_dataset": "orig"},
                    "id": i})
    return out


def items_of(records: list[dict]) -> list[ev.Item]:
    return [ev.to_item(r, f"record {i}", "file") for i, r in enumerate(records)]


@pytest.mark.parametrize("fmt", ["plain", "original"])
@pytest.mark.parametrize("multi", [False, True])
def test_loglik_finds_the_known_answer_key(setup, fmt, multi):
    """The key is what the model answers by brute force; the batched, padded scorer must find all of it, and
    score 0 on a key where every answer is another candidate. multi: every set of up to 2 letters competes."""
    model, tok = setup
    records_fn = plain_records if fmt == "plain" else original_records
    size = 2 if multi else 1
    key = known_key_with(model, tok, records_fn(["A"] * len(QUESTIONS)), size)
    items = items_of(records_with(records_fn(key), fmt, key))
    result = ev.evaluate(model, tok, items, "loglik", batch_size=3, progress=False, answer_size=size)
    assert [r["prediction"] for r in result.records] == key
    assert result.accuracy == 1.0 and all(r["extracted_by"] == "loglik" for r in result.records)
    assert result.answer_space.startswith("letter sets" if multi else "option letters")
    wrong = [next(c for c in ev.candidates(i, size) if c != k) for i, k in zip(items, key)]
    bad = ev.evaluate(model, tok, items_of(records_with(records_fn(wrong), fmt, wrong)), "loglik", batch_size=2,
                      progress=False, answer_size=size)
    assert bad.accuracy == 0.0
    assert sum(g["n"] for g in bad.groups("task").values()) == len(QUESTIONS)


def known_key_with(model, tok, records: list[dict], max_size: int) -> list[str]:
    key = []
    for item in items_of(records):
        s = brute_force_scores(model, tok, item, ev.render_prompt(tok, item.messages) + ev.PREFIX[item.lang],
                               max_size)
        key.append(max(s, key=s.get))
    return key


def records_with(records: list[dict], fmt: str, answers: list[str]) -> list[dict]:
    out = []
    for r, a in zip(records, answers):
        r = json.loads(json.dumps(r))
        if fmt == "plain":
            r["answer"] = a
        else:
            r["eval"]["answer"] = a
        out.append(r)
    return out


def test_generate_mode_extracts_or_forces_as_a_brute_force_does(setup, monkeypatch):
    """Greedy replies (batched, left-padded) equal one-by-one generation; replies with an answer sentence are
    read by the pattern, the others by the forced pass, whose choice equals the brute-force scores."""
    model, tok = setup
    items = items_of(plain_records(["A"] * len(QUESTIONS)))
    prompts = [ev.render_prompt(tok, i.messages) for i in items]
    batched = ev.generate_responses(model, tok, prompts, 3, 6, torch.device("cpu"), progress=False)
    for prompt, got in zip(prompts, batched):
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            one = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
        assert got == tok.decode(one[0, ids.shape[1]:], skip_special_tokens=True)

    canned = ["Aspirin works. The answer is B.", "答案为C。", "no idea", "The answer is A and C.", "maybe"]
    monkeypatch.setattr(ev, "generate_responses", lambda *a, **k: list(canned))
    answers = ["B", "C", "A", "AC", "B"]
    result = ev.evaluate(model, tok, items_of(records_with(plain_records(answers), "plain", answers)), "generate",
                         batch_size=2, progress=False)
    by = [r["extracted_by"] for r in result.records]
    assert by == ["pattern", "pattern", "forced", "pattern", "forced"]
    preds = [r["prediction"] for r in result.records]
    assert preds[:2] == ["B", "C"] and preds[3] == "AC"
    for j in (2, 4):  # forced: the best candidate after prompt + reply + "The answer is"
        item = items[j]
        context = prompts[j] + canned[j].rstrip() + "\n" + ev.PREFIX[item.lang]
        s = brute_force_scores(model, tok, item, context, 2)
        assert preds[j] == max(s, key=s.get)
    assert result.records[0]["response"] == canned[0] and result.records[0]["correct"]


@pytest.mark.parametrize("text, letters, want", [
    ("The answer is B.", "ABCD", "B"),
    ("Because of X. The answer is C", "ABCD", "C"),
    ("the answer is: (D)", "ABCD", "D"),
    ("The answer is A and C.", "ABCD", "AC"),
    ("The answer is A, C, D", "ABCD", "ACD"),
    ("答案为AC。", "ABCD", "AC"),
    ("答案为A、C。因为B不对", "ABCD", "AC"),
    ("答案是：B", "ABCD", "B"),
    ("答案为选项B。", "ABCD", "B"),
    ("The answer is option E.", "ABCDE", "E"),
    ("The answer is E.", "ABCD", None),            # not an option
    ("The answer is ACE inhibitors.", "ABCDE", None),  # a word, not letters
    ("The answer is B because A is wrong.", "ABCD", "B"),
    ("The answer is A. Later: the answer is D.", "ABCD", "D"),  # the last answer sentence wins
    ("I think B is right.", "ABCD", None),         # no answer sentence: the forced pass decides
    ("The answer is\nB", "ABCD", None),            # the answer must be on the marker's line
    ("The answer is not clear", "ABCD", None),
    ("", "ABCD", None),
])
def test_extraction_edge_cases(text, letters, want):
    assert ev.extract_answer(text, letters) == want


def test_prompts_are_the_training_format_and_the_demo_data(chatml_tokenizer, template_tokenizer):
    from importlib.resources import files

    from medcare.data import encode_conversation

    lines = files("medcare.demo").joinpath("eval.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    for r in records:  # the bundled held-out questions: the plain format, the user turn as the demo trained
        item = ev.to_item(r, "eval.jsonl", "eval")
        assert item.messages[0]["content"] == r["messages"][0]["content"]
        assert item.answer == "".join(sorted(r["answer"]))
        assert item.options == (r["options"] if isinstance(r["options"], dict) else dict(zip("ABCDE", r["options"])))
        assert item.bare == [{"role": "user", "content": r["question"]}]
    assert any(isinstance(r["options"], list) for r in records)
    for tok in (chatml_tokenizer, template_tokenizer):
        item = ev.to_item(records[0], "eval.jsonl", "eval")
        reply = "X"
        enc = encode_conversation(tok, [*item.messages, {"role": "assistant", "content": reply}])
        prompt_ids = tok(ev.render_prompt(tok, item.messages), add_special_tokens=False)["input_ids"]
        first_label = next(i for i, label in enumerate(enc["labels"]) if label != -100)
        assert enc["input_ids"][:first_label] == prompt_ids


def test_original_records_parse_options_and_add_the_instruction():
    r = {"conversations": [{"from": "system", "value": "You are a doctor."},
                           {"from": "human", "value": "Q?\n(A) x\n(B) y\n(C) z"}], "eval": {"answer": "C"}}
    item = ev.to_item(r, "f:line 1", "medqa")
    assert item.letters == "ABC" and item.task == "medqa" and item.type == "-"
    assert item.messages[0] == {"role": "system", "content": "You are a doctor."}
    assert item.messages[1]["content"].endswith("\n\n" + ev.EN_INSTRUCTION)
    zh = {"messages": [{"role": "user", "content": "题目？A. 甲 B. 乙 E. 戊"}], "eval": {"answer": "E", "type": "单选"}}
    zi = ev.to_item(zh, "f:line 2", "cmb")
    assert zi.letters == "ABCDE" and zi.lang == "zh" and zi.messages[0]["content"].endswith(ev.ZH_INSTRUCTION)


# ------------------------------------------------------------------------------------ stage directories
@pytest.fixture(scope="module")
def stages(tmp_path_factory, chatml_tokenizer):
    root = tmp_path_factory.mktemp("evalstages")
    vocab = len(chatml_tokenizer)
    base = save_base(root / "base", tiny_model("qwen2", vocab), chatml_tokenizer)
    model = tiny_model("qwen2", vocab)
    cfg1 = stage1_config()
    apply_stage1(model, cfg1)
    randomize_adapters(model, std=0.1)
    s1 = ckpt.save_stage(str(root / "s1"), ckpt.adapter_state(model), stage1_meta(cfg1, model, base))
    model = tiny_model("qwen2", vocab)
    attention = build_stage_model(model, ckpt.read_stage(s1), alignment=stage2_config()).attention
    randomize_adapters(model, std=0.1)
    s2 = ckpt.save_stage(str(root / "s2"), {**ckpt.adapter_state(model), **attention},
                         stage2_meta(cfg1, stage2_config(), model, s1, base))
    merged = tiny_model("qwen2", vocab)
    build_stage_model(merged, ckpt.read_stage(s2), merged=True)
    export = save_base(root / "export", merged, chatml_tokenizer)
    return dict(root=root, base=base, s1=s1, s2=s2, export=export)


def test_stage_dirs_applied_unmerged_compute_the_export_and_the_transition(stages):
    ids = torch.randint(0, 400, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted, _, what = ev.load_model(stages["base"], stages["s2"], "float32", "cpu", "drop")
        exported, _, _ = ev.load_model(stages["export"], None, "float32", "cpu", "drop")
        assert what.startswith("stage 2")
        torch.testing.assert_close(adapted(ids).logits, exported(ids).logits, rtol=1e-4, atol=1e-5)
        dropped, _, what = ev.load_model(stages["base"], stages["s1"], "float32", "cpu", "drop")
        kept, _, _ = ev.load_model(stages["base"], stages["s1"], "float32", "cpu", "keep")
        start2 = tiny_model("qwen2", exported.config.vocab_size)
        build_stage_model(start2, ckpt.read_stage(stages["s1"]))  # the stage-1 model without experts
        torch.testing.assert_close(dropped(ids).logits, start2(ids).logits, rtol=1e-4, atol=1e-5)
        assert (kept(ids).logits - dropped(ids).logits).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------- the CLI
def write(path, records, jsonl=True):
    with open(path, "w", encoding="utf-8") as f:
        if jsonl:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        else:
            json.dump(records, f, ensure_ascii=False)
    return str(path)


def test_cli_reports_on_both_formats(stages, tmp_path, capsys):
    plain = write(tmp_path / "plain.jsonl", plain_records(["B", "C", "AE", "A", "B"]))
    orig = write(tmp_path / "orig.json", original_records(["A", "D", "B", "AC", "A"]), jsonl=False)
    out = tmp_path / "r" / "report.json"
    assert ev.main(["--model", stages["export"], "--data", plain, orig, "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["n"] == 10 and len(report["items"]) == 10 and report["mode"] == "loglik"
    assert set(report["by_task"]) == {"t0", "t1", "orig"} and set(report["by_type"]) == {"en", "zh", "single", "multi"}
    assert report["correct"] == sum(i["correct"] for i in report["items"])
    assert report["accuracy"] == pytest.approx(report["correct"] / 10)
    assert "letter sets of up to 2" in report["answer_space"]
    assert "by task" in printed and "report written to" in printed
    assert ev.main(["--model", stages["base"], "--stage-dir", stages["s2"], "--data", plain, "--limit", "2",
                    "--mode", "generate", "--max-new-tokens", "3", "--no-progress"]) == 0
    table = capsys.readouterr().out.split("scored by generate")[1]
    assert [line.split()[:2] for line in table.splitlines() if line.strip().startswith("all")] == [["all", "2"]]


@pytest.mark.parametrize("case", ["bad_answer", "bad_options", "neither", "no_file", "exists", "bad_limit",
                                  "broken_json", "no_stage_dir", "bad_dtype", "no_model"])
def test_cli_user_errors_are_one_line(stages, tmp_path, capfd, case):
    data = write(tmp_path / "d.jsonl", plain_records(["B", "C", "A", "A", "B"]))
    argv = ["--model", stages["export"], "--data", data, "--no-progress"]
    if case == "bad_answer":
        argv[3] = write(tmp_path / "b.jsonl", [{"question": "Q", "options": ["x", "y"], "answer": "C"}])
    elif case == "bad_options":
        argv[3] = write(tmp_path / "b.jsonl", [{"question": "Q", "options": {"1": "x"}, "answer": "A"}])
    elif case == "neither":
        argv[3] = write(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    elif case == "no_file":
        argv[3] = str(tmp_path / "missing.jsonl")
    elif case == "exists":
        (tmp_path / "r.json").write_text("{}")
        argv += ["--output", str(tmp_path / "r.json")]
    elif case == "bad_limit":
        argv += ["--limit", "0"]
    elif case == "broken_json":
        (tmp_path / "b.jsonl").write_text('{"question": "Q",\n')
        argv[3] = str(tmp_path / "b.jsonl")
    elif case == "no_stage_dir":
        argv += ["--stage-dir", str(tmp_path / "nope")]
    elif case == "bad_dtype":
        argv += ["--dtype", "float8"]
    elif case == "no_model":
        argv[1] = str(tmp_path / "no-model")
    assert ev.main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("medcare.eval: error: ") and "Traceback" not in "".join(err)
    if case == "exists":
        assert (tmp_path / "r.json").read_text() == "{}"


# --------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_loglik_matches_cpu(stages):
    items = items_of(plain_records(["B", "C", "AE", "A", "B"]))
    cpu_model, tok, _ = ev.load_model(stages["base"], stages["s2"], "float32", "cpu", "drop")
    gpu_model, _, _ = ev.load_model(stages["base"], stages["s2"], "float32", "cuda", "drop")
    cpu = ev.evaluate(cpu_model, tok, items, "loglik", batch_size=4, progress=False)
    gpu = ev.evaluate(gpu_model, tok, items, "loglik", batch_size=4, progress=False)
    assert [r["prediction"] for r in gpu.records] == [r["prediction"] for r in cpu.records]
    bf16, _, _ = ev.load_model(stages["base"], stages["s2"], "auto", "cuda", "drop")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert len(ev.evaluate(bf16, tok, items, "generate", batch_size=4, max_new_tokens=4, progress=False).records) == 5


# ------------------------------------------------------------------------------------------------ cloze
@torch.no_grad()
def brute_force_cloze(model, tok, item: ev.Item) -> dict[str, float]:
    """Each option text's log-likelihood per UTF-8 byte as the reply to the bare question, one unpadded forward
    per option, summed token by token."""
    context = ev.render_prompt(tok, item.bare)
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    scores = {}
    for letter, text in item.options.items():
        full = tok(context + text, add_special_tokens=False)["input_ids"]
        n = 0
        while n < min(len(ctx), len(full)) and ctx[n] == full[n]:
            n += 1
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
        scores[letter] = sum(float(logp[t - 1, full[t]]) for t in range(max(n, 1), len(full))) / len(text.encode())
    return scores


@pytest.mark.parametrize("fmt", ["plain", "original"])
def test_cloze_finds_the_known_answer_key_and_never_shows_letters(setup, fmt):
    model, tok = setup
    records_fn = plain_records if fmt == "plain" else original_records
    items = items_of(records_fn(["A"] * len(QUESTIONS)))
    for item, (q, options, _) in zip(items, QUESTIONS):  # the bare question: no options, no answer format
        assert item.bare[-1] == {"role": "user", "content": q}
        assert list(item.options.values()) == list(options.values() if isinstance(options, dict) else options)
    key = []
    for item in items:
        s = brute_force_cloze(model, tok, item)
        key.append(max(s, key=s.get))
    got = ev.evaluate(model, tok, items_of(records_with(records_fn(key), fmt, key)), "cloze", batch_size=3,
                      progress=False)
    assert [r["prediction"] for r in got.records] == key and got.accuracy == 1.0
    assert got.answer_space.startswith("option texts") and {r["extracted_by"] for r in got.records} == {"cloze"}
    # The scores themselves, not just the winners: batched and padded equals one by one.
    scores = ev.cloze_predict(model, tok, items, 4, torch.device("cpu"), progress=False)
    for item, s in zip(items, scores):
        ref = brute_force_cloze(model, tok, item)
        assert s.keys() == ref.keys() and all(abs(s[k] - ref[k]) < 1e-4 for k in s)


def test_cloze_refuses_questions_it_cannot_score(setup):
    model, tok = setup
    multi = items_of(plain_records(["AB"] + ["A"] * (len(QUESTIONS) - 1)))
    with pytest.raises(ev.EvalError, match="record 0: cloze scoring needs single-answer questions"):
        ev.evaluate(model, tok, multi, "cloze", progress=False)
    inline = {"conversations": [{"from": "human", "value": "Which one? A. this B. that"}], "eval": {"answer": "A"}}
    item = ev.to_item(inline, "inline", "f")
    assert item.options == {} and item.bare == []
    with pytest.raises(ev.EvalError, match="option texts"):
        ev.evaluate(model, tok, [item], "cloze", progress=False)


@pytest.mark.parametrize("reply, expected", [
    ("Asthma is commonly treated with salbutamol, whereas metformin is for diabetes. The answer is C.", "B"),
    ("The answer is A.", None),
    ("", None),
    ("METFORMIN first, then salbutamol", "A"),
    ("type 2 diabetes: metformin", "C"),  # "type 2 diabetes" starts first
    ("diabetes insipidus is not an option", "D"),  # at one position the longer option text wins
])
def test_named_option(reply, expected):
    options = {"A": "metformin", "B": "salbutamol", "C": "type 2 diabetes", "D": "diabetes insipidus"}
    options_d = dict(options, E="diabetes")
    assert ev.named_option(reply, options_d) == expected


def test_generate_reports_how_often_the_reply_names_the_right_option(setup, monkeypatch):
    model, tok = setup
    items = items_of(plain_records(["A", "B", "A", "C", "B"]))
    replies = ["It is 100 mg. The answer is B.", "感冒。答案为B。", "Rash. The answer is B.", "no idea", "Yes!"]
    monkeypatch.setattr(ev, "generate_responses", lambda *a, **k: replies)
    result = ev.evaluate(model, tok, items, "generate", progress=False)
    assert [r["named"] for r in result.records] == ["A", "A", "B", None, "A"]
    assert result.named_accuracy == pytest.approx(1 / 5)  # only the first names its answer; "no idea" counts wrong
    assert [r["prediction"] for r in result.records][:3] == ["B", "B", "B"] and result.records[0]["correct"] is False
    assert "names the right option first" in result.table() and result.report()["named_accuracy"] == 0.2


def test_one_forward_per_question_equals_one_sequence_per_candidate():
    """Single-letter answer sets: the letter logits at the answer position (one row per question) give the
    candidate scoring's log-likelihoods and predictions, from a fraction of the sequences. The Qwen2 tokenizer
    (the demo's): its letters are single tokens after "The answer is" and "答案为", as in real vocabularies."""
    from medcare.demo.tokenizer import qwen2_tokenizer

    tok = qwen2_tokenizer()
    model = tiny_model("qwen2", len(tok), seed=2)
    items = items_of(plain_records(["A"] * len(QUESTIONS)))
    contexts = [ev.render_prompt(tok, i.messages) + ev.PREFIX[i.lang] for i in items]
    rows_fast = [r for j, (i, c) in enumerate(zip(items, contexts))
                 for r in ev._rows(tok, j, c, ev.candidates(i, 1), i.lang, False)]
    rows_slow = [r for j, (i, c) in enumerate(zip(items, contexts))
                 for r in ev._rows(tok, j, c, ev.candidates(i, 1), i.lang, False, one_forward=False)]
    assert len(rows_fast) == len(items) and len(rows_slow) == sum(len(i.letters) for i in items)
    fast = ev.loglik_predict(model, tok, items, contexts, 1, 4, torch.device("cpu"), progress=False)
    slow = ev.loglik_predict(model, tok, items, contexts, 1, 4, torch.device("cpu"), progress=False,
                             one_forward=False)
    for f, s in zip(fast, slow):
        assert f.keys() == s.keys() and all(abs(f[k] - s[k]) < 1e-4 for k in f)
        assert max(f, key=f.get) == max(s, key=s.get)
