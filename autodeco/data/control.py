"""Paired training data for decoding control: a seeded share of rows gets a commanded twin.

    >>> data = ControlDataset(AutoDecoDataset.from_jsonl(files, tok, keep_rows=True), tok, share=0.3)
    >>> batch = DataCollatorWithControl(tok)([data[i] for i in range(8)])   # + control_pairs [K, 3]

A twin is the same row with a low or high command (autodeco.control phrasings) in its user message; the
collator puts the plain rows first and the twins after them and emits control_pairs = (plain row, twin row,
direction +1 high / -1 low). The loss is autodeco.losses.control_margin_loss. See docs/control.md.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
from torch.utils.data import Dataset

from autodeco.config import IGNORE_INDEX
from autodeco.control import (
    HIGH,
    HIGH_COMMANDS,
    LOW,
    LOW_COMMANDS,
    check_command,
    insert_command,
    insert_command_into_messages,
)
from autodeco.data.dataset import AutoDecoDataset, DataCollatorForCompletion
from autodeco.data.rows import RowTokenizer

__all__ = ["ControlDataset", "DataCollatorWithControl"]


class ControlDataset(Dataset):
    """A training dataset where a seeded `share` of the rows carry a commanded twin.

    base: an AutoDecoDataset loaded with `keep_rows=True` (each example holds its JSON row). For round(share * N)
    rows (at least one when share > 0) chosen with random.Random(seed), the twin is the row with a command in its
    user message: low or high with probability 1/2, the phrasing drawn uniformly from `low_commands` /
    `high_commands`; it is tokenised like the training data and cut to `max_length`. The twins are fixed for the
    run (a resumed run sees the same ones). Items are {"input_ids", "labels"} plus, for rows with a twin,
    "control_twin" ({"input_ids", "labels"}) and "control_direction" (+1 high, -1 low).
    """

    def __init__(self, base: AutoDecoDataset, tokenizer, *, share: float, seed: int = 0, max_length: int = 4096,
                 low_commands: Sequence[str] = LOW_COMMANDS, high_commands: Sequence[str] = HIGH_COMMANDS):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share (--control-share) must be in [0, 1], got {share!r}; e.g. 0.3.")
        if not low_commands or not high_commands:
            raise ValueError("low_commands and high_commands must each hold at least one phrasing.")
        for command in (*low_commands, *high_commands):
            check_command(command)
        examples = base.examples
        if share > 0 and examples and "row" not in examples[0]:
            raise ValueError(
                "ControlDataset needs the JSON rows of the examples: load the data with "
                "AutoDecoDataset.from_jsonl(..., keep_rows=True)."
            )
        self.examples = examples
        self.stats = base.stats
        self.share, self.seed, self.max_length = float(share), int(seed), int(max_length)
        self.low_commands, self.high_commands = tuple(low_commands), tuple(high_commands)
        rng = random.Random(self.seed)
        count = min(len(examples), max(1, round(share * len(examples)))) if share > 0 else 0
        chosen = sorted(rng.sample(range(len(examples)), count))
        row_tokenizer = RowTokenizer(tokenizer)
        self.twins: dict[int, dict] = {}
        self.skipped = 0  # chosen rows whose twin lost every supervised token to truncation
        for index in chosen:
            direction = HIGH if rng.random() < 0.5 else LOW
            command = rng.choice(self.high_commands if direction == HIGH else self.low_commands)
            row = dict(examples[index]["row"])
            if "messages" in row:
                row["messages"] = insert_command_into_messages(row["messages"], command)
            else:
                row["prompt"] = insert_command(row["prompt"], command, tokenizer)
            input_ids, labels = row_tokenizer(row, where=f"training row {index} with command {command!r}")
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
            if all(label == IGNORE_INDEX for label in labels):
                self.skipped += 1
                continue
            self.twins[index] = {"input_ids": input_ids, "labels": labels, "direction": direction, "command": command}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        item = {"input_ids": example["input_ids"], "labels": example["labels"]}
        twin = self.twins.get(index)
        if twin is not None:
            item["control_twin"] = {"input_ids": twin["input_ids"], "labels": twin["labels"]}
            item["control_direction"] = twin["direction"]
        return item

    def summary(self) -> str:
        """One line for the training log."""
        low = sum(1 for t in self.twins.values() if t["direction"] == LOW)
        text = (f"{len(self.twins):,} of {len(self.examples):,} rows get a commanded twin "
                f"({low:,} low, {len(self.twins) - low:,} high; share {self.share:g}, seed {self.seed})")
        if self.skipped:
            text += f"; {self.skipped} twin(s) dropped (nothing supervised left after truncation)"
        return text


class DataCollatorWithControl:
    """Pads plain rows then their twins into one batch and says which rows pair up.

    features: ControlDataset items. Returns the inner collator's batch over [plain rows..., twins...] (B + K rows)
    plus `control_pairs` [K, 3] long: (plain row index, twin row index, direction +1 high / -1 low). Features
    without a twin just pass through (K may be 0).
    """

    def __init__(self, tokenizer=None, inner: DataCollatorForCompletion | None = None):
        self.inner = inner if inner is not None else DataCollatorForCompletion(tokenizer)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        plain = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
        twins, pairs = [], []
        for index, feature in enumerate(features):
            twin = feature.get("control_twin")
            if twin is None:
                continue
            direction = int(feature.get("control_direction", 0))
            if direction not in (LOW, HIGH):
                raise ValueError(f"batch item {index}: control_direction must be -1 (low) or +1 (high), got {direction}.")
            pairs.append((index, len(plain) + len(twins), direction))
            twins.append(twin)
        batch = self.inner(plain + twins)
        batch["control_pairs"] = torch.tensor(pairs, dtype=torch.long).reshape(-1, 3)  # [K, 3]
        return batch
