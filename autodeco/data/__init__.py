"""Training data for the AutoDeco heads: JSONL rows -> token ids + labels, a padding collator, control twins.

    >>> from autodeco.data import AutoDecoDataset, DataCollatorForCompletion
    >>> train = AutoDecoDataset.from_jsonl(["train.jsonl"], tokenizer, max_length=4096)

rows.py: reading, validating and tokenising rows (load_examples, RowTokenizer, DataError, DataStats);
dataset.py: AutoDecoDataset, DataCollatorForCompletion; control.py: ControlDataset, DataCollatorWithControl.
Row formats and chat supervision: docs/training.md.
"""

from autodeco.config import IGNORE_INDEX
from autodeco.data.control import ControlDataset, DataCollatorWithControl
from autodeco.data.dataset import AutoDecoDataset, DataCollatorForCompletion
from autodeco.data.rows import DataError, DataStats, RowTokenizer, load_examples

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "DataStats",
    "load_examples",
    "AutoDecoDataset",
    "DataCollatorForCompletion",
    "RowTokenizer",
    "ControlDataset",
    "DataCollatorWithControl",
]
