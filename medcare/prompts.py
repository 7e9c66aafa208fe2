"""The multiple-choice prompt: one function that the demo's data generator and medcare.eval share, so that a
question is asked at evaluation exactly as it was asked in training.

The user turn is the question, its lettered options (one per line, "A. text") and the paper's answer
instruction ("Please format the final answer at the end of the response as: The answer is {answer}." /
"请在回答的最后用以下格式回答：答案为{answer}。"). "{answer}" stays a literal placeholder: a concrete letter in
every prompt would bias a small model towards it.
"""

from __future__ import annotations

from collections.abc import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
EN_INSTRUCTION = "Please format the final answer at the end of the response as: The answer is {answer}."
ZH_INSTRUCTION = "请在回答的最后用以下格式回答：答案为{answer}。"
ANSWER_PREFIX = {"en": "The answer is", "zh": "答案为"}
SENTENCE_END = {"en": ".", "zh": "。"}


def is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def language(text: str) -> str:
    """"zh" when the text has a CJK character, else "en"."""
    return "zh" if is_chinese(text) else "en"


def mcq_prompt(question: str, options: Sequence[str] | dict[str, str], lang: str | None = None) -> str:
    """The user turn of a multiple-choice question. ``options``: a dict letter -> text, or a list lettered A, B,
    ...; ``lang`` "en" / "zh", detected from the question when None."""
    if not isinstance(options, dict):
        options = dict(zip(LETTERS, options, strict=False))
    lang = lang or language(question)
    lines = [question, *(f"{letter}. {text}" for letter, text in options.items())]
    return "\n".join([*lines, ZH_INSTRUCTION if lang == "zh" else EN_INSTRUCTION])


def answer_sentence(letters: str, lang: str) -> str:
    """The reply's last sentence: "The answer is AC." / "答案为AC。"."""
    sep = " " if lang == "en" else ""
    return f"{ANSWER_PREFIX[lang]}{sep}{letters}{SENTENCE_END[lang]}"
