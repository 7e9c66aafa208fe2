"""Reading and validating conversation files.

Input files are JSON (a list of records) or JSON Lines (one record per line); the format is detected from
the content (a file whose first non-space character is ``[`` is a JSON list), not the extension. A record is

    {"conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...]}      (ShareGPT, the original)
    {"messages": [{"role": "user" | "assistant" | "system", "content": str}, ...]}    (OpenAI / HF chat)

Other keys ("id", "eval", ...) are ignored. Conversations are normalised to ``{"role", "content"}`` dicts.
Validation reports every problem at once, each with its file and location ("line 12" in JSON Lines,
"record 3 (line 40)" in a JSON list, 1-based like line numbers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..loading import UserError

# Per record format: the key of the speaker, the key of the text, and the speaker values -> normalised role.
FORMATS: dict[str, tuple[str, str, dict[str, str]]] = {
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


class DataError(UserError):
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


def one_line(text: object) -> str:
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
        return None, DataProblem(path, "", f"cannot read: {e.strerror or one_line(e)}", True)
    try:
        return data.decode("utf-8-sig"), None  # -sig: editors on Windows write a BOM
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return None, DataProblem(path, "", f"not UTF-8 text (invalid byte at line {line}, offset {e.start})", True)


class RawRecord(NamedTuple):
    """A parsed record before validation (value None when the JSON itself is bad)."""

    location: str
    value: Any
    problem: DataProblem | None = None


def _parse_jsonl(path: str, text: str) -> Iterator[RawRecord]:
    # split("\n"), not splitlines(): U+2028 and friends may legally appear raw inside JSON strings.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        location = f"line {lineno}"
        try:
            yield RawRecord(location, json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == 1 and _is_single_object(text):
                yield RawRecord("", None, DataProblem(path, "", "holds one JSON object; expected a JSON list of "
                                                 "records or JSON Lines (one record per line)", True))
                return
            yield RawRecord(location, None, DataProblem(path, location, f"malformed JSON: {e.msg} (column {e.colno})"))


def _is_single_object(text: str) -> bool:
    """A pretty-printed single object would otherwise report one error per line."""
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _parse_json_list(path: str, text: str) -> Iterator[RawRecord]:
    """Element by element with raw_decode, so each record knows the line it starts on."""
    decoder, n, pos, line, line_pos = json.JSONDecoder(), 0, _skip_ws(text, text.index("[") + 1), 1, 0
    if pos < len(text) and text[pos] == "]":
        pos = _skip_ws(text, pos + 1)
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                yield RawRecord("", None, _syntax_problem(path, text, e.pos, f"malformed JSON: {e.msg}"))
                return
            n, line, line_pos = n + 1, line + text.count("\n", line_pos, pos), pos
            yield RawRecord(f"record {n} (line {line})", value)
            pos = _skip_ws(text, end)
            if pos < len(text) and text[pos] == ",":
                pos = _skip_ws(text, pos + 1)
            elif pos < len(text) and text[pos] == "]":
                pos = _skip_ws(text, pos + 1)
                break
            else:
                yield RawRecord("", None, _syntax_problem(path, text, pos, "malformed JSON: expected ',' or ']'"))
                return
    if pos < len(text):
        yield RawRecord("", None, _syntax_problem(path, text, pos, "malformed JSON: extra data after the list"))


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


def parse_file(path: str) -> Iterator[RawRecord]:
    text, problem = _read_text(path)
    if problem is not None:
        yield RawRecord("", None, problem)
    elif not text.strip():
        yield RawRecord("", None, DataProblem(path, "", "file is empty (no records)", True))
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
    keys = [k for k in FORMATS if k in value]
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
    return (None, reasons) if reasons else (messages, order_problems(messages))


def _normalise_turn(kind: str, turn: Any) -> tuple[dict[str, str], list[str]]:
    if not isinstance(turn, dict):
        return {}, [f"not an object (got a JSON {_json_type(turn)})"]
    speaker_key, text_key, roles = FORMATS[kind]
    if kind == "conversations" and speaker_key not in turn and "role" in turn:
        speaker_key = "role"  # the original loader accepts "role" with ShareGPT values too
    reasons = []
    speaker, text = turn.get(speaker_key), turn.get(text_key)
    if speaker_key not in turn:
        reasons.append(f"missing '{speaker_key}'")
    elif speaker not in roles:
        expected = ", ".join(repr(r) for r in roles)
        reasons.append(f"unknown '{speaker_key}' value {one_line(repr(speaker))[:60]} (expected one of {expected})")
    if text_key not in turn:
        reasons.append(f"missing '{text_key}'")
    elif not isinstance(text, str):
        reasons.append(f"'{text_key}' is not a string (got a JSON {_json_type(text)})")
    elif not text.strip():
        reasons.append(f"empty '{text_key}'")
    return {"role": roles.get(speaker, ""), "content": text}, reasons


def order_problems(messages: Messages) -> list[str]:
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


def as_paths(paths: PathLike | Iterable[PathLike]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def scan(paths: list[str], extra_check: Callable[[Messages], list[str]] | None = None) -> LoadResult:
    """Read and validate every file; ``extra_check`` adds reasons for records that are otherwise good."""
    result = LoadResult([], [], 0)
    for path in paths:
        for raw in parse_file(path):
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
    result = scan(as_paths(paths))
    unusable = any(p.whole_file for p in result.problems)
    if result.problems and (on_error == "fail" or unusable or not result.records):
        raise DataError(result.problems, result.total)
    if not result.records:
        raise DataError([DataProblem(", ".join(as_paths(paths)) or "(no files)", "", "no records", True)], 0)
    return result
