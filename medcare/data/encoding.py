"""Tokenising conversations with label masks, and the dataset of a training run.

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
counted (one warning per data set), never trained on as pure boundary tokens. `render_prompt` is the text a
model sees before its reply at evaluation: the same format training used.
"""

from __future__ import annotations

import warnings
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .records import LoadResult, Messages, one_line, order_problems

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
MASK_MODES = ("assistant", "official")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# model_max_length is a huge sentinel (int(1e30)) when a tokenizer does not know its model's context.
_MAX_SANE_LENGTH, _FALLBACK_MAX_LENGTH = 1_000_000, 2048
_TQDM_THRESHOLD = 1000


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


def resolve_max_length(tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> int:
    if max_length is None:
        return default_max_length(tokenizer)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
        raise ValueError(f"max_length must be a positive integer; got {max_length!r}")
    return max_length


def check_mask(tokenizer: PreTrainedTokenizerBase, mask: str) -> None:
    if mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {', '.join(MASK_MODES)}; got {mask!r}")
    if mask != "official":
        return
    for token in (IM_START, IM_END):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"mask='official' needs a ChatML tokenizer with {token} as one token; "
                             f"{type(tokenizer).__name__} splits it into {len(ids)} tokens (use mask='assistant')")


def chatml_pieces(messages: Messages) -> list[_Piece]:
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


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Messages, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # a user-supplied Jinja template can raise anything (TemplateError, TypeError...)
        raise ValueError(f"the chat template failed: {one_line(e)}") from e


def _template_pieces(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[_Piece]:
    """Assistant spans from prefix renders: the prompt before turn i (with generation prompt) and the
    conversation through turn i must both be prefixes of the full render, so the reply is their difference."""
    full, pieces, done = render_chat(tokenizer, messages, False), [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, turn = render_chat(tokenizer, messages[:i], True), render_chat(tokenizer, messages[: i + 1], False)
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
    reasons = reasons or order_problems(list(messages))
    if reasons:
        raise ValueError("bad conversation: " + "; ".join(reasons))
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], mask: str) -> _Encoded:
    messages = _as_messages(messages)
    if mask == "official":
        pieces = _official_pieces(messages)
    elif getattr(tokenizer, "chat_template", None):
        pieces = _template_pieces(tokenizer, messages)
    else:
        pieces = chatml_pieces(messages)
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
    limit = resolve_max_length(tokenizer, max_length)
    check_mask(tokenizer, mask)
    return _encode_truncated(tokenizer, messages, limit, mask)


def _encode_truncated(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], limit: int,
                      mask: str) -> dict[str, list[int]] | None:
    encoded = encode(tokenizer, messages, mask)
    if not any(encoded.reply[:limit]):
        return None
    return {"input_ids": encoded.ids[:limit], "labels": encoded.labels[:limit]}


# ---------------------------------------------------------------------------------------------- dataset


class SupervisedDataset(Dataset):
    """Conversations tokenised once, up front, into flat int32 buffers (python int lists cost ~9x more).

    Items are ``{"input_ids": list[int], "labels": list[int]}``. ``lengths`` holds every item's length, so
    length grouping never re-tokenises: `EpochSampler` (medcare.data.batching, what MedCareTrainer uses) reads it.

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
        self.max_length = resolve_max_length(tokenizer, max_length)
        check_mask(tokenizer, mask)
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


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> str:
    """The text a model sees before its reply, exactly as training formats a conversation: the tokenizer's
    chat template with the generation prompt, else ChatML with the default system prompt."""
    if getattr(tokenizer, "chat_template", None):
        return render_chat(tokenizer, list(messages), True)
    return "".join(p.text for p in chatml_pieces(list(messages))) + f"{IM_START}assistant\n"
