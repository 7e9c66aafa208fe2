"""Conversation data for MedCare fine-tuning: read and validate, tokenise with label masks, batch.

    records.py   reading JSON / JSON Lines files and validating every record (every problem, with its location)
    encoding.py  label-masked tokenisation (assistant replies, or the original implementation's scheme), the
                 tokenised dataset of a run, and the evaluation prompt in the same format
    batching.py  the padding collator and the epoch order (shuffled, length-grouped, a function of seed + epoch)
    check.py     ``python -m medcare.data check FILE... [--tokenizer DIR --max-length N]``

The names below are the package's API; the submodules' other public names serve the training layer.
"""

from .batching import DataCollator, EpochSampler, length_grouped_indices
from .check import check_files, main
from .encoding import (
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    IM_END,
    IM_START,
    MASK_MODES,
    SupervisedDataset,
    default_max_length,
    encode_conversation,
    render_prompt,
)
from .records import FORMATS, DataError, DataProblem, LoadResult, Messages, load_records, parse_file, summarize

__all__ = [
    "DEFAULT_SYSTEM_PROMPT", "FORMATS", "IGNORE_INDEX", "IM_END", "IM_START", "MASK_MODES", "DataCollator",
    "DataError", "DataProblem", "EpochSampler", "LoadResult", "Messages", "SupervisedDataset", "check_files",
    "default_max_length", "encode_conversation", "length_grouped_indices", "load_records", "main", "parse_file",
    "render_prompt", "summarize",
]
