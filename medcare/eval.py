"""Both kinds of task the paper reports: medical multiple choice (knowledge) and alignment-required tasks
(extraction, normalisation, classification, scored on the generated reply): did training make it better?

    python -m medcare.eval --model DIR --data FILE [FILE ...] [--stage-dir DIR] [--output report.json]
                           [--mode loglik|generate|cloze] [--limit N] [--batch-size N] [--device auto|cpu|cuda]

--model is a Hugging Face model directory: an exported MedCare model, any base model, or, with --stage-dir,
the base model a stage directory is applied to (its adapters stay unmerged modules; a stage-1 directory is
evaluated without its routed experts, as the paper deploys it, unless --experts keep).

Alignment tasks ({"type": "extraction" | "normalisation" | "classification", "prompt", "answer", ...}, see
medcare.alignment) may sit in the same files or their own; they are always scored on a greedy reply (a short
budget per type, stopped at the end of a one-line answer), whatever --mode says, and reported beside the
questions. Multiple-choice records (JSON or JSON Lines), two formats:
  * plain: {"question": str, "options": [str, ...] | {"A": str, ...}, "answer": "B" | "AC" | ["A", "C"],
    "task": optional, "type": optional}; any number of options, one or several correct letters.
  * the original MedCare test files: {"conversations": [{"from": "human", "value": question with its
    lettered options}, ...], "eval": {"answer": "AC", "type": ..., "task_dataset": ...}} (or "messages").
The prompt is the training chat format (the tokenizer's chat template, else ChatML) with the paper's answer
instruction ("Please format the final answer ... The answer is {answer}." / "请在回答的最后用以下格式回答：
答案为{answer}。"), added unless the question already has it.

Scoring modes:
  * loglik (default): after the prompt and the answer prefix ("The answer is" / "答案为"), the candidate
    answer with the highest log-likelihood wins; no generation, one forward per batch. Candidates are the
    option letters; when the data has multi-answer items, every letter set up to the largest answer size,
    each followed by the sentence end, scored as a whole.
  * generate: greedy generation (batched; a row stops once its answer sentence is complete, or at
    --max-new-tokens), then the paper's extraction ("The answer is X" / "答案为X", the last one);
    when nothing matches, a second pass appends the answer prefix to the response and picks the most
    likely candidate (the paper's forced-letter pass). Where the option texts are known, the report also gives
    how often the reply names the right option first, whatever letter it gives (named_accuracy).
  * cloze: no letters at all: the question alone is the prompt, and the option whose text, as the whole reply,
    has the highest log-likelihood per UTF-8 byte wins (lm-evaluation-harness's acc_norm). Models below a
    billion parameters or so cannot bind answers to letters (their letter choice stays near chance even after
    a reply that states the right answer), so this is how their knowledge is read. Single-answer questions
    whose option texts are known (plain records; original-format questions with one option per line).
An item is correct when the predicted letter set equals the answer set exactly. The report gives accuracy
overall, per task and per type, and every item's prediction.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from . import alignment
from .alignment import AlignItem, AlignmentError, conversation_turns, is_alignment_record, to_align_item
from .checkpoint import open_stage
from .data import IM_END, parse_file, render_prompt
from .files import write_json
from .loading import UserError, load_model_and_tokenizer, resolve_device, resolve_dtype
from .prompts import ANSWER_PREFIX as PREFIX
from .prompts import EN_INSTRUCTION, SENTENCE_END, ZH_INSTRUCTION, is_chinese, mcq_prompt
from .stage_model import build_stage_model

_OPTION_LINE = re.compile(r"^\s*[(（]?([A-Z])\s*(?:[)）.．、:：]|\s)", re.M)
_OPTION_TEXT = re.compile(r"^\s*[(（]?([A-Z])\s*[)）.．、:：]\s*(\S.*?)\s*$", re.M)
_MARKERS = re.compile(r"答案[为是][:：]?|the[ \t]+answer[ \t]+is[ \t]*:?", re.I)


class EvalError(UserError):
    """Unusable evaluation data, model or arguments: reported as one line, exit status 2."""


MODES = ("loglik", "generate", "cloze")
# Defaults of the CLI: a multiple-choice reply (a short explanation and the answer sentence, where generation
# stops) fits 128 new tokens; 16 sequences a batch keep 2 CPU cores busy without padding waste.
DEFAULT_MAX_NEW_TOKENS, DEFAULT_BATCH_SIZE = 128, 16


# ------------------------------------------------------------------------------------------------ items
@dataclass
class Item:
    """One multiple-choice question, ready to prompt."""

    id: str
    task: str
    type: str
    messages: list[dict[str, str]]   # system (optional) + user turn
    letters: str                     # the option letters, in order: "ABCD"
    answer: str                      # the correct letters, sorted: "B", "AC"
    lang: str                        # "en" | "zh": the answer prefix and sentence end
    # cloze scoring: the question alone (system turn kept) and each option's text; empty when not known
    bare: list[dict[str, str]] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)


def _letters(value, where: str) -> str:
    """'AC' from "AC", "A, C", "A、C" or ["A", "C"]; EvalError when it is anything else."""
    text = "".join(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else value
    if not isinstance(text, str):
        raise EvalError(f"{where}: answer must be letters (\"B\", \"AC\" or [\"A\", \"C\"]), got {value!r}")
    letters = re.sub(r"[\s,，、;；/&和]+", "", text).upper()
    if not letters or not re.fullmatch(r"[A-Z]+", letters) or len(set(letters)) != len(letters):
        raise EvalError(f"{where}: answer must be distinct option letters, got {value!r}")
    return "".join(sorted(letters))


def _plain_item(r: dict, where: str, stem: str) -> Item:
    question, options = r.get("question"), r.get("options")
    if not isinstance(question, str) or not question.strip():
        raise EvalError(f"{where}: 'question' must be a non-empty string")
    if isinstance(options, list) and options and all(isinstance(o, str) for o in options) and len(options) <= 26:
        options = dict(zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", options, strict=False))
    elif isinstance(options, dict) and options and all(
            isinstance(k, str) and re.fullmatch(r"[A-Za-z]", k) and isinstance(v, str) for k, v in options.items()):
        options = {k.upper(): v for k, v in options.items()}
    else:
        raise EvalError(f"{where}: 'options' must be a non-empty list of strings or a dict letter -> string")
    answer = _letters(r.get("answer"), where)
    if set(answer) - set(options):
        raise EvalError(f"{where}: answer {answer!r} is not among the options {''.join(options)}")
    lang = "zh" if is_chinese(question) else "en"
    messages = [{"role": "user", "content": mcq_prompt(question, options, lang)}]
    return Item(str(r.get("id", where)), str(r.get("task") or stem), str(r.get("type") or "-"), messages,
                "".join(options), answer, lang, [{"role": "user", "content": question}], options)


def _original_item(r: dict, where: str, stem: str) -> Item:
    info, turns = r["eval"], conversation_turns(r) or []
    system = [t for t in turns[:1] if t["role"] == "system"]
    user = next((t for t in turns if t["role"] == "user"), None)
    if user is None or not isinstance(user["content"], str) or not user["content"].strip():
        raise EvalError(f"{where}: the conversation has no human/user turn with the question")
    if not isinstance(info, dict) or ("answer" not in info and "answer_idx" not in info):
        raise EvalError(f"{where}: 'eval' must be an object with the answer letters under 'answer'")
    question = user["content"]
    answer = _letters(info.get("answer", info.get("answer_idx")), where)
    letters = "".join(dict.fromkeys(_OPTION_LINE.findall(question)))
    if not letters:  # the paper's rule when the options are not on lines of their own
        letters = "ABCDE" if "E." in question or "(E)" in question else "ABCD"
    if set(answer) - set(letters):
        raise EvalError(f"{where}: answer {answer!r} is not among the options {letters} found in the question")
    lang = "zh" if is_chinese(question) else "en"
    options = {m[1]: m[2].strip() for m in _OPTION_TEXT.finditer(question)}
    first = _OPTION_TEXT.search(question)
    bare = question[:first.start()].strip() if first else ""
    if set(options) != set(letters) or not bare:  # options not on lines of their own: no cloze scoring
        options, bare = {}, ""
    if "答案为" not in question and "The answer is" not in question:
        question = f"{question}\n\n{ZH_INSTRUCTION if lang == 'zh' else EN_INSTRUCTION}"
    task = info.get("task_dataset") or info.get("task") or r.get("task") or stem
    return Item(str(info.get("sample_id", r.get("id", where))), str(task), str(info.get("type") or "-"),
                [*system, {"role": "user", "content": question}], letters, answer, lang,
                [*system, {"role": "user", "content": bare}] if bare else [], options)


def to_item(r, where: str, stem: str) -> Item | AlignItem:
    """An Item (a multiple-choice question, either format) or an AlignItem (an alignment task, see
    medcare.alignment); EvalError naming `where` when the record is none of them or is bad."""
    if is_alignment_record(r):
        try:
            return to_align_item(r, where, stem)
        except AlignmentError as exc:
            raise EvalError(f"{where}: {exc}") from None
    if isinstance(r, dict) and "question" in r:
        return _plain_item(r, where, stem)
    if isinstance(r, dict) and "eval" in r and conversation_turns(r) is not None:
        return _original_item(r, where, stem)
    raise EvalError(f"{where}: neither a {{question, options, answer}} record, a conversation with an 'eval' "
                    f"answer (the original MedCare test format) nor an alignment task {{type, prompt, answer}}")


def load_items(paths: Sequence[str], limit: int | None = None) -> list[Item | AlignItem]:
    """Every record of every file, validated; EvalError listing the first problems (file:line: reason) when any
    is bad, or naming a file without records."""
    items, problems = [], []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        raws = list(parse_file(path))
        if not raws:
            problems.append(f"{path}: no records (an empty file)")
        for raw in raws:
            where = f"{path}:{raw.location}" if raw.location else path
            if raw.problem is not None:
                problems.append(str(raw.problem))
                continue
            try:
                items.append(to_item(raw.value, where, stem))
            except EvalError as exc:
                problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise EvalError("; ".join(problems[:3]) + more)
    if not items:
        raise EvalError(f"no questions in {', '.join(paths)}")
    return items[:limit] if limit else items


# ------------------------------------------------------------------------------------------- prompting
def candidates(item: Item, max_size: int) -> list[str]:
    """Every letter set of 1..max_size options (sorted letters): the hypotheses loglik scoring compares."""
    return ["".join(c) for k in range(1, min(max_size, len(item.letters)) + 1)
            for c in itertools.combinations(sorted(item.letters), k)]


def extract_answer(text: str, letters: str) -> str | None:
    """The paper's extraction: the letters after the last "The answer is" / "答案为" ("答案是" too), e.g.
    "The answer is B." -> "B", "答案为A、C。" -> "AC", "The answer is (A) and (C)" -> "AC". Words before the
    first letter are skipped ("option B"), the first other word after it ends the answer; a run of capitals
    counts only when all of them are option letters ("ACE inhibitor" is not A, C, E). None if nothing found."""
    marks = list(_MARKERS.finditer(text))
    if not marks:
        return None
    span = text[marks[-1].end():].split("\n", 1)[0]
    found: list[str] = []
    last = ""  # the previous letter token
    for tok in re.findall(r"[A-Za-z]+|[\u4e00-\u9fff]|\S", span):
        if tok.isascii() and tok.isalpha():
            if tok.isupper() and set(tok) <= set(letters) and len(set(tok)) == len(tok):
                found += list(tok)
                last = tok
            elif found and tok.lower() not in ("and", "or"):
                if len(last) > 1 and last == "".join(found[-len(last):]):  # "ACE inhibitors": a word, not letters
                    del found[-len(last):]
                break
        elif tok in "。.;；!?！？" and found:
            break
        elif found and tok not in ",，、和与及()（）[]【】&/+:：" and not tok.isascii():
            break
    return "".join(sorted(set(found))) or None


def named_option(reply: str, options: dict[str, str]) -> str | None:
    """The letter of the option whose text the reply names first (case-insensitive; at one position the
    longer text wins), or None: what the reply says the answer is, whatever letter it then gives."""
    text = reply.casefold()
    found = [(text.find(o.casefold()), -len(o), letter) for letter, o in options.items() if o and o.casefold() in text]
    return min(found)[2] if found else None


# ---------------------------------------------------------------------------------------------- scoring
@dataclass
class _Row:
    """One sequence of a loglik batch: score the last `n_cont` tokens (0: score candidates at the next token)."""

    ids: list[int]
    n_cont: int
    item: int
    cands: list[tuple[str, int]]  # (candidate, next-token id) when n_cont == 0, else [(candidate, -1)]


def _rows(tokenizer, index: int, context: str, cands: list[str], lang: str, with_end: bool,
          one_forward: bool = True) -> list[_Row]:
    """One row when every candidate is a single token right after the context (single letters, the usual case):
    one forward per question reads every letter's log-probability at the answer position. Else (letter sets,
    multi-token letters, or `one_forward` off) a row per candidate holding context + candidate, whose tokens
    are summed."""
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx = encode(context)
    sep = " " if lang == "en" else ""
    fulls = {c: encode(context + sep + c + (SENTENCE_END[lang] if with_end else "")) for c in cands}
    if one_forward and not with_end and all(len(f) == len(ctx) + 1 and f[: len(ctx)] == ctx for f in fulls.values()):
        return [_Row(ctx, 0, index, [(c, f[-1]) for c, f in fulls.items()])]
    return [_continuation(ctx, f, index, c) for c, f in fulls.items()]


def _continuation(ctx: list[int], full: list[int], index: int, name: str) -> _Row:
    """A row scoring the tokens of `full` after its common prefix with `ctx` (at least the first is context)."""
    n = next((i for i, (a, b) in enumerate(zip(ctx, full, strict=False)) if a != b), min(len(ctx), len(full)))
    return _Row(full, len(full) - max(n, 1), index, [(name, -1)])


def _score_all(model, tokenizer, rows: list[_Row], batch_size: int, device, progress: bool, desc: str) -> list:
    """Each row's score (a float, or the candidates' list for a next-token row), rows batched by length."""
    order = sorted(range(len(rows)), key=lambda j: len(rows[j].ids))
    values: list = [None] * len(rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with tqdm(total=len(rows), desc=f"medcare.eval ({desc})", unit="seq", disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            for j, value in zip(batch, _score_rows(model, [rows[j] for j in batch], pad_id, device), strict=True):
                values[j] = value
            bar.update(len(batch))
    return values


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _score_rows(model, rows: list[_Row], pad_id: int, device) -> list[float | list[float]]:
    """Log-likelihoods of one batch of rows in one forward (left-padded, so every row ends at the last
    position and only the last few positions need logits)."""
    ids, mask = _left_pad([r.ids for r in rows], pad_id, device)
    keep = max(r.n_cont for r in rows) + 1
    kw = {"logits_to_keep": keep} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **kw)
    logp = torch.log_softmax(out.logits[:, -keep:].float(), dim=-1)
    scores = []
    for i, r in enumerate(rows):
        if r.n_cont == 0:
            scores.append(logp[i, -1, [t for _, t in r.cands]].tolist())
        else:
            targets = ids[i, -r.n_cont:]
            scores.append(float(logp[i, -r.n_cont - 1:-1].gather(-1, targets[:, None]).sum()))
    return scores


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def loglik_predict(model, tokenizer, items: list[Item], contexts: list[str], max_size: int, batch_size: int,
                   device, progress: bool = True, desc: str = "loglik", one_forward: bool = True
                   ) -> list[dict[str, float]]:
    """Per item, candidate -> log-likelihood after its context; rows sorted by length, `batch_size` a forward.
    `one_forward=False` scores every candidate as a sequence of its own (the slow reference)."""
    rows = [row for i, (item, ctx) in enumerate(zip(items, contexts, strict=True))
            for row in _rows(tokenizer, i, ctx, candidates(item, max_size), item.lang, max_size > 1, one_forward)]
    scores: list[dict[str, float]] = [{} for _ in items]
    for row, s in zip(rows, _score_all(model, tokenizer, rows, batch_size, device, progress, desc), strict=True):
        values = s if row.n_cont == 0 else [s]
        scores[row.item].update({c: v for (c, _), v in zip(row.cands, values, strict=True)})
    return scores


def cloze_predict(model, tokenizer, items: list[Item], batch_size: int, device, progress: bool = True
                  ) -> list[dict[str, float]]:
    """Per item, letter -> log-likelihood per UTF-8 byte of that option's text as the whole reply to the bare
    question (no options shown, no answer format asked): the cloze formulation, which reads what a model knows
    without asking it to bind answers to letters (small models cannot: their letter choice is near chance
    even when their reply states the right answer)."""
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows, sizes = [], []
    for i, item in enumerate(items):
        context = render_prompt(tokenizer, item.bare)
        ctx = encode(context)
        for letter, text in item.options.items():
            rows.append(_continuation(ctx, encode(context + text), i, letter))
            sizes.append(max(len(text.encode("utf-8")), 1))
    scores: list[dict[str, float]] = [{} for _ in items]
    values = _score_all(model, tokenizer, rows, batch_size, device, progress, "cloze")
    for row, value, size in zip(rows, values, sizes, strict=True):
        scores[row.item][row.cands[0][0]] = value / size
    return scores


class AnswerSentenceStop(StoppingCriteria):
    """Stops a row once its reply has completed an answer sentence ("The answer is B." / "答案为B。": the marker,
    then the end of that sentence or line): the paper's replies end there, so the tokens after it are waste."""

    DONE = re.compile(r"(?:答案[为是]|the[ \t]+answer[ \t]+is)[^\n.。]*?[A-Z][^\n.。]*[.。\n]", re.I)

    FIRST_LINE = re.compile(r"\S[^\n]*\n")  # one-line replies (a term, a label, kv fields) end at the line end

    def __init__(self, tokenizer, prompt_width: int, pattern: re.Pattern = DONE):
        self.tokenizer, self.width, self.pattern = tokenizer, prompt_width, pattern

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width:], skip_special_tokens=True)
        return torch.tensor([bool(self.pattern.search(t)) for t in texts], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, device,
                       progress: bool = True, stop_at_answer: bool = False, desc: str = "generate",
                       stop: re.Pattern | None = None) -> list[str]:
    """Greedy completions (left-padded batches, prompts sorted by length), stopping at the tokenizer's
    end-of-turn / end-of-text, and with `stop_at_answer` after the answer sentence (AnswerSentenceStop), or
    once the reply matches `stop`; the reply is cut right after the match, so a row that finished early in its
    batch reads the same as alone."""
    stop = AnswerSentenceStop.DONE if stop_at_answer else stop
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = {t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)) if
             isinstance(t, int) and t != tokenizer.unk_token_id}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                              eos_token_id=sorted(stops))
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda j: len(encoded[j]))
    out: list[str] = [""] * len(prompts)
    with tqdm(total=len(prompts), desc=f"medcare.eval ({desc})", unit="reply", disable=not progress,
              leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            ids, mask = _left_pad([encoded[j] for j in chunk], pad_id, device)
            criteria = StoppingCriteriaList([AnswerSentenceStop(tokenizer, ids.shape[1], stop)] if stop else [])
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                 stopping_criteria=criteria)
            for j, seq in zip(chunk, gen[:, ids.shape[1]:], strict=True):
                text = tokenizer.decode(seq, skip_special_tokens=True)
                done = stop.search(text) if stop else None
                out[j] = text[:done.end()].rstrip() if done else text
            bar.update(len(chunk))
    return out


# ---------------------------------------------------------------------------------------------- results
@dataclass
class EvalResult:
    mode: str
    answer_space: str
    records: list[dict] = field(default_factory=list)  # multiple-choice questions
    seconds: float = 0.0
    alignment: list[dict] = field(default_factory=list)  # alignment tasks (medcare.alignment.score)

    def alignment_summary(self) -> dict | None:
        return alignment.summarise(self.alignment) if self.alignment else None

    @property
    def accuracy(self) -> float:
        return sum(r["correct"] for r in self.records) / max(len(self.records), 1)

    @property
    def named_accuracy(self) -> float | None:
        """generate mode, questions with known option texts: the share whose reply names the right option first
        (named_option); None when no record has one."""
        named = [r for r in self.records if "named" in r]
        return sum(r["named"] == r["answer"] for r in named) / len(named) if named else None

    def groups(self, key: str) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for r in self.records:
            g = out.setdefault(r[key], {"n": 0, "correct": 0})
            g["n"] += 1
            g["correct"] += int(r["correct"])
        for g in out.values():
            g["accuracy"] = g["correct"] / g["n"]
        return out

    def report(self, **meta) -> dict:
        extra = {"alignment": {**self.alignment_summary(), "items": self.alignment}} if self.alignment else {}
        return {**meta, **extra, "mode": self.mode, "answer_space": self.answer_space, "n": len(self.records),
                "correct": sum(r["correct"] for r in self.records), "accuracy": self.accuracy,
                "named_accuracy": self.named_accuracy,
                "by_task": self.groups("task"), "by_type": self.groups("type"), "seconds": round(self.seconds, 2),
                "items": self.records}

    def table(self) -> str:
        lines = [] if not self.records else [
            f"{'multiple choice':28s}{'n':>6s}{'correct':>9s}{'accuracy':>10s}",
            _line("all", len(self.records), sum(r["correct"] for r in self.records))]
        for key in ("task", "type") if self.records else ():
            groups = self.groups(key)
            lines.append(f"  by {key}")
            lines += [_line("  " + name, g["n"], g["correct"]) for name, g in sorted(groups.items())]
        if self.named_accuracy is not None:
            named = [r for r in self.records if "named" in r]
            lines.append(f"  the reply names the right option first (whatever letter it gives): "
                         f"{sum(r['named'] == r['answer'] for r in named)}/{len(named)}, "
                         f"{100 * self.named_accuracy:.1f}%")
        if self.alignment:
            lines.append(alignment.table(self.alignment_summary()))
        return "\n".join(lines)


def _line(name: str, n: int, correct: int) -> str:
    return f"  {name[:26]:26s}{n:>6d}{correct:>9d}{100 * correct / max(n, 1):>9.1f}%"


def evaluate(model, tokenizer, items: list[Item | AlignItem], mode: str = "loglik", batch_size: int = 8,
             max_new_tokens: int = 512, progress: bool = True, answer_size: int | None = None) -> EvalResult:
    """Score `items` with `model` (in eval mode, on its own device): multiple-choice questions by `mode` (see
    the module docstring), alignment tasks always by their generated replies (medcare.alignment).
    `answer_size`: the largest letter set loglik scoring considers (default: the largest answer in `items`)."""
    if mode not in MODES:
        raise EvalError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
    t0 = time.time()
    model.eval()
    questions = [i for i in items if isinstance(i, Item)]
    tasks = [i for i in items if isinstance(i, AlignItem)]
    if questions:
        result = _evaluate_questions(model, tokenizer, questions, mode, batch_size, max_new_tokens, progress,
                                     answer_size)
    else:
        result = EvalResult(mode, "none (no multiple-choice questions)")
    if tasks:
        result.alignment = evaluate_alignment(model, tokenizer, tasks, batch_size, progress)
    result.seconds = time.time() - t0
    return result


def evaluate_alignment(model, tokenizer, items: list[AlignItem], batch_size: int, progress: bool = True
                       ) -> list[dict]:
    """Each task's greedy reply in the training chat format, read and scored (medcare.alignment.score). Replies
    are generated in groups of one budget (alignment.MAX_NEW_TOKENS per type) and end at the end of the turn,
    or, for one-line formats, at the end of the first line."""
    device = next(model.parameters()).device
    groups: dict[tuple[int, bool], list[int]] = {}
    for j, item in enumerate(items):
        one_line = not (item.type == "extraction" and item.format == "json")
        groups.setdefault((alignment.MAX_NEW_TOKENS[item.type], one_line), []).append(j)
    replies = [""] * len(items)
    for (budget, one_line), members in sorted(groups.items()):
        prompts = [render_prompt(tokenizer, items[j].messages) for j in members]
        out = generate_responses(model, tokenizer, prompts, batch_size, budget, device, progress,
                                 desc=f"alignment, {budget} tokens",
                                 stop=AnswerSentenceStop.FIRST_LINE if one_line else None)
        for j, reply in zip(members, out, strict=True):
            replies[j] = reply.strip()
    return [alignment.score(item, reply) for item, reply in zip(items, replies, strict=True)]


def _evaluate_questions(model, tokenizer, items: list[Item], mode: str, batch_size: int, max_new_tokens: int,
                        progress: bool, answer_size: int | None) -> EvalResult:
    t0, device = time.time(), next(model.parameters()).device
    max_size = answer_size or max(len(i.answer) for i in items)
    space = "option letters" if max_size == 1 else f"letter sets of up to {max_size} options (multi-answer data)"
    if mode == "cloze":
        unfit = next((i for i in items if len(i.answer) > 1 or not i.options), None)
        if unfit is not None:
            raise EvalError(f"question {unfit.id}: cloze scoring needs single-answer questions whose option texts "
                            f"are known (options on lines of their own); use --mode loglik or generate")
        scores = cloze_predict(model, tokenizer, items, batch_size, device, progress)
        return _result(mode, "option texts (log-likelihood per byte)", items, [max(s, key=s.get) for s in scores],
                       [None] * len(items), ["cloze"] * len(items), t0)
    prompts = [render_prompt(tokenizer, i.messages) for i in items]
    responses: list[str | None] = [None] * len(items)
    preds: list[str | None] = [None] * len(items)
    how = ["loglik"] * len(items)
    if mode == "generate":
        responses = generate_responses(model, tokenizer, prompts, batch_size, max_new_tokens, device, progress,
                                       stop_at_answer=True)
        preds = [extract_answer(r, i.letters) for r, i in zip(responses, items, strict=True)]
        how = ["pattern" if p else "forced" for p in preds]
    todo = [j for j, p in enumerate(preds) if p is None]
    if todo:  # loglik mode: every item; generate mode: the forced-answer pass after the response
        contexts = [prompts[j] + ("" if responses[j] is None else responses[j].rstrip() + "\n")
                    + PREFIX[items[j].lang] for j in todo]
        scores = loglik_predict(model, tokenizer, [items[j] for j in todo], contexts, max_size, batch_size, device,
                                progress, "loglik" if mode == "loglik" else "forced answer pass")
        for j, s in zip(todo, scores, strict=True):
            preds[j] = max(s, key=s.get)
    return _result(mode, space, items, preds, responses, how, t0)


def _result(mode: str, space: str, items: list[Item], preds, responses, how, t0: float) -> EvalResult:
    result = EvalResult(mode, space, seconds=0.0)
    for j, item in enumerate(items):
        rec = {"id": item.id, "task": item.task, "type": item.type, "answer": item.answer, "prediction": preds[j],
               "correct": preds[j] == item.answer, "extracted_by": how[j]}
        if responses[j] is not None:
            rec["response"] = responses[j]
            if item.options:
                rec["named"] = named_option(responses[j], item.options)
        result.records.append(rec)
    result.seconds = time.time() - t0
    return result


# ------------------------------------------------------------------------------------------------ models
def load_model(model_dir: str, stage_dir: str | None, dtype: str, device: str, experts: str):
    """(model in eval mode on its device, tokenizer, description). With `stage_dir`, the model of that stage
    directory on the base `model_dir` (medcare.stage_model.build_stage_model, adapters unmerged)."""
    dev = resolve_device(device)
    model, tokenizer = load_model_and_tokenizer(model_dir, resolve_dtype(dtype, dev, option="--dtype"))
    what = "plain model"
    if stage_dir:
        what = build_stage_model(model, open_stage(stage_dir), experts=experts).description
    return model.to(dev).eval(), tokenizer, what


# ----------------------------------------------------------------------------------------------- the CLI
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m medcare.eval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model directory (an export, or the base with --stage-dir)")
    ap.add_argument("--data", required=True, nargs="+", help="multiple-choice files (JSON or JSONL)")
    ap.add_argument("--stage-dir", default=None, help="a stage-1 or stage-2 directory to apply to --model")
    ap.add_argument("--output", default=None, help="write the JSON report here (refused if it exists)")
    ap.add_argument("--overwrite", action="store_true", help="allow --output to replace an existing file")
    ap.add_argument("--mode", default="loglik", choices=MODES, help="scoring (default loglik)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N questions (a quick look)")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                    help=f"sequences per forward / generate call (default {DEFAULT_BATCH_SIZE})")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                    help=f"generate mode: multiple-choice reply length limit (default {DEFAULT_MAX_NEW_TOKENS}; "
                         f"alignment tasks have their own per type)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on a bf16 GPU, else float32), float32, bfloat16, "
                                                    "float16")
    ap.add_argument("--experts", default="drop", choices=("drop", "keep"),
                    help="stage-1 directories: drop the routed experts (the paper's deployment) or keep them")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def _check_args(args) -> None:
    problems = []
    if args.limit is not None and args.limit < 1:
        problems.append(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.output and os.path.exists(args.output) and (os.path.isdir(args.output) or not args.overwrite):
        problems.append(f"--output {args.output} already exists; choose a new file or pass --overwrite")
    if args.stage_dir and not os.path.isdir(args.stage_dir):
        problems.append(f"--stage-dir {args.stage_dir}: no such directory")
    if problems:
        raise EvalError("; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        items = load_items(args.data, args.limit)  # before any model is loaded
        model, tokenizer, what = load_model(args.model, args.stage_dir, args.dtype, args.device, args.experts)
        n_tasks = sum(isinstance(i, AlignItem) for i in items)
        print(f"medcare.eval: {len(items) - n_tasks} multiple-choice questions and {n_tasks} alignment tasks from "
              f"{', '.join(args.data)}; {args.model}"
              f"{' + ' + args.stage_dir if args.stage_dir else ''} ({what}) on {next(model.parameters()).device}, "
              f"mode {args.mode}")
        result = evaluate(model, tokenizer, items, args.mode, args.batch_size, args.max_new_tokens,
                          progress=not args.no_progress)
    except UserError as exc:
        print(f"medcare.eval: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    print(f"scored by {result.mode} over {result.answer_space}, {result.seconds:.1f} s")
    print(result.table())
    if args.output:
        report = result.report(model=os.path.abspath(args.model), data=[os.path.abspath(d) for d in args.data],
                               stage_dir=os.path.abspath(args.stage_dir) if args.stage_dir else None, model_kind=what)
        write_json(args.output, report)
        print(f"report written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
