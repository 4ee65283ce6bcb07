"""The training dataset and its padding collator.

    >>> train = AutoDecoDataset.from_jsonl(["a.jsonl", "b.jsonl"], tokenizer, max_length=4096)
    >>> print(train.stats.summary())
    >>> trainer = Trainer(model=model, train_dataset=train,
    ...                   data_collator=DataCollatorForCompletion(tokenizer, pad_to_multiple_of=8), ...)

Batches: input_ids, attention_mask, labels [B, L] long, right-padded, labels unshifted (-100 on padding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from autodeco.config import IGNORE_INDEX
from autodeco.data.rows import DataStats, load_examples

__all__ = ["AutoDecoDataset", "DataCollatorForCompletion"]


class AutoDecoDataset(Dataset):
    """Tokenised training examples (``{"input_ids", "labels"}`` lists) with the :class:`DataStats` of loading."""

    def __init__(self, examples: list[dict], stats: DataStats | None = None):
        self.examples = examples
        self.stats = stats if stats is not None else DataStats()

    @classmethod
    def from_jsonl(
        cls,
        paths: str | Path | Sequence[str | Path],
        tokenizer,
        max_length: int = 4096,
        skip_bad_rows: bool = False,
        keep_rows: bool = False,
    ) -> "AutoDecoDataset":
        examples, stats = load_examples(
            paths, tokenizer, max_length=max_length, skip_bad_rows=skip_bad_rows, keep_rows=keep_rows
        )
        return cls(examples, stats)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


class DataCollatorForCompletion:
    """Right-pads a list of ``{"input_ids", "labels"}`` examples into a batch of tensors.

    Returns ``input_ids`` [B, L] (padded with the pad id), ``attention_mask`` [B, L] (1 on real tokens)
    and ``labels`` [B, L] (``-100`` on padding), all ``torch.long``; ``L`` is the longest example,
    rounded up to ``pad_to_multiple_of`` if given. Labels are not shifted: the model shifts them, as any
    Hugging Face causal LM does. The pad id is ``pad_token_id`` if given, else the tokenizer's pad token,
    else its EOS token -- harmless, since the attention mask comes from the lengths, not the pad id.
    """

    def __init__(self, tokenizer=None, pad_token_id: int | None = None, pad_to_multiple_of: int | None = None):
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
            if pad_token_id is None:
                pad_token_id = tokenizer.eos_token_id
        if pad_token_id is None:
            raise ValueError(
                "DataCollatorForCompletion needs a pad id: pass pad_token_id=..., "
                "or a tokenizer with a pad or EOS token"
            )
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of!r}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DataCollatorForCompletion got an empty batch")
        rows = []
        for index, feature in enumerate(features):
            if "input_ids" not in feature or "labels" not in feature:
                raise ValueError(
                    f"batch item {index} has keys {sorted(feature)}; it needs 'input_ids' and 'labels' "
                    "(as produced by autodeco.data.load_examples)"
                )
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long).flatten()
            labels = torch.as_tensor(feature["labels"], dtype=torch.long).flatten()
            if ids.numel() != labels.numel():
                raise ValueError(
                    f"batch item {index}: input_ids has {ids.numel()} tokens but labels has {labels.numel()}; "
                    "they must be the same length (labels unshifted)"
                )
            rows.append((ids, labels))

        length = max(ids.numel() for ids, _ in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros((batch, length), dtype=torch.long)  # [B, L]
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)  # [B, L]
        for row, (ids, row_labels) in enumerate(rows):
            n = ids.numel()
            input_ids[row, :n] = ids
            attention_mask[row, :n] = 1
            labels[row, :n] = row_labels
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
