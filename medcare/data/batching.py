"""Batching a tokenised dataset: padding collator and the resumable, length-grouped epoch order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .encoding import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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
