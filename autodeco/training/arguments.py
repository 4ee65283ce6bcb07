"""AutoDecoTrainingArguments: every setting of a head-training run in one `TrainingArguments` dataclass.

    from autodeco.training import AutoDecoTrainingArguments
    args = AutoDecoTrainingArguments(output_dir="runs/heads", heads="top_p", control_share=0.3)

Fields the paper fixes carry its defaults with the reason in their help; autodeco's own settings (which heads,
max_length, the losses' options, fresh-head shape, decoding control) are fields too, so `autodeco train` gets
every one of them, and every Trainer field, as a flag (HfArgumentParser; autodeco/cli/train.py).
See docs/training.md for the full table.
"""

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import TrainingArguments
from transformers.integrations import is_tensorboard_available
from transformers.trainer_utils import SaveStrategy, SchedulerType

from autodeco.training.engines import default_use_cpu

__all__ = [
    "AutoDecoTrainingArguments",
    "DEFAULT_TRAINING_ARGUMENTS",
    "FORCED_TRAINING_ARGUMENTS",
    "HEADS_CHOICES",
    "build_training_arguments",
]

# --heads value -> (train the temperature head, train the top-p head)
HEADS_CHOICES = {"both": (True, True), "temperature": (True, False), "top_p": (False, True)}
# The batches are the collator's dict of tensors; removing "unused" columns or guessing label names from the
# forward signature would only get in the way.
FORCED_TRAINING_ARGUMENTS = {"remove_unused_columns": False, "label_names": ["labels"]}


def _default_report_to() -> str:
    return "tensorboard" if is_tensorboard_available() else "none"


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class AutoDecoTrainingArguments(TrainingArguments):
    """TrainingArguments with the paper's defaults for head training, plus autodeco's own settings."""

    # ---- TrainingArguments fields whose defaults follow the paper (the reason is in each help)
    max_steps: int = field(default=400, metadata=_help(
        "optimizer steps to train for; the paper trains its heads for ~400 steps on ~6K samples"))
    per_device_train_batch_size: int = field(default=4, metadata=_help(
        "sequences per micro-batch on each device; 4 x 4 accumulation = 16 sequences per step, so 400 steps are "
        "about one pass over ~6K samples"))
    gradient_accumulation_steps: int = field(default=4, metadata=_help(
        "micro-batches per optimizer step; the loss is the exact mean over all their supervised tokens (with N "
        "processes divide it by N to keep 16 sequences per step)"))
    learning_rate: float = field(default=5e-5, metadata=_help(
        "peak AdamW learning rate, cosine-decayed after a 10%% warmup; with 256 hidden units and a zero-initialised "
        "output layer, 400 steps move T by a few units of logit but not wildly (mid-range of the 5e-6..1e-4 used "
        "for heads)"))
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata=_help(
        "learning-rate schedule; cosine: a smooth decay to 0 over the short run"))
    warmup_steps: float = field(default=0.1, metadata=_help(
        "warmup steps; a float < 1 is a ratio of max_steps (0.1: 10%% linear warmup)"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay; the heads are tiny, nothing to "
                                                             "regularise"))
    max_grad_norm: float = field(default=1.0, metadata=_help(
        "gradient clipping; guards against rare huge-gradient tokens (T near its bounds)"))
    seed: int = field(default=42, metadata=_help("seed of the data order, the easy-token mask draws and fresh heads"))
    logging_steps: float = field(default=10, metadata=_help("optimizer steps per logging window"))
    logging_first_step: bool = field(default=True, metadata=_help("log the first step too (fresh heads' losses)"))
    save_strategy: SaveStrategy | str = field(default="steps", metadata=_help("when to write checkpoint-* dirs"))
    save_steps: float = field(default=100, metadata=_help(
        "steps between checkpoints; 4 per paper run, each a few MB (heads + AdamW state, never the base)"))
    ddp_find_unused_parameters: bool | None = field(default=False, metadata=_help(
        "every trainable parameter gets a gradient every step, so DDP need not search for unused ones"))
    report_to: None | str | list[str] = field(default_factory=_default_report_to, metadata=_help(
        "where logs go; default tensorboard when it is installed, else none"))
    dataloader_pin_memory: bool = field(default_factory=torch.cuda.is_available, metadata=_help(
        "pin batches in memory; default only with CUDA (pinning without a GPU only draws a warning)"))
    use_cpu: bool = field(default_factory=default_use_cpu, metadata=_help(
        "train on CPU processes; default True when torch sees no accelerator, so the shipped accelerate configs "
        "(DeepSpeed included, which would otherwise see one process) work unchanged on a CPU-only machine"))
    remove_unused_columns: bool = field(default=False, metadata=_help(
        "fixed False for AutoDeco: the collator's batch goes to the model as is"))
    label_names: list[str] | None = field(default_factory=lambda: ["labels"], metadata=_help(
        "fixed ['labels'] for AutoDeco: the collator's batch goes to the model as is"))

    # ---- autodeco's own settings
    heads: Literal["both", "temperature", "top_p"] = field(default="both", metadata=_help(
        "which head(s) to train; the other stays frozen and bit-identical (default both)"))
    max_length: int = field(default=4096, metadata=_help(
        "tokens per example at most; longer rows are cut from the right (default 4096)"))
    skip_bad_rows: bool = field(default=False, metadata=_help(
        "skip (and count) malformed data rows instead of stopping at the first one"))
    easy_token_mask_ratio: float | None = field(default=None, metadata=_help(
        "share of easy tokens (base argmax == label) dropped from the temperature loss (default: the model's "
        "config; fresh heads 0.6 as in the paper)"))
    dft: bool | None = field(default=None, metadata=_help(
        "weight each token's loss by the base's probability of the label (default: the model's config; fresh "
        "heads on, as in the paper)"))
    soft_top_p_alpha: float | None = field(default=None, metadata=_help(
        "steepness of the soft top-p mask (default: the model's config; fresh heads 30, as in the paper)"))
    max_temperature: float | None = field(default=None, metadata=_help(
        "fresh heads only: T = max_temperature * sigmoid(...) (default 2.0)"))
    head_hidden_size: int | None = field(default=None, metadata=_help(
        "fresh heads only: hidden width of each head MLP (default 256, as in the paper)"))
    control_share: float = field(default=0.0, metadata=_help(
        "decoding control: share of training rows that also appear with a low- or high-randomness command in the "
        "user message, trained with a margin ranking loss on mean T and P (default 0: off; e.g. 0.3)"))
    control_margin: float = field(default=0.1, metadata=_help(
        "margin of the control ranking loss: the commanded mean T (and P) should differ from the plain one by at "
        "least this much in the command's direction (default 0.1)"))
    control_weight: float = field(default=1.0, metadata=_help(
        "weight of the control loss added to the ordinary losses (default 1.0)"))
    fused_loss: bool = field(default=True, metadata=_help(
        "compute the head losses chunk by chunk from the final hidden states, never holding the base's [batch, "
        "sequence, vocabulary] logits (docs/training.md); --no-fused-loss keeps the full-logits path"))
    control_seed: int | None = field(default=None, metadata=_help(
        "seed that picks the commanded rows, their direction and phrasing (default: seed)"))

    def __post_init__(self):
        for key, value in FORCED_TRAINING_ARGUMENTS.items():
            if getattr(self, key) != value:
                raise ValueError(
                    f"TrainingArguments.{key} must be {value!r} for AutoDeco training (the collator's batch goes to "
                    f"the model as is); got {getattr(self, key)!r}."
                )
        self._check_autodeco_fields()
        super().__post_init__()

    def _check_autodeco_fields(self) -> None:
        if self.heads not in HEADS_CHOICES:
            raise ValueError(f"heads (--heads) must be one of {', '.join(HEADS_CHOICES)}, got {self.heads!r}.")
        if not (isinstance(self.max_length, int) and self.max_length > 0):
            raise ValueError(f"max_length (--max-length) must be a positive integer, got {self.max_length!r}.")
        if self.easy_token_mask_ratio is not None and not 0.0 <= self.easy_token_mask_ratio <= 1.0:
            raise ValueError(f"easy_token_mask_ratio must be in [0, 1], got {self.easy_token_mask_ratio}.")
        for name in ("soft_top_p_alpha", "max_temperature", "head_hidden_size"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be positive, got {value}.")
        if not 0.0 <= self.control_share <= 1.0:
            raise ValueError(f"--control-share must be in [0, 1], got {self.control_share}; e.g. 0.3 (0 turns "
                             "control off).")
        if not self.control_margin >= 0:
            raise ValueError(f"--control-margin must be >= 0, got {self.control_margin}; e.g. 0.1.")
        if not self.control_weight >= 0:
            raise ValueError(f"--control-weight must be >= 0, got {self.control_weight}; e.g. 1.0.")

    # ---- what the settings mean for a run

    @property
    def trains(self) -> tuple[bool, bool]:
        """(train the temperature head, train the top-p head)."""
        return HEADS_CHOICES[self.heads]

    def loss_settings(self) -> dict:
        """The AutoDecoConfig loss fields this run sets (which heads train; the losses' options when given)."""
        train_temperature, train_top_p = self.trains
        settings = {k: getattr(self, k) for k in ("easy_token_mask_ratio", "soft_top_p_alpha", "dft")
                    if getattr(self, k) is not None}
        return {**settings, "train_temperature": train_temperature, "train_top_p": train_top_p}

    def head_shape(self) -> dict:
        """Fresh-head shape options that were given (max_temperature, head_hidden_size)."""
        return {k: getattr(self, k) for k in ("max_temperature", "head_hidden_size") if getattr(self, k) is not None}

    def control(self) -> dict | None:
        """The decoding-control options ({share, margin, weight, seed}), or None when control is off."""
        if self.control_share == 0:
            return None
        return {"share": float(self.control_share), "margin": float(self.control_margin),
                "weight": float(self.control_weight),
                "seed": int(self.seed if self.control_seed is None else self.control_seed)}


# The TrainingArguments fields whose defaults AutoDeco changes (the paper's): {name: default}.
DEFAULT_TRAINING_ARGUMENTS = {
    f.name: f.default for f in dataclasses.fields(AutoDecoTrainingArguments)
    if f.name in AutoDecoTrainingArguments.__annotations__ and f.name in {g.name for g in dataclasses.fields(TrainingArguments)}
    and f.default is not dataclasses.MISSING and f.name not in FORCED_TRAINING_ARGUMENTS
}


def build_training_arguments(output_dir: str | os.PathLike, **overrides) -> AutoDecoTrainingArguments:
    """AutoDecoTrainingArguments(output_dir, **overrides), naming close matches for a misspelt field."""
    valid = {f.name for f in dataclasses.fields(AutoDecoTrainingArguments) if f.init}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        hints = {k: difflib.get_close_matches(k, valid, n=3) for k in unknown}
        raise ValueError(
            f"Unknown TrainingArguments field(s) {unknown}"
            + "".join(f"; did you mean {h} for '{k}'?" for k, h in hints.items() if h)
            + ". Valid names are the fields of transformers.TrainingArguments and autodeco's own (see "
            "autodeco.training.AutoDecoTrainingArguments): run "
            "`python -c \"import transformers; help(transformers.TrainingArguments)\"`."
        )
    return AutoDecoTrainingArguments(output_dir=str(output_dir), **overrides)
