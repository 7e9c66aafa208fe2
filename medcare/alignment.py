"""Alignment-required tasks scored on generated output: entity extraction, term normalisation, classification.

The paper's second kind of task (CBLUE/CCTE-style): the model must answer in a required format, so its reply
is generated greedily in the training chat format and read, never scored by likelihood.

Record (JSON or JSON Lines, beside or instead of multiple-choice questions in ``medcare.eval --data``)::

    {"type": "extraction" | "normalisation" | "classification",
     "prompt": "the user turn",           # or "messages" / "conversations" (system and user turns; an
                                          # assistant turn, if any, is the reference and is not shown)
     "answer": ...,                       # the gold answer, see below
     "labels": ["a", "b", ...],           # classification: the allowed labels (the answer is one of them)
     "format": "kv" | "json",             # extraction: the reply format (default kv)
     "reply_prefix": "intent: ",          # normalisation / classification: what the reply starts with, if any
     "task": "a name", "id": ...}         # optional: the per-task table and the report

* extraction: ``answer`` is the gold reply in the format, ``"diseases: a, b; drugs: none; ..."`` (kv: fields
  split by ";" or "；", key from value by ":" or "：", items by "," or "，", "none"/"无" for an empty field) or a
  JSON object ``{"diseases": ["a", "b"], "drugs": []}`` (either written as the answer, whatever the format);
  scored by field-level precision, recall and F1 over (field, item) pairs, case-insensitive;
* normalisation: ``answer`` is the standard term; exact match (case and spacing ignored) of the reply's value
  (the reply after ``reply_prefix``, its first line, a final full stop dropped);
* classification: ``answer`` is one of ``labels``; the reply's value must be one of them; when it is not, the
  label the reply names first is taken (and the reply counts as not following the format).
Every reply is also checked against its required format (``format_ok``): kv fields with known keys and
nothing else, a JSON object, one line starting with ``reply_prefix``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .data import FORMATS
from .prompts import is_chinese

TYPES = ("extraction", "normalisation", "classification")
# Reply budgets in new tokens per type: an extraction lists a few items, the others are a term or a label.
MAX_NEW_TOKENS = {"extraction": 64, "normalisation": 24, "classification": 16}
_NONE = {"none", "无", "n/a", "-", "—", "无。"}
_FIELD_SEP = re.compile(r"[;；\n]")
_ITEM_SEP = re.compile(r"\s*[,，]\s*")
_KEY_VALUE = re.compile(r"^\s*([^:：]+?)\s*[:：]\s*(.*?)\s*$")


class AlignmentError(ValueError):
    """A bad alignment record: the message names the problem; the loader adds where."""


@dataclass
class AlignItem:
    """One alignment task, ready to prompt."""

    id: str
    task: str
    type: str
    messages: list[dict[str, str]]    # system (optional) + user turn
    answer: str | dict[str, list[str]]
    lang: str
    labels: tuple[str, ...] = ()
    format: str = "kv"
    reply_prefix: str = ""
    gold: dict[str, set[str]] = field(default_factory=dict)  # extraction: the parsed gold fields


def is_alignment_record(r) -> bool:
    """A record that is neither kind of multiple-choice question but asks for a reply: an alignment task."""
    return isinstance(r, dict) and "question" not in r and "eval" not in r and (
        "prompt" in r or r.get("type") in TYPES)


def conversation_turns(r: dict) -> list[dict[str, str]] | None:
    """A record's conversation ("conversations" or "messages", the formats training reads) as role/content
    turns; None when it has neither."""
    for key, (speaker, text, roles) in FORMATS.items():
        if isinstance(r.get(key), list):
            return [{"role": roles.get(t.get(speaker), "?"), "content": t.get(text)}
                    for t in r[key] if isinstance(t, dict)]
    return None


def to_align_item(r: dict, where: str, stem: str) -> AlignItem:
    """An AlignItem from a record; AlignmentError (one line, naming the field) when the record is unusable."""
    kind = r.get("type")
    if kind not in TYPES:
        raise AlignmentError(f"'type' must be one of {', '.join(TYPES)} for an alignment task, got {kind!r}")
    if isinstance(r.get("prompt"), str):
        messages = [{"role": "user", "content": r["prompt"]}]
    else:
        turns = conversation_turns(r) or []
        user = [i for i, t in enumerate(turns) if t["role"] == "user"]
        if not user:
            raise AlignmentError("needs a 'prompt' string or a conversation with a user turn")
        messages = [t for t in turns[:user[-1] + 1] if t["role"] in ("system", "user")]
    if not all(isinstance(t["content"], str) and t["content"].strip() for t in messages):
        raise AlignmentError("the prompt is empty")
    if "answer" not in r or r["answer"] in (None, "", [], {}):
        raise AlignmentError("has no gold 'answer'")
    answer, labels, fmt, prefix = r["answer"], (), "kv", r.get("reply_prefix", "")
    if not isinstance(prefix, str):
        raise AlignmentError(f"'reply_prefix' must be a string, got {prefix!r}")
    gold: dict[str, set[str]] = {}
    if kind == "extraction":
        fmt = r.get("format", "kv")
        if fmt not in ("kv", "json"):
            raise AlignmentError(f"'format' must be kv or json, got {fmt!r}")
        gold = _gold_fields(answer)
    elif not isinstance(answer, str):
        raise AlignmentError(f"'answer' must be a string for {kind}, got {type(answer).__name__}")
    if kind == "classification":
        labels = r.get("labels")
        if not (isinstance(labels, list) and labels and all(isinstance(x, str) and x.strip() for x in labels)):
            raise AlignmentError("classification needs 'labels': a non-empty list of the allowed label strings")
        labels = tuple(labels)
        if _norm(answer) not in {_norm(x) for x in labels}:
            raise AlignmentError(f"answer {answer!r} is not one of the allowed labels {list(labels)}")
    text = " ".join(t["content"] for t in messages)
    return AlignItem(str(r.get("id", where)), str(r.get("task") or f"{stem}:{kind}"), kind, messages, answer,
                     "zh" if is_chinese(text) else "en", labels, fmt, prefix, gold)


def _gold_fields(answer) -> dict[str, set[str]]:
    if isinstance(answer, dict):
        fields = _json_fields(answer)
    elif isinstance(answer, str):
        fields, ok = parse_kv(answer)
        if not ok:
            raise AlignmentError(f"extraction answer {answer[:60]!r} is not 'key: a, b; key: none'")
    else:
        fields = None
    if not fields:
        raise AlignmentError("extraction 'answer' must be 'key: a, b; key: none' or a JSON object of lists")
    return fields


def _norm(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".。")


def _items(values) -> set[str]:
    return {_norm(v) for v in values if _norm(v) and _norm(v) not in _NONE}


def parse_kv(text: str) -> tuple[dict[str, set[str]], bool]:
    """'diseases: a, b; drugs: none' -> ({'diseases': {'a', 'b'}, 'drugs': set()}, True); the bool says whether
    every non-empty part was a 'key: value' field."""
    fields, ok = {}, True
    for part in _FIELD_SEP.split(text.strip()):
        if not part.strip():
            continue
        m = _KEY_VALUE.match(part)
        if not m:
            ok = False
            continue
        fields[_norm(m[1])] = fields.get(_norm(m[1]), set()) | _items(_ITEM_SEP.split(m[2]))
    return fields, ok and bool(fields)


def _json_fields(obj) -> dict[str, set[str]] | None:
    if not isinstance(obj, dict) or not obj:
        return None
    out = {}
    for key, value in obj.items():
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            return None
        out[_norm(str(key))] = _items(values)
    return out


def _json_reply(reply: str) -> dict[str, set[str]] | None:
    text = reply.strip()
    fence = re.search(r"\{.*\}", text, re.S)
    try:
        return _json_fields(json.loads(fence.group(0) if fence else text))
    except (ValueError, TypeError):
        return None


def _value(reply: str, prefix: str) -> tuple[str, bool]:
    """The reply's value (its first line, after the prefix) and whether the reply had the required form: one
    line, starting with the prefix. Without the prefix, the text after a "label:" is the value."""
    lines = reply.strip().splitlines() or [""]
    head, ok = lines[0].strip(), len(lines) == 1
    if prefix:
        p = prefix.strip()
        if head.casefold().startswith(p.casefold()):
            head = head[len(p):]
        else:
            ok = False
            m = _KEY_VALUE.match(head)
            head = m[2] if m else head
    head = head.strip()
    return head, ok and bool(head)


def score(item: AlignItem, reply: str) -> dict:
    """One reply's record: the prediction, whether it follows the format, and the type's counts/score."""
    rec = {"id": item.id, "task": item.task, "type": item.type, "response": reply}
    if item.type == "extraction":
        if item.format == "json":
            pred = _json_reply(reply)
            ok, pred = pred is not None, pred or {}
        else:
            pred, ok = parse_kv(reply)
            ok = ok and set(pred) <= set(item.gold)
        gold_pairs = {(k, v) for k, vs in item.gold.items() for v in vs}
        pred_pairs = {(k, v) for k, vs in pred.items() for v in vs}
        tp = len(gold_pairs & pred_pairs)
        fp, fn = len(pred_pairs) - tp, len(gold_pairs) - tp
        p, r = _ratio(tp, tp + fp, empty=float(not gold_pairs)), _ratio(tp, tp + fn, empty=1.0)
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        rec.update(prediction={k: sorted(v) for k, v in pred.items()}, tp=tp, fp=fp, fn=fn, score=f1, format_ok=ok)
    elif item.type == "normalisation":
        value, ok = _value(reply, item.reply_prefix)
        rec.update(prediction=value, score=float(_norm(value) == _norm(item.answer)), format_ok=ok)
    else:
        value, ok = _value(reply, item.reply_prefix)
        label = next((x for x in item.labels if _norm(x) == _norm(value)), None)
        if label is None:
            ok = False
            text = reply.casefold()
            named = [(text.find(x.casefold()), -len(x), x) for x in item.labels if x.casefold() in text]
            label = min(named)[2] if named else None
        rec.update(prediction=label, score=float(label is not None and _norm(label) == _norm(item.answer)),
                   format_ok=ok)
    rec["answer"] = item.answer
    return rec


def _ratio(a: int, b: int, empty: float) -> float:
    return a / b if b else empty


def summarise(records: list[dict]) -> dict:
    """Per type and per task: n, the share that followed the format, and the type's metrics (extraction:
    micro precision/recall/F1 over (field, item) pairs; normalisation: exact match; classification: accuracy);
    overall: the mean record score (F1 / exact / correct) and the format share."""
    def group(recs: list[dict]) -> dict:
        out = {"n": len(recs), "format_ok": sum(r["format_ok"] for r in recs) / len(recs),
               "score": sum(r["score"] for r in recs) / len(recs)}
        kinds = {r["type"] for r in recs}
        if kinds == {"extraction"}:
            tp, fp, fn = (sum(r[k] for r in recs) for k in ("tp", "fp", "fn"))
            p, r_ = _ratio(tp, tp + fp, 0.0), _ratio(tp, tp + fn, 0.0)
            out.update(precision=p, recall=r_, f1=2 * p * r_ / (p + r_) if p + r_ else 0.0)
        elif kinds == {"normalisation"}:
            out["exact_match"] = out["score"]
        elif kinds == {"classification"}:
            out["accuracy"] = out["score"]
        return out

    by: dict[str, dict[str, list[dict]]] = {"type": {}, "task": {}}
    for r in records:
        by["type"].setdefault(r["type"], []).append(r)
        by["task"].setdefault(r["task"], []).append(r)
    return {**group(records), "by_type": {k: group(v) for k, v in sorted(by["type"].items())},
            "by_task": {k: group(v) for k, v in sorted(by["task"].items())}}


METRIC = {"extraction": "f1", "normalisation": "exact_match", "classification": "accuracy"}


def table(summary: dict) -> str:
    lines = [f"  {'alignment':26s}{'n':>6s}{'metric':>16s}{'format':>9s}",
             f"  {'all (mean record score)':26s}{summary['n']:>6d}{100 * summary['score']:>15.1f}%"
             f"{100 * summary['format_ok']:>8.1f}%"]
    for key in ("type", "task"):
        lines.append(f"  by {key}")
        for name, g in summary[f"by_{key}"].items():
            metric = next((m for m in ("f1", "exact_match", "accuracy") if m in g), "score")
            lines.append(f"    {name[:24]:24s}{g['n']:>6d}{metric:>9s} {100 * g[metric]:>5.1f}%"
                         f"{100 * g['format_ok']:>8.1f}%")
    return "\n".join(lines)
