"""Instruction-based decoding control: commands like "Answer with low randomness." move the heads' T and P.

The AutoDeco paper (Sec. 5, Table 3) finds that the heads react to natural-language commands about randomness,
occasionally without training and reliably after targeted training. This module holds what that training needs:

    from autodeco.control import LOW_COMMANDS, HIGH_COMMANDS, insert_command, control_margin_loss
    prompt = insert_command(chat_prompt, "Answer with low randomness.", tokenizer)   # into the user message
    loss = control_margin_loss(plain_mean_t, commanded_mean_t, direction, margin=0.1)

* Phrasings. LOW_COMMANDS / HIGH_COMMANDS are used in training; LOW_COMMANDS_HELD_OUT / HIGH_COMMANDS_HELD_OUT
  are different wordings never used in training, so an evaluation can tell memorised phrasings from
  understanding (autodeco/evaluation/control_eval.py).
* Command insertion. `insert_command` puts the command at the end of the (last) user message of an already
  chat-formatted prompt (as `autodeco.evaluation.benchmarks.build_prompt` and the data builder write them);
  `insert_command_into_messages` does the same for chat rows.
* Paired training data. `ControlDataset` gives a seeded share of the training rows a commanded twin (the same
  row with a low or high command in its user message); `DataCollatorWithControl` puts the plain rows first and
  the twins after them in the same micro-batch and emits `control_pairs` [K, 3] = (plain row, twin row,
  direction: +1 high, -1 low).
* Loss. `AutoDecoTrainer.compute_loss` (autodeco/trainer.py) pops `control_pairs`, trains the ordinary losses on
  every row (twins included) and adds `control_weight * (control_margin_loss on mean T + on mean P)`, where the
  means are over each row's supervised completion tokens (`completion_means`).

From the command line: `autodeco train ... --control-share 0.3 [--control-margin 0.1] [--control-weight 1.0]
[--control-seed 0]`, then `autodeco eval-control --model DIR --prompts FILE --output-dir DIR`.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from autodeco.atomic import write_json_atomic
from autodeco.data import (
    IGNORE_INDEX,
    AutoDecoDataset,
    DataCollatorForCompletion,
    RowTokenizer,
)

__all__ = [
    "LOW_COMMANDS",
    "HIGH_COMMANDS",
    "LOW_COMMANDS_HELD_OUT",
    "HIGH_COMMANDS_HELD_OUT",
    "LOW",
    "HIGH",
    "CONTROL_SETTINGS_NAME",
    "insert_command",
    "insert_command_into_messages",
    "user_turn_suffix",
    "control_margin_loss",
    "completion_means",
    "ControlDataset",
    "DataCollatorWithControl",
    "save_control_settings",
    "load_control_settings",
]

# Used in training (drawn uniformly for each commanded twin).
LOW_COMMANDS: tuple[str, ...] = (
    "Answer with low randomness.",
    "Be precise and deterministic.",
    "Generate your answer with low diversity.",
    "Respond in a focused, conservative way.",
    "Use as little creativity as possible.",
    "Please be careful and consistent.",
)
HIGH_COMMANDS: tuple[str, ...] = (
    "Answer with high randomness.",
    "Be creative and diverse.",
    "Generate your answer with high diversity.",
    "Respond in an exploratory, adventurous way.",
    "Use as much creativity as possible.",
    "Please be playful and unpredictable.",
)
# Never used in training: how well control generalises to wordings the heads have not seen.
LOW_COMMANDS_HELD_OUT: tuple[str, ...] = (
    "Keep the randomness of your answer minimal.",
    "Stay predictable and avoid surprises.",
    "Reply in a strict, methodical manner.",
)
HIGH_COMMANDS_HELD_OUT: tuple[str, ...] = (
    "Let your answer be wild and surprising.",
    "Make the response as varied as you can.",
    "Take risks and try unusual ideas.",
)

LOW, HIGH = -1, 1  # directions: the commanded mean should be below (low) or above (high) the plain one
# Written beside the trained heads by `autodeco train --control-share ...`: which phrasings training saw.
CONTROL_SETTINGS_NAME = "autodeco_control.json"
_SENTINEL = "\u2063AUTODECO_COMMAND_SENTINEL\u2063"


def _check_command(command) -> None:
    if not isinstance(command, str) or not command.strip():
        raise ValueError(f"command must be a non-empty string such as 'Answer with low randomness.', got {command!r}.")


def user_turn_suffix(tokenizer) -> str | None:
    """What the tokenizer's chat template writes after a user message's content up to the generation prompt's end
    (e.g. "<|im_end|>\\n<|im_start|>assistant\\n"), or None when there is no chat template or it cannot tell.

    Found by rendering one user turn whose content is a sentinel and taking the text after the sentinel.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # a template that refuses a lone user turn (jinja2 errors of any kind): no suffix known
        return None
    if not isinstance(text, str) or text.count(_SENTINEL) != 1:
        return None
    return text.split(_SENTINEL, 1)[1]


def insert_command(prompt: str, command: str, tokenizer=None) -> str:
    """`prompt` with `command` at the end of its (last) user message.

    prompt: an already formatted prompt. When the tokenizer has a chat template and the prompt ends with the
    template's user-turn suffix (see user_turn_suffix), the command goes right before that suffix, on a line of
    its own. Otherwise (no chat template, or a prompt the template did not write) the command is appended to the
    prompt's text, before its trailing whitespace (so "problem\\n" becomes "problem\\ncommand\\n").
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string (a formatted prompt), got {type(prompt).__name__}.")
    _check_command(command)
    suffix = user_turn_suffix(tokenizer)
    if suffix and prompt.endswith(suffix):
        body = prompt[: len(prompt) - len(suffix)]
        return f"{body}\n{command}{suffix}" if body.strip() else f"{body}{command}{suffix}"
    body = prompt.rstrip()
    tail = prompt[len(body):]
    return f"{body}\n{command}{tail}" if body else f"{command}{tail}"


def insert_command_into_messages(messages: list[dict], command: str) -> list[dict]:
    """A copy of chat `messages` whose last user message has "\\n" + `command` appended to its content."""
    _check_command(command)
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}.")
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in messages]
        raise ValueError(
            f"messages has no user message (roles: {roles}), so there is nowhere to put the command {command!r}; "
            "add a user turn."
        )
    out = copy.deepcopy(messages)
    last = out[users[-1]]
    content = last.get("content")
    if not isinstance(content, str):
        raise ValueError(
            f"messages[{users[-1]}].content must be a string to append the command to, got {type(content).__name__}."
        )
    last["content"] = f"{content}\n{command}" if content.strip() else command
    return out


# ---------------------------------------------------------------------------------------------------- loss


def control_margin_loss(plain_mean: torch.Tensor, commanded_mean: torch.Tensor, direction: torch.Tensor,
                        margin: float) -> torch.Tensor:
    """mean_k relu(margin - direction_k * (commanded_mean_k - plain_mean_k)): a margin ranking loss.

    plain_mean, commanded_mean: [K] a row's mean predicted T (or P) without and with the command;
    direction: [K] +1 (high command: the commanded mean should be higher) or -1 (low). Zero once every
    commanded mean is at least `margin` on the right side of its plain one. K = 0 gives 0 (kept in the graph).
    """
    if not (plain_mean.dim() == 1 and plain_mean.shape == commanded_mean.shape == direction.shape):
        raise ValueError(
            f"control_margin_loss: plain_mean {tuple(plain_mean.shape)}, commanded_mean {tuple(commanded_mean.shape)} "
            f"and direction {tuple(direction.shape)} must all be the same 1-D shape [K]."
        )
    if not margin >= 0:
        raise ValueError(f"control_margin_loss: margin must be >= 0, got {margin!r}.")
    if plain_mean.numel() == 0:
        return (commanded_mean.sum() + plain_mean.sum()) * 0.0
    direction = direction.to(commanded_mean.dtype)
    return torch.relu(margin - direction * (commanded_mean - plain_mean)).mean()


def completion_means(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean of `values` (T or P, [B, L]) over its supervised tokens -> [B] float32.

    Position i predicts label i + 1 (as in the losses), so values[:, :-1] is averaged where labels[:, 1:] != -100.
    A row with no supervised token gives 0.
    """
    if values.shape != labels.shape:
        raise ValueError(f"completion_means: values {tuple(values.shape)} and labels {tuple(labels.shape)} differ.")
    mask = (labels[:, 1:] != IGNORE_INDEX).to(values.device)  # [B, L-1]
    shifted = values[:, :-1].float()  # [B, L-1]
    total = torch.where(mask, shifted, torch.zeros_like(shifted)).sum(dim=1)  # [B]
    return total / mask.sum(dim=1).clamp_min(1)


# ---------------------------------------------------------------------------------------------------- data


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
            _check_command(command)
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


# ---------------------------------------------------------------------------------------------------- settings


def save_control_settings(directory, *, share: float, margin: float, weight: float, seed: int,
                          low_commands: Sequence[str] = LOW_COMMANDS, high_commands: Sequence[str] = HIGH_COMMANDS,
                          extra: dict | None = None) -> Path:
    """Write CONTROL_SETTINGS_NAME beside the heads: the control options and the phrasings training saw."""
    path = Path(directory) / CONTROL_SETTINGS_NAME
    write_json_atomic(path, {
        "share": share, "margin": margin, "weight": weight, "seed": seed,
        "low_commands": list(low_commands), "high_commands": list(high_commands),
        "low_commands_held_out": list(LOW_COMMANDS_HELD_OUT), "high_commands_held_out": list(HIGH_COMMANDS_HELD_OUT),
        **(extra or {}),
    })
    return path


def load_control_settings(directory) -> dict | None:
    """The CONTROL_SETTINGS_NAME json of a model directory, or None when it has none (not trained with control)."""
    path = Path(directory) / CONTROL_SETTINGS_NAME
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); delete it or rewrite it with save_control_settings.") from None
    for key in ("low_commands", "high_commands"):
        value = settings.get(key)
        if not (isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value)):
            raise ValueError(f"{path}: '{key}' must be a non-empty list of phrasings, got {value!r}.")
    return settings
