"""Conversation data for MedCare fine-tuning: load, validate, tokenise with label masks, batch.

Input files are JSON (a list of records) or JSON Lines (one record per line); the format is detected from
the content (a file whose first non-space character is ``[`` is a JSON list), not the extension. A record is

    {"conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...]}      (ShareGPT, the original)
    {"messages": [{"role": "user" | "assistant" | "system", "content": str}, ...]}    (OpenAI / HF chat)

Other keys ("id", "eval", ...) are ignored. Conversations are normalised to ``{"role", "content"}`` dicts.
Validation reports every problem at once, each with its file and location ("line 12" in JSON Lines,
"record 3 (line 40)" in a JSON list, 1-based like line numbers); ``python -m medcare.data check FILE...``
runs it without training.

Label masks (ignore index -100; labels are unshifted, the model shifts them):

* ``mask="assistant"`` (default): only assistant replies are supervised, each with its end-of-turn token
  (``<|im_end|>`` in ChatML). Whitespace after the end-of-turn token (ChatML's ``"\\n"``) is *not*
  supervised: generation stops at the end-of-turn token, so the model never emits it. With a tokenizer that
  has a chat template the template decides the text; assistant spans are found by rendering the conversation
  prefix by prefix, so any prefix-stable template works. Without one, ChatML is used with the default
  system prompt inserted when the conversation has none (what Qwen2's own template does).
* ``mask="official"``: the original MedCare / Qwen-1 scheme (ChatML tokenizers only): every turn supervises
  ``<|im_start|>``, ``<|im_end|>`` and the ``"\\n"`` after it; assistant turns also supervise their content.
  Unlike the original, a system turn of the record is kept (the original always used the default prompt).

Sequences are truncated at the end to ``max_length``; a record with no assistant token left is dropped and
counted (one warning per data set), never trained on as pure boundary tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_SYSTEM_PROMPT", "IGNORE_INDEX", "MASK_MODES", "DataCollator", "DataError", "DataProblem",
    "EpochSampler", "LoadResult", "SupervisedDataset", "check_files", "default_max_length", "encode_conversation",
    "length_grouped_indices", "length_grouped_sampler", "load_records", "main", "summarize",
]

IGNORE_INDEX = -100
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
MASK_MODES = ("assistant", "official")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# model_max_length is a huge sentinel (int(1e30)) when a tokenizer does not know its model's context.
_MAX_SANE_LENGTH, _FALLBACK_MAX_LENGTH = 1_000_000, 2048
_TQDM_THRESHOLD = 1000
# Per record format: the key of the speaker, the key of the text, and the speaker values -> normalised role.
_FORMATS: dict[str, tuple[str, str, dict[str, str]]] = {
    "conversations": ("from", "value", {"human": "user", "gpt": "assistant", "system": "system"}),
    "messages": ("role", "content", {"user": "user", "assistant": "assistant", "system": "system"}),
}
Messages = list[dict[str, str]]
PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with the data.

    Attributes:
        path: The file, as the caller named it.
        location: "line 12" (JSON Lines), "record 3 (line 40)" (JSON list), "line 5 column 9" (a JSON syntax
            error), or "" when the problem concerns the whole file.
        reason: What is wrong, one line.
        whole_file: True when the problem makes the whole file unusable (missing, unreadable, broken JSON
            list); such problems are never skipped.
    """

    path: str
    location: str
    reason: str
    whole_file: bool = False

    def __str__(self) -> str:
        return f"{self.path}:{self.location}: {self.reason}" if self.location else f"{self.path}: {self.reason}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summarize(problems: Sequence[DataProblem], total: int, num_files: int = 0) -> str:
    """One line: "OK, 120 records in 2 files" or "3 problems in 2 of 120 records (a.jsonl, b.json)"."""
    if not problems:
        return f"OK, {_plural(total, 'record')} in {_plural(num_files, 'file')}"
    bad_records = len({(p.path, p.location) for p in problems if not p.whole_file})
    bad_files = len({p.path for p in problems if p.whole_file})
    where = []
    if bad_records or not bad_files:
        where.append(f"{bad_records} of {_plural(total, 'record')}")
    if bad_files:
        where.append(f"{bad_files} unusable {'file' if bad_files == 1 else 'files'}")
    files = list(dict.fromkeys(p.path for p in problems))
    shown = ", ".join(files[:5]) + (f", +{len(files) - 5} more" if len(files) > 5 else "")
    return f"{_plural(len(problems), 'problem')} in {' and '.join(where)} ({shown})"


class DataError(ValueError):
    """Bad training data. ``str()`` is a one-line summary; ``problems`` holds every problem found.

    Args:
        problems: Every problem found.
        total: How many records were read.
    """

    def __init__(self, problems: Sequence[DataProblem], total: int = 0) -> None:
        self.problems = list(problems)
        self.total = total
        first = f"; first: {self.problems[0]}" if self.problems else ""
        super().__init__(f"{summarize(self.problems, total)}{first} "
                         "(list them all with: python -m medcare.data check FILE...)")

    def report(self) -> str:
        """Every problem, one per line, then the summary line."""
        return "\n".join([*map(str, self.problems), summarize(self.problems, self.total)])


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------- reading


def _read_text(path: str) -> tuple[str | None, DataProblem | None]:
    """The file's text, or the problem that prevents reading it (never raises for a user mistake)."""
    if os.path.isdir(path):
        return None, DataProblem(path, "", "is a directory, not a data file", True)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, DataProblem(path, "", "file not found", True)
    except OSError as e:
        return None, DataProblem(path, "", f"cannot read: {e.strerror or _one_line(e)}", True)
    try:
        return data.decode("utf-8-sig"), None  # -sig: editors on Windows write a BOM
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return None, DataProblem(path, "", f"not UTF-8 text (invalid byte at line {line}, offset {e.start})", True)


class _Raw(NamedTuple):
    """A parsed record before validation (value None when the JSON itself is bad)."""

    location: str
    value: Any
    problem: DataProblem | None = None


def _parse_jsonl(path: str, text: str) -> Iterator[_Raw]:
    # split("\n"), not splitlines(): U+2028 and friends may legally appear raw inside JSON strings.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        location = f"line {lineno}"
        try:
            yield _Raw(location, json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == 1 and _is_single_object(text):
                yield _Raw("", None, DataProblem(path, "", "holds one JSON object; expected a JSON list of "
                                                 "records or JSON Lines (one record per line)", True))
                return
            yield _Raw(location, None, DataProblem(path, location, f"malformed JSON: {e.msg} (column {e.colno})"))


def _is_single_object(text: str) -> bool:
    """A pretty-printed single object would otherwise report one error per line."""
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _parse_json_list(path: str, text: str) -> Iterator[_Raw]:
    """Element by element with raw_decode, so each record knows the line it starts on."""
    decoder, n, pos, line, line_pos = json.JSONDecoder(), 0, _skip_ws(text, text.index("[") + 1), 1, 0
    if pos < len(text) and text[pos] == "]":
        pos = _skip_ws(text, pos + 1)
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                yield _Raw("", None, _syntax_problem(path, text, e.pos, f"malformed JSON: {e.msg}"))
                return
            n, line, line_pos = n + 1, line + text.count("\n", line_pos, pos), pos
            yield _Raw(f"record {n} (line {line})", value)
            pos = _skip_ws(text, end)
            if pos < len(text) and text[pos] == ",":
                pos = _skip_ws(text, pos + 1)
            elif pos < len(text) and text[pos] == "]":
                pos = _skip_ws(text, pos + 1)
                break
            else:
                yield _Raw("", None, _syntax_problem(path, text, pos, "malformed JSON: expected ',' or ']'"))
                return
    if pos < len(text):
        yield _Raw("", None, _syntax_problem(path, text, pos, "malformed JSON: extra data after the list"))


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _syntax_problem(path: str, text: str, pos: int, reason: str) -> DataProblem:
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    if pos >= len(text):
        reason += " (unexpected end of file)"
    return DataProblem(path, f"line {line} column {column}", reason, True)


def _parse_file(path: str) -> Iterator[_Raw]:
    text, problem = _read_text(path)
    if problem is not None:
        yield _Raw("", None, problem)
    elif not text.strip():
        yield _Raw("", None, DataProblem(path, "", "file is empty (no records)", True))
    elif text.lstrip().startswith("["):
        yield from _parse_json_list(path, text)
    else:
        yield from _parse_jsonl(path, text)


# ---------------------------------------------------------------------------------------------- validation


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _normalise(value: Any) -> tuple[Messages | None, list[str]]:
    """The record as role/content messages, or the reasons it is bad (every one of them)."""
    if not isinstance(value, dict):
        return None, [f"record is a JSON {_json_type(value)}, not an object"]
    keys = [k for k in _FORMATS if k in value]
    if len(keys) != 1:
        return None, ["record has both 'conversations' and 'messages'; keep one" if keys
                      else "record has neither 'conversations' nor 'messages'"]
    turns = value[keys[0]]
    if not isinstance(turns, list) or not turns:
        return None, [f"'{keys[0]}' is {'empty' if turns == [] else 'not a list'}"]
    messages, reasons = [], []
    for k, turn in enumerate(turns, 1):
        message, turn_reasons = _normalise_turn(keys[0], turn)
        messages.append(message)
        reasons += [f"turn {k}: {r}" for r in turn_reasons]
    # Order checks on broken turns would only add noise ("no assistant turn" when the role was misspelt).
    return (None, reasons) if reasons else (messages, _order_problems(messages))


def _normalise_turn(kind: str, turn: Any) -> tuple[dict[str, str], list[str]]:
    if not isinstance(turn, dict):
        return {}, [f"not an object (got a JSON {_json_type(turn)})"]
    speaker_key, text_key, roles = _FORMATS[kind]
    if kind == "conversations" and speaker_key not in turn and "role" in turn:
        speaker_key = "role"  # the original loader accepts "role" with ShareGPT values too
    reasons = []
    speaker, text = turn.get(speaker_key), turn.get(text_key)
    if speaker_key not in turn:
        reasons.append(f"missing '{speaker_key}'")
    elif speaker not in roles:
        expected = ", ".join(repr(r) for r in roles)
        reasons.append(f"unknown '{speaker_key}' value {_one_line(repr(speaker))[:60]} (expected one of {expected})")
    if text_key not in turn:
        reasons.append(f"missing '{text_key}'")
    elif not isinstance(text, str):
        reasons.append(f"'{text_key}' is not a string (got a JSON {_json_type(text)})")
    elif not text.strip():
        reasons.append(f"empty '{text_key}'")
    return {"role": roles.get(speaker, ""), "content": text}, reasons


def _order_problems(messages: Messages) -> list[str]:
    reasons = []
    if messages[0]["role"] == "assistant":
        reasons.append("conversation starts with an assistant turn (expected a user or system turn first)")
    reasons += [f"turn {k}: system turn is not the first turn"
                for k, m in enumerate(messages, 1) if k > 1 and m["role"] == "system"]
    if not any(m["role"] == "assistant" for m in messages):
        reasons.append("no assistant turn (nothing to train on)")
    return reasons


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class LoadResult:
    """What `load_records` read.

    Attributes:
        records: The good conversations, normalised to ``[{"role": ..., "content": ...}, ...]``.
        problems: Every problem found (kept under ``on_error="skip"`` so the caller can log them).
        total: How many records the files hold, good and bad.
        origins: ``(path, location)`` of each good record, parallel to ``records``.
    """

    records: list[Messages]
    problems: list[DataProblem]
    total: int
    origins: list[tuple[str, str]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        """How many records were dropped as bad."""
        return len({(p.path, p.location) for p in self.problems if not p.whole_file})


def _as_paths(paths: PathLike | Iterable[PathLike]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def _scan(paths: list[str], extra_check: Callable[[Messages], list[str]] | None = None) -> LoadResult:
    """Read and validate every file; ``extra_check`` adds reasons for records that are otherwise good."""
    result = LoadResult([], [], 0)
    for path in paths:
        for raw in _parse_file(path):
            # Every record counts, a JSON Lines line that does not parse included; whole-file problems do not.
            if raw.problem is None or not raw.problem.whole_file:
                result.total += 1
            if raw.problem is not None:
                result.problems.append(raw.problem)
                continue
            messages, reasons = _normalise(raw.value)
            if messages is not None and extra_check is not None:
                reasons = extra_check(messages)
            if reasons:
                result.problems += [DataProblem(path, raw.location, r) for r in reasons]
            else:
                result.records.append(messages)
                result.origins.append((path, raw.location))
    return result


def load_records(paths: PathLike | Iterable[PathLike], on_error: str = "fail") -> LoadResult:
    """Load and validate conversation files (JSON list or JSON Lines, detected by content).

    Args:
        paths: One path or several; records keep file order.
        on_error: "fail" raises on any problem; "skip" drops bad records (``result.skipped`` counts them,
            ``result.problems`` says why) but still raises when a whole file is unusable or nothing is left.

    Returns:
        The normalised conversations, the problems and the record count.

    Raises:
        DataError: Listing every problem found.
        ValueError: Unknown ``on_error``.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip'; got {on_error!r}")
    result = _scan(_as_paths(paths))
    unusable = any(p.whole_file for p in result.problems)
    if result.problems and (on_error == "fail" or unusable or not result.records):
        raise DataError(result.problems, result.total)
    if not result.records:
        raise DataError([DataProblem(", ".join(_as_paths(paths)) or "(no files)", "", "no records", True)], 0)
    return result


def check_files(paths: PathLike | Iterable[PathLike], tokenizer: PreTrainedTokenizerBase | None = None,
                max_length: int | None = None, mask: str = "assistant") -> list[DataProblem]:
    """Every problem in the files; with a tokenizer also the records truncation would leave unsupervised.

    Args:
        paths: The files to check.
        tokenizer: Optional; enables the truncation check (and catches chat-template failures).
        max_length: Truncation length (default: `default_max_length` of the tokenizer).
        mask: The label mask mode training will use.

    Returns:
        The problems, in file order (empty when the data is clean).
    """
    return _check(_as_paths(paths), tokenizer, max_length, mask)[0]


def _check(paths: list[str], tokenizer: PreTrainedTokenizerBase | None, max_length: int | None,
           mask: str) -> tuple[list[DataProblem], int]:
    if tokenizer is None:
        if max_length is not None:
            raise ValueError("max_length needs a tokenizer")
        result = _scan(paths)
        return result.problems, result.total
    limit = _resolve_max_length(tokenizer, max_length)
    _check_mask(tokenizer, mask)  # once here, not once per record

    def truncation_problems(messages: Messages) -> list[str]:
        try:
            encoded = _encode(tokenizer, messages, mask)
        except ValueError as e:
            return [f"cannot encode: {_one_line(e)}"]
        if any(encoded.reply[:limit]):
            return []
        return [f"no assistant token left after truncation to {limit} tokens (the first one is at position "
                f"{encoded.reply.index(True)} of {len(encoded.ids)})"]

    result = _scan(paths, truncation_problems)
    return result.problems, result.total


# ---------------------------------------------------------------------------------------------- encoding


class _Piece(NamedTuple):
    """A span of the rendered conversation, tokenised on its own so that label boundaries are exact."""

    text: str
    train: bool  # supervised
    reply: bool  # part of an assistant reply (a record with none left after truncation is dropped)
    trim: bool = False  # leave trailing whitespace tokens unsupervised (chat-template replies)


class _Encoded(NamedTuple):
    ids: list[int]
    labels: list[int]
    reply: list[bool]


def default_max_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """``tokenizer.model_max_length`` when it is a real limit, else 2048."""
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < _MAX_SANE_LENGTH:
        return length
    return _FALLBACK_MAX_LENGTH


def _resolve_max_length(tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> int:
    if max_length is None:
        return default_max_length(tokenizer)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
        raise ValueError(f"max_length must be a positive integer; got {max_length!r}")
    return max_length


def _check_mask(tokenizer: PreTrainedTokenizerBase, mask: str) -> None:
    if mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {', '.join(MASK_MODES)}; got {mask!r}")
    if mask != "official":
        return
    for token in (IM_START, IM_END):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"mask='official' needs a ChatML tokenizer with {token} as one token; "
                             f"{type(tokenizer).__name__} splits it into {len(ids)} tokens (use mask='assistant')")


def _chatml_pieces(messages: Messages) -> list[_Piece]:
    """ChatML as Qwen2's template writes it; the "\\n" after <|im_end|> rides with the next masked span."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *messages]
    pieces, pending = [], ""
    for message in messages:
        pending += f"{IM_START}{message['role']}\n"
        if message["role"] == "assistant":
            pieces += [_Piece(pending, False, False), _Piece(message["content"] + IM_END, True, True)]
            pending = "\n"
        else:
            pending += f"{message['content']}{IM_END}\n"
    return pieces + [_Piece(pending, False, False)]


def _official_pieces(messages: Messages) -> list[_Piece]:
    """The original scheme: role name and its "\\n" masked, boundary tokens of every turn supervised."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *messages]
    pieces = []
    for message in messages:
        is_reply = message["role"] == "assistant"
        pieces += [_Piece(IM_START, True, False), _Piece(message["role"], False, False), _Piece("\n", False, False),
                   _Piece(message["content"], is_reply, is_reply), _Piece(IM_END, True, is_reply),
                   _Piece("\n", True, False)]
    return pieces


def _render(tokenizer: PreTrainedTokenizerBase, messages: Messages, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # a user-supplied Jinja template can raise anything (TemplateError, TypeError...)
        raise ValueError(f"the chat template failed: {_one_line(e)}") from e


def _template_pieces(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[_Piece]:
    """Assistant spans from prefix renders: the prompt before turn i (with generation prompt) and the
    conversation through turn i must both be prefixes of the full render, so the reply is their difference."""
    full, pieces, done = _render(tokenizer, messages, False), [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, turn = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(prompt) and full.startswith(turn) and done <= len(prompt) < len(turn)):
            raise ValueError(
                f"the chat template is not prefix-stable: rendering the first {i} messages (with the generation "
                f"prompt) and the first {i + 1} is not a prefix of the whole conversation, so assistant turn "
                f"{i + 1} cannot be located; use a tokenizer without chat_template (ChatML) or mask='official'")
        pieces += [_Piece(full[done:len(prompt)], False, False), _Piece(full[len(prompt):len(turn)], True, True, True)]
        done = len(turn)
    return pieces + [_Piece(full[done:], False, False)]


def _untrimmed_length(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> int:
    """Tokens up to the last one that is not pure whitespace (the end-of-turn token, normally)."""
    n = len(ids)
    while n > 0 and not tokenizer.decode(ids[n - 1:n]).strip():
        n -= 1
    return n


def _tokenize(tokenizer: PreTrainedTokenizerBase, pieces: list[_Piece]) -> _Encoded:
    pieces = [p for p in pieces if p.text]
    # add_special_tokens=False: templates write BOS and friends into the text themselves.
    batch = tokenizer([p.text for p in pieces], add_special_tokens=False)["input_ids"]
    out = _Encoded([], [], [])
    for piece, ids in zip(pieces, batch, strict=True):
        n_train = 0 if not piece.train else _untrimmed_length(tokenizer, ids) if piece.trim else len(ids)
        out.ids.extend(ids)
        out.labels.extend(ids[:n_train] + [IGNORE_INDEX] * (len(ids) - n_train))
        out.reply.extend([piece.reply] * n_train + [False] * (len(ids) - n_train))
    return out


def _as_messages(messages: Sequence[dict[str, str]]) -> Messages:
    """Checks normalised messages (callers may pass their own) with the same rules as the files."""
    if not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    reasons = []
    for k, m in enumerate(messages, 1):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            reasons.append(f"turn {k}: expected {{'role': 'system'|'user'|'assistant', 'content': str}}")
    reasons = reasons or _order_problems(list(messages))
    if reasons:
        raise ValueError("bad conversation: " + "; ".join(reasons))
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _encode(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], mask: str) -> _Encoded:
    messages = _as_messages(messages)
    if mask == "official":
        pieces = _official_pieces(messages)
    elif getattr(tokenizer, "chat_template", None):
        pieces = _template_pieces(tokenizer, messages)
    else:
        pieces = _chatml_pieces(messages)
    return _tokenize(tokenizer, pieces)


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]],
                        max_length: int | None = None, mask: str = "assistant") -> dict[str, list[int]] | None:
    """Token ids and labels of one normalised conversation, truncated at the end.

    Args:
        tokenizer: A Hugging Face tokenizer; its chat template is used when it has one, else ChatML.
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
        max_length: Truncation length (default: `default_max_length`).
        mask: "assistant" (replies + end-of-turn) or "official" (the original MedCare masking; it always
            writes ChatML itself, as the original did, whatever chat template the tokenizer has).

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` (labels -100 where unsupervised), or None when no
        assistant token is left after truncation.

    Raises:
        ValueError: Bad messages, bad mask, a non-ChatML tokenizer with mask="official", or a chat
            template that is not prefix-stable.
    """
    limit = _resolve_max_length(tokenizer, max_length)
    _check_mask(tokenizer, mask)
    return _encode_truncated(tokenizer, messages, limit, mask)


def _encode_truncated(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], limit: int,
                      mask: str) -> dict[str, list[int]] | None:
    encoded = _encode(tokenizer, messages, mask)
    if not any(encoded.reply[:limit]):
        return None
    return {"input_ids": encoded.ids[:limit], "labels": encoded.labels[:limit]}


# ---------------------------------------------------------------------------------------------- dataset


class SupervisedDataset(Dataset):
    """Conversations tokenised once, up front, into flat int32 buffers (python int lists cost ~9x more).

    Items are ``{"input_ids": list[int], "labels": list[int]}``. ``lengths`` holds every item's length, so
    length grouping never re-tokenises: pass it to `length_grouped_sampler`, or let the HF Trainer's
    ``train_sampling_strategy="group_by_length"`` read ``len(item["input_ids"])``, which is a buffer slice.

    Args:
        records: Normalised conversations (``LoadResult.records``, or the `LoadResult` itself).
        tokenizer: A Hugging Face tokenizer.
        max_length: Truncation length (default: `default_max_length`).
        mask: "assistant" or "official" (see `encode_conversation`).

    Attributes:
        lengths: Token count of each item.
        dropped: Records dropped because truncation left no assistant token (one warning says how many).
        dropped_indices: Their positions in ``records`` (so a caller can name their file and line).
        max_length: The truncation length used.

    Raises:
        ValueError: A record cannot be encoded (names the record), or truncation dropped every record.
    """

    def __init__(self, records: Sequence[Messages] | LoadResult, tokenizer: PreTrainedTokenizerBase,
                 max_length: int | None = None, mask: str = "assistant") -> None:
        records = records.records if isinstance(records, LoadResult) else records
        self.max_length = _resolve_max_length(tokenizer, max_length)
        _check_mask(tokenizer, mask)
        self._ids, self._labels, self._offsets = array("i"), array("i"), array("q", [0])
        self.lengths: list[int] = []
        self.dropped = 0
        self.dropped_indices: list[int] = []
        for k, messages in enumerate(tqdm(records, desc="medcare: tokenizing", unit="record",
                                          disable=len(records) <= _TQDM_THRESHOLD)):
            try:
                example = _encode_truncated(tokenizer, messages, self.max_length, mask)  # checked above
            except ValueError as e:
                raise ValueError(f"record {k + 1}: {e}") from e
            if example is None:
                self.dropped += 1
                self.dropped_indices.append(k)
                continue
            self._ids.extend(example["input_ids"])
            self._labels.extend(example["labels"])
            self._offsets.append(len(self._ids))
            self.lengths.append(len(example["input_ids"]))
        self._report_dropped(len(records))

    def _report_dropped(self, total: int) -> None:
        if not self.dropped:
            return
        message = (f"dropped {self.dropped} of {total} records: no assistant token left after truncation to "
                   f"{self.max_length} tokens (raise max_length, or list them with `python -m medcare.data check "
                   f"FILE --tokenizer DIR --max-length {self.max_length}`)")
        if not self.lengths:
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        start, end = self._offsets[index], self._offsets[index + 1]
        return {"input_ids": self._ids[start:end].tolist(), "labels": self._labels[start:end].tolist()}


class DataCollator:
    """Right-pads a batch to its longest item: input_ids with the pad token, labels with -100.

    Args:
        tokenizer: Supplies ``pad_token_id`` (``eos_token_id`` when there is no pad token; padded positions
            are masked out of attention and loss, so the id only has to be valid).
        pad_to_multiple_of: Round the padded length up to a multiple of this (tensor-core friendly shapes).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0):
            raise ValueError(f"pad_to_multiple_of must be a positive integer; got {pad_to_multiple_of!r}")
        self.pad_token_id = int(pad_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Batch ``{"input_ids", "labels"?}`` items into long tensors plus ``attention_mask``."""
        if not features:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(features), longest)
        batch = {"input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros(shape, dtype=torch.long)}
        if "labels" in features[0]:
            batch["labels"] = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            batch["input_ids"][row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            batch["attention_mask"][row, :n] = 1
            if "labels" in batch:
                batch["labels"][row, :n] = torch.as_tensor(feature["labels"], dtype=torch.long)
        return batch


def length_grouped_indices(lengths: Sequence[int], batch_size: int,
                           generator: torch.Generator | None = None) -> list[int]:
    """A permutation in which each run of ``batch_size`` indices has similar lengths, longest batch first
    (the HF Trainer's algorithm: shuffle, sort within mega-batches of 50 batches)."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    return get_length_grouped_indices(list(lengths), batch_size, generator=generator)


class EpochSampler(torch.utils.data.Sampler):
    """A shuffled (optionally length-grouped) order that is a pure function of (seed, epoch).

    The HF samplers draw from the global RNG, whose state at the start of an epoch depends on everything
    that ran before (dropout, the previous epoch): a run resumed in a later epoch would then see another
    order. Here the order of epoch e is fixed by ``seed + e``, so a resumed run, every process of a
    distributed run, and an uninterrupted run agree. The trainer calls ``set_epoch`` at each epoch start.

    Args:
        lengths: Token count of every item (``SupervisedDataset.lengths``).
        group_size: Group items of similar length into runs of this many (the global batch: per-device batch
            x processes x accumulation, so every process gets similar lengths); None: a plain shuffle.
        seed: Base seed.
    """

    def __init__(self, lengths: Sequence[int], group_size: int | None, seed: int) -> None:
        self.lengths, self.group_size, self.seed, self.epoch = list(lengths), group_size, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.group_size:
            return iter(length_grouped_indices(self.lengths, self.group_size, generator=generator))
        return iter(torch.randperm(len(self.lengths), generator=generator).tolist())


def length_grouped_sampler(dataset: SupervisedDataset, batch_size: int,
                           generator: torch.Generator | None = None) -> torch.utils.data.Sampler:
    """The HF ``LengthGroupedSampler`` fed with the precomputed ``dataset.lengths``."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    return LengthGroupedSampler(batch_size, lengths=list(dataset.lengths), generator=generator)


# ---------------------------------------------------------------------------------------------- CLI


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medcare.data",
                                     description="Tools for MedCare conversation data files.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check", help="validate data files without training",
        description="Validate JSON / JSON Lines conversation files: prints every problem as FILE:LOCATION: "
                    "REASON, then a summary line; exit status 0 when clean, 2 when not.")
    check.add_argument("files", nargs="+", metavar="FILE", help="JSON list or JSON Lines files")
    check.add_argument("--tokenizer", metavar="DIR",
                       help="tokenizer directory (or hub id): also report records truncation leaves unsupervised")
    check.add_argument("--max-length", type=int, metavar="N",
                       help="truncation length for the check (default: the tokenizer's model_max_length or 2048)")
    check.add_argument("--mask", choices=MASK_MODES, default="assistant", help="label mask mode of the training run")
    return parser


def _load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    # A path that clearly is one must not fall through to a hub lookup (slow, and confusing offline).
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1 or os.sep != "/" and os.sep in name
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise ValueError(f"tokenizer directory not found: {name}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(name))
    except Exception as e:  # transformers raises OSError, ValueError, EnvironmentError... for a bad directory
        raise ValueError(f"cannot load a tokenizer from {name}: {_one_line(e)}") from e


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medcare.data check FILE... [--tokenizer DIR --max-length N]``; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.max_length is not None and args.max_length <= 0:
        parser.error("--max-length must be a positive integer")
    if args.max_length is not None and args.tokenizer is None:
        parser.error("--max-length needs --tokenizer")
    try:
        tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
        problems, total = _check(args.files, tokenizer, args.max_length, args.mask)
    except ValueError as e:
        print(f"medcare.data: error: {_one_line(e)}")
        return 2
    for problem in problems:
        print(problem)
    print(f"medcare.data: {summarize(problems, total, len(args.files))}")
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
