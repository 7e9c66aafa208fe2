"""`python -m medcare.data check FILE...`: every problem of the data files, without training.

With ``--tokenizer`` it also reports the records that truncation to ``--max-length`` would leave without a
supervised token. Prints every problem as FILE:LOCATION: REASON, then a one-line summary; exit status 0 when
clean, 2 when not.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from .encoding import MASK_MODES, check_mask, encode, resolve_max_length
from .records import DataProblem, Messages, PathLike, as_paths, one_line, scan, summarize

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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
    return _check(as_paths(paths), tokenizer, max_length, mask)[0]


def _check(paths: list[str], tokenizer: PreTrainedTokenizerBase | None, max_length: int | None,
           mask: str) -> tuple[list[DataProblem], int]:
    if tokenizer is None:
        if max_length is not None:
            raise ValueError("max_length needs a tokenizer")
        result = scan(paths)
        return result.problems, result.total
    limit = resolve_max_length(tokenizer, max_length)
    check_mask(tokenizer, mask)  # once here, not once per record

    def truncation_problems(messages: Messages) -> list[str]:
        try:
            encoded = encode(tokenizer, messages, mask)
        except ValueError as e:
            return [f"cannot encode: {one_line(e)}"]
        if any(encoded.reply[:limit]):
            return []
        return [f"no assistant token left after truncation to {limit} tokens (the first one is at position "
                f"{encoded.reply.index(True)} of {len(encoded.ids)})"]

    result = scan(paths, truncation_problems)
    return result.problems, result.total


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
        raise ValueError(f"cannot load a tokenizer from {name}: {one_line(e)}") from e


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
        print(f"medcare.data: error: {one_line(e)}")
        return 2
    for problem in problems:
        print(problem)
    print(f"medcare.data: {summarize(problems, total, len(args.files))}")
    return 2 if problems else 0

