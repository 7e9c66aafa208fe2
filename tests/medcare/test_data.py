"""medcare.data: loading, validation (every problem, with its location), the check CLI, label masks,
truncation, the dataset, the collator and length grouping. Tokenizers come from conftest (offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from medcare import data
from medcare.data import (
    DEFAULT_SYSTEM_PROMPT,
    DataCollator,
    DataError,
    DataProblem,
    LoadResult,
    SupervisedDataset,
    check_files,
    encode_conversation,
    load_records,
)

CONVERSATIONS = [
    [{"role": "user", "content": "患者头痛三天，伴有发热。"},
     {"role": "assistant", "content": "建议多喝水，注意休息。"}],
    [{"role": "system", "content": "You are a doctor."}, {"role": "user", "content": "What is the usual dose?"},
     {"role": "assistant", "content": "Take 500 mg twice a day."}, {"role": "user", "content": "With food?"},
     {"role": "assistant", "content": "Yes, with food."}],
]
SHAREGPT_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def as_sharegpt(messages, **extra):
    return {"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in messages], **extra}


def as_openai(messages, **extra):
    return {"messages": messages, **extra}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def supervised_spans(tokenizer, example):
    """The decoded runs of consecutive supervised tokens."""
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != data.IGNORE_INDEX:
            assert label == token  # labels are unshifted copies of the ids
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return [tokenizer.decode(s) for s in spans + ([current] if current else [])]


# ---------------------------------------------------------------------------------------------- loading


def test_both_record_formats_and_both_file_formats_load_the_same(tmp_path):
    extra = {"id": 7, "eval": {"answer": "A"}}  # extra keys are allowed and ignored
    files = [
        write_jsonl(tmp_path / "a.jsonl", [as_sharegpt(c, **extra) for c in CONVERSATIONS]),
        write_jsonl(tmp_path / "b.jsonl", [as_openai(c, **extra) for c in CONVERSATIONS]),
        write_json(tmp_path / "c.json", [as_sharegpt(c) for c in CONVERSATIONS]),
        write_json(tmp_path / "d.json", [as_openai(c) for c in CONVERSATIONS]),
        # Detected by content, not extension: a JSON list named .jsonl and JSON Lines named .json.
        write_json(tmp_path / "e.jsonl", [as_sharegpt(c) for c in CONVERSATIONS]),
        write_jsonl(tmp_path / "f.json", [as_openai(c) for c in CONVERSATIONS]),
    ]
    for path in files:
        result = load_records(path)
        assert result.records == CONVERSATIONS, path.name
        assert (result.total, result.problems, result.skipped) == (2, [], 0)
    both = load_records([str(files[0]), files[2]])
    assert both.records == CONVERSATIONS * 2 and both.total == 4
    assert both.origins == [(str(files[0]), "line 1"), (str(files[0]), "line 2"),
                            (str(files[2]), "record 1 (line 2)"), (str(files[2]), "record 2 (line 14)")]


def test_bom_crlf_blank_lines_and_the_original_role_key_are_accepted(tmp_path):
    lines = [json.dumps(as_openai(CONVERSATIONS[0])), "", json.dumps(
        {"conversations": [{"role": "human", "value": "q"}, {"role": "gpt", "value": "a"}]})]
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    result = load_records(path)
    second = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert result.records == [CONVERSATIONS[0], second]
    assert result.origins[1] == (str(path), "line 3")


BAD_LINES = {  # line -> (JSON Lines text, expected reason fragment); line 1 and the last line are good
    2: ('{"messages": [}', "malformed JSON"),
    3: ("[1, 2]", "record is a JSON array, not an object"),
    4: ('{"id": 1}', "neither 'conversations' nor 'messages'"),
    5: ('{"messages": ["hi", {"role": "assistant", "content": "x"}]}', "turn 1: not an object (got a JSON string)"),
    6: ('{"conversations": [{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}]}',
        "turn 1: unknown 'from' value 'bot'"),
    7: ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "turn 1: missing 'content'"),
    8: ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}',
        "turn 1: empty 'content'"),
    9: ('{"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]}',
        "turn 1: 'value' is not a string (got a JSON number)"),
    10: ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant turn"),
    11: ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}',
         "starts with an assistant turn"),
    12: ('{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, '
         '{"role": "assistant", "content": "a"}]}', "turn 2: system turn is not the first turn"),
    13: ('{"messages": [], "id": 3}', "'messages' is empty"),
    14: ('{"messages": "hello"}', "'messages' is not a list"),
    15: ("null", "record is a JSON null"),
}


def test_every_validation_problem_is_reported_with_its_line(tmp_path):
    good = json.dumps(as_openai(CONVERSATIONS[0]))
    lines = [good] + [BAD_LINES[n][0] for n in sorted(BAD_LINES)] + ["", good]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    problems = check_files(path)
    assert [p.location for p in problems] == [f"line {n}" for n in sorted(BAD_LINES)]
    for problem, n in zip(problems, sorted(BAD_LINES), strict=True):
        assert problem.path == str(path)
        assert BAD_LINES[n][1] in problem.reason, (n, problem.reason)
        assert not problem.whole_file
    with pytest.raises(DataError) as info:
        load_records(path)
    assert info.value.problems == problems and info.value.total == len(BAD_LINES) + 2
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{len(BAD_LINES)} problems in")


def test_a_record_reports_all_its_turn_problems(tmp_path):
    record = {"messages": [{"role": "doctor", "content": ""}, {"content": 5}, {"role": "assistant", "content": "a"}]}
    problems = check_files(write_jsonl(tmp_path / "x.jsonl", [record]))
    assert [p.reason for p in problems] == [
        "turn 1: unknown 'role' value 'doctor' (expected one of 'user', 'assistant', 'system')",
        "turn 1: empty 'content'", "turn 2: missing 'role'", "turn 2: 'content' is not a string (got a JSON number)"]
    assert {p.location for p in problems} == {"line 1"}


def test_json_list_problems_name_the_record_and_its_line(tmp_path):
    records = [as_openai(CONVERSATIONS[0]), {"messages": [{"role": "user", "content": "q"}]}, "text",
               as_sharegpt(CONVERSATIONS[1]), {"conversations": [{"from": "gpt", "value": "a"}]}, 4]
    path = write_json(tmp_path / "list.json", records)
    text_lines = path.read_text().split("\n")
    problems = check_files(path)
    assert [p.location.split(" (")[0] for p in problems] == ["record 2", "record 3", "record 5", "record 6"]
    for p in problems:  # the line named is where that record starts
        line = int(p.location.split("line ")[1].rstrip(")"))
        assert text_lines[line - 1].strip() in ("{", '"text",', "4")
    result = load_records(path, on_error="skip")
    assert result.records == CONVERSATIONS and result.total == 6 and result.skipped == 4


@pytest.mark.parametrize("content, location, reason", [
    ('[{"messages": []},\n {"messages": [}\n]', "line 2 column 16", "malformed JSON: Expecting value"),
    ('[{"messages": []}\n {"id": 1}]', "line 2 column 2", "expected ',' or ']'"),
    ('[{"messages": []},', "line 1 column 19", "unexpected end of file"),
    ("[]\n[]", "line 2 column 1", "extra data after the list"),
])
def test_broken_json_list_gives_the_parse_position(tmp_path, content, location, reason):
    path = tmp_path / "broken.json"
    path.write_text(content)
    problems = check_files(path)
    assert problems[-1].location == location and reason in problems[-1].reason and problems[-1].whole_file
    with pytest.raises(DataError):
        load_records(path, on_error="skip")  # an unusable file is never skipped silently


def test_file_level_problems(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "empty.jsonl").write_text(" \n")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"a": 1}\n{"b": "caf\xe9"}\n')
    (tmp_path / "object.json").write_text(json.dumps(as_openai(CONVERSATIONS[0]), indent=2))
    names = ["missing.jsonl", "dir.jsonl", "empty.jsonl", "latin1.jsonl", "object.json"]
    problems = check_files([tmp_path / n for n in names])
    assert [(os.path.basename(p.path), p.location, p.whole_file) for p in problems] == [(n, "", True) for n in names]
    reasons = [p.reason for p in problems]
    assert reasons[0] == "file not found" and "directory" in reasons[1] and "empty" in reasons[2]
    assert "not UTF-8" in reasons[3] and "line 2" in reasons[3] and "one JSON object" in reasons[4]


def test_policies(tmp_path):
    good = [as_openai(c) for c in CONVERSATIONS]
    path = write_jsonl(tmp_path / "mixed.jsonl", [good[0], {"messages": "x"}, good[1], {"x": 1}, 5])
    with pytest.raises(DataError) as info:
        load_records(path, on_error="fail")
    assert isinstance(info.value, ValueError) and len(info.value.problems) == 3
    assert info.value.report().splitlines()[-1] == f"3 problems in 3 of 5 records ({path})"
    result = load_records(path, on_error="skip")
    assert isinstance(result, LoadResult) and result.records == CONVERSATIONS
    assert (result.total, result.skipped, len(result.problems)) == (5, 3, 3)
    all_bad = write_jsonl(tmp_path / "all_bad.jsonl", [{"x": 1}])
    with pytest.raises(DataError, match="1 problem in 1 of 1 record"):
        load_records(all_bad, on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        load_records(path, on_error="ignore")


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_clean_file(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [as_openai(c) for c in CONVERSATIONS])
    b = write_json(tmp_path / "b.json", [as_sharegpt(CONVERSATIONS[0])])
    assert data.main(["check", str(a), str(b)]) == 0
    assert capsys.readouterr().out.splitlines() == ["medcare.data: OK, 3 records in 2 files"]


def test_cli_lists_every_problem_then_the_summary(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [as_openai(CONVERSATIONS[0]), {"messages": []}, {"x": 1}])
    b = write_json(tmp_path / "b.json", [{"messages": [{"role": "user", "content": "q"}]}])
    missing = tmp_path / "missing.jsonl"
    assert data.main(["check", str(a), str(b), str(missing)]) == 2
    assert capsys.readouterr().out.splitlines() == [
        f"{a}:line 2: 'messages' is empty",
        f"{a}:line 3: record has neither 'conversations' nor 'messages'",
        f"{b}:record 1 (line 2): no assistant turn (nothing to train on)",
        f"{missing}: file not found",
        f"medcare.data: 4 problems in 3 of 4 records and 1 unusable file ({a}, {b}, {missing})",
    ]


def test_cli_missing_file_is_one_line_and_no_traceback(tmp_path, capsys):
    assert data.main(["check", str(tmp_path / "nope.jsonl")]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{tmp_path / 'nope.jsonl'}: file not found",
                   f"medcare.data: 1 problem in 1 unusable file ({tmp_path / 'nope.jsonl'})"]


def test_cli_subprocess_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe garbage\n")
    proc = subprocess.run([sys.executable, "-m", "medcare.data", "check", str(tmp_path / "missing.jsonl"), str(bad),
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 and "not UTF-8" in lines[1] and "directory" in lines[2]
    assert lines[-1].startswith("medcare.data: 3 problems in 3 unusable files")


def test_cli_truncation_check_with_a_saved_tokenizer(tmp_path, capsys, chatml_tokenizer):
    tokenizer_dir = tmp_path / "tok"
    chatml_tokenizer.save_pretrained(tokenizer_dir)
    long_prompt = {"role": "user", "content": "患者头痛三天，伴有发热。" * 30}
    records = [as_openai(CONVERSATIONS[0]), as_openai([long_prompt, {"role": "assistant", "content": "ok"}])]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert data.main(["check", str(path), "--tokenizer", str(tokenizer_dir), "--max-length", "64"]) == 2
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith(f"{path}:line 2: no assistant token left after truncation to 64")
    assert out[1] == f"medcare.data: 1 problem in 1 of 2 records ({path})"
    assert data.main(["check", str(path), "--tokenizer", str(tokenizer_dir), "--max-length", "4096"]) == 0
    capsys.readouterr()
    assert data.main(["check", str(path), "--tokenizer", str(tmp_path / "no_tok")]) == 2
    assert capsys.readouterr().out.splitlines() == [f"medcare.data: error: tokenizer directory not found: "
                                                     f"{tmp_path / 'no_tok'}"]
    with pytest.raises(SystemExit) as exit_info:  # argparse usage error: exit status 2, no traceback
        data.main(["check", str(path), "--max-length", "8"])
    assert exit_info.value.code == 2


# ---------------------------------------------------------------------------------------------- labels


def test_assistant_mask_supervises_exactly_the_replies(chatml_tokenizer):
    tok = chatml_tokenizer
    example = encode_conversation(tok, CONVERSATIONS[1])
    assert tok.decode(example["input_ids"]) == (
        "<|im_start|>system\nYou are a doctor.<|im_end|>\n<|im_start|>user\nWhat is the usual dose?<|im_end|>\n"
        "<|im_start|>assistant\nTake 500 mg twice a day.<|im_end|>\n<|im_start|>user\nWith food?<|im_end|>\n"
        "<|im_start|>assistant\nYes, with food.<|im_end|>\n")
    assert supervised_spans(tok, example) == ["Take 500 mg twice a day.<|im_end|>", "Yes, with food.<|im_end|>"]
    assert example["labels"][-1] == data.IGNORE_INDEX  # the "\n" after <|im_end|> is never generated


def test_chatml_inserts_the_default_system_prompt(chatml_tokenizer):
    example = encode_conversation(chatml_tokenizer, CONVERSATIONS[0])
    text = chatml_tokenizer.decode(example["input_ids"])
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n患者")
    assert supervised_spans(chatml_tokenizer, example) == ["建议多喝水，注意休息。<|im_end|>"]


@pytest.mark.parametrize("conversation", CONVERSATIONS + [CONVERSATIONS[1][1:]])
def test_chat_template_and_builtin_chatml_agree(chatml_tokenizer, template_tokenizer, conversation):
    for mask in data.MASK_MODES:
        assert encode_conversation(template_tokenizer, conversation, mask=mask) == \
            encode_conversation(chatml_tokenizer, conversation, mask=mask)


def test_saved_template_tokenizer_round_trips(tmp_path, template_tokenizer):
    from transformers import AutoTokenizer

    template_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == template_tokenizer.chat_template
    assert encode_conversation(loaded, CONVERSATIONS[1]) == encode_conversation(template_tokenizer, CONVERSATIONS[1])


def test_any_prefix_stable_template_works(make_test_tokenizer):
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
    tok = make_test_tokenizer(template)
    example = encode_conversation(tok, CONVERSATIONS[1])
    assert tok.decode(example["input_ids"]).startswith("<|im_start|>system: You are a doctor.<|im_end|>")
    assert supervised_spans(tok, example) == ["Take 500 mg twice a day.<|im_end|>", "Yes, with food.<|im_end|>"]


def test_unstable_template_is_a_clear_error(make_test_tokenizer):
    tok = make_test_tokenizer("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n"
                              "{% endfor %}")
    with pytest.raises(ValueError, match="not prefix-stable"):
        encode_conversation(tok, CONVERSATIONS[0])
    broken = make_test_tokenizer("{{ messages[0]['content'] | nosuchfilter }}")
    with pytest.raises(ValueError, match="chat template failed"):
        encode_conversation(broken, CONVERSATIONS[0])


def test_official_mask_supervises_turn_boundaries_of_every_role(chatml_tokenizer):
    tok = chatml_tokenizer

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    expected_ids, expected_labels = [], []
    for m in CONVERSATIONS[1]:
        for text, supervised in [("<|im_start|>", True), (m["role"], False), ("\n", False),
                                 (m["content"], m["role"] == "assistant"), ("<|im_end|>", True), ("\n", True)]:
            expected_ids += ids(text)
            expected_labels += ids(text) if supervised else [data.IGNORE_INDEX] * len(ids(text))
    official = encode_conversation(tok, CONVERSATIONS[1], mask="official")
    assert official == {"input_ids": expected_ids, "labels": expected_labels}
    # Same tokens as the assistant mask; it supervises a strict superset of positions.
    assistant = encode_conversation(tok, CONVERSATIONS[1])
    assert assistant["input_ids"] == official["input_ids"]
    sup_a = {i for i, label in enumerate(assistant["labels"]) if label != data.IGNORE_INDEX}
    sup_o = {i for i, label in enumerate(official["labels"]) if label != data.IGNORE_INDEX}
    assert sup_a < sup_o
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert official["labels"].count(im_start) == len(CONVERSATIONS[1]) and im_start not in assistant["labels"]


def test_official_mask_needs_chatml_tokens(make_test_tokenizer):
    plain = make_test_tokenizer(chatml_tokens=False)
    with pytest.raises(ValueError, match="mask='official' needs a ChatML tokenizer"):
        encode_conversation(plain, CONVERSATIONS[0], mask="official")
    assert encode_conversation(plain, CONVERSATIONS[0]) is not None  # the assistant mask still works
    with pytest.raises(ValueError, match="mask must be one of"):
        encode_conversation(plain, CONVERSATIONS[0], mask="all")
    with pytest.raises(ValueError, match="starts with an assistant turn"):
        encode_conversation(plain, CONVERSATIONS[0][::-1])


# ---------------------------------------------------------------------------------------------- truncation


def test_truncation_cuts_the_end_and_drops_unsupervised_records(chatml_tokenizer):
    full = encode_conversation(chatml_tokenizer, CONVERSATIONS[0])
    first_reply = next(i for i, label in enumerate(full["labels"]) if label != data.IGNORE_INDEX)
    cut = encode_conversation(chatml_tokenizer, CONVERSATIONS[0], max_length=first_reply + 1)
    assert cut == {"input_ids": full["input_ids"][:first_reply + 1], "labels": full["labels"][:first_reply + 1]}
    assert encode_conversation(chatml_tokenizer, CONVERSATIONS[0], max_length=first_reply) is None
    # In official mode boundary tokens alone do not keep a record alive.
    assert encode_conversation(chatml_tokenizer, CONVERSATIONS[0], max_length=first_reply, mask="official") is None
    with pytest.raises(ValueError, match="max_length"):
        encode_conversation(chatml_tokenizer, CONVERSATIONS[0], max_length=0)


def test_default_max_length(make_test_tokenizer):
    assert data.default_max_length(make_test_tokenizer(model_max_length=300)) == 300
    assert data.default_max_length(make_test_tokenizer(model_max_length=int(1e30))) == 2048


def test_dataset_drops_with_one_warning(chatml_tokenizer):
    long_user = [{"role": "user", "content": "What is the usual dose? " * 40}, {"role": "assistant", "content": "ok"}]
    records = [CONVERSATIONS[0], long_user, long_user, CONVERSATIONS[1], long_user]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = SupervisedDataset(records, chatml_tokenizer, max_length=64)
    assert len(dataset) == 2 and dataset.dropped == 3
    assert len(caught) == 1 and "dropped 3 of 5 records" in str(caught[0].message)
    assert dataset[0] == encode_conversation(chatml_tokenizer, CONVERSATIONS[0], 64)
    assert dataset[-1] == encode_conversation(chatml_tokenizer, CONVERSATIONS[1], 64)
    with pytest.raises(IndexError):
        dataset[2]
    with pytest.raises(ValueError, match="dropped 1 of 1"):
        SupervisedDataset([long_user], chatml_tokenizer, max_length=64)
    with pytest.raises(ValueError, match="record 2: bad conversation"):
        SupervisedDataset([CONVERSATIONS[0], [{"role": "user", "content": "q"}]], chatml_tokenizer)


# ---------------------------------------------------------------------------------------------- batching


def test_dataset_lengths_and_trainer_length_grouping(tmp_path, template_tokenizer):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    result = load_records(write_jsonl(tmp_path / "d.jsonl", [as_openai(c) for c in CONVERSATIONS * 5]))
    dataset = SupervisedDataset(result, template_tokenizer)
    assert dataset.dropped == 0 and len(dataset) == 10
    assert dataset.lengths == [len(dataset[i]["input_ids"]) for i in range(10)]
    assert dataset.lengths[:2] == [len(encode_conversation(template_tokenizer, c)["input_ids"]) for c in CONVERSATIONS]
    # What Trainer(train_sampling_strategy="group_by_length") builds for a torch Dataset.
    assert LengthGroupedSampler(4, dataset=dataset).lengths == dataset.lengths
    sampler = data.EpochSampler(dataset.lengths, 4, seed=0)  # what medcare's trainer uses
    order = list(sampler)
    assert sorted(order) == list(range(10)) and dataset.lengths[order[0]] == max(dataset.lengths)
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(10)) and list(sampler) != order and list(sampler) == list(sampler)
    indices = data.length_grouped_indices(dataset.lengths, 2, generator=torch.Generator().manual_seed(1))
    assert sorted(indices) == list(range(10))


def test_collator_pads_right(make_test_tokenizer):
    tok = make_test_tokenizer()
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9, 10, 11, 12], "labels": [8] * 5}]
    batch = DataCollator(tok)(features)
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7, pad, pad], [8, 9, 10, 11, 12]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [8] * 5]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert all(t.dtype == torch.long for t in batch.values())
    padded = DataCollator(tok, pad_to_multiple_of=8)(features)
    assert {k: tuple(v.shape) for k, v in padded.items()} == {k: (2, 8) for k in ("input_ids", "labels",
                                                                                   "attention_mask")}
    assert padded["labels"][:, 5:].eq(-100).all() and padded["attention_mask"][:, 5:].eq(0).all()
    unlabelled = DataCollator(tok)([{"input_ids": [1]}, {"input_ids": [1, 2]}])
    assert set(unlabelled) == {"input_ids", "attention_mask"}


def test_collator_pad_fallbacks(make_test_tokenizer):
    no_pad = make_test_tokenizer(pad=False)
    assert no_pad.pad_token_id is None
    batch = DataCollator(no_pad)([{"input_ids": [3], "labels": [3]}, {"input_ids": [3, 4], "labels": [3, 4]}])
    assert batch["input_ids"][0, 1] == no_pad.eos_token_id
    no_pad.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        DataCollator(no_pad)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        DataCollator(make_test_tokenizer(), pad_to_multiple_of=0)


def test_dataset_and_collator_feed_a_dataloader(chatml_tokenizer):
    dataset = SupervisedDataset(CONVERSATIONS * 3, chatml_tokenizer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=DataCollator(chatml_tokenizer))
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    for b in batches:
        assert b["input_ids"].shape[1] == b["attention_mask"].sum(1).max()
        assert b["labels"].ne(-100).sum() > 0


def test_problem_string_forms():
    assert str(DataProblem("a.jsonl", "line 3", "bad")) == "a.jsonl:line 3: bad"
    assert str(DataProblem("a.jsonl", "", "file not found", True)) == "a.jsonl: file not found"
    assert data.summarize([], 1, 1) == "OK, 1 record in 1 file"
